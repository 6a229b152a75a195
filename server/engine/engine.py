"""Builds the engine from a model path: weights, KV cache, adapter slots, decode step, scheduler thread."""

import logging
from dataclasses import dataclass

import torch

from server.engine.decode_step import EagerDecode, GraphedDecode
from server.engine.kv_cache import KVCache
from server.engine.lora_slots import AdapterSlots
from server.engine.model import EngineModel, check_supported
from server.engine.scheduler import Scheduler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    """Sizes fixed at start: they decide the memory the engine takes and the shapes it captures."""

    max_rows: int = 8  # requests decoding at once (KV cache rows)
    max_len: int = 4096  # prompt + answer tokens per request
    adapter_slots: int = 4  # adapters resident at once
    max_rank: int = 64  # larger ranks are refused; smaller ones are zero-padded to it
    prefill_chunk: int = 1024  # prompt tokens per forward; long prompts are split
    prefill_budget: int = 2048  # prompt tokens per scheduling step, so decoding rows never stall long
    cuda_graphs: bool = True  # capture decode steps on CUDA devices
    prefill_pad: int | None = None  # prompt chunks padded to a multiple of this; None: 64 on CUDA, 1 on CPU
    # torch.compile the decode steps' layers (fused elementwise ops: fewer kernels per step; each batch
    # bucket compiles once at start). None: on for CUDA, off on CPU (where every batch size would compile).
    compile: bool | None = None


class Engine:
    """The model with its cache, adapter slots and a running scheduler thread."""

    def __init__(self, model: EngineModel, cache: KVCache, adapters: AdapterSlots, scheduler: Scheduler, *,
                 config: EngineConfig):
        self.model, self.cache, self.adapters, self.scheduler = model, cache, adapters, scheduler
        self.config = config

    @classmethod
    def from_hf(cls, hf_model, *, config: EngineConfig, device, dtype, start: bool = True) -> "Engine":
        """Take the weights of a loaded transformers model (it can be dropped afterwards) and start the
        scheduler thread (``start=False`` leaves stepping to the caller).

        Raises:
            UnsupportedModel: not a Llama/Qwen2 model the engine can reproduce exactly.
        """
        check_supported(hf_model.config)
        device = torch.device(device)
        max_len = min(config.max_len, hf_model.config.max_position_embeddings)
        text = hf_model.config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        cache = KVCache(layers=text.num_hidden_layers, rows=config.max_rows, kv_heads=text.num_key_value_heads,
                        max_len=max_len, head_dim=head_dim, dtype=dtype, device=device)
        model = EngineModel.from_hf(hf_model, cache_len=cache.length, dtype=dtype, device=device)
        adapters = AdapterSlots(layers=model.shape.layers, dims=model.shape.lora_dims(), num_slots=config.adapter_slots,
                                max_rank=config.max_rank, dtype=dtype, device=device)
        model.stack_adapters(adapters)
        compiled = config.compile if config.compile is not None else device.type == "cuda"
        if compiled:
            model.compile_decode()
        if device.type == "cuda" and config.cuda_graphs:
            decode = GraphedDecode(model, cache, adapters, compiled=compiled)
            decode.capture()
        else:
            decode = EagerDecode(model, cache, adapters, compiled=compiled)
        scheduler = Scheduler(model, cache, adapters, decode=decode, prefill_chunk=config.prefill_chunk,
                              prefill_budget=config.prefill_budget,
                              prefill_pad=config.prefill_pad or (64 if device.type == "cuda" else 1))
        if start:
            scheduler.start()
        log.info("engine ready: %d rows x %d tokens (KV %.2f GiB), %d adapter slots of rank %d (%.2f GiB), %s %s%s",
                 config.max_rows, max_len, cache.nbytes() / 2**30, config.adapter_slots, config.max_rank,
                 adapters.nbytes() / 2**30, device, dtype, ", compiled decode" if compiled else "")
        return cls(model, cache, adapters, scheduler, config=config)

    @classmethod
    def from_pretrained(cls, path: str, *, config: EngineConfig, device=None, dtype=None) -> "Engine":
        """Load ``path`` (hub id or dir) with transformers and build the engine; bf16 on GPU, fp32 on CPU."""
        from transformers import AutoConfig, AutoModelForCausalLM

        check_supported(AutoConfig.from_pretrained(path))  # refuse before loading any weights
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        return cls.from_hf(hf_model, config=config, device=device, dtype=dtype)

    def close(self) -> None:
        self.scheduler.stop()
