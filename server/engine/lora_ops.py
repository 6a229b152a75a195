"""Segmented LoRA operations as the model calls them: the kernel on CUDA, the torch reference elsewhere
(``*_reference``, also the kernels' test oracle), and inside a compiled step a custom op wrapping the same.
"""

import torch
import torch.nn.functional as F

from server.engine.lora_triton import lora_expand_, lora_shrink, silu_mul, triton
from server.engine.segments import Segments


def kernels_available(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda


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
