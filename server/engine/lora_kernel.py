"""Triton BGMV for decode steps: every row adds its own slot's LoRA delta into the base output.

Two kernels per module group (shrink, then expand in place) instead of three torch ops over every
slot; each row reads only its own slot's A and, of the block-diagonal B, only its module's rank
rows. Absent Triton (CPU builds), callers use the torch path.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None


def bgmv_available(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda


if triton is not None:

    @triton.jit
    def _shrink_kernel(x_ptr, a_ptr, h_ptr, slots_ptr, IN, stride_x, stride_ak, stride_aw,
                       W: tl.constexpr, W_P2: tl.constexpr, BLOCK_K: tl.constexpr):
        row = tl.program_id(0)
        slot = tl.load(slots_ptr + row)
        has = slot > 0
        first = tl.maximum(slot - 1, 0) * W
        w = tl.arange(0, W_P2)
        wmask = (w < W) & has
        acc = tl.zeros((BLOCK_K, W_P2), dtype=tl.float32)
        for k0 in range(0, IN, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            kmask = (k < IN) & has
            xv = tl.load(x_ptr + row * stride_x + k, mask=kmask, other=0.0).to(tl.float32)
            av = tl.load(a_ptr + k[:, None] * stride_ak + (first + w)[None, :] * stride_aw,
                         mask=kmask[:, None] & wmask[None, :],
                         other=0.0).to(tl.float32)
            acc += xv[:, None] * av
        h = tl.sum(acc, axis=0)
        h = h.to(x_ptr.dtype.element_ty).to(tl.float32)  # round as the two-matmul reference does
        tl.store(h_ptr + row * W_P2 + w, h, mask=w < W)

    @triton.jit
    def _expand_kernel(h_ptr, b_ptr, out_ptr, slots_ptr, OUT, stride_b, stride_out, OFF1, OFF2,
                       R: tl.constexpr, W: tl.constexpr, W_P2: tl.constexpr, BLOCK_N: tl.constexpr):
        row = tl.program_id(0)
        block = tl.program_id(1)
        slot = tl.load(slots_ptr + row)
        has = slot > 0
        first = tl.maximum(slot - 1, 0) * W
        n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = (n < OUT) & has
        module = (n >= OFF1).to(tl.int32) + (n >= OFF2).to(tl.int32)  # B is block-diagonal over modules
        w = tl.arange(0, W_P2)
        h = tl.load(h_ptr + row * W_P2 + w, mask=(w < W) & has, other=0.0)
        wanted = ((w[:, None] // R) == module[None, :]) & (w[:, None] < W) & nmask[None, :]
        bv = tl.load(b_ptr + (first + w)[:, None] * stride_b + n[None, :], mask=wanted, other=0.0).to(tl.float32)
        delta = tl.sum(h[:, None] * bv, axis=0)
        ptr = out_ptr + row * stride_out + n
        current = tl.load(ptr, mask=nmask, other=0.0).to(tl.float32)
        tl.store(ptr, (current + delta).to(out_ptr.dtype.element_ty), mask=nmask)


def bgmv_(base: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor, *,
          rank: int, out_offsets: tuple[int, ...]) -> torch.Tensor:
    """In place: base[i] += x[i] @ a[:, s*W:(s+1)*W] @ b[s*W:(s+1)*W] with s = slots[i] - 1, W = modules * rank.

    ``a`` (in, slots * W) may be any strided view (e.g. the transpose of a row-major weight).

    base (rows, out) and x (rows, in) contiguous in their last dim; slots (rows,) integer, 0 = no adapter;
    b block-diagonal: module j's rank rows only feed the columns from ``out_offsets[j]``.
    """
    rows, in_features = x.shape
    out_features = base.shape[1]
    width = rank * len(out_offsets)
    w_p2 = triton.next_power_of_2(width)
    h = torch.empty(rows, w_p2, dtype=torch.float32, device=x.device)
    block_k = max(16, min(256, 8192 // w_p2))
    _shrink_kernel[(rows,)](x, a, h, slots, in_features, x.stride(0), a.stride(0), a.stride(1), W=width, W_P2=w_p2,
                            BLOCK_K=block_k)
    offsets = list(out_offsets[1:]) + [out_features] * (3 - len(out_offsets))
    block_n = max(16, min(128, 8192 // w_p2))
    _expand_kernel[(rows, triton.cdiv(out_features, block_n))](
        h, b, base, slots, out_features, b.stride(0), base.stride(0), offsets[0], offsets[1],
        R=rank, W=width, W_P2=w_p2, BLOCK_N=block_n)
    return base
