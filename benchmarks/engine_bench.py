"""Multi-adapter engine throughput and latency against transformers + peft, in one process.

GPU:  python benchmarks/engine_bench.py --shape qwen2.5-0.5b --requests 128
CPU smoke:  python benchmarks/engine_bench.py --shape tiny --requests 8
--compile (default on CUDA) measures the engine twice, eager then with compiled decode layers, in one process.
Weights are random (speed depends on shapes only); adapters are random rank-16 all-linear peft dirs.
"""

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.engine_workload import run_engine  # noqa: E402
from server.engine.engine import Engine, EngineConfig  # noqa: E402
from tests.model_factory import LLAMA3_8B, QWEN25_05B, build_model, build_tokenizer  # noqa: E402

SHAPES = {"tiny": dict(architecture="qwen2"), "qwen2.5-0.5b": QWEN25_05B, "llama3-8b": LLAMA3_8B}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="RAG-shaped prompt lengths (default 1000 2000; tiny: 20 60)")
    p.add_argument("--new-tokens", type=int, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="answer lengths (default 128 256; tiny: 8 16)")
    p.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 32], help="distinct adapters per mix")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--max-rows", type=int, default=None, help="engine rows decoding at once (default: requests)")
    p.add_argument("--poisson-rate", type=float, default=40.0, help="requests/s of the Poisson arrival run")
    p.add_argument("--no-poisson", action="store_true")
    p.add_argument("--baseline-batch", type=int, default=8, help="transformers+peft rows per generate call")
    p.add_argument("--baseline-batches", type=int, default=1)
    p.add_argument("--baseline-new-tokens", type=int, default=32)
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also measure the engine with torch.compile'd decode layers (default: on CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="time decode graphs per bucket and prefill, then exit")
    return p.parse_args(argv)


