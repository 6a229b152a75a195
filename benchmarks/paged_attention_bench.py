"""Decode attention over the paged KV cache at the Llama-3-8B attention shape: the Triton paged kernel (tile and
warp variants) against the gathering torch reference and against what the contiguous cache ran (SDPA over
every row's whole max_len allocation under a mask), one layer, bf16.

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
        kernel = cache_access(positions, tables, block_size=BLOCK, fresh=False, kernel=True, group=4, dtype=dtype)
        gather = cache_access(positions, tables, block_size=BLOCK, fresh=False, kernel=False, group=4, dtype=dtype)
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
        for name, fn in variants.items():
            if name.startswith("paged"):
                torch.testing.assert_close(fn()[:, None], reference, atol=3e-2, rtol=3e-2)
            us = timed(fn)
            print(f"{rows:5d} {live:5d} {name:40} {us:9.1f} {live_bytes / us / 1e3:16.0f}", flush=True)
        del cache_k, cache_v, variants
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
