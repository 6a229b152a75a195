"""The engine-owned key/value cache: one fixed row per running request, static shapes for CUDA graphs."""

import torch


class KVCache:
    """Keys and values for ``rows`` requests of up to ``max_len`` tokens each.

    Per layer: k and v of shape (rows, kv_heads, length, head_dim). ``length`` is ``max_len`` plus at
    least one scratch position: rows that are idle during a batched decode step write there, so a
    static-shaped step never touches a real token of a request that is still being prefilled.
    ``model.decoder_layer`` writes and reads these tensors itself, indexing the whole tensor so the
    compiled step scatters in place.
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

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
