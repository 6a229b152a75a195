"""The LRU tier bookkeeping: device slots, host memory, protection of pinned and in-use adapters."""

from server.hotswap.residency import Residency


def test_least_recently_used_unprotected_adapter_leaves_the_device_first():
    residency = Residency(max_device=2, max_host=1)
    residency.put("a", "device")
    residency.put("b", "device")
    assert residency.device_victims("c", protected=set()) == ["a"]
    residency.touch("a")
    assert residency.device_victims("c", protected=set()) == ["b"]
    assert residency.device_victims("c", protected={"b"}) == ["a"]
    assert residency.device_victims("c", protected={"a", "b"}) is None  # no room: the caller waits
    assert residency.device_victims("a", protected=set()) == []  # already counted


def test_host_tier_keeps_at_most_max_host_and_spares_protected_keys():
    residency = Residency(max_device=1, max_host=1)
    for key in ("a", "b", "c"):
        residency.put(key, "host")
    assert residency.host_victims(protected=set()) == ["a", "b"]
    assert residency.host_victims(protected={"a"}) == ["b", "c"]
    residency.drop("a")
    residency.drop("b")
    assert residency.keys("host") == ["c"] and residency.host_victims(protected=set()) == []
