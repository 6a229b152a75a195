"""Block plans for segmented LoRA (SGMV): a mixed-adapter batch's tokens grouped into blocks that share one
adapter slot, so a program multiplies its rows by one A and one B and reads each slot's weights once per block.
A plan is built on the host and copied to the device in one tensor; a captured decode step keeps it in a static buffer.
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch


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


def segment_prompts(lengths: list[int], slots: list[int], *, width: int | None,
                    block_m: int | None = None) -> SegmentPlan:
    """Plan for prompts laid out row after row, ``width`` tokens each: every token is in a block (the
    fused activation kernel covers all of them), the prompt's real tokens under its slot, the padding
    after them under slot 0 (no LoRA work). ``width`` None: packed back to back, no padding."""
    groups = []
    block_m = block_m or prompt_block(_prompt_tokens(lengths, width))
    start = 0
    for length, slot in zip(lengths, slots):
        groups.append((slot, range(start, start + length)))
        if width is not None and length < width:
            groups.append((0, range(start + length, start + width)))
        start += length if width is None else width
    return plan_blocks(groups, block_m=block_m)


def _prompt_tokens(lengths: list[int], width: int | None) -> int:
    return sum(lengths) if width is None else width * len(lengths)


def segment_mixed(lengths: list[int], slots: list[int], *, width: int | None,
                  decode_slots: list[int]) -> SegmentPlan:
    """Plan for a forward carrying prompts and decode rows (model.DecodeRows): the prompts laid out as in
    :func:`segment_prompts`, then one token per decode row, grouped by slot as in :func:`segment_rows`."""
    prompt_tokens = _prompt_tokens(lengths, width)
    block_m = prompt_block(prompt_tokens + len(decode_slots))
    prompts = segment_prompts(lengths, slots, width=width, block_m=block_m)
    rows = segment_rows(decode_slots, block_m=block_m)
    shifted = torch.where(rows.rows >= 0, rows.rows + prompt_tokens, rows.rows)
    return SegmentPlan(prompts.slot + rows.slot, torch.cat([prompts.rows, shifted]), block_m)


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
