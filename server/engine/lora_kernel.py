"""Segmented LoRA (SGMV) for mixed-adapter batches: each adapter's rows are one segment, so every
slot's A and B are read once per launch however many rows use it.

Tokens are grouped by adapter slot in a :class:`Segments` plan (built on the host, copied to the
device in one tensor). ``lora_shrink`` computes h = x @ A_slot^T per segment; ``lora_expand_`` adds
h @ B_slot into the base output in place, one launch per module group. B is block-diagonal over a
group's modules; the expand loads only the rank rows of the module each output column belongs to.
The Triton kernels run on CUDA (and in Triton's CPU interpreter for tests); ``*_reference`` are
the same computation in torch, used on CPU and as the kernels' test oracle.
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch reference path runs instead
    triton = None


def kernels_available(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda


@dataclass(frozen=True)
class Segments:
    """Rows grouped by adapter slot.

    ``meta`` (4, capacity) int32 on the device: row 0 the token order (segment by segment), then per
    segment its slot (1-based), start in that order and length; segments past ``count`` have length 0.
    ``count`` and ``longest`` are host ints (launch grids); a captured graph passes ``count=capacity``.
    """

    meta: torch.Tensor
    count: int
    longest: int

    @property
    def order(self) -> torch.Tensor:
        return self.meta[0]


class SegmentPlan(NamedTuple):
    """A host-side :class:`Segments`: the token order, then per segment its slot, start in that order and
    length (the four rows of ``Segments.meta``)."""

    order: list[int]
    slot: list[int]
    start: list[int]
    length: list[int]


def segment_rows(slots: list[int]) -> SegmentPlan:
    """Plan for per-row slots (0 = no adapter): rows with an adapter, sorted by slot, one segment per slot."""
    order = sorted((row for row, slot in enumerate(slots) if slot), key=lambda row: slots[row])
    plan = SegmentPlan(order, [], [], [])
    for position, row in enumerate(order):
        if plan.slot and plan.slot[-1] == slots[row]:
            plan.length[-1] += 1
        else:
            plan.slot.append(slots[row])
            plan.start.append(position)
            plan.length.append(1)
    return plan


def segment_prompts(lengths: list[int], slots: list[int], *, width: int) -> SegmentPlan:
    """Plan for prompts laid out row after row, ``width`` tokens each (padding after each prompt's
    ``lengths[i]`` real tokens is left out): one segment per prompt that has an adapter."""
    plan = SegmentPlan([], [], [], [])
    for i, (length, slot) in enumerate(zip(lengths, slots)):
        if slot:
            plan.slot.append(slot)
            plan.start.append(len(plan.order))
            plan.length.append(length)
            plan.order.extend(range(i * width, i * width + length))
    return plan


def to_segments(plan: SegmentPlan, *, device, capacity: int | None = None) -> Segments:
    """The host plan as a device :class:`Segments` (one copy; from page-locked memory on CUDA, so the
    host does not wait for the GPU's queued work before it can go on dispatching)."""
    device = torch.device(device)
    meta = torch.empty(4, capacity or max(len(plan.order), len(plan.slot), 1), dtype=torch.int32,
                       pin_memory=device.type == "cuda")
    fill_segments(meta, plan)
    return Segments(meta=meta.to(device, non_blocking=True), count=len(plan.slot),
                    longest=max(plan.length, default=0))


def fill_segments(meta: torch.Tensor, plan: SegmentPlan) -> None:
    """Write a host plan into a (4, capacity) int32 buffer in place (also a captured graph's input)."""
    meta.zero_()
    for row, values in enumerate(plan):
        if values:
            meta[row, : len(values)] = torch.tensor(values, dtype=torch.int32)


# ---- torch reference (CPU path and test oracle) ------------------------------------------------------

def lora_shrink_reference(x: torch.Tensor, a: torch.Tensor, segments: Segments, *, width: int) -> torch.Tensor:
    """h (tokens, width): for every token in a segment, x[token] @ A_slot^T; zeros elsewhere.

    ``a`` is (slots * width, in), slot s in rows (s - 1) * width .. s * width.
    """
    h = x.new_zeros(x.shape[0], width)
    for rows, slot in _segment_rows(segments):
        h[rows] = x[rows] @ a[(slot - 1) * width : slot * width].t()
    return h


def lora_expand_reference_(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, segments: Segments, *, width: int,
                           h_slot_stride: int = 0) -> torch.Tensor:
    """In place: y[token, :out] += h[token, cols] @ B_slot for every token in a segment, where cols are
    the slot's ``width`` columns of h (at (slot - 1) * h_slot_stride; 0 when h holds only each token's own
    slot). ``b`` is (slots * width, out) block-diagonal, so the dense product equals the per-module one."""
    out = b.shape[1]
    for rows, slot in _segment_rows(segments):
        cols = (slot - 1) * h_slot_stride
        y[rows, :out] += h[rows, cols : cols + width] @ b[(slot - 1) * width : slot * width]
    return y


def _segment_rows(segments: Segments):
    meta = segments.meta.cpu()
    for seg in range(segments.count):
        slot, start, length = (int(v) for v in meta[1:, seg])
        if slot and length:
            yield meta[0, start : start + length].long().to(segments.meta.device), slot


# ---- Triton kernels ----------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _shrink_kernel(x_ptr, a_ptr, h_ptr, meta_ptr, capacity, stride_x, stride_a, stride_h, K: tl.constexpr,
                       W: tl.constexpr, W_P2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                       IEEE: tl.constexpr):
        seg = tl.program_id(0)
        slot = tl.load(meta_ptr + capacity + seg)
        start = tl.load(meta_ptr + 2 * capacity + seg)
        length = tl.load(meta_ptr + 3 * capacity + seg)  # 0 for unused entries (slot 0)
        first = tl.maximum(slot - 1, 0) * W
        w = tl.arange(0, W_P2)
        m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        mmask = m < length
        # programs past the segment's end load nothing (a vector mask: scalar-bool masks trip some Triton versions)
        live = (tl.zeros((BLOCK_K,), dtype=tl.int32) + tl.program_id(1) * BLOCK_M) < length
        rows = tl.load(meta_ptr + start + m, mask=mmask, other=0)
        acc = tl.zeros((BLOCK_M, W_P2), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            kmask = k < K
            xt = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + k[None, :],
                         mask=mmask[:, None] & kmask[None, :], other=0.0)
            at = tl.load(a_ptr + (first + w)[None, :].to(tl.int64) * stride_a + k[:, None],
                         mask=(kmask & live)[:, None] & (w < W)[None, :], other=0.0)
            if IEEE:
                acc += tl.dot(xt, at, input_precision="ieee")
            else:
                acc += tl.dot(xt, at)
        tl.store(h_ptr + rows[:, None].to(tl.int64) * stride_h + w[None, :], acc.to(h_ptr.dtype.element_ty),
                 mask=mmask[:, None] & (w < W)[None, :])

    @triton.jit
    def _expand_kernel(h_ptr, b_ptr, y_ptr, meta_ptr, capacity, grid_m, N, OFF1, OFF2, stride_h, h_col0, h_slot_stride,
                       stride_b, stride_y, R: tl.constexpr, W: tl.constexpr, W_P2: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STEPS: tl.constexpr, IEEE: tl.constexpr):
        seg = tl.program_id(0)
        slot = tl.load(meta_ptr + capacity + seg)
        start = tl.load(meta_ptr + 2 * capacity + seg)
        length = tl.load(meta_ptr + 3 * capacity + seg)  # 0 for unused entries (slot 0)
        first = tl.maximum(slot - 1, 0) * W
        n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < N
        module = (n >= OFF1).to(tl.int32) + (n >= OFF2).to(tl.int32)  # B is block-diagonal over modules
        w = tl.arange(0, W_P2)
        used = (n * 0 + length) > 0  # an empty segment loads no B (as a vector: see the shrink kernel)
        wanted = ((w[:, None] // R) == module[None, :]) & (w < W)[:, None] & (nmask & used)[None, :]
        bt = tl.load(b_ptr + (first + w)[:, None].to(tl.int64) * stride_b + n[None, :], mask=wanted, other=0.0)
        h_first = h_col0 + tl.maximum(slot - 1, 0) * h_slot_stride
        for step in range(STEPS):  # this program's blocks of the segment (B's tile is loaded once for them)
            m = (step * grid_m + tl.program_id(1)) * BLOCK_M + tl.arange(0, BLOCK_M)
            mmask = m < length
            rows = tl.load(meta_ptr + start + m, mask=mmask, other=0).to(tl.int64)
            ht = tl.load(h_ptr + rows[:, None] * stride_h + h_first + w[None, :],
                         mask=mmask[:, None] & (w < W)[None, :], other=0.0)
            if IEEE:
                delta = tl.dot(ht, bt, input_precision="ieee")
            else:
                delta = tl.dot(ht, bt)
            ptr = y_ptr + rows[:, None] * stride_y + n[None, :]
            ymask = mmask[:, None] & nmask[None, :]
            current = tl.load(ptr, mask=ymask, other=0.0).to(tl.float32)
            tl.store(ptr, (current + delta).to(y_ptr.dtype.element_ty), mask=ymask)


def _pow2(n: int, *, floor: int = 16) -> int:
    """The power of two >= n (and >= floor: tl.dot needs every dimension >= 16)."""
    return max(floor, 1 << (n - 1).bit_length())


def _blocks_m(segments: Segments, block_m: int, per_program: int) -> int:
    """Programs along the tokens of a segment: each handles ``per_program`` blocks of ``block_m``."""
    return max(1, -(-segments.longest // (block_m * per_program)))


def lora_shrink(x: torch.Tensor, a: torch.Tensor, segments: Segments, *, width: int) -> torch.Tensor:
    """Kernel version of :func:`lora_shrink_reference` (rows of h outside every segment are left unset)."""
    h = torch.empty(x.shape[0], width, dtype=x.dtype, device=x.device)
    if segments.count == 0:
        return h
    block_m = 16 if segments.longest <= 16 else 64
    _shrink_kernel[(segments.count, -(-segments.longest // block_m))](
        x, a, h, segments.meta, segments.meta.shape[1], x.stride(0), a.stride(0), h.stride(0), K=x.shape[1],
        W=width, W_P2=_pow2(width), BLOCK_M=block_m, BLOCK_K=64, IEEE=x.dtype == torch.float32)
    return h


def lora_expand_(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, segments: Segments, *, rank: int, width: int,
                 out_offsets: tuple[int, ...], h_col0: int = 0, h_slot_stride: int = 0) -> torch.Tensor:
    """Kernel version of :func:`lora_expand_reference_` (h's slot columns start at ``h_col0``: h may be
    the tail of y itself, as in the decode step's stacked GEMM)."""
    if segments.count == 0:
        return y
    out = b.shape[1]
    # Decode-sized batches: a segment is a few rows (an adapter's share of the batch), so small blocks.
    block_m = 16 if segments.longest <= 16 or y.shape[0] <= 256 else 64
    block_n = 128 if out >= 1024 else 64
    offsets = list(out_offsets[1:]) + [out] * (3 - len(out_offsets))
    grid_m = _blocks_m(segments, block_m, 4)
    steps = _pow2(-(-segments.longest // (block_m * grid_m)), floor=1)
    _expand_kernel[(segments.count, grid_m, triton.cdiv(out, block_n))](
        h, b, y, segments.meta, segments.meta.shape[1], grid_m, out, offsets[0], offsets[1], h.stride(0),
                         h_col0, h_slot_stride, b.stride(0), y.stride(0), R=rank, W=width, W_P2=_pow2(width),
                         BLOCK_M=block_m, BLOCK_N=block_n, STEPS=steps, IEEE=y.dtype == torch.float32)
    return y


# ---- operators: one entry point for eager, captured and compiled steps (opaque to torch.compile) --------

@torch.library.custom_op("lorag::lora_shrink", mutates_args=())
def lora_shrink_op(x: torch.Tensor, a: torch.Tensor, meta: torch.Tensor, count: int, longest: int,
                   width: int) -> torch.Tensor:
    """h (tokens, width) of every segment's tokens; the kernel on CUDA, the torch reference elsewhere."""
    segments = Segments(meta=meta, count=count, longest=longest)
    if kernels_available(x):
        return lora_shrink(x, a, segments, width=width)
    return lora_shrink_reference(x, a, segments, width=width)


@lora_shrink_op.register_fake
def _(x, a, meta, count, longest, width):
    return x.new_empty(x.shape[0], width)


@torch.library.custom_op("lorag::lora_expand", mutates_args=("y",))
def lora_expand_op(y: torch.Tensor, h: torch.Tensor | None, b: torch.Tensor, meta: torch.Tensor, count: int,
                   longest: int, rank: int, width: int, out_offsets: list[int], h_col0: int,
                   h_slot_stride: int) -> None:
    """y[:, :out] += each segment's h @ B_slot in place; ``h=None`` reads h from y's columns from ``h_col0``."""
    segments = Segments(meta=meta, count=count, longest=longest)
    source = y if h is None else h
    if kernels_available(y):
        lora_expand_(y, source, b, segments, rank=rank, width=width, out_offsets=tuple(out_offsets), h_col0=h_col0,
                     h_slot_stride=h_slot_stride)
    else:
        lora_expand_reference_(y, source[:, h_col0:], b, segments, width=width, h_slot_stride=h_slot_stride)


@lora_expand_op.register_fake
def _(y, h, b, meta, count, longest, rank, width, out_offsets, h_col0, h_slot_stride):
    return None
