"""Adapter swap latency in the server's adapter service against peft's own load_adapter / set_adapter, one process.

CPU:  python benchmarks/adapter_swap.py --shape tiny --repeats 10
GPU:  python benchmarks/adapter_swap.py --shape qwen2.5-0.5b --repeats 20
Random-init base (tests/model_factory.py) and random rank-16 all-linear adapters written as lorag adapter dirs.
Rows: cold load (disk -> validated -> host -> device), host -> device promotion, activation (choosing the
adapter for a request), unload; time to first token with a cold adapter vs the same adapter resident.
With --engine, the same service rows over the engine's adapter slots, and the slots alone.
"""

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.model_factory import LLAMA3_8B, QWEN25_05B, build_model, build_tokenizer  # noqa: E402

SHAPES = {"tiny": dict(architecture="llama"), "qwen2.5-0.5b": QWEN25_05B, "llama3-8b": LLAMA3_8B}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("--engine", action="store_true", help="also time the engine's adapter slots (server/engine)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def make_adapters(model_path: Path, root: Path, *, count: int, rank: int) -> list[Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from adapters.manifest import AdapterManifest, LoraSpec, model_fingerprint, write_adapter_dir, write_manifest

    fingerprint = model_fingerprint(AutoConfig.from_pretrained(model_path))
    base = AutoModelForCausalLM.from_pretrained(model_path)
    paths = []
    for index in range(count):
        torch.manual_seed(index)
        peft_model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                                                     init_lora_weights=False))
        name = f"bench{index}"

        def fill(directory: Path) -> None:
            peft_model.save_pretrained(directory)
            write_manifest(directory, AdapterManifest(
                name=name, tenant="bench", base_model=str(model_path), base_fingerprint=fingerprint, method="lora",
                lora=LoraSpec(rank=rank, alpha=2 * rank, target_modules="all-linear")))

        paths.append(write_adapter_dir(root / "tenants" / "bench" / "adapters" / name, fill))
        base = peft_model.unload()  # back to the plain model for the next adapter
    return paths


def timed(fn, *, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - start) * 1000


def sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def summary(samples: list[float]) -> dict:
    return {"median_ms": statistics.median(samples), "min_ms": min(samples), "n": len(samples)}


def bench_service(model_path: Path, data_dir: Path, adapters: list[Path], *, device, repeats: int,
                  engine: bool = False, rank: int = 16) -> dict:
    """lorag: the server's AdapterService (built as `lorag serve` builds it) over TransformersGenerator (peft
    layers, per-row adapter names) or, with ``engine``, over the engine's adapter slots (what `lorag serve` uses
    for Llama/Qwen2 on a GPU)."""
    from core.prompt import ChatMessage
    from server.generation.protocol import GenerationRequest, SamplingParams
    from server.services import build_services, close_services
    from server.settings import ServerSettings

    if engine:
        from server.engine.engine import EngineConfig
        from server.generation.engine_generator import EngineGenerator

        generator = EngineGenerator.from_pretrained(
            str(model_path), device=device, config=EngineConfig(max_rows=2, max_len=256, adapter_slots=1, max_rank=rank))
    else:
        from server.generation.transformers_generator import TransformersGenerator

        generator = TransformersGenerator.from_pretrained(str(model_path), device=device)
    settings = ServerSettings(data_dir=data_dir, adapters={"max_resident": 1, "max_host": len(adapters),
                                                           "poll_interval_s": 0})
    services = build_services(settings, generator=generator)
    service = services.adapters
    names = [path.name for path in adapters]
    results = {"cold": [], "promote": [], "unload": [], "activate": []}
    for round_ in range(repeats):
        name = names[round_ % len(names)]
        service.unload("bench", name)  # to disk
        results["cold"].append(timed(lambda: service.load("bench", name), device=device))
        results["unload"].append(timed(lambda: service.unload("bench", name), device=device))
    # Host -> device: every adapter in host memory, one device slot, alternate between two.
    for name in names:
        service.load("bench", name)
    for round_ in range(repeats):
        name = names[round_ % 2]
        results["promote"].append(timed(lambda: service.load("bench", name), device=device))

    async def ttft(name: str | None) -> float:
        request = GenerationRequest(messages=(ChatMessage("user", "hello"),), passages=(),
                                    sampling=SamplingParams(max_tokens=1))
        start = time.perf_counter()
        lease = None
        if name is not None:
            lease = await service.acquire("bench", name)
            request = GenerationRequest(messages=request.messages, passages=(), sampling=request.sampling,
                                        adapter=lease.key)
        activated = time.perf_counter()
        stream = await generator.start(request)
        async for _ in stream.deltas:
            break
        end = time.perf_counter()
        if lease is not None:
            lease.release()
        return (end - start) * 1000, (activated - start) * 1000

    async def ttfts():
        out = {"ttft_cold": [], "ttft_warm": [], "ttft_base": []}
        for round_ in range(repeats):
            name = names[round_ % len(names)]
            await asyncio.to_thread(service.unload, "bench", name)
            out["ttft_cold"].append((await ttft(name))[0])
            warm, activation = await ttft(name)
            out["ttft_warm"].append(warm)
            results["activate"].append(activation)  # acquire of a resident adapter: bookkeeping only
            out["ttft_base"].append((await ttft(None))[0])
        return out

    results.update(asyncio.run(ttfts()))
    asyncio.run(close_services(services))  # the adapter service; the generator is ours to close
    asyncio.run(generator.close())
    return {key: summary(values) for key, values in results.items()}