def build_adapters(hf_model, root: Path, count: int, rank: int, seed: int) -> list[Path]:
    """``count`` random rank-``rank`` all-linear adapters saved as peft dirs (B != 0)."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(hf_model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                                                     init_lora_weights=False))
    dirs = []
    for i in range(count):
        torch.manual_seed(seed + i)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_" in name:
                    param.normal_(0, 0.02)
        path = root / f"adapter-{i}"
        peft_model.save_pretrained(path)
        dirs.append(path)
    peft_model.unload()  # give the base model back without LoRA layers
    return dirs


def run_peft_baseline(hf_model, adapter_dirs, workload, *, batch, batches, new_tokens, device):
    """transformers + peft mixed-adapter generate (adapter_names), a few batches only."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(hf_model, adapter_dirs[0], adapter_name="a0")
    for i, path in enumerate(adapter_dirs[1:], start=1):
        model.load_adapter(path, adapter_name=f"a{i}")
    model.eval()
    names = [f"a{i}" for i in range(len(adapter_dirs))]
    tokens = 0
    elapsed = 0.0
    for b in range(batches):
        rows = workload[b * batch : (b + 1) * batch]
        width = max(len(p) for p, _ in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for r, (prompt, _) in enumerate(rows):  # left padding, as decoder-only generate wants
            ids[r, width - len(prompt):] = torch.tensor(prompt)
            mask[r, width - len(prompt):] = 1
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                                 adapter_names=[names[(b * batch + r) % len(names)] for r in range(len(rows))])
        sync(device)
        elapsed += time.perf_counter() - t0
        tokens += (out.shape[1] - width) * len(rows)
    model.unload()
    return {"tokens": tokens, "seconds": elapsed, "tok_s": tokens / elapsed, "rows": batch, "batches": batches,
            "adapters": min(len(names), batch)}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    args = parse_args(argv)
    tiny = args.shape == "tiny"
    device = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    prompt_range = args.prompt_tokens or ((20, 60) if tiny else (1000, 2000))
    new_range = args.new_tokens or ((8, 16) if tiny else (128, 256))
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="engine-bench-"))
    tokenizer = build_tokenizer()
    t0 = time.perf_counter()
    model_path = build_model(tmp / "model", dtype=dtype, tokenizer=tokenizer, **SHAPES[args.shape])
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
    vocab = hf_model.config.vocab_size
    workload = [([rng.randrange(3, vocab) for _ in range(rng.randint(*prompt_range))], rng.randint(*new_range))
                for _ in range(args.requests)]
    max_adapters = max(args.adapters)
    adapter_dirs = build_adapters(hf_model, tmp / "adapters", max_adapters, args.rank, args.seed)
    print(f"model + {max_adapters} adapters built in {time.perf_counter() - t0:.1f}s on {device} ({dtype})", flush=True)

    results = {"shape": args.shape, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "requests": args.requests, "prompt_tokens": prompt_range, "new_tokens": new_range, "variants": {}}
    compile_too = args.compile if args.compile is not None else device.type == "cuda"
    for variant, compiled in (("eager", False), ("compiled", True)):
        if compiled and not compile_too:
            continue
        config = EngineConfig(max_rows=args.max_rows or args.requests, max_len=prompt_range[1] + new_range[1] + 1,
                              adapter_slots=max_adapters, max_rank=args.rank, prefill_chunk=2048,
                              prefill_budget=16384, cuda_graphs=not args.no_cuda_graphs, compile=compiled)
        t0 = time.perf_counter()
        engine = Engine.from_hf(hf_model, config=config, device=device, dtype=dtype)
        for i, path in enumerate(adapter_dirs):
            engine.adapters.load(f"a{i}", path)
        print(f"{variant} engine built (graphs captured{', layers compiled' if compiled else ''}) in "
              f"{time.perf_counter() - t0:.1f}s", flush=True)
        if args.profile:
            profile(engine, vocab, device)
        else:
            results["variants"][variant] = measure_engine(engine, workload, args=args, rng=rng, vocab=vocab,
                                                          device=device, tiny=tiny)
        engine.close()
        del engine
        if device.type == "cuda":  # the next variant gets the memory back (graph pools included)
            import gc

            gc.collect()
            torch.cuda.empty_cache()
    if args.profile:
        return 0

    if not args.no_baseline:
        results["peft_baseline"] = run_peft_baseline(
            hf_model, adapter_dirs, workload, batch=args.baseline_batch, batches=args.baseline_batches,
            new_tokens=args.baseline_new_tokens if not tiny else 8, device=device)
    print_table(results)
    out = os.environ.get("OUT")
    if out:
        Path(out, "engine_bench.json").write_text(json.dumps(results, indent=2, default=str))
    return 0


