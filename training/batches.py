"""Rows and batches: optional packing of several examples per row, padding, and the seeded epoch order.

Packed and padded rows share one layout: ``position_ids`` restart at 0 for every sequence (padding is
a sequence of its own), and no 2-D attention mask is passed. transformers then builds a block-diagonal
causal mask (sdpa/eager) or uses varlen kernels (flash attention), so no token sees another sequence.
"""

import random
from dataclasses import dataclass

from training.data import IGNORE_INDEX, Encoded


@dataclass(frozen=True)
class Row:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def single_rows(encoded: list[Encoded]) -> list[Row]:
    return [Row(e.input_ids, e.labels, list(range(len(e.input_ids)))) for e in encoded]


def pack_rows(encoded: list[Encoded], max_seq_len: int) -> list[Row]:
    """First-fit-decreasing packing of examples into rows of at most ``max_seq_len`` tokens.

    Deterministic for a given input order, so a resumed run rebuilds the same rows.
    """
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i].input_ids), i))
    bins: list[list[int]] = []
    space: list[int] = []
    for index in order:
        length = len(encoded[index].input_ids)
        for slot, free in enumerate(space):
            if free >= length:
                bins[slot].append(index)
                space[slot] -= length
                break
        else:
            bins.append([index])
            space.append(max_seq_len - length)
    rows = []
    for members in bins:
        ids, labels, positions = [], [], []
        for index in members:
            example = encoded[index]
            ids += example.input_ids
            labels += example.labels  # labels[0] of every example is -100: no loss across the seam
            positions += range(len(example.input_ids))
        rows.append(Row(ids, labels, positions))
    return rows


def collate(rows: list[Row], pad_id: int):
    """Stack rows into tensors (batch, seq); padding gets label -100 and its own position run."""
    import torch

    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row)
        input_ids[i, :n] = torch.tensor(row.input_ids)
        labels[i, :n] = torch.tensor(row.labels)
        position_ids[i, :n] = torch.tensor(row.position_ids)
        position_ids[i, n:] = torch.arange(width - n)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def epoch_order(n_rows: int, *, seed: int, epoch: int) -> list[int]:
    """The row order of one epoch: a function of (seed, epoch) only, so resuming needs no saved order."""
    order = list(range(n_rows))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def micro_batches(n_rows: int, batch_size: int, *, seed: int, epoch: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """Row indices of each micro-batch of one epoch for this process (data parallel: every world-th batch)."""
    order = epoch_order(n_rows, seed=seed, epoch=epoch)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    # Every process must run the same number of steps or DDP hangs: drop the uneven tail.
    usable = len(batches) - len(batches) % world if world > 1 else len(batches)
    return batches[rank:usable:world]
