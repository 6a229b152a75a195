"""The engine-owned key/value cache: one fixed row per running request, static shapes for CUDA graphs."""

import torch


class KVCache:
    """Keys and values for ``rows`` requests of up to ``max_len`` tokens each.

    Per layer: k and v of shape (rows, kv_heads, length, head_dim). ``length`` is ``max_len`` plus at
    least one scratch position: rows that are idle during a batched decode step write there, so a
    static-shaped step never touches a real token of a request that is still being prefilled.
    """

    def __init__(self, *, layers: int, rows: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        # Multiple of 64 keeps attention-mask strides aligned for the fused attention kernels.
        self.length = -(-(max_len + 1) // 64) * 64
        self.max_len = max_len
        self.rows = rows
        self.scratch_position = self.length - 1
        shape = (rows, kv_heads, self.length, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]

    def write(self, layer: int, rows: slice | torch.Tensor, positions: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor, *, batch_index: torch.Tensor) -> None:
        """Store k, v (batch, seq, kv_heads, head_dim) at ``positions`` (batch, seq) of ``rows``.

        ``rows`` is a contiguous slice of rows or a (batch,) tensor of row numbers; ``batch_index`` is
        arange(batch)[:, None] (built once per forward, not per layer).
        """
        if isinstance(rows, slice):
            self.k[layer][rows][batch_index, :, positions] = k
            self.v[layer][rows][batch_index, :, positions] = v
        else:
            self.k[layer][rows[:, None], :, positions] = k
            self.v[layer][rows[:, None], :, positions] = v

    def read(self, layer: int, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (no copy) of the keys and values of ``rows``: (batch, kv_heads, length, head_dim)."""
        return self.k[layer][rows], self.v[layer][rows]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