def measure_engine(engine, workload, *, args, rng, vocab, device, tiny) -> dict:
    """Warm-up over the workload, then every run of the plan, single-request decode and long-prompt TTFT."""
    max_adapters = max(args.adapters)
    results = {"runs": {}}
    # Warm-up over the whole workload: the allocator and the per-shape kernel choices of every prompt length.
    run_engine(engine, workload, adapter_names=[f"a{i}" for i in range(max_adapters)])
    plans = [("engine, no adapters", [], None)]
    plans += [(f"engine, {k} adapters", [f"a{i}" for i in range(k)], None) for k in args.adapters]
    if not args.no_poisson:
        k = max_adapters
        plans.append((f"engine, {k} adapters, Poisson {args.poisson_rate:g}/s", [f"a{i}" for i in range(k)],
                      args.poisson_rate))
    for label, names, rate in plans:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        metrics = run_engine(engine, workload, adapter_names=names, poisson_rate=rate, seed=args.seed)
        if device.type == "cuda":
            metrics["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
        results["runs"][label] = metrics
        print(f"{label}: {metrics['tok_s']:.0f} tok/s, TTFT p50 {metrics['ttft_p50_ms']:.0f} ms", flush=True)

    # single request: decode speed and time to first token of a long RAG prompt
    single_prompt = workload[0][0][:128]
    for key, names in (("single_request_tok_s", []), ("single_request_adapter_tok_s", ["a0"])):
        single = run_engine(engine, [(single_prompt, 256 if not tiny else 16)], adapter_names=names)
        results[key] = 1000 / single["tpot_p50_ms"]
    long_prompt = [rng.randrange(3, vocab) for _ in range(min(2000, engine.cache.max_len - 2))]
    ttfts = [run_engine(engine, [(long_prompt, 1)], adapter_names=["a0"])["ttft_p50_ms"] for _ in range(3)]
    results["ttft_long_ms"] = min(ttfts)
    results["ttft_long_tokens"] = len(long_prompt)
    results["engine_memory_gib"] = {"kv_cache": engine.cache.nbytes() / 2**30, "kv_blocks": engine.cache.num_blocks,
                                    "adapter_slots": engine.adapters.nbytes() / 2**30}
    return results


def profile(engine, vocab, device):
    """Per-bucket decode step time (graph replay, and with the host's argmax + copy), prefill time, top kernels."""
    from server.engine.decode_step import EagerDecode
    from server.engine.segments import segment_prompts, to_segments

    decode = engine.scheduler.decode
    at = min(1500, engine.cache.max_len - 2)
    model, cache = engine.model, engine.cache

    def tables(rows):  # distinct blocks per row where the cache has them (timing only: contents do not matter)
        ids = torch.arange(rows * cache.max_blocks) % (cache.num_blocks - 1) + 1
        return ids.view(rows, cache.max_blocks).to(torch.int32)

    for bucket in (1, 8, 32, 64, 128):
        if bucket > engine.cache.rows:
            continue
        for lora in (False, True):
            tokens = [5] * bucket
            positions = [at] * bucket
            slots = [1 + (i % engine.adapters.num_slots) for i in range(bucket)] if lora else [0] * bucket
            for _ in range(3):
                decode(tokens, positions, slots, tables(bucket)).argmax(-1).tolist()
            sync(device)
            t0 = time.perf_counter()
            for _ in range(20):
                decode(tokens, positions, slots, tables(bucket)).argmax(-1).tolist()
            sync(device)
            print(f"decode bucket {bucket:4d} lora={lora!s:5}: {(time.perf_counter() - t0) / 20 * 1000:.2f} ms/step", flush=True)
    for slot in (0, 1):
        for n in sorted({min(512, at), min(2000, at)}):
            toks = torch.randint(3, vocab, (1, n), device=device)
            pos = torch.arange(n, device=device)[None]
            segments = to_segments(segment_prompts([n], [slot], width=n), device=device) if slot else None
            for _ in range(2):
                model.forward(toks, pos, cache=cache, block_tables=tables(1).to(device), adapters=engine.adapters, segments=segments,
                              cached=0)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(5):
                model.forward(toks, pos, cache=cache, block_tables=tables(1).to(device), adapters=engine.adapters, segments=segments,
                              cached=0)
            sync(device)
            print(f"prefill {n} tokens adapter slot {slot}: {(time.perf_counter() - t0) / 5 * 1000:.2f} ms", flush=True)
    # A prefill group as the scheduler forms it: 8 prompts of 1,500 tokens, each with its own adapter or none.
    group = min(8, cache.rows)
    n = min(1500, at)
    toks = torch.randint(3, vocab, (group, n), device=device)
    pos = torch.arange(n, device=device)[None].expand(group, n)
    group_tables = tables(group).to(device)
    for slots in ([0] * group, [1 + i % engine.adapters.num_slots for i in range(group)]):
        segments = (to_segments(segment_prompts([n] * group, slots, width=n), device=device) if any(slots) else None)
        for repeat in range(7):
            if repeat == 2:
                sync(device)
                t0 = time.perf_counter()
            model.forward(toks, pos, cache=cache, block_tables=group_tables, adapters=engine.adapters, segments=segments,
                          cached=0)
        sync(device)
        print(f"prefill group {group} x {n} tokens, {len(set(slots) - {0})} adapters: "
              f"{(time.perf_counter() - t0) / 5 * 1000:.2f} ms", flush=True)
    if device.type != "cuda":
        return
    rows = min(128, cache.rows)
    # The two kernel tables side by side show where the adapter cost goes: the engine's own step (graphs,
    # compiled when the engine is), then the same step run eagerly.
    for name, step in (("engine's step", decode), ("eager", EagerDecode(model, cache, engine.adapters))):
        for lora in (False, True):
            args = ([5] * rows, [at] * rows, [1 + (i % engine.adapters.num_slots) if lora else 0 for i in range(rows)],
                    tables(rows))
            step(*args)
            sync(device)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                step(*args)
                sync(device)
            print(f"decode step, {rows} rows, adapters {'on' if lora else 'off'} ({name}, one step):")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=90))
    for slots in ([0] * group, [1 + i % engine.adapters.num_slots for i in range(group)]):
        segments = (to_segments(segment_prompts([n] * group, slots, width=n), device=device) if any(slots) else None)
        model.forward(toks, pos, cache=cache, block_tables=group_tables, adapters=engine.adapters, segments=segments, cached=0)
        sync(device)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            model.forward(toks, pos, cache=cache, block_tables=group_tables, adapters=engine.adapters, segments=segments,
                          cached=0)
            sync(device)
        print(f"prefill group {group} x {n} tokens, {len(set(slots) - {0})} adapters (one forward):")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))


