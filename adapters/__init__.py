"""The adapter directory on disk: the artifact training writes and the server reads."""
