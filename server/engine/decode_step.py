"""One batched decode step over cache rows 0..n-1: eager (CPU, fallback) or replayed CUDA graphs (GPU),
either one optionally through the model's compiled layer (``compiled=True``, after compile_decode).

Both take python lists (token, position, adapter slot per row) and the rows' block tables (n, max_blocks)
int32 on the host (idle rows: position 0 and an all-scratch table), and return float32 logits whose
first n rows belong to those rows. The tokens may instead be a (n,) tensor on the device: the step before's
picks, which the host has not read (see Scheduler.decode_ahead).
"""

import logging

import torch

from server.engine.kv_cache import PagedKVCache
from server.engine.lora_slots import AdapterSlots
from server.engine.segments import DECODE_BLOCK, Segments, decode_capacity, fill_segments, segment_rows, to_segments

log = logging.getLogger(__name__)


class EagerDecode:
    """Runs the model forward directly; shapes follow the batch (no padding)."""

    def __init__(self, model, cache: PagedKVCache, adapters: AdapterSlots | None, *, compiled: bool = False):
        self.model, self.cache, self.adapters = model, cache, adapters
        self.compiled = compiled  # every new batch size compiles once: meant for tests and small row counts

    def __call__(self, tokens: list[int] | torch.Tensor, positions: list[int], slots: list[int],
                 tables: torch.Tensor) -> torch.Tensor:
        device = self.model.device
        segments = None
        if self.adapters is not None and any(slots):
            segments = to_segments(segment_rows(slots), device=device)
        if not isinstance(tokens, torch.Tensor):
            tokens = torch.tensor(tokens, device=device)
        return self.model.forward(
            tokens[:, None], torch.tensor(positions, device=device)[:, None],
            cache=self.cache, block_tables=tables.to(device), adapters=self.adapters, segments=segments,
            compiled=self.compiled,
        )


