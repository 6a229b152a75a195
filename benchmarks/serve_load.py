"""Load on a real `lorag serve` process: concurrent streaming chat clients on loopback, extractive generator
vs the tiny model through transformers and through the multi-adapter engine, concurrency 1 vs N. Prints requests/s, time to first token, retrieval share.

    python benchmarks/serve_load.py --clients 8 --seconds 10
"""

import argparse
import asyncio
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

QUESTIONS = [
    "How long is the warranty on a Kestrel Tide buoy?",
    "How often should the pH probe be calibrated?",
    "What is the accuracy of the dissolved oxygen sensor?",
    "What is the range of the LoRaWAN link?",
    "How many API requests per minute are allowed?",
]
MAX_CLIENTS = 32
MAX_SECONDS = 60


@dataclass
class RunResult:
    generator: str
    clients: int
    seconds: float
    ttft: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: int = 0
    retrieval_s: float = 0.0

    @property
    def requests(self) -> int:
        return len(self.latency)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def pct(self, values: list[float], q: float) -> float:
        if not values:
            return float("nan")
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]

    @property
    def retrieval_share(self) -> float:
        return self.retrieval_s / sum(self.latency) if self.latency else float("nan")


async def one_request(client: httpx.AsyncClient, key: str, question: str, max_tokens: int, result: RunResult):
    payload = {"model": "lorag", "messages": [{"role": "user", "content": question}], "stream": True,
               "max_tokens": max_tokens}
    started = time.perf_counter()
    first = None
    try:
        async with client.stream("POST", "/v1/chat/completions", json=payload,
                                 headers={"Authorization": f"Bearer {key}"}) as response:
            if response.status_code != 200:
                result.errors += 1
                await response.aread()
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.errors += 1
                    return
                if first is None and chunk["choices"][0]["delta"].get("content"):
                    first = time.perf_counter() - started
                if "usage" in chunk:
                    result.tokens += chunk["usage"]["completion_tokens"]
    except httpx.HTTPError:
        result.errors += 1
        return
    result.latency.append(time.perf_counter() - started)
    result.ttft.append(first if first is not None else result.latency[-1])


async def run_load(base_url: str, key: str, *, generator: str, clients: int, seconds: float,
                   max_tokens: int) -> RunResult:
    result = RunResult(generator, clients, seconds)
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:
        before = await retrieval_seconds(client)

        async def worker(index: int):
            n = index
            while time.perf_counter() < deadline:
                await one_request(client, key, QUESTIONS[n % len(QUESTIONS)], max_tokens, result)
                n += clients

        started = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(clients)))
        result.seconds = time.perf_counter() - started
        result.retrieval_s = await retrieval_seconds(client) - before
    return result


async def retrieval_seconds(client: httpx.AsyncClient) -> float:
    text = (await client.get("/metrics")).text
    return sum(float(m) for m in re.findall(r'^lorag_retrieval_seconds_sum\{[^}]*\} (\S+)$', text, re.M))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(data_dir: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "LORAG_GENERATION__FALLBACK": "error",
                        "LORAG_SERVER__MAX_CONCURRENT_REQUESTS": str(MAX_CLIENTS)}
    command = [sys.executable, "-m", "lorag.cli", "serve", "--data-dir", str(data_dir), "--port", str(port), *extra]
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base_url = f"http://127.0.0.1:{port}"
    wait_until_ready(process, base_url)
    return process, base_url


def wait_until_ready(process: subprocess.Popen, base_url: str, *, timeout_s: float = 300) -> None:
    """Poll /readyz of the server ``process`` started; exit with its stderr if it dies or never gets ready."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited: {process.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit("server did not become ready")


def prepare(data_dir: Path) -> tuple[str, Path]:
    from ingest.pipeline import ingest_paths
    from server.settings import ServerSettings
    from server.tenants import TenantRegistry
    from tests.model_factory import build_model

    settings = ServerSettings(data_dir=data_dir)
    report = ingest_paths([REPO_ROOT / "data" / "docs"], tenant="bench", settings=settings)
    assert report.failed == 0
    _, key = TenantRegistry(data_dir).add("bench")
    model_path = build_model(data_dir / "tiny-llama", architecture="llama")
    return key, model_path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8, help=f"concurrent clients, at most {MAX_CLIENTS}")
    parser.add_argument("--seconds", type=float, default=10, help=f"per run, at most {MAX_SECONDS}")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    clients = max(1, min(args.clients, MAX_CLIENTS))
    seconds = max(1.0, min(args.seconds, MAX_SECONDS))

    results: list[RunResult] = []
    with tempfile.TemporaryDirectory(prefix="lorag-serve-load-") as tmp:
        data_dir = Path(tmp)
        key, model_path = prepare(data_dir)
        runs = (
            ("extractive", ["--generator", "extractive"]),
            ("tiny-llama", ["--model", str(model_path), "--engine", "transformers"]),
            ("tiny-engine", ["--model", str(model_path), "--engine", "engine"]),  # continuous batching, on CPU here
        )
        for name, extra in runs:
            process, base_url = start_server(data_dir, extra)
            try:
                for n in (1, clients):
                    asyncio.run(run_load(base_url, key, generator=name, clients=1, seconds=1, max_tokens=4))  # warm
                    results.append(asyncio.run(run_load(base_url, key, generator=name, clients=n, seconds=seconds,
                                                        max_tokens=args.max_tokens)))
            finally:
                process.terminate()
                process.wait(timeout=30)
    report(results, clients)
    return 1 if any(r.errors for r in results) else 0


def report(results: list[RunResult], clients: int) -> None:
    print(f"{'generator':<12}{'clients':>8}{'requests':>10}{'req/s':>9}{'ttft p50':>10}{'ttft p99':>10}"
          f"{'lat p50':>9}{'tok/s':>8}{'retr%':>7}{'errors':>8}")
    for r in results:
        print(f"{r.generator:<12}{r.clients:>8}{r.requests:>10}{r.rps:>9.2f}{r.pct(r.ttft, .5) * 1000:>8.0f}ms"
              f"{r.pct(r.ttft, .99) * 1000:>8.0f}ms{r.pct(r.latency, .5):>8.2f}s{r.tokens / r.seconds:>8.1f}"
              f"{r.retrieval_share * 100:>6.0f}%{r.errors:>8}")
    by = {(r.generator, r.clients): r for r in results}
    print("\nratios:")
    for name in ("extractive", "tiny-llama", "tiny-engine"):
        one, many = by[(name, 1)], by[(name, clients)]
        print(f"  {name}: req/s at {clients} clients / at 1 client = {many.rps / one.rps:.2f}x; "
              f"ttft p50 {statistics.median(many.ttft) / statistics.median(one.ttft):.2f}x")
    for n in sorted({1, clients}):
        ext, tiny = by[("extractive", n)], by[("tiny-llama", n)]
        print(f"  {n} client(s): tiny-llama / extractive req/s = {tiny.rps / ext.rps:.2f}x; "
              f"ttft p50 = {statistics.median(tiny.ttft) / statistics.median(ext.ttft):.2f}x")
        engine = by[("tiny-engine", n)]
        print(f"  {n} client(s): tiny-engine / tiny-llama (transformers) req/s = {engine.rps / tiny.rps:.2f}x; "
              f"ttft p50 = {statistics.median(engine.ttft) / statistics.median(tiny.ttft):.2f}x")


if __name__ == "__main__":
    sys.exit(main())
