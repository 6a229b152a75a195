"""The engine-owned key/value cache, paged: fixed-size blocks that sequences take as they grow.

Per layer, k and v are (num_blocks, block_size, kv_heads, head_dim); a sequence's tokens live in the
blocks its block table lists, token t in block ``table[t // block_size]`` at offset ``t % block_size``.
Block 0 is scratch (see block_pool.SCRATCH_BLOCK). ``model.decoder_layer`` writes and reads these tensors
itself, through a flat (num_blocks * block_size, kv_heads, head_dim) view, so a compiled step scatters in place.
"""

import torch

from server.engine.block_pool import BlockPool


class PagedKVCache:
    """Keys and values in ``num_blocks`` blocks of ``block_size`` tokens; ``pool`` says which block holds what."""

    def __init__(self, *, layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int, max_len: int,
                 rows: int, dtype, device, prefix_cache: bool = True):
        self.block_size, self.num_blocks, self.max_len, self.rows = block_size, num_blocks, max_len, rows
        self.max_blocks = -(-max_len // block_size)  # block-table width: the longest sequence's blocks
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.pool = BlockPool(num_blocks, block_size, prefix_cache=prefix_cache)

    @staticmethod
    def block_bytes(*, layers: int, block_size: int, kv_heads: int, head_dim: int, dtype) -> int:
        """Bytes one block takes over all layers (keys and values)."""
        return 2 * layers * block_size * kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
