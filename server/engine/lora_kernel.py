"""Triton BGMV for decode steps: every row adds its own slot's LoRA delta into the base output, one kernel.

Replaces the masked all-slots GEMMs on CUDA: reads only the slots the rows use and launches one
kernel per module group instead of three. Absent Triton (CPU builds), callers use the torch path.
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
    def _bgmv_kernel(x_ptr, a_ptr, b_ptr, out_ptr, slots_ptr, IN, OUT, stride_x, stride_a, stride_b, stride_out,
                     W: tl.constexpr, W_P2: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        row = tl.program_id(0)
        block = tl.program_id(1)
        slot = tl.load(slots_ptr + row)
        has = slot > 0
        first = tl.maximum(slot - 1, 0) * W  # this slot's first column of A / row of B
        w = tl.arange(0, W_P2)
        wmask = (w < W) & has
        h = tl.zeros((W_P2,), dtype=tl.float32)
        for k0 in range(0, IN, BLOCK_K):  # shrink: h = x[row] @ A[:, slot block]
            k = k0 + tl.arange(0, BLOCK_K)
            kmask = (k < IN) & has
            xv = tl.load(x_ptr + row * stride_x + k, mask=kmask, other=0.0).to(tl.float32)
            av = tl.load(a_ptr + k[:, None] * stride_a + (first + w)[None, :], mask=kmask[:, None] & wmask[None, :],
                         other=0.0).to(tl.float32)
            h += tl.sum(xv[:, None] * av, axis=0)
        h = h.to(x_ptr.dtype.element_ty).to(tl.float32)  # round like the two-matmul reference does
        n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = (n < OUT) & has
        bv = tl.load(b_ptr + (first + w)[:, None] * stride_b + n[None, :], mask=wmask[:, None] & nmask[None, :],
                     other=0.0).to(tl.float32)
        delta = tl.sum(h[:, None] * bv, axis=0)  # expand: h @ B[slot block, columns]
        ptr = out_ptr + row * stride_out + n
        current = tl.load(ptr, mask=nmask, other=0.0).to(tl.float32)
        tl.store(ptr, (current + delta).to(out_ptr.dtype.element_ty), mask=nmask)


def bgmv_(base: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor, *,
          width: int) -> torch.Tensor:
    """In place: base[i] += x[i] @ a[:, s*width:(s+1)*width] @ b[s*width:(s+1)*width] with s = slots[i] - 1.

    base (rows, out) and x (rows, in) contiguous in their last dim; slots (rows,) integer, 0 = no adapter.
    """
    rows, in_features = x.shape
    out_features = base.shape[1]
    w_p2 = triton.next_power_of_2(width)
    block_k = max(16, min(128, 8192 // w_p2))
    block_n = max(16, min(128, 8192 // w_p2))
    grid = (rows, triton.cdiv(out_features, block_n))
    _bgmv_kernel[grid](x, a, b, base, slots, in_features, out_features, x.stride(0), a.stride(0), b.stride(0),
                       base.stride(0), W=width, W_P2=w_p2, BLOCK_K=block_k, BLOCK_N=block_n)
    return base