def print_table(results):
    peft = results.get("peft_baseline")
    print(f"\n{results['shape']} on {results['device']}: {results['requests']} requests, prompts "
          f"{results['prompt_tokens']} tokens, answers {results['new_tokens']} tokens")
    print(f"{'run':53} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'TPOT p99':>9} {'GiB':>6} "
          f"{'x no-ad':>8} {'x peft':>8}")
    variants = results["variants"]
    for variant, v in variants.items():
        runs = v["runs"]
        base = runs["engine, no adapters"]["tok_s"]
        for label, m in runs.items():
            vs_peft = f"{m['tok_s'] / peft['tok_s']:.1f}" if peft else "-"
            print(f"{variant + ' ' + label:53} {m['tok_s']:8.0f} {m['ttft_p50_ms']:9.1f} {m['ttft_p99_ms']:9.1f} "
                  f"{m['tpot_p50_ms']:9.2f} {m['tpot_p99_ms']:9.2f} {m.get('peak_gpu_gib', float('nan')):6.1f} "
                  f"{m['tok_s'] / base:8.2f} {vs_peft:>8}")
    if peft:
        print(f"{'transformers+peft adapter_names (measured)':53} {peft['tok_s']:8.0f}   "
              f"({peft['batches']} batch(es) x {peft['rows']} rows, {peft['adapters']} adapters; its tok/s is "
              f"measured on those batches only and assumed to hold for the whole workload)")
    for variant, v in variants.items():
        print(f"{variant}: single request decode {v['single_request_tok_s']:.0f} tok/s without adapter "
              f"(target >= 400), {v['single_request_adapter_tok_s']:.0f} tok/s with one; "
              f"TTFT of a {v['ttft_long_tokens']}-token prompt alone: {v['ttft_long_ms']:.1f} ms (target < 50)")
    if any("Poisson" in label for v in variants.values() for label in v["runs"]):
        print("(the Poisson run's throughput is bounded by its arrival rate; its TTFT is the one to read)")
    for variant, v in variants.items():
        runs = v["runs"]
        mix = [label for label in runs if "adapters" in label and "Poisson" not in label and "no adapters" not in label]
        if mix:
            widest, base = mix[-1], runs["engine, no adapters"]["tok_s"]
            print(f"ratios ({variant}): {widest} / no adapters = {runs[widest]['tok_s'] / base:.2f} (target >= 0.85)"
                  + (f"; / transformers+peft = {runs[widest]['tok_s'] / peft['tok_s']:.0f}x (target >= 50x)"
                     if peft else ""))
    if "eager" in variants and "compiled" in variants:
        eager, compiled = variants["eager"], variants["compiled"]
        parts = [f"{label.removeprefix('engine, ')} {compiled['runs'][label]['tok_s'] / m['tok_s']:.2f}x"
                 for label, m in eager["runs"].items() if label in compiled["runs"]]
        parts.append(f"single request {compiled['single_request_tok_s'] / eager['single_request_tok_s']:.2f}x")
        parts.append(f"single request + adapter "
                     f"{compiled['single_request_adapter_tok_s'] / eager['single_request_adapter_tok_s']:.2f}x")
        print("compiled / eager tok/s: " + ", ".join(parts))


if __name__ == "__main__":
    raise SystemExit(main())
