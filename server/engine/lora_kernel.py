"""Segmented LoRA (SGMV) for mixed-adapter batches: tokens are grouped into blocks that share one
adapter slot, so a program multiplies its rows by one A and one B, and every slot's weights are read
once per block however many rows use them.

The plan (:class:`Segments`) is built on the host and copied to the device in one tensor; a captured
decode step keeps it in a static buffer. ``lora_shrink`` computes h = x @ A_slot^T per block;
``lora_expand_`` adds h @ B_slot into the base output (in place, or fused into the residual add for
o/down); ``silu_mul`` adds the gate/up LoRA while applying silu(gate) * up, so the widest activation of
the layer is read once. B is block-diagonal over a group's modules; a kernel loads only the rank rows
of the module each output column belongs to. The Triton kernels run on CUDA (and in Triton's CPU
interpreter for tests); ``*_reference`` are the same computation in torch, used on CPU and as the
kernels' test oracle.
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch reference path runs instead
    triton = None


def kernels_available(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda


DECODE_BLOCK = 16  # rows per block in decode steps (an adapter's share of a batch is a few rows)


def prompt_block(tokens: int) -> int:
    """Rows per block for prompts: large blocks for large groups (each block re-reads its slot's A and B),
    smaller ones for a prompt or two, so the shrink (one program per block, looping over all the input
    features) still spreads over a GPU's ~100+ multiprocessors."""
    return 64 if tokens >= 64 * 128 else 32 if tokens >= 32 * 128 else 16


@dataclass(frozen=True)
class Segments:
    """Tokens grouped into blocks of ``block_m`` rows that share one adapter slot.

    ``meta`` is int32 on the device, ``capacity * (1 + block_m)`` long: first each block's slot (1-based;
    0 = no adapter, so the LoRA kernels skip the block), then each block's ``block_m`` token rows (-1 =
    padding). Every block belongs to one slot, so a program multiplies its rows by one A and one B with
    no per-row gather. ``blocks`` is the launch size; a captured graph launches its capacity, and the
    blocks its step's plan leaves empty cost a masked no-op each (not a pass over every possible row).
    """

    meta: torch.Tensor
    blocks: int
    block_m: int

    @property
    def capacity(self) -> int:
        return self.meta.shape[0] // (1 + self.block_m)

    def block_rows(self) -> torch.Tensor:
        """(blocks, block_m) token rows of the launched blocks, -1 for padding."""
        start = self.capacity
        return self.meta[start : start + self.blocks * self.block_m].view(self.blocks, self.block_m)

    def block_slots(self) -> torch.Tensor:
        return self.meta[: self.blocks]


class SegmentPlan(NamedTuple):
    """A host-side :class:`Segments`: each block's slot, and each block's ``block_m`` rows (-1 padding)."""

    slot: list[int]
    rows: torch.Tensor  # int32 (blocks * block_m,)
    block_m: int


def plan_blocks(groups: list[tuple[int, range]], *, block_m: int) -> SegmentPlan:
    """Cut each (slot, range of rows) group into blocks of ``block_m`` rows, the last one padded with -1.

    One tensor write per group, not per row: a prompt group holds ~16k tokens, and the plan is on the
    host's path before every forward.
    """
    slots, pieces = [], []
    for slot, rows in groups:
        rows = torch.arange(rows.start, rows.stop, dtype=torch.int32)
        blocks = -(-len(rows) // block_m)
        padded = torch.full((blocks * block_m,), -1, dtype=torch.int32)
        padded[: len(rows)] = rows
        slots += [slot] * blocks
        pieces.append(padded)
    return SegmentPlan(slots, torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.int32), block_m)


def segment_rows(slots: list[int], *, block_m: int = DECODE_BLOCK) -> SegmentPlan:
    """Plan for per-row slots (0 = no adapter) of a decode step, by slot: every row is in a block (the
    fused residual and activation kernels cover all of them), those without an adapter under slot 0.

    Plain lists, one tensor at the end: a step has at most a few hundred rows, and this runs before
    every step whose batch changed.
    """
    by_slot: dict[int, list[int]] = {}
    for row, slot in enumerate(slots):
        by_slot.setdefault(slot, []).append(row)
    block_slots, rows = [], []
    for slot, members in sorted(by_slot.items()):
        for first in range(0, len(members), block_m):
            block = members[first : first + block_m]
            block_slots.append(slot)
            rows += block + [-1] * (block_m - len(block))
    return SegmentPlan(block_slots, torch.tensor(rows, dtype=torch.int32), block_m)


def segment_prompts(lengths: list[int], slots: list[int], *, width: int, block_m: int | None = None) -> SegmentPlan:
    """Plan for prompts laid out row after row, ``width`` tokens each: every token is in a block (the
    fused activation kernel covers all of them), the prompt's real tokens under its slot, the padding
    after them under slot 0 (no LoRA work)."""
    groups = []
    block_m = block_m or prompt_block(width * len(lengths))
    for i, (length, slot) in enumerate(zip(lengths, slots)):
        groups.append((slot, range(i * width, i * width + length)))
        if length < width:
            groups.append((0, range(i * width + length, (i + 1) * width)))
    return plan_blocks(groups, block_m=block_m)


def decode_capacity(rows: int, num_slots: int, *, block_m: int = DECODE_BLOCK) -> int:
    """Most blocks a decode step of ``rows`` rows can need: each slot in use (and slot 0) adds at most
    one partial block."""
    return -(-rows // block_m) + min(rows, num_slots + 1)


def to_segments(plan: SegmentPlan, *, device, capacity: int | None = None) -> Segments:
    """The host plan as a device :class:`Segments` (one copy; from page-locked memory on CUDA, so the
    host does not wait for the GPU's queued work before it can go on dispatching)."""
    device = torch.device(device)
    capacity = capacity or max(len(plan.slot), 1)
    meta = torch.empty(capacity * (1 + plan.block_m), dtype=torch.int32, pin_memory=device.type == "cuda")
    fill_segments(meta, plan)
    return Segments(meta=meta.to(device, non_blocking=True), blocks=max(len(plan.slot), 1), block_m=plan.block_m)


def fill_segments(meta: torch.Tensor, plan: SegmentPlan) -> None:
    """Write a host plan into a host int32 buffer in place (also a captured graph's input); blocks past
    the plan's get slot 0 and no rows."""
    capacity = meta.shape[0] // (1 + plan.block_m)
    if len(plan.slot) > capacity:
        raise ValueError(f"plan of {len(plan.slot)} blocks exceeds the buffer's {capacity}")
    meta[:capacity].zero_()
    meta[capacity:].fill_(-1)
    if plan.slot:
        meta[: len(plan.slot)] = torch.tensor(plan.slot, dtype=torch.int32)
        meta[capacity : capacity + len(plan.rows)] = plan.rows


# ---- torch reference (CPU path and test oracle) ------------------------------------------------------

def _slot_rows(segments: Segments):
    """(rows, slot) per slot the launched blocks use, rows as a device index tensor."""
    slots = segments.block_slots().cpu()
    rows = segments.block_rows().cpu()
    for slot in sorted(set(slots.tolist()) - {0}):
        chosen = rows[slots == slot].flatten()
        yield chosen[chosen >= 0].long().to(segments.meta.device), slot


def lora_shrink_reference(x: torch.Tensor, a: torch.Tensor, segments: Segments, *, width: int) -> torch.Tensor:
    """h (tokens, width): for every token in a block with a slot, x[token] @ A_slot^T; zeros elsewhere.

    ``a`` is (slots * width, in), slot s in rows (s - 1) * width .. s * width.
    """
    h = x.new_zeros(x.shape[0], width)
    for rows, slot in _slot_rows(segments):
        h[rows] = x[rows] @ a[(slot - 1) * width : slot * width].t()
    return h


def lora_expand_reference_(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, segments: Segments, *, width: int,
                           h_slot_stride: int = 0) -> torch.Tensor:
    """In place: y[token, :out] += h[token, cols] @ B_slot for every token in a block with a slot, where
    cols are the slot's ``width`` columns of h (at (slot - 1) * h_slot_stride; 0 when h holds only each
    token's own slot). ``b`` is (slots * width, out) block-diagonal, so the dense product equals the
    per-module one."""
    out = b.shape[1]
    for rows, slot in _slot_rows(segments):
        cols = (slot - 1) * h_slot_stride
        y[rows, :out] += h[rows, cols : cols + width] @ b[(slot - 1) * width : slot * width]
    return y


def silu_mul_reference(gate_up: torch.Tensor, h: torch.Tensor | None, b: torch.Tensor | None,
                       segments: Segments | None, *, rank: int) -> torch.Tensor:
    """silu(gate) * up of the gate/up projection's output, after adding each token's LoRA (when given:
    h holds each token's gate rank columns, then its up rank columns)."""
    if segments is not None:
        gate_up = lora_expand_reference_(gate_up.clone(), h, b, segments, width=2 * rank)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# ---- Triton kernels ----------------------------------------------------------------------------------

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


# ---- one entry point per operation: the kernel on CUDA, the torch reference elsewhere; inside a compiled
# step, the same through a custom op (opaque to torch.compile). Eager code skips the custom-op dispatch:
# tens of microseconds per call, paid several times per layer. -------------------------------------------

def shrink(x: torch.Tensor, a: torch.Tensor, segments: Segments, *, width: int) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return lora_shrink_op(x, a, segments.meta, segments.blocks, segments.block_m, width)
    return _shrink(x, a, segments, width=width)


def expand_(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, segments: Segments, *, rank: int, width: int,
            out_offsets: tuple[int, ...], h_col0: int = 0, h_slot_stride: int = 0) -> None:
    """y[:, :out] += each token's h @ B_slot, in place (h may be y itself: see lora_expand_)."""
    if torch.compiler.is_compiling():
        lora_expand_op(y, None if h is y else h, b, segments.meta, segments.blocks, segments.block_m, rank, width,
                       list(out_offsets), h_col0, h_slot_stride)
    else:
        _expand(y, h, b, segments, rank=rank, width=width, out_offsets=out_offsets, h_col0=h_col0,
                h_slot_stride=h_slot_stride)


def expand_add(residual: torch.Tensor, y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, segments: Segments, *,
               rank: int, width: int, h_col0: int = 0, h_slot_stride: int = 0) -> torch.Tensor:
    """residual + y[:, :out] + each token's h @ B_slot (one module), as a new tensor; the plan covers every row."""
    if torch.compiler.is_compiling():
        return lora_expand_add_op(residual, y, None if h is y else h, b, segments.meta, segments.blocks,
                                  segments.block_m, rank, width, h_col0, h_slot_stride)
    return _expand_add(residual, y, h, b, segments, rank=rank, width=width, h_col0=h_col0, h_slot_stride=h_slot_stride)


def silu_mul_lora(gate_up: torch.Tensor, h: torch.Tensor, b: torch.Tensor, segments: Segments, *, rank: int,
                  intermediate: int, h_col0: int = 0, h_slot_stride: int = 0) -> torch.Tensor:
    """silu(gate + LoRA) * (up + LoRA); the plan covers every row."""
    if torch.compiler.is_compiling():
        return lora_silu_mul_op(gate_up, None if h is gate_up else h, b, segments.meta, segments.blocks,
                                segments.block_m, rank, intermediate, h_col0, h_slot_stride)
    return _silu_mul(gate_up, h, b, segments, rank=rank, intermediate=intermediate, h_col0=h_col0,
                     h_slot_stride=h_slot_stride)


def _shrink(x, a, segments, *, width):
    if kernels_available(x):
        return lora_shrink(x, a, segments, width=width)
    return lora_shrink_reference(x, a, segments, width=width)


def _expand(y, h, b, segments, *, rank, width, out_offsets, h_col0, h_slot_stride):
    if kernels_available(y):
        lora_expand_(y, h, b, segments, rank=rank, width=width, out_offsets=out_offsets, h_col0=h_col0,
                     h_slot_stride=h_slot_stride)
    else:
        lora_expand_reference_(y, h[:, h_col0:], b, segments, width=width, h_slot_stride=h_slot_stride)


def _expand_add(residual, y, h, b, segments, *, rank, width, h_col0, h_slot_stride):
    if kernels_available(y):
        return lora_expand_(y, h, b, segments, rank=rank, width=width, out_offsets=(0,), h_col0=h_col0,
                            h_slot_stride=h_slot_stride, residual=residual)
    out = b.shape[1]
    projected = lora_expand_reference_(y[:, :out].clone(), h[:, h_col0:], b, segments, width=width,
                                       h_slot_stride=h_slot_stride)
    return residual + projected


def _silu_mul(gate_up, h, b, segments, *, rank, intermediate, h_col0, h_slot_stride):
    if kernels_available(gate_up):
        return silu_mul(gate_up, h, b, segments, rank=rank, intermediate=intermediate, h_col0=h_col0,
                        h_slot_stride=h_slot_stride)
    projected = lora_expand_reference_(gate_up[:, : 2 * intermediate].clone(), h[:, h_col0:], b, segments,
                                       width=2 * rank, h_slot_stride=h_slot_stride)
    gate, up = projected.chunk(2, dim=-1)
    return F.silu(gate) * up


@torch.library.custom_op("lorag::lora_shrink", mutates_args=())
def lora_shrink_op(x: torch.Tensor, a: torch.Tensor, meta: torch.Tensor, blocks: int, block_m: int,
                   width: int) -> torch.Tensor:
    return _shrink(x, a, Segments(meta=meta, blocks=blocks, block_m=block_m), width=width)


@lora_shrink_op.register_fake
def _(x, a, meta, blocks, block_m, width):
    return x.new_empty(x.shape[0], width)


@torch.library.custom_op("lorag::lora_expand", mutates_args=("y",))
def lora_expand_op(y: torch.Tensor, h: torch.Tensor | None, b: torch.Tensor, meta: torch.Tensor, blocks: int,
                   block_m: int, rank: int, width: int, out_offsets: list[int], h_col0: int,
                   h_slot_stride: int) -> None:
    """``h=None``: h is read from y's own columns from ``h_col0`` (custom ops cannot alias inputs)."""
    _expand(y, y if h is None else h, b, Segments(meta=meta, blocks=blocks, block_m=block_m), rank=rank,
            width=width, out_offsets=tuple(out_offsets), h_col0=h_col0, h_slot_stride=h_slot_stride)


@lora_expand_op.register_fake
def _(y, h, b, meta, blocks, block_m, rank, width, out_offsets, h_col0, h_slot_stride):
    return None


@torch.library.custom_op("lorag::lora_expand_add", mutates_args=())
def lora_expand_add_op(residual: torch.Tensor, y: torch.Tensor, h: torch.Tensor | None, b: torch.Tensor,
                       meta: torch.Tensor, blocks: int, block_m: int, rank: int, width: int, h_col0: int,
                       h_slot_stride: int) -> torch.Tensor:
    return _expand_add(residual, y, y if h is None else h, b, Segments(meta=meta, blocks=blocks, block_m=block_m),
                       rank=rank, width=width, h_col0=h_col0, h_slot_stride=h_slot_stride)


@lora_expand_add_op.register_fake
def _(residual, y, h, b, meta, blocks, block_m, rank, width, h_col0, h_slot_stride):
    return torch.empty_like(residual)


@torch.library.custom_op("lorag::lora_silu_mul", mutates_args=())
def lora_silu_mul_op(gate_up: torch.Tensor, h: torch.Tensor | None, b: torch.Tensor, meta: torch.Tensor, blocks: int,
                     block_m: int, rank: int, intermediate: int, h_col0: int, h_slot_stride: int) -> torch.Tensor:
    return _silu_mul(gate_up, gate_up if h is None else h, b, Segments(meta=meta, blocks=blocks, block_m=block_m),
                     rank=rank, intermediate=intermediate, h_col0=h_col0, h_slot_stride=h_slot_stride)


@lora_silu_mul_op.register_fake
def _(gate_up, h, b, meta, blocks, block_m, rank, intermediate, h_col0, h_slot_stride):
    return gate_up.new_empty(gate_up.shape[0], intermediate)
