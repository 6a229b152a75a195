"""Which KV-cache blocks hold what: allocation as sequences grow, reference counts, and a prefix cache of
full prompt blocks (found by the hash of every token up to the block's end, kept until evicted LRU).

Admission works on reservations: a sequence is admitted only when the blocks it can ever need (prompt plus
max_tokens) are free or evictable, so a running sequence never waits for a block and nothing is preempted;
the blocks themselves are taken one at a time as the sequence grows.
"""

import hashlib
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass

SCRATCH_BLOCK = 0  # never allocated: idle decode rows and prompt padding write there


@dataclass
class PrefixStats:
    """Prompt tokens looked up in the prefix cache and how many were found there."""

    queried_tokens: int = 0
    hit_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


def block_keys(tokens: list[int], block_size: int, salt: bytes) -> list[bytes]:
    """The key of every full block of ``tokens``: a digest of the salt and every token up to the block's end.

    A keyed digest rather than Python's ``hash``: blocks are shared between requests (and tenants), so a
    crafted prompt must not be able to collide with another prompt's key.
    """
    keys, previous = [], salt
    for end in range(block_size, len(tokens) + 1, block_size):
        digest = hashlib.blake2b(array("q", tokens[end - block_size : end]).tobytes(),
                                 digest_size=16, key=previous[:64])
        previous = digest.digest()
        keys.append(previous)
    return keys


class BlockPool:
    """Blocks 1..num_blocks-1 of a paged KV cache (block 0 is scratch)."""

    def __init__(self, num_blocks: int, block_size: int, *, prefix_cache: bool = True):
        if num_blocks < 2:
            raise ValueError(f"a paged KV cache needs at least 2 blocks (one is scratch), got {num_blocks}")
        self.num_blocks, self.block_size, self.prefix_cache = num_blocks, block_size, prefix_cache
        self._free: deque[int] = deque(range(1, num_blocks))
        self._refs = [0] * num_blocks
        self._key_of: list[bytes | None] = [None] * num_blocks
        self._by_key: dict[bytes, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced blocks still holding a prefix, LRU first
        self._reserved = 0  # blocks promised to admitted sequences, not taken yet
        self.stats = PrefixStats()

    # ---- accounting ----------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Blocks a sequence can ever use (all but scratch)."""
        return self.num_blocks - 1

    @property
    def used(self) -> int:
        """Blocks referenced by running sequences."""
        return self.capacity - len(self._free) - len(self._evictable)

    @property
    def cached(self) -> int:
        """Unreferenced blocks kept for their prefix (reusable, or evicted when a block is needed)."""
        return len(self._evictable)

    @property
    def available(self) -> int:
        """Blocks a new reservation may claim: free or evictable, less those promised already."""
        return len(self._free) + len(self._evictable) - self._reserved

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def reserve(self, blocks: int) -> bool:
        """Promise ``blocks`` future allocations; False (nothing promised) when they are not available."""
        if blocks > self.available:
            return False
        self._reserved += blocks
        return True

    def unreserve(self, blocks: int) -> None:
        self._reserved -= blocks

    # ---- blocks --------------------------------------------------------------------------------------
    def allocate(self) -> int:
        """A block for a reserved allocation: a free one, else the least recently used cached prefix block."""
        if self._free:
            block = self._free.popleft()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            del self._by_key[self._key_of[block]]
            self._key_of[block] = None
        else:
            raise RuntimeError("KV cache block pool exhausted: an allocation was not reserved")
        self._reserved -= 1
        self._refs[block] = 1
        return block

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each block; unreferenced ones become free, or evictable if they hold a prefix."""
        for block in blocks:
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if self._key_of[block] is not None:
                    self._evictable[block] = None  # most recently used at the end
                else:
                    self._free.append(block)

    # ---- prefix cache --------------------------------------------------------------------------------
    def lookup(self, keys: list[bytes]) -> list[int]:
        """The cached blocks of the longest run of ``keys`` from the start (not referenced yet)."""
        if not self.prefix_cache:
            return []
        found = []
        for key in keys:
            block = self._by_key.get(key)
            if block is None:
                break
            found.append(block)
        return found

    def evictable_among(self, blocks: list[int]) -> int:
        return sum(block in self._evictable for block in blocks)

    def share(self, blocks: list[int]) -> None:
        """Take a reference to cached blocks found by :meth:`lookup`."""
        for block in blocks:
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1

    def register(self, block: int, key: bytes) -> None:
        """Publish a full prompt block under its key (the first block with a key keeps it)."""
        if self.prefix_cache and key not in self._by_key and self._key_of[block] is None:
            self._by_key[key] = block
            self._key_of[block] = key

    def clear_prefixes(self) -> None:
        """Forget every cached prefix (adapter weights changed under a salt, or a test wants a cold cache)."""
        for block in list(self._evictable):
            self._free.append(block)
        self._evictable.clear()
        for block, key in enumerate(self._key_of):
            if key is not None:
                self._key_of[block] = None
        self._by_key.clear()
