"""Decode attention over the paged KV cache at the Llama-3-8B attention shape: the Triton paged kernel (tile and
warp variants) against the gathering torch reference, against what the contiguous cache ran (SDPA over every
row's whole max_len allocation under a mask), and against PyTorch's own length-aware candidates, one layer, bf16:

- FlexAttention over the paged cache: the cache's blocks viewed as one long key sequence, a block mask per
  step that lets each row see only its own blocks up to its length (built per step in the engine, since
  tables change: timed with and without building it);
- varlen attention (``torch.nn.attention.varlen.varlen_attn``, Flash Attention) reading the pages through a
  block table, where this torch and the block size allow it;
- varlen attention over keys first gathered into one packed sequence per row (what a non-paged varlen kernel
  needs: the gather is part of its cost).

A candidate this torch lacks, or that refuses the shape, is printed as unavailable with the reason.

GPU:  python benchmarks/paged_attention_bench.py
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.engine.paged_attention import (  # noqa: E402
    attend_cache,
    cache_access,
    decode_splits,
    grouped_attention,
    paged_decode,
)

HEADS, KV_HEADS, HEAD_DIM, BLOCK, MAX_LEN, LIVE = 32, 8, 128, 16, 2257, 1600
CANDIDATE_ROWS = (1, 128, 384)


def timed(fn, repeats=30) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats * 1000  # us


def main() -> int:
    dev, dtype = "cuda", torch.bfloat16
    max_blocks = -(-MAX_LEN // BLOCK)
    print(f"one layer, {HEADS} heads / {KV_HEADS} kv heads of {HEAD_DIM}, max_len {MAX_LEN}")
    print(f"{'rows':>5} {'live':>5} {'variant':40} {'us':>9} {'GB/s of live KV':>16}")
    for rows, live in ((1, 256), (1, LIVE), (4, LIVE), (8, LIVE), (64, LIVE), (128, LIVE), (256, LIVE), (384, LIVE)):
        blocks = rows * max_blocks + 1
        cache_k = torch.randn(blocks, BLOCK, KV_HEADS, HEAD_DIM, device=dev, dtype=dtype)
        cache_v = torch.randn_like(cache_k)
        tables = (torch.randperm(blocks - 1, device=dev)[: rows * max_blocks] + 1).view(rows, max_blocks).int()
        positions = torch.full((rows, 1), live - 1, device=dev)
        q = torch.randn(rows, 1, HEADS, HEAD_DIM, device=dev, dtype=dtype)
        k = torch.randn(rows, 1, KV_HEADS, HEAD_DIM, device=dev, dtype=dtype)
        live_bytes = rows * live * KV_HEADS * HEAD_DIM * 2 * 2
        kernel = cache_access(positions, tables, block_size=BLOCK, kernel=True, group=4, dtype=dtype)
        gather = cache_access(positions, tables, block_size=BLOCK, kernel=False, group=4, dtype=dtype)
        variants = {f"paged kernel, tile {n}, {w} warps": (lambda n=n, w=w: paged_decode(
            q[:, 0], cache_k, cache_v, kernel.block_tables, kernel.lengths, block_n=n, num_warps=w, splits=1))
            for n in (32, 64, 128) for w in (4, 8)}
        split = decode_splits(rows, KV_HEADS)
        variants[f"paged kernel, default ({split}-way split)"] = lambda: paged_decode(
            q[:, 0], cache_k, cache_v, kernel.block_tables, kernel.lengths)
        variants["gathering reference"] = lambda: attend_cache(q, k, k, cache_k, cache_v, gather)
        # The contiguous cache: (rows, kv_heads, length, head_dim) read whole under an additive mask.
        length = -(-(MAX_LEN + 1) // 64) * 64
        if rows * KV_HEADS * length * HEAD_DIM * 2 * 2 < 60 * 2**30:
            keys = torch.randn(rows, KV_HEADS, length, HEAD_DIM, device=dev, dtype=dtype)
            visible = torch.arange(length, device=dev) <= positions[..., None]
            bias = torch.zeros(visible.shape, dtype=dtype, device=dev).masked_fill_(~visible, float("-inf"))
            mask = bias[:, None, None].expand(rows, 1, 4, 1, length).reshape(rows, 1, 4, length)
            variants["contiguous cache, whole rows (before)"] = lambda: grouped_attention(q, keys, keys, mask)
        cache_k[kernel.write_block, kernel.write_offset] = k  # the step's own token, as attend_cache writes it
        cache_v[kernel.write_block, kernel.write_offset] = k
        reference = attend_cache(q, k, k, cache_k, cache_v, gather)
        unavailable = {}
        # PyTorch's candidates at one small and two large batches (each shape compiles FlexAttention anew).
        candidates = _candidates(q[:, 0], cache_k, cache_v, kernel.block_tables, kernel.lengths) \
            if rows in CANDIDATE_ROWS and live == LIVE else {}
        for name, build in candidates.items():
            try:
                variants[name] = build()
            except Exception as error:  # noqa: BLE001 - a candidate this torch or shape does not support
                unavailable[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
        for name, fn in variants.items():
            if name.startswith("paged"):  # the engine's kernel: a wrong result stops the run
                torch.testing.assert_close(fn()[:, None], reference, atol=3e-2, rtol=3e-2)
            elif name in candidates:  # a candidate that fails at its first call is reported, not timed
                try:
                    torch.testing.assert_close(fn().reshape(rows, 1, HEADS, HEAD_DIM), reference, atol=3e-2, rtol=3e-2)
                except Exception as error:  # noqa: BLE001
                    unavailable[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
                    continue
            us = timed(fn)
            print(f"{rows:5d} {live:5d} {name:40} {us:9.1f} {live_bytes / us / 1e3:16.0f}", flush=True)
        for name, reason in unavailable.items():
            print(f"{rows:5d} {live:5d} {name:40} unavailable: {reason}", flush=True)
        del cache_k, cache_v, variants
        torch.cuda.empty_cache()
    return 0


def _candidates(q, cache_k, cache_v, tables, lengths) -> dict:
    """PyTorch's length-aware attention, each as a builder of a callable giving (rows, heads, head_dim) for one
    query token per row, q (rows, heads, head_dim)."""
    import inspect

    rows = q.shape[0]
    blocks = cache_k.shape[0]

    def flex(build_mask: bool):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        attend = torch.compile(flex_attention, dynamic=False)
        # Which row owns each physical block, and where in that row's sequence the block starts.
        owner = torch.full((blocks,), -1, device=q.device, dtype=torch.int32)
        start = torch.zeros(blocks, device=q.device, dtype=torch.int32)
        used = tables.shape[1]
        owner[tables.long().flatten()] = torch.arange(rows, device=q.device, dtype=torch.int32).repeat_interleave(used)
        start[tables.long().flatten()] = (torch.arange(used, device=q.device, dtype=torch.int32) * BLOCK).repeat(rows)
        owner[0] = -1  # the scratch block belongs to nobody

        def visible(b, h, q_index, kv_index):
            block = kv_index // BLOCK
            return (owner[block] == q_index) & (start[block] + kv_index % BLOCK < lengths[q_index])

        def mask():
            # Its kernel's key tile (64-128) must divide the mask's key block: 128 tokens, 8 cache blocks, which
            # may belong to different rows (then the block is partial, and computed under the mask).
            return create_block_mask(visible, None, None, rows, blocks * BLOCK, device=q.device,
                                     BLOCK_SIZE=(128, 128))

        keys = cache_k.view(1, blocks * BLOCK, KV_HEADS, HEAD_DIM).transpose(1, 2)
        values = cache_v.view(1, blocks * BLOCK, KV_HEADS, HEAD_DIM).transpose(1, 2)
        queries = q.transpose(0, 1)[None]  # (1, heads, rows, head_dim): each row is one query position
        fixed = mask()
        return lambda: attend(queries, keys, values, block_mask=mask() if build_mask else fixed,
                              enable_gqa=True)[0].transpose(0, 1)

    def varlen():
        from torch.nn.attention.varlen import varlen_attn

        return varlen_attn, set(inspect.signature(varlen_attn).parameters)

    cu_q = torch.arange(rows + 1, device=q.device, dtype=torch.int32)
    cu_k = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    top = int(lengths.max())

    def varlen_paged():
        attend, takes = varlen()
        if not {"block_table", "enable_gqa"} <= takes:
            raise TypeError(f"varlen_attn of torch {torch.__version__} takes no block_table / enable_gqa")
        return lambda: attend(q, cache_k, cache_v, cu_q, None, 1, top, enable_gqa=True, seqused_k=lengths,
                              block_table=tables)

    def varlen_gathered():
        attend, takes = varlen()
        # The packed slots: each row's live tokens, read through its block table.
        slots = torch.cat([tables[r, torch.arange(int(lengths[r]), device=q.device) // BLOCK].long() * BLOCK
                           + torch.arange(int(lengths[r]), device=q.device) % BLOCK for r in range(rows)])
        flat_k, flat_v = cache_k.view(-1, KV_HEADS, HEAD_DIM), cache_v.view(-1, KV_HEADS, HEAD_DIM)
        if "enable_gqa" in takes:
            return lambda: attend(q, flat_k[slots], flat_v[slots], cu_q, cu_k, 1, top, enable_gqa=True)
        # Without grouped-query support each kv head is repeated for its query heads: part of the cost.
        group = HEADS // KV_HEADS
        return lambda: attend(q, flat_k[slots].repeat_interleave(group, 1), flat_v[slots].repeat_interleave(group, 1),
                              cu_q, cu_k, 1, top)

    return {
        "flex attention, mask given": lambda: flex(False),
        "flex attention, mask built each step": lambda: flex(True),
        "varlen (flash), paged block table": varlen_paged,
        "varlen (flash), keys gathered first": varlen_gathered,
    }


if __name__ == "__main__":
    raise SystemExit(main())
