"""Builds the engine from a model path: weights, KV cache, adapter slots, decode step, scheduler thread."""

import logging
from dataclasses import dataclass

import torch

from server.engine.decode_step import EagerDecode, GraphedDecode
from server.engine.kv_cache import PagedKVCache
from server.engine.lora_slots import AdapterSlots
from server.engine.model import EngineModel, check_supported
from server.engine.scheduler import Scheduler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    """Sizes fixed at start: they decide the memory the engine takes and the shapes it captures."""

    max_rows: int = 8  # requests decoding at once (decode batch rows; their KV lives in blocks)
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
    block_size: int = 16  # tokens per KV cache block (also the prefix cache's unit of sharing)
    # KV cache blocks; None: on CUDA as many as the free GPU memory holds after the weights, adapter slots
    # and kv_headroom_gib, on CPU enough for every row at max_len. Either way at most twice what max_rows
    # sequences of max_len can use (the rest of that room keeps shared prefixes).
    kv_blocks: int | None = None
    kv_headroom_gib: float = 8.0  # GPU memory left for activations, captured graphs and compiled kernels
    prefix_cache: bool = True  # share the KV blocks of prompts' common leading tokens, evicted LRU
    # Decoding requests ride along prompt forwards (chunked prefill mixed into decode steps), so a running
    # batch keeps decoding while new prompts prefill; off: prompts first, then a decode step of their own.
    mix_decode: bool = True
    # Greedy decode steps are launched before the host reads the step before's tokens (the device feeds its
    # own picks forward), so the host's bookkeeping between steps overlaps the GPU's step. A request that
    # ends on a stop token costs one discarded row of the step after. Sampled steps are read first.
    decode_ahead: bool = True
    # A forward of several prompts runs their real tokens only (packed into one row; attention lays them out
    # again), so no GEMM works on the padding of a group of prompts of different lengths.
    pack_prompts: bool = True


class Engine:
    """The model with its cache, adapter slots and a running scheduler thread."""

    def __init__(self, model: EngineModel, cache: PagedKVCache, adapters: AdapterSlots, scheduler: Scheduler, *,
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
        model = EngineModel.from_hf(hf_model, cache_len=max_len, dtype=dtype, device=device)
        return cls.from_model(model, config=config, start=start)

    @classmethod
    def from_model(cls, model: EngineModel, *, config: EngineConfig, start: bool = True) -> "Engine":
        """Build the cache, adapter slots, decode step and scheduler around ``model`` (whose transformers
        original may be gone: the KV cache is sized from the GPU memory free now)."""
        device, dtype, shape = model.device, model.dtype, model.shape
        max_len = min(config.max_len, shape.max_positions, model.cos.shape[0])
        adapters = AdapterSlots(layers=shape.layers, dims=shape.lora_dims(), num_slots=config.adapter_slots,
                                max_rank=config.max_rank, dtype=dtype, device=device)
        model.stack_adapters(adapters)
        num_blocks = kv_blocks(config, max_len=max_len, device=device, block_bytes=PagedKVCache.block_bytes(
            layers=shape.layers, block_size=config.block_size, kv_heads=shape.kv_heads, head_dim=shape.head_dim,
            dtype=dtype))
        cache = PagedKVCache(layers=shape.layers, num_blocks=num_blocks, block_size=config.block_size,
                             kv_heads=shape.kv_heads, head_dim=shape.head_dim, max_len=max_len, rows=config.max_rows,
                             dtype=dtype, device=device, prefix_cache=config.prefix_cache)
        compiled = config.compile if config.compile is not None else device.type == "cuda"
        if compiled:
            model.compile_decode()
        if device.type == "cuda" and config.cuda_graphs:
            decode = GraphedDecode(model, cache, adapters, compiled=compiled)
            decode.capture()
        else:
            decode = EagerDecode(model, cache, adapters, compiled=compiled)
        scheduler = Scheduler(model, cache, adapters, decode=decode, prefill_chunk=config.prefill_chunk,
                              prefill_budget=config.prefill_budget, mix_decode=config.mix_decode,
                              decode_ahead=config.decode_ahead, pack_prompts=config.pack_prompts,
                              prefill_pad=config.prefill_pad or (64 if device.type == "cuda" else 1))
        if start:
            scheduler.start()
        log.info("engine ready: %d rows of up to %d tokens, KV cache %d blocks of %d tokens (%.2f GiB), "
                 "%d adapter slots of rank %d (%.2f GiB), %s %s%s",
                 config.max_rows, max_len, num_blocks, config.block_size, cache.nbytes() / 2**30,
                 config.adapter_slots, config.max_rank,
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


def kv_blocks(config: EngineConfig, *, max_len: int, device: torch.device, block_bytes: int) -> int:
    """How many KV cache blocks to allocate (see EngineConfig.kv_blocks), scratch block included.

    Raises:
        ValueError: the free GPU memory holds fewer blocks than one sequence of max_len needs.
    """
    per_sequence = -(-max_len // config.block_size)
    most = 2 * config.max_rows * per_sequence + 1
    if config.kv_blocks is not None:
        return config.kv_blocks  # as asked: a request longer than the cache is refused at submit
    if device.type != "cuda":
        return config.max_rows * per_sequence + 1
    free, _ = torch.cuda.mem_get_info(device)
    blocks = min(most, int((free - config.kv_headroom_gib * 2**30) // block_bytes))
    if blocks < per_sequence + 1:
        raise ValueError(f"engine KV cache: the free GPU memory ({free / 2**30:.1f} GiB, less kv_headroom_gib "
                         f"{config.kv_headroom_gib:g}) holds {max(blocks, 0)} blocks of {config.block_size} tokens, "
                         f"fewer than one request of max_len {max_len} needs ({per_sequence + 1} with scratch); "
                         f"lower max_len or kv_headroom_gib, or free GPU memory")
    return blocks
