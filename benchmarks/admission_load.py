"""Fair admission under load, on a real `lorag serve` process (uvicorn, extractive generator, real retrieval):

1. fair:     N streaming clients spread evenly over 4 tenants; every request must succeed, and the tenants'
             p99 latencies are compared (worst / best).
2. limited:  the same load with one tenant held to --rpm requests per minute: only that tenant may see
             errors, and only 429 with Retry-After (its clients wait that long, as a polite client does).
3. busy:     one tenant sends --busy-clients streams while the other three send 4 each: the quiet tenants'
             p99 is compared with the busy one's (without per-tenant admission a busy tenant fills the queue).
4. overload: --overload-clients streams; the excess must be shed with 503 + Retry-After (429 for a tenant
             holding more of the full queue than a late one) and nothing else, every tenant still served,
             while the server's RSS stays flat.

Prints one row per tenant and phase, the ratios, the status counts, the deepest queue seen and RSS.

    nice python benchmarks/admission_load.py --clients 64 --seconds 60 --overload-clients 256
"""

import argparse
import asyncio
import json
import os
import re
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.serve_load import QUESTIONS, free_port, wait_until_ready  # noqa: E402

TENANTS = ("tenant-a", "tenant-b", "tenant-c", "tenant-d")
ADMIN_KEY = "admission-bench-" + "k" * 24
MAX_CLIENTS = 512


@dataclass
class TenantResult:
    latency: list[float] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)  # HTTP status (or "stream-error", "transport") -> count
    retry_after_missing: int = 0

    def pct(self, q: float) -> float:
        if not self.latency:
            return float("nan")
        ordered = sorted(self.latency)
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


@dataclass
class Phase:
    name: str
    clients: dict[str, int]  # tenant -> concurrent clients
    seconds: float
    tenants: dict[str, TenantResult] = field(default_factory=dict)
    max_queued: float = 0.0
    max_in_flight: float = 0.0
    rss_mb: list[float] = field(default_factory=list)


async def one_request(client: httpx.AsyncClient, key: str, question: str, result: TenantResult) -> float:
    """One streamed chat request; returns how long to wait before the next (Retry-After on 429/503)."""
    payload = {"model": "lorag", "messages": [{"role": "user", "content": question}], "stream": True,
               "max_tokens": 64}
    started = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/chat/completions", json=payload,
                                 headers={"Authorization": f"Bearer {key}"}) as response:
            if response.status_code != 200:
                await response.aread()
                result.statuses[response.status_code] += 1
                retry_after = response.headers.get("Retry-After")
                if retry_after is None:
                    result.retry_after_missing += 1
                    return 1.0
                return float(retry_after)
            async for line in response.aiter_lines():
                if line.startswith("data: {") and '"error"' in line[:20]:
                    result.statuses["stream-error"] += 1
                    return 0.0
    except httpx.HTTPError:
        result.statuses["transport"] += 1
        return 0.5
    result.statuses[200] += 1
    result.latency.append(time.perf_counter() - started)
    return 0.0


async def run_phase(base_url: str, keys: dict[str, str], phase: Phase, pid: int) -> Phase:
    total = sum(phase.clients.values())
    deadline = time.perf_counter() + phase.seconds
    phase.tenants = {tenant: TenantResult() for tenant in phase.clients}
    limits = httpx.Limits(max_connections=total + 4, max_keepalive_connections=total + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=300, limits=limits) as client:

        async def worker(tenant: str, index: int):
            n = index
            while time.perf_counter() < deadline:
                wait = await one_request(client, keys[tenant], QUESTIONS[n % len(QUESTIONS)], phase.tenants[tenant])
                n += 1
                if wait:
                    await asyncio.sleep(min(wait, max(0.0, deadline - time.perf_counter())))

        async def watch():
            while time.perf_counter() < deadline:
                text = (await client.get("/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"})).text
                phase.max_queued = max(phase.max_queued, _gauge(text, "lorag_chat_queued"))
                phase.max_in_flight = max(phase.max_in_flight, _gauge(text, "lorag_chat_in_flight"))
                phase.rss_mb.append(rss_mb(pid))
                await asyncio.sleep(1.0)

        workers = [worker(tenant, i) for tenant, count in phase.clients.items() for i in range(count)]
        await asyncio.gather(watch(), *workers)
    phase.rss_mb.append(rss_mb(pid))
    return phase


def _gauge(text: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1)) / 1024


def start_server(data_dir: Path, env_extra: dict[str, str]):
    import subprocess

    port = free_port()
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "LORAG_SERVER__ADMIN_KEY": ADMIN_KEY,
                        **env_extra}
    command = [sys.executable, "-m", "lorag.cli", "serve", "--data-dir", str(data_dir), "--port", str(port),
               "--generator", "extractive"]
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base_url = f"http://127.0.0.1:{port}"
    wait_until_ready(process, base_url)
    return process, base_url


