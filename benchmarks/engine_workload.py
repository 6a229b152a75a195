"""The engine benchmarks' shared load generator: submit a workload to a running engine, time every answer."""

import random
import threading
import time

from server.engine.scheduler import Sequence


def percentile(values, q):
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def run_engine(engine, workload, *, adapter_names, poisson_rate=None, seed=0, cold=True):
    """Submit ``workload`` [(prompt, new_tokens)] with adapters round-robin; returns metrics.

    ``cold``: forget the prefix cache first, so a workload run again (or a warm-up) does not find its own
    prompts cached; the prefix cache's hit rate over the run is in the metrics either way.
    """
    pool = engine.cache.pool
    if cold:
        pool.clear_prefixes()
    queried, hits = pool.stats.queried_tokens, pool.stats.hit_tokens
    records = []
    finished = threading.Event()
    remaining = [len(workload)]
    lock = threading.Lock()

    def make_emit(record):
        def emit(tokens, finish, error):
            now = time.perf_counter()
            if tokens:
                if record["first"] is None:
                    record["first"] = now
                record["last"] = now
                record["tokens"] += len(tokens)
            if finish is not None:
                record["finish"] = finish
                record["error"] = error
                with lock:
                    remaining[0] -= 1
                    if remaining[0] == 0:
                        finished.set()
        return emit

    rng = random.Random(seed)
    sched = engine.scheduler
    start = time.perf_counter()
    for i, (prompt, new) in enumerate(workload):
        if poisson_rate and i:
            time.sleep(rng.expovariate(poisson_rate))
        name = adapter_names[i % len(adapter_names)] if adapter_names else None
        record = {"submit": time.perf_counter(), "first": None, "last": None, "tokens": 0, "finish": None}
        records.append(record)
        sched.submit(Sequence(prompt=prompt, max_tokens=new, emit=make_emit(record),
                              adapter_slot=engine.adapters.acquire(name)))
    finished.wait()
    elapsed = time.perf_counter() - start
    errors = [r["error"] for r in records if r.get("error") is not None]
    if errors:
        raise RuntimeError(f"engine failed: {errors[0]!r}")
    tokens = sum(r["tokens"] for r in records)
    ttft = [(r["first"] - r["submit"]) * 1000 for r in records]
    tpot = [(r["last"] - r["first"]) * 1000 / (r["tokens"] - 1) for r in records if r["tokens"] > 1]
    return {"tokens": tokens, "seconds": elapsed, "tok_s": tokens / elapsed,
            "ttft_p50_ms": percentile(ttft, 50), "ttft_p99_ms": percentile(ttft, 99),
            "tpot_p50_ms": percentile(tpot, 50), "tpot_p99_ms": percentile(tpot, 99),
            "prefix_hit_rate": (pool.stats.hit_tokens - hits) / max(1, pool.stats.queried_tokens - queried)}
