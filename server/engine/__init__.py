"""Multi-adapter generation engine: own Llama/Qwen2 forward, KV cache, batched LoRA slots, continuous batching."""