def bench_peft(model_path: Path, adapters: list[Path], *, device, dtype, repeats: int) -> dict:
    """Baseline: PeftModel.load_adapter(path) / set_adapter / delete_adapter on the same model and files."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
    model = PeftModel.from_pretrained(base, str(adapters[0]), adapter_name="keep")
    results = {"cold": [], "activate": [], "unload": []}
    for round_ in range(repeats):
        path = adapters[round_ % len(adapters)]
        results["cold"].append(timed(lambda: model.load_adapter(str(path), adapter_name="swap"), device=device))
        results["activate"].append(timed(lambda: model.set_adapter("swap"), device=device))
        model.set_adapter("keep")
        results["unload"].append(timed(lambda: model.delete_adapter("swap"), device=device))
    return {key: summary(values) for key, values in results.items()}


def bench_engine(model_path: Path, adapters: list[Path], *, device, dtype, rank: int, repeats: int) -> dict:
    """The engine's preallocated slots: load = copy into a slot; activation = a row's slot index (acquire)."""
    from transformers import AutoModelForCausalLM

    from server.engine.engine import Engine, EngineConfig

    hf_model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    engine = Engine.from_hf(hf_model, config=EngineConfig(max_rows=2, max_len=256, adapter_slots=2, max_rank=rank),
                            device=device, dtype=dtype, start=False)
    slots = engine.adapters
    results = {"cold": [], "activate": [], "unload": []}
    for round_ in range(repeats):
        path = adapters[round_ % len(adapters)]
        results["cold"].append(timed(lambda: slots.load("swap", path), device=device))

        def activate():
            slots.release(slots.acquire("swap"))

        results["activate"].append(timed(activate, device=device))
        results["unload"].append(timed(lambda: slots.unload("swap"), device=device))
    engine.close()
    return {key: summary(values) for key, values in results.items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    with tempfile.TemporaryDirectory(prefix="lorag-adapter-bench-") as tmp:
        tmp = Path(tmp)
        shape = dict(SHAPES[args.shape])
        model_path = build_model(tmp / "model", tokenizer=build_tokenizer(), dtype=dtype, **shape)
        adapters = make_adapters(model_path, tmp / "data", count=3, rank=args.rank)
        size_mb = (adapters[0] / "adapter_model.safetensors").stat().st_size / 2**20
        print(f"shape={args.shape} device={device} dtype={dtype} rank={args.rank} all-linear adapter={size_mb:.1f} MiB "
              f"repeats={args.repeats}")
        ours = bench_service(model_path, tmp / "data", adapters, device=device, repeats=args.repeats)
        peft = bench_peft(model_path, adapters, device=device, dtype=dtype, repeats=args.repeats)
        engine = served_engine = None
        if args.engine:
            engine = bench_engine(model_path, adapters, device=device, dtype=dtype, rank=args.rank,
                                  repeats=args.repeats)
            served_engine = bench_service(model_path, tmp / "data", adapters, device=device,
                                          repeats=args.repeats, engine=True, rank=args.rank)
    def cell(stats, key):
        return f"{stats[key]['median_ms']:.3f}" if stats and key in stats else "-"

    rows = [("cold load (disk -> device)", "cold"), ("host -> device promotion", "promote"),
            ("activation", "activate"), ("unload", "unload"), ("TTFT, cold adapter", "ttft_cold"),
            ("TTFT, resident adapter", "ttft_warm"), ("TTFT, base model", "ttft_base")]
    print("\nmedian ms; service = the server's AdapterService (validation, host tier, LRU) over the generator named")
    print("| step | service + peft generator | peft alone | service+peft / peft | service + engine | engine slots alone |"
          " service+engine / peft |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, key in rows:
        mine, theirs = ours.get(key), peft.get(key)
        ratio = f"{mine['median_ms'] / theirs['median_ms']:.3f}x" if mine and theirs else "-"
        ratio_engine = (f"{served_engine[key]['median_ms'] / theirs['median_ms']:.3f}x"
                        if served_engine and theirs and key in served_engine else "-")
        print(f"| {label} | {cell(ours, key)} | {cell(peft, key)} | {ratio} | {cell(served_engine, key)} | "
              f"{cell(engine, key)} | {ratio_engine} |")
    for label, stats in (("peft generator", ours), ("engine", served_engine)):
        if stats:
            penalty = stats["ttft_cold"]["median_ms"] - stats["ttft_warm"]["median_ms"]
            print(f"cold-adapter TTFT penalty, {label}: {penalty:.1f} ms "
                  f"({stats['ttft_cold']['median_ms'] / stats['ttft_warm']['median_ms']:.2f}x the resident adapter's TTFT)")
    if args.json:
        args.json.write_text(json.dumps({"shape": args.shape, "device": device, "rank": args.rank, "lorag": ours,
                                         "peft": peft, "engine": engine, "service_engine": served_engine}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