def prepare(data_dir: Path) -> dict[str, str]:
    """The sample corpus ingested for each tenant (equal work per request), and each tenant's key."""
    from ingest.pipeline import ingest_paths
    from retrieval.embedder import Embedder
    from server.settings import ServerSettings
    from server.tenants import TenantRegistry

    settings = ServerSettings(data_dir=data_dir)
    embedder = Embedder(settings.embedding)
    registry = TenantRegistry(data_dir)
    keys = {}
    for tenant in TENANTS:
        report = ingest_paths([REPO_ROOT / "data" / "docs"], tenant=tenant, settings=settings, embedder=embedder)
        assert report.failed == 0, report
        keys[tenant] = registry.add(tenant)[1]
    return keys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64, help="streaming clients in the fair and limited phases")
    parser.add_argument("--seconds", type=float, default=60, help="length of the fair phase")
    parser.add_argument("--short-seconds", type=float, default=30, help="length of each other phase")
    parser.add_argument("--rpm", type=int, default=12, help="requests per minute of the limited tenant")
    parser.add_argument("--busy-clients", type=int, default=52, help="clients of the busy tenant")
    parser.add_argument("--overload-clients", type=int, default=256)
    args = parser.parse_args()
    clients = max(4, min(args.clients, MAX_CLIENTS))
    even = {tenant: clients // len(TENANTS) for tenant in TENANTS}

    phases: list[Phase] = []
    with tempfile.TemporaryDirectory(prefix="lorag-admission-") as tmp:
        data_dir = Path(tmp)
        keys = prepare(data_dir)
        plan = [
            (Phase("fair", even, args.seconds), {}),
            (Phase("limited", even, args.short_seconds),
             {"LORAG_SERVER__TENANT_LIMITS": json.dumps({TENANTS[-1]: {"requests_per_minute": args.rpm}})}),
            (Phase("busy", {TENANTS[0]: args.busy_clients} | {t: 4 for t in TENANTS[1:]}, args.short_seconds), {}),
            (Phase("overload", {t: min(args.overload_clients, MAX_CLIENTS) // len(TENANTS) for t in TENANTS},
                   args.short_seconds), {}),
        ]
        for phase, env in plan:
            process, base_url = start_server(data_dir, env)
            try:
                asyncio.run(run_phase(base_url, keys, Phase("warm-up", {TENANTS[0]: 2}, 3), process.pid))
                phases.append(asyncio.run(run_phase(base_url, keys, phase, process.pid)))
            finally:
                process.terminate()
                process.wait(timeout=60)
    return report(phases, args)


def report(phases: list[Phase], args) -> int:
    failures = []
    print(f"{'phase':<9}{'tenant':<10}{'clients':>8}{'ok':>6}{'req/s':>7}{'p50':>8}{'p99':>8}  other statuses")
    for phase in phases:
        for tenant, result in phase.tenants.items():
            others = {k: v for k, v in result.statuses.items() if k != 200}
            missing = f" (Retry-After missing: {result.retry_after_missing})" if result.retry_after_missing else ""
            print(f"{phase.name:<9}{tenant:<10}{phase.clients[tenant]:>8}{result.statuses[200]:>6}"
                  f"{result.statuses[200] / phase.seconds:>7.1f}{result.pct(.5):>7.2f}s{result.pct(.99):>7.2f}s  "
                  f"{others or '-'}{missing}")
        print(f"{'':<9}deepest queue {phase.max_queued:.0f}, most in flight {phase.max_in_flight:.0f}, "
              f"RSS {phase.rss_mb[0]:.0f} -> {phase.rss_mb[-1]:.0f} MB (max {max(phase.rss_mb):.0f})")
    by = {phase.name: phase for phase in phases}
    print("\nchecks:")
    fair = by["fair"].tenants
    p99 = [r.pct(.99) for r in fair.values()]
    ratio = max(p99) / min(p99)
    errors = sum(v for r in fair.values() for k, v in r.statuses.items() if k != 200)
    print(f"  fair: worst / best tenant p99 = {ratio:.2f}x (target <= 2); non-200 answers: {errors} (target 0)")
    failures += [ratio > 2] + [errors > 0]
    limited = by["limited"].tenants
    limited_errors = {t: dict(r.statuses - Counter({200: r.statuses[200]})) for t, r in limited.items()}
    others_ok = all(not errors for t, errors in limited_errors.items() if t != TENANTS[-1])
    only_429 = set(limited_errors[TENANTS[-1]]) <= {429} and limited[TENANTS[-1]].retry_after_missing == 0
    others_errors = sum(sum(e.values()) for t, e in limited_errors.items() if t != TENANTS[-1])
    print(f"  limited: {TENANTS[-1]} answered {limited_errors[TENANTS[-1]]} at {args.rpm} rpm (only 429 + "
          f"Retry-After: {only_429}); other tenants' non-200 answers: {others_errors}")
    failures += [not others_ok, not only_429]
    busy = by["busy"].tenants
    quiet = max(busy[t].pct(.99) for t in TENANTS[1:])
    print(f"  busy: quiet tenants' worst p99 / busy tenant's p99 = {quiet / busy[TENANTS[0]].pct(.99):.2f}x")
    overload = by["overload"]
    statuses = sum((r.statuses for r in overload.tenants.values()), Counter())
    missing = sum(r.retry_after_missing for r in overload.tenants.values())
    # 429 here: a tenant holding more of the full queue than another that arrived later gave up its newest waiter
    shed_cleanly = set(statuses) <= {200, 429, 503} and missing == 0
    served = min(r.statuses[200] for r in overload.tenants.values())
    growth = overload.rss_mb[-1] - overload.rss_mb[0]
    print(f"  overload: statuses {dict(statuses)}; shed only with 503/429 + Retry-After: {shed_cleanly}; "
          f"least-served tenant got {served} answers; "
          f"RSS {overload.rss_mb[0]:.0f} -> {overload.rss_mb[-1]:.0f} MB ({growth:+.0f} MB)")
    failures += [not shed_cleanly, statuses[503] == 0, served == 0]
    return 1 if any(failures) else 0


if __name__ == "__main__":
    sys.exit(main())
