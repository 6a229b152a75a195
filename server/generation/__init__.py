"""Everything that turns a prompt into answer text: the generator protocol and its implementations."""
