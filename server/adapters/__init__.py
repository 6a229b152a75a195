"""Per-tenant LoRA adapters in the running server: discovery on disk, validation, residency, hot swaps."""