class GraphedDecode:
    """Decode steps captured as CUDA graphs, one per (batch bucket, with/without adapters).

    Inputs live in static device buffers (the rows' adapter segments included); adapter weights live
    in the slot tensors, so loading an adapter (a copy into its slot) needs no re-capture; the rows'
    block tables are a static buffer too. A batch runs in the smallest bucket that holds its highest
    row; rows past n are idle rows writing to the scratch block.
    """

    def __init__(self, model, cache: PagedKVCache, adapters: AdapterSlots | None, *, buckets: tuple[int, ...] = (),
                 compiled: bool = False):
        self.model, self.cache, self.adapters = model, cache, adapters
        default = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256]
        self.buckets = sorted({b for b in (buckets or default) if b < cache.rows} | {cache.rows})
        device, rows = model.device, cache.rows
        self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.tables = torch.zeros(rows, cache.max_blocks, dtype=torch.int32, device=device)
        slots = adapters.num_slots if adapters is not None else 0
        meta_len = decode_capacity(rows, slots) * (1 + DECODE_BLOCK)
        self.segment_meta = torch.zeros(meta_len, dtype=torch.int32, device=device)
        self.compiled = compiled
        # Two sets of page-locked inputs, used in turn: a step's inputs are written while the step before is
        # still queued (Scheduler.decode_ahead), and its copies may not have run yet.
        self._staging = [_Staging(rows, cache.max_blocks, meta_len) for _ in range(2)]
        self._turn = 0
        self._planned: tuple | None = None  # the (bucket, slots) whose plan segment_meta holds
        self.graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def _forward(self, bucket: int, lora: bool) -> torch.Tensor:
        return self.model.forward(
            self.tokens[:bucket], self.positions[:bucket], cache=self.cache, block_tables=self.tables[:bucket],
            adapters=self.adapters if lora else None, segments=self._segments(bucket) if lora else None,
            compiled=self.compiled,
        )

    def _segments(self, bucket: int) -> Segments:
        # A static launch size: as many blocks as a step of this bucket can need (the kernels skip
        # the ones the step's plan leaves empty).
        return Segments(meta=self.segment_meta, blocks=decode_capacity(bucket, self.adapters.num_slots),
                        block_m=DECODE_BLOCK)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket (largest first so smaller graphs reuse its memory pool)."""
        pool = torch.cuda.graph_pool_handle()
        variants = (False, True) if self.adapters is not None else (False,)
        side = torch.cuda.Stream()
        for bucket in sorted(self.buckets, reverse=True):
            for lora in variants:
                if lora:  # a valid plan for this bucket (every row without an adapter): warm-ups read real rows
                    self._plan(bucket, [0] * bucket, self._staging[0])
                    torch.cuda.current_stream().synchronize()  # the pinned host plan is rewritten next bucket
                side.wait_stream(torch.cuda.current_stream())
                # Warm-up allocates workspaces outside the graph and, when compiled, compiles this shape
                # (a compile inside the capture would fail: it benchmarks and synchronizes).
                with torch.cuda.stream(side):
                    for _ in range(2):
                        self._forward(bucket, lora)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = self._forward(bucket, lora)
                self.graphs[(bucket, lora)] = (graph, logits)
        torch.cuda.synchronize()
        self._planned = None  # the graphs' plan buffer holds a capture plan, not a step's
        log.info("captured %d %sdecode graphs for buckets %s", len(self.graphs),
                 "compiled " if self.compiled else "", self.buckets)

    def __call__(self, tokens: list[int] | torch.Tensor, positions: list[int], slots: list[int],
                 tables: torch.Tensor) -> torch.Tensor:
        n = len(positions)
        bucket = next(b for b in self.buckets if b >= n)
        lora = self.adapters is not None and any(slots)
        staging = self._staging[self._turn]
        self._turn ^= 1
        staging.writable()
        on_device = isinstance(tokens, torch.Tensor)
        host = staging.inputs_np
        host[:, n:bucket] = 0
        host[0, :n] = 0 if on_device else tokens
        host[1, :n] = positions
        staging.tables_np[n:bucket] = 0
        staging.tables_np[:n] = tables.numpy()
        self.tokens[:bucket, 0].copy_(staging.inputs[0, :bucket], non_blocking=True)
        self.positions[:bucket, 0].copy_(staging.inputs[1, :bucket], non_blocking=True)
        self.tables[:bucket].copy_(staging.tables[:bucket], non_blocking=True)
        if lora and self._planned != (bucket, slots):  # most steps keep the previous step's batch
            self._plan(bucket, slots + [0] * (bucket - n), staging)  # idle rows too
            self._planned = (bucket, list(slots))
        staging.copied.record()
        if on_device:
            self.tokens[:n, 0].copy_(tokens[:n])
        graph, logits = self.graphs[(bucket, lora)]
        graph.replay()
        return logits

    def _plan(self, bucket: int, slots: list[int], staging: "_Staging") -> None:
        """Write the block plan of ``bucket`` rows with these slots into the graphs' plan buffer. Every
        block row must be below ``bucket``: the kernels index the bucket's tensors with them."""
        fill_segments(staging.meta, segment_rows(slots))
        self.segment_meta.copy_(staging.meta, non_blocking=True)


class _Staging:
    """One set of a step's page-locked inputs (with numpy views: a step writes them with numpy's cheap slice
    assignments; a torch op on a small host tensor costs microseconds of dispatch, and a one-row step is
    ~4.5 ms at 8B), and an event after their copies to the device."""

    def __init__(self, rows: int, max_blocks: int, meta_len: int):
        self.inputs = torch.zeros(2, rows, dtype=torch.long).pin_memory()  # tokens, positions
        self.inputs_np = self.inputs.numpy()
        self.tables = torch.zeros(rows, max_blocks, dtype=torch.int32).pin_memory()
        self.tables_np = self.tables.numpy()
        self.meta = torch.zeros(meta_len, dtype=torch.int32).pin_memory()
        self.copied = torch.cuda.Event()

    def writable(self) -> None:
        """Wait until the copies last made from this set have run (at once unless two steps are queued)."""
        self.copied.synchronize()
