"""Which adapter versions sit on the model's device, which in host memory, which only on disk: LRU tiers.

Pure bookkeeping (no I/O, not thread-safe: the service calls it under its lock). Keys that are pinned or
used by running requests are never chosen for eviction.
"""

from collections import OrderedDict
from typing import Literal

Tier = Literal["device", "host"]


class Residency:
    def __init__(self, *, max_device: int, max_host: int):
        self.max_device = max_device
        self.max_host = max_host
        self._tiers: OrderedDict[str, Tier] = OrderedDict()  # least recently used first

    def tier(self, key: str) -> Tier | None:
        return self._tiers.get(key)

    def keys(self, tier: Tier) -> list[str]:
        """Keys in ``tier``, least recently used first."""
        return [key for key, where in self._tiers.items() if where == tier]

    def touch(self, key: str) -> None:
        if key in self._tiers:
            self._tiers.move_to_end(key)

    def put(self, key: str, tier: Tier) -> None:
        self._tiers[key] = tier
        self._tiers.move_to_end(key)

    def drop(self, key: str) -> None:
        self._tiers.pop(key, None)

    def device_victims(self, key: str, *, protected: set[str]) -> list[str] | None:
        """Device keys to move to host so ``key`` fits on the device; None when every candidate is protected."""
        on_device = [k for k in self.keys("device") if k != key]
        excess = len(on_device) + 1 - self.max_device
        if excess <= 0:
            return []
        candidates = [k for k in on_device if k not in protected]
        return candidates[:excess] if len(candidates) >= excess else None

    def host_victims(self, *, protected: set[str]) -> list[str]:
        """Host keys to drop (back to disk only) so at most ``max_host`` stay in host memory."""
        on_host = [k for k in self.keys("host") if k not in protected]
        excess = len(self.keys("host")) - self.max_host
        return on_host[:excess] if excess > 0 else []
