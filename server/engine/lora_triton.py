"""Triton kernels for segmented LoRA, run on CUDA (and in Triton's CPU interpreter for tests): ``lora_shrink``
(h = x @ A_slot^T per block), ``lora_expand_`` (h @ B_slot into the base output, in place or fused into o/down's
residual add) and ``silu_mul`` (gate/up LoRA added while applying silu(gate) * up: the widest activation read once).
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch reference path runs instead (see lora_ops)
    triton = None

from server.engine.segments import Segments

# B is block-diagonal over a group's modules; a kernel loads only the rank rows of the module each output
# column belongs to.

if triton is not None:

    @triton.jit
    def _block(meta_ptr, capacity, BLOCK_M: tl.constexpr):
        """This program's block: its slot, its rows (clamped to 0 where padding) and which rows are real."""
        block = tl.program_id(0)
        slot = tl.load(meta_ptr + block)
        rows = tl.load(meta_ptr + capacity + block * BLOCK_M + tl.arange(0, BLOCK_M))
        return slot, tl.maximum(rows, 0).to(tl.int64), rows >= 0

    @triton.jit
    def _shrink_kernel(x_ptr, a_ptr, h_ptr, meta_ptr, capacity, stride_x, stride_a, stride_h, K: tl.constexpr,
                       W: tl.constexpr, W_P2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                       IEEE: tl.constexpr):
        slot, rows, real = _block(meta_ptr, capacity, BLOCK_M)
        acc = _shrink_rows(x_ptr, a_ptr, rows, real, slot, stride_x, stride_a, K, W, W_P2, BLOCK_M, BLOCK_K, IEEE)
        w = tl.arange(0, W_P2)
        mmask = real & ((rows * 0 + slot) > 0)
        tl.store(h_ptr + rows[:, None] * stride_h + w[None, :], acc.to(h_ptr.dtype.element_ty),
                 mask=mmask[:, None] & (w < W)[None, :])

    @triton.jit
    def _times_b(ht, b_ptr, slot, n, nmask, module, stride_b, slot_width, w_off, R: tl.constexpr, W: tl.constexpr,
                 W_P2: tl.constexpr, IEEE: tl.constexpr):
        """(rows, n) tile of ht @ B_slot in float32, ht holding the ``W`` rank columns from ``w_off`` of the
        slot's ``slot_width``. B is block-diagonal over modules, so only the rank rows of each column's
        ``module`` are loaded."""
        first = tl.maximum(slot - 1, 0) * slot_width + w_off
        w = tl.arange(0, W_P2)
        used = (n * 0 + slot) > 0  # a block without a slot loads no B
        wanted = ((w[:, None] // R) == module[None, :]) & (w < W)[:, None] & (nmask & used)[None, :]
        bt = tl.load(b_ptr + (first + w)[:, None].to(tl.int64) * stride_b + n[None, :], mask=wanted, other=0.0)
        if IEEE:
            return tl.dot(ht, bt, input_precision="ieee")
        return tl.dot(ht, bt)

    @triton.jit
    def _lora_delta(h_ptr, b_ptr, rows, mmask, slot, n, nmask, module, stride_h, h_col0, h_slot_stride, stride_b,
                    slot_width, w_off, R: tl.constexpr, W: tl.constexpr, W_P2: tl.constexpr, IEEE: tl.constexpr):
        """(rows, n) tile of h @ B_slot in float32, h read from memory (see _times_b)."""
        w = tl.arange(0, W_P2)
        h_first = h_col0 + tl.maximum(slot - 1, 0) * h_slot_stride + w_off
        ht = tl.load(h_ptr + rows[:, None] * stride_h + h_first + w[None, :],
                     mask=(mmask & ((rows * 0 + slot) > 0))[:, None] & (w < W)[None, :], other=0.0)
        return _times_b(ht, b_ptr, slot, n, nmask, module, stride_b, slot_width, w_off, R, W, W_P2, IEEE)

    @triton.jit
    def _shrink_rows(x_ptr, a_ptr, rows, mmask, slot, stride_x, stride_a, K: tl.constexpr, W: tl.constexpr,
                     W_P2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
        """(BLOCK_M, W_P2) float32: x[rows] @ A_slot^T, zeros for a block without a slot."""
        # Vector masks throughout: scalar-bool masks trip some Triton versions' interpreter.
        mmask = mmask & ((rows * 0 + slot) > 0)  # a block without a slot loads nothing
        live = (tl.zeros((BLOCK_K,), dtype=tl.int32) + slot) > 0
        first = tl.maximum(slot - 1, 0) * W
        w = tl.arange(0, W_P2)
        acc = tl.zeros((BLOCK_M, W_P2), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            kmask = k < K
            xt = tl.load(x_ptr + rows[:, None] * stride_x + k[None, :], mask=mmask[:, None] & kmask[None, :],
                         other=0.0)
            at = tl.load(a_ptr + (first + w)[None, :].to(tl.int64) * stride_a + k[:, None],
                         mask=(kmask & live)[:, None] & (w < W)[None, :], other=0.0)
            if IEEE:
                acc += tl.dot(xt, at, input_precision="ieee")
            else:
                acc += tl.dot(xt, at)
        return acc

    @triton.jit
    def _shrink_expand_kernel(x_ptr, a_ptr, b_ptr, y_ptr, r_ptr, out_ptr, meta_ptr, capacity, N, OFF1, OFF2, stride_x,
                              stride_a, stride_b, stride_y, stride_r, stride_out, K: tl.constexpr, R: tl.constexpr,
                              W: tl.constexpr, W_P2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                              BLOCK_N: tl.constexpr, RESIDUAL: tl.constexpr, IEEE: tl.constexpr):
        """The shrink and the expand of one block in one program: h = x @ A_slot^T stays in registers
        (rounded to the activations' dtype, as the separate kernels store it), then the program walks
        the output columns adding h @ B_slot, in place into y or (RESIDUAL) as r + y + delta into out."""
        slot, rows, real = _block(meta_ptr, capacity, BLOCK_M)
        dtype = y_ptr.dtype.element_ty
        ht = _shrink_rows(x_ptr, a_ptr, rows, real, slot, stride_x, stride_a, K, W, W_P2, BLOCK_M, BLOCK_K,
                          IEEE).to(dtype)
        mmask = real if RESIDUAL else real & ((rows * 0 + slot) > 0)
        for n0 in range(0, N, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            nmask = n < N
            module = (n >= OFF1).to(tl.int32) + (n >= OFF2).to(tl.int32)
            delta = _times_b(ht, b_ptr, slot, n, nmask, module, stride_b, W, 0, R, W, W_P2, IEEE)
            tile = mmask[:, None] & nmask[None, :]
            y = tl.load(y_ptr + rows[:, None] * stride_y + n[None, :], mask=tile, other=0.0).to(tl.float32)
            projected = (y + delta).to(dtype)
            if RESIDUAL:
                r = tl.load(r_ptr + rows[:, None] * stride_r + n[None, :], mask=tile, other=0.0).to(tl.float32)
                tl.store(out_ptr + rows[:, None] * stride_out + n[None, :],
                         (r + projected.to(tl.float32)).to(dtype), mask=tile)
            else:
                tl.store(y_ptr + rows[:, None] * stride_y + n[None, :], projected, mask=tile)

    @triton.jit
    def _expand_kernel(h_ptr, b_ptr, y_ptr, r_ptr, out_ptr, meta_ptr, capacity, N, OFF1, OFF2, stride_h, h_col0,
                       h_slot_stride, stride_b, stride_y, stride_r, stride_out, R: tl.constexpr, W: tl.constexpr,
                       W_P2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RESIDUAL: tl.constexpr,
                       IEEE: tl.constexpr):
        """y + h @ B_slot: in place into y, or (RESIDUAL) r + that into out, for every block including
        those without a slot (their rows get r + y: the residual add the layer needs anyway)."""
        slot, rows, real = _block(meta_ptr, capacity, BLOCK_M)
        mmask = real if RESIDUAL else real & ((rows * 0 + slot) > 0)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < N
        module = (n >= OFF1).to(tl.int32) + (n >= OFF2).to(tl.int32)
        delta = _lora_delta(h_ptr, b_ptr, rows, mmask, slot, n, nmask, module, stride_h, h_col0, h_slot_stride,
                            stride_b, W, 0, R, W, W_P2, IEEE)
        tile = mmask[:, None] & nmask[None, :]
        y = tl.load(y_ptr + rows[:, None] * stride_y + n[None, :], mask=tile, other=0.0).to(tl.float32)
        dtype = y_ptr.dtype.element_ty
        projected = (y + delta).to(dtype)
        if RESIDUAL:  # rounded as the unfused ops round: the projection's output, then the sum
            r = tl.load(r_ptr + rows[:, None] * stride_r + n[None, :], mask=tile, other=0.0).to(tl.float32)
            tl.store(out_ptr + rows[:, None] * stride_out + n[None, :], (r + projected.to(tl.float32)).to(dtype),
                     mask=tile)
        else:
            tl.store(y_ptr + rows[:, None] * stride_y + n[None, :], projected, mask=tile)

    @triton.jit
    def _silu_mul_kernel(gu_ptr, out_ptr, h_ptr, b_ptr, meta_ptr, capacity, M, I, stride_gu, stride_out, stride_h,
                         h_col0, h_slot_stride, stride_b, R: tl.constexpr, R_P2: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, LORA: tl.constexpr, IEEE: tl.constexpr):
        if LORA:
            slot, rows, mmask = _block(meta_ptr, capacity, BLOCK_M)
        else:
            m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
            rows, mmask = m.to(tl.int64), m < M
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < I
        tile = mmask[:, None] & nmask[None, :]
        at = gu_ptr + rows[:, None] * stride_gu + n[None, :]
        dtype = out_ptr.dtype.element_ty
        gate = tl.load(at, mask=tile, other=0.0).to(tl.float32)
        up = tl.load(at + I, mask=tile, other=0.0).to(tl.float32)
        if LORA:
            # Each half reads only its module's R rows of h and B (a slot's h holds gate's rank, then up's).
            zero = tl.zeros((BLOCK_N,), dtype=tl.int32)
            gate += _lora_delta(h_ptr, b_ptr, rows, mmask, slot, n, nmask, zero, stride_h, h_col0, h_slot_stride,
                                stride_b, 2 * R, 0, R, R, R_P2, IEEE)
            up += _lora_delta(h_ptr, b_ptr, rows, mmask, slot, n + I, nmask, zero, stride_h, h_col0, h_slot_stride,
                              stride_b, 2 * R, R, R, R, R_P2, IEEE)
            # Rounded where the unfused ops would round (projection output, then silu, then the product),
            # so the result matches expand + F.silu(gate) * up.
            gate = gate.to(dtype).to(tl.float32)
            up = up.to(dtype).to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
        tl.store(out_ptr + rows[:, None] * stride_out + n[None, :], (silu * up).to(dtype), mask=tile)


def _pow2(n: int, *, floor: int = 16) -> int:
    """The power of two >= n (and >= floor: tl.dot needs every dimension >= 16)."""
    return max(floor, 1 << (n - 1).bit_length())


def lora_shrink(x: torch.Tensor, a: torch.Tensor, segments: Segments, *, width: int) -> torch.Tensor:
    """Kernel version of :func:`lora_shrink_reference` (rows of h outside every slot's blocks are left unset)."""
    h = torch.empty(x.shape[0], width, dtype=x.dtype, device=x.device)
    _shrink_kernel[(segments.blocks,)](
        x, a, h, segments.meta, segments.capacity, x.stride(0), a.stride(0), h.stride(0), K=x.shape[1], W=width,
        W_P2=_pow2(width), BLOCK_M=segments.block_m, BLOCK_K=128, IEEE=x.dtype == torch.float32)
    return h


def lora_expand_(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, segments: Segments, *, rank: int, width: int,
                 out_offsets: tuple[int, ...], h_col0: int = 0, h_slot_stride: int = 0,
                 residual: torch.Tensor | None = None) -> torch.Tensor:
    """Kernel version of :func:`lora_expand_reference_` (h's slot columns start at ``h_col0``: h may be
    the tail of y itself, as in the decode step's stacked GEMM). With ``residual``, y is left as it is
    and ``residual + y[:, :out] + h @ B`` comes back as a new tensor; the plan must then cover every row."""
    out = b.shape[1]
    block_n = 128 if out >= 1024 else 64
    offsets = list(out_offsets[1:]) + [out] * (3 - len(out_offsets))
    target = y if residual is None else torch.empty_like(residual)
    r = y if residual is None else residual
    _expand_kernel[(segments.blocks, triton.cdiv(out, block_n))](
        h, b, y, r, target, segments.meta, segments.capacity, out, offsets[0], offsets[1], h.stride(0), h_col0,
        h_slot_stride, b.stride(0), y.stride(0), r.stride(0), target.stride(0), R=rank, W=width, W_P2=_pow2(width),
        BLOCK_M=segments.block_m, BLOCK_N=block_n, RESIDUAL=residual is not None, IEEE=y.dtype == torch.float32)
    return target


def lora_shrink_expand_(x: torch.Tensor, a: torch.Tensor, y: torch.Tensor, b: torch.Tensor, segments: Segments, *,
                        rank: int, width: int, out_offsets: tuple[int, ...],
                        residual: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`lora_shrink` then :func:`lora_expand_` in one launch (one program per block; h never leaves
    registers). Same results as the two kernels: h is rounded to x's dtype in between."""
    out = b.shape[1]
    block_n = 128 if out >= 1024 else 64
    offsets = list(out_offsets[1:]) + [out] * (3 - len(out_offsets))
    target = y if residual is None else torch.empty_like(residual)
    r = y if residual is None else residual
    _shrink_expand_kernel[(segments.blocks,)](
        x, a, b, y, r, target, segments.meta, segments.capacity, out, offsets[0], offsets[1], x.stride(0), a.stride(0),
        b.stride(0), y.stride(0), r.stride(0), target.stride(0), K=x.shape[1], R=rank, W=width, W_P2=_pow2(width),
        BLOCK_M=segments.block_m, BLOCK_K=128, BLOCK_N=block_n, RESIDUAL=residual is not None,
        IEEE=y.dtype == torch.float32)
    return target


# (columns per program, warps), measured on an H100 for 12k tokens x 4,864: the LoRA variant's two
# extra dots want narrower tiles (166 us vs 215 us at 128 columns); the plain one is at memory speed.
SILU_MUL_TILE = {True: (64, 4), False: (128, 4)}


def silu_mul(gate_up: torch.Tensor, h: torch.Tensor | None = None, b: torch.Tensor | None = None,
             segments: Segments | None = None, *, rank: int = 0, intermediate: int | None = None, h_col0: int = 0,
             h_slot_stride: int = 0) -> torch.Tensor:
    """Kernel version of :func:`silu_mul_reference`: one pass over the gate/up output instead of the
    expand's read-modify-write plus the activation's read (the largest activation of a prompt's forward).
    ``gate_up`` may be wider than 2 * ``intermediate`` (the decode step's stacked GEMM, h in its tail)."""
    tokens = gate_up.shape[0]
    intermediate = intermediate or gate_up.shape[1] // 2
    out = torch.empty(tokens, intermediate, dtype=gate_up.dtype, device=gate_up.device)
    lora = segments is not None
    block_n, num_warps = SILU_MUL_TILE[lora]
    block_m = segments.block_m if lora else 64
    grid = (segments.blocks if lora else triton.cdiv(tokens, block_m), triton.cdiv(intermediate, block_n))
    h, b, meta = (h, b, segments.meta) if lora else (out, out, out)  # unused without LoRA (any pointer will do)
    _silu_mul_kernel[grid](
        gate_up, out, h, b, meta, segments.capacity if lora else 0, tokens, intermediate, gate_up.stride(0),
        out.stride(0), h.stride(0), h_col0, h_slot_stride, b.stride(0), R=max(rank, 1), R_P2=_pow2(max(rank, 1)),
        BLOCK_M=block_m, BLOCK_N=block_n, LORA=lora, IEEE=gate_up.dtype == torch.float32, num_warps=num_warps)
    return out
