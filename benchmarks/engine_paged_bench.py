"""The paged-KV engine at the sizes users serve: throughput against the GPU's physical limit, concurrency,
prefix reuse, Poisson arrivals, single-request latency, and a profile of one decode step and one prefill.

GPU:  python benchmarks/engine_paged_bench.py --shape llama3-8b
      python benchmarks/engine_paged_bench.py --shape qwen2.5-0.5b --concurrency 128 --no-prefix --no-poisson
CPU smoke:  python benchmarks/engine_paged_bench.py --shape tiny

The model is built with random weights directly on the device (nothing written to disk: speed depends on
shapes only); adapters are random rank-16 all-linear LoRAs made in memory. Needs torch, transformers and
server/engine only. The physical-limit estimate beside the figures assumes the GPU's peak bf16 matrix rate
and memory bandwidth (--peak-tflops, --peak-tbs) and charges every prompt token's FLOPs and every decode
step's bytes (weights once plus every running sequence's live keys and values) to whichever is slower.
"""

import argparse
import contextlib
import gc
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.engine_workload import percentile, run_engine  # noqa: E402
from server.engine.engine import Engine, EngineConfig  # noqa: E402
from server.engine.model import EngineModel  # noqa: E402

SHAPES = {  # as tests/model_factory's, without its tokenizer dependencies
    "tiny": dict(architecture="qwen2", hidden_size=64, layers=2, heads=4, kv_heads=2, intermediate_size=128,
                 vocab_size=512, max_positions=4096),
    "qwen2.5-0.5b": dict(architecture="qwen2", hidden_size=896, layers=24, heads=14, kv_heads=2,
                         intermediate_size=4864, vocab_size=151936, max_positions=32768),
    "llama3-8b": dict(architecture="llama", hidden_size=4096, layers=32, heads=32, kv_heads=8,
                      intermediate_size=14336, vocab_size=128256, max_positions=8192),
}
# The throughput workload: prompt and new-token counts per request, drawn uniformly (--shape tiny: smaller).
PROMPT_RANGE, NEW_RANGE = (1000, 2000), (128, 256)
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--concurrency", type=int, nargs="+", default=[64, 128, 256, 384],
                   help="requests arriving at once, one run each (32 adapters)")
    p.add_argument("--adapters", type=int, default=32)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--shared-prefix", type=int, default=300, help="tokens every request shares in the prefix run")
    p.add_argument("--no-prefix", action="store_true")
    p.add_argument("--poisson-rate", type=float, default=4.0)
    p.add_argument("--poisson-requests", type=int, default=64)
    p.add_argument("--no-poisson", action="store_true")
    p.add_argument("--prefill-budget", type=int, default=16384)
    p.add_argument("--poisson-chunk", type=int, default=512,
                   help="prompt tokens per step in the chunked Poisson run (prompts split into chunks this long)")
    p.add_argument("--mix-compare", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the main load with decode steps after prompts (mixing off)")
    p.add_argument("--ahead-compare", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the main load with every decode step's tokens read before the next step is "
                        "launched (the engine's decode_ahead off)")
    p.add_argument("--pack-compare", action="store_true",
                   help="also run the main load with prompt groups laid out padded (pack_prompts off; a lone "
                        "prompt is never packed)")
    p.add_argument("--repeats", type=int, default=1,
                   help="run the main load (without and with adapters, and read first) this many times in turn")
    p.add_argument("--prompt-block", type=int, default=None,
                   help="also run the main load with the LoRA plans of forwards of 8,192+ prompt tokens cut into "
                        "blocks of this many rows (smaller forwards keep segments.prompt_block's choice)")
    p.add_argument("--prompt-block-sweep", type=int, nargs="*", default=[],
                   help="GPU time of one 8 x 1,500-token prompt forward with its LoRA plan in blocks of these sizes")
    p.add_argument("--poisson-variants", nargs="+", default=["mixed", "chunked", "after"],
                   choices=["mixed", "chunked", "after", "server"],
                   help="Poisson runs: mixing with this script's budget, mixing with --poisson-chunk chunks, decode "
                        "after prompts, mixing with the engine's default chunk and budget (what lorag serve uses)")
    p.add_argument("--no-throughput", action="store_true", help="skip the all-at-once and concurrency runs")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--inductor", nargs="+", default=["default"], choices=["default", "untuned", "max-autotune"],
                   help="inductor settings to compile the single-request engine with, one engine each")
    p.add_argument("--compiled-single", action=argparse.BooleanOptionalAction, default=None,
                   help="also time a single request on a 1-row engine with compiled decode graphs (default: CUDA)")
    p.add_argument("--time-limit", type=float, default=540.0, help="seconds after which optional parts are skipped")
    p.add_argument("--peak-tflops", type=float, default=790.0)
    p.add_argument("--peak-tbs", type=float, default=4.8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("requests", "adapters", "rank", "poisson_requests", "prefill_budget", "poisson_chunk", "repeats"):
        if getattr(args, name) < 1:  # refused here, before a model is built, rather than by the engine after
            p.error(f"--{name.replace('_', '-')} must be at least 1, not {getattr(args, name)}")
    blocks = args.prompt_block_sweep + ([args.prompt_block] if args.prompt_block is not None else [])
    if any(size not in (16, 32, 64, 128) for size in blocks):
        p.error("--prompt-block and --prompt-block-sweep take 16, 32, 64 or 128 (rows per LoRA block)")
    if (args.prompt_block or args.prompt_block_sweep or args.pack_compare) and args.no_throughput:
        p.error("--prompt-block, --prompt-block-sweep and --pack-compare are parts of the throughput run: "
                "leave out --no-throughput")
    if args.poisson_rate <= 0:
        p.error(f"--poisson-rate must be above 0 requests a second, not {args.poisson_rate:g}")
    if min(args.concurrency) < 1:
        p.error(f"--concurrency must be at least 1, not {min(args.concurrency)}")
    return args


def build_hf_model(shape: dict, *, dtype, device):
    """A transformers causal LM of ``shape`` with random weights, initialised on ``device``."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    config_class = Qwen2Config if shape["architecture"] == "qwen2" else LlamaConfig
    config = config_class(hidden_size=shape["hidden_size"], num_hidden_layers=shape["layers"],
                          num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                          intermediate_size=shape["intermediate_size"], vocab_size=shape["vocab_size"],
                          max_position_embeddings=shape["max_positions"], tie_word_embeddings=False,
                          rope_theta=500000.0 if shape["architecture"] == "llama" else 1000000.0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def random_adapter(model: EngineModel, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """peft-named tensors of a random all-linear rank-``rank`` LoRA (B != 0), made on the model's device."""
    gen = torch.Generator(device=model.device).manual_seed(seed)
    tensors = {}
    for layer in range(model.shape.layers):
        for module, (fan_in, fan_out) in model.shape.lora_dims().items():
            block = "self_attn" if module in MODULES[:4] else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
            for half, shape in (("A", (rank, fan_in)), ("B", (fan_out, rank))):
                tensors[f"{prefix}.lora_{half}.weight"] = torch.randn(
                    shape, generator=gen, device=model.device, dtype=model.dtype) * 0.02
    return tensors


def workload(rng, count, prompt_range, new_range, vocab, *, shared: list[int] | None = None):
    shared = shared or []
    return [(shared + [rng.randrange(3, vocab) for _ in range(rng.randint(*prompt_range) - len(shared))],
             rng.randint(*new_range)) for _ in range(count)]


def physical_limit(model: EngineModel, requests, *, peak_tflops: float, peak_tbs: float) -> dict:
    """Seconds the workload takes at best when all of it arrives at once: prompt FLOPs at the peak rate, then
    decode steps each bounded by max(FLOPs, bytes read) with every unfinished sequence in the batch."""
    s = model.shape
    linear_params = s.layers * (s.hidden * (s.q_dim + 2 * s.kv_dim) + s.q_dim * s.hidden
                                + 3 * s.hidden * s.intermediate) + s.hidden * s.vocab_size
    weight_bytes = (linear_params + s.layers * 2 * s.hidden) * model.embed.element_size()
    kv_token_bytes = 2 * s.layers * s.kv_dim * model.embed.element_size()
    attention_flops = lambda q, k: 4 * s.layers * s.q_dim * q * k  # noqa: E731 - QK^T and PV per query/key pair
    prefill_flops = sum(2 * linear_params * len(p) + attention_flops(len(p), len(p)) / 2 for p, _ in requests)
    prefill_s = prefill_flops / (peak_tflops * 1e12)
    decode_s = 0.0
    for step in range(max(n for _, n in requests)):
        running = [(len(p), n) for p, n in requests if n > step]
        flops = sum(2 * linear_params + attention_flops(1, length + step) for length, _ in running)
        read = weight_bytes + sum(kv_token_bytes * (length + step) for length, _ in running)
        decode_s += max(flops / (peak_tflops * 1e12), read / (peak_tbs * 1e12))
    tokens = sum(n for _, n in requests)
    return {"prefill_s": prefill_s, "decode_s": decode_s, "tok_s": tokens / (prefill_s + decode_s)}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    tiny = args.shape == "tiny"
    device = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    prompt_range, new_range = ((20, 60), (8, 16)) if tiny else (PROMPT_RANGE, NEW_RANGE)
    shared_prefix = min(args.shared_prefix, prompt_range[0] - 1)
    concurrency = [min(c, 16) for c in args.concurrency] if tiny else args.concurrency
    rng = random.Random(args.seed)
    shape = SHAPES[args.shape]
    vocab = shape["vocab_size"]
    max_len = prompt_range[1] + new_range[1] + 1

    t0 = time.perf_counter()
    hf = build_hf_model(shape, dtype=dtype, device=device)
    model = EngineModel.from_hf(hf, cache_len=max_len, dtype=dtype, device=device)
    del hf  # the engine shares or copied every weight it needs; its KV cache gets the rest of the memory
    free_memory(device)
    rows = max(concurrency + [args.requests])
    config = EngineConfig(max_rows=rows, max_len=max_len, adapter_slots=args.adapters, max_rank=args.rank,
                          prefill_chunk=2048, prefill_budget=args.prefill_budget, compile=False)
    engine = Engine.from_model(model, config=config)
    for i in range(args.adapters):
        engine.adapters.load_weights(f"a{i}", {"r": args.rank, "lora_alpha": 2 * args.rank},
                                     random_adapter(model, args.rank, args.seed + i), source=f"random adapter {i}")
    names = [f"a{i}" for i in range(args.adapters)]
    pool = engine.cache.pool
    results = {"shape": args.shape, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "kv_blocks": engine.cache.num_blocks, "block_size": engine.cache.block_size,
               "kv_cache_gib": engine.cache.nbytes() / 2**30, "max_rows": rows, "runs": {}}
    print(f"{args.shape} on {results['device']} ({dtype}): engine built in {time.perf_counter() - t0:.1f}s, "
          f"{rows} rows, KV cache {engine.cache.num_blocks} blocks x {engine.cache.block_size} tokens "
          f"({results['kv_cache_gib']:.1f} GiB, {pool.capacity * pool.block_size} tokens)", flush=True)

    def record(label, metrics, requests=None):
        if device.type == "cuda":
            metrics["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if requests is not None:
            metrics["limit"] = physical_limit(model, requests, peak_tflops=args.peak_tflops, peak_tbs=args.peak_tbs)
        results["runs"][label] = metrics
        limit = metrics.get("limit")
        print(f"{label:44} {metrics['tok_s']:8.0f} tok/s"
              + (f" (limit {limit['tok_s']:.0f}: {metrics['tok_s'] / limit['tok_s']:.2f} of it)" if limit else "")
              + f"  TTFT p50/p99 {metrics['ttft_p50_ms']:.0f}/{metrics['ttft_p99_ms']:.0f} ms"
              f"  TPOT p50/p99 {metrics['tpot_p50_ms']:.2f}/{metrics['tpot_p99_ms']:.2f} ms"
              f"  prefix hits {metrics['prefix_hit_rate']:.2f}", flush=True)

    main_load = workload(rng, args.requests, prompt_range, new_range, vocab)
    if not args.no_throughput:
        run_engine(engine, main_load, adapter_names=names)  # warm-up: allocator, kernel choices per prompt shape
        results["medians"] = main_runs(engine, main_load, names, args, record)
        if args.pack_compare:
            engine.scheduler.pack_prompts = False
            run_engine(engine, main_load, adapter_names=names)  # warm-up: kernels for the padded row counts
            results["medians, prompts padded"] = main_runs(engine, main_load, names, args, record,
                                                           suffix=", prompts padded")
            engine.scheduler.pack_prompts = True
        if args.prompt_block:
            with prompt_blocks_of(args.prompt_block):
                run_engine(engine, main_load, adapter_names=names)  # warm-up: the LoRA kernels at this block size
                results[f"medians, prompt blocks of {args.prompt_block}"] = main_runs(
                    engine, main_load, names, args, record, suffix=f", prompt blocks of {args.prompt_block}")
        if args.prompt_block_sweep and device.type == "cuda":
            prompt_block_sweep(engine, names, device, sizes=args.prompt_block_sweep)
        elif args.prompt_block_sweep:
            print("prompt-block sweep skipped: it times CUDA kernels", flush=True)
        if args.mix_compare:
            engine.scheduler.mix_decode = False
            record(f"{args.requests} at once, {args.adapters} adapters, decode after prompts",
                   run_engine(engine, main_load, adapter_names=names), main_load)
            engine.scheduler.mix_decode = True

        for c in concurrency:
            if c == args.requests:
                continue
            load = workload(rng, c, prompt_range, new_range, vocab)
            record(f"{c} at once, {args.adapters} adapters", run_engine(engine, load, adapter_names=names), load)

    if not args.no_prefix:
        shared = [rng.randrange(3, vocab) for _ in range(shared_prefix)]
        load = workload(rng, args.requests, prompt_range, new_range, vocab, shared=shared)
        primer = [(shared + [rng.randrange(3, vocab) for _ in range(8)], 1)]
        for on in (False, True):
            pool.prefix_cache = on
            run_engine(engine, primer, adapter_names=[], cold=True)  # a request before them left the prefix behind
            record(f"{args.requests} sharing {shared_prefix} tokens, prefix cache {'on' if on else 'off'}",
                   run_engine(engine, load, adapter_names=[], cold=False), load)
        pool.prefix_cache = True

    if not args.no_poisson:
        load = workload(rng, args.poisson_requests, prompt_range, new_range, vocab)
        sched = engine.scheduler
        defaults = EngineConfig()
        variants = {
            "mixed": ("mixed", True, config.prefill_chunk, config.prefill_budget),
            "chunked": (f"mixed, {args.poisson_chunk}-token chunks", True, args.poisson_chunk, args.poisson_chunk),
            "after": ("decode after prompts", False, config.prefill_chunk, config.prefill_budget),
            "server": (f"mixed, engine defaults (chunk {defaults.prefill_chunk}, budget {defaults.prefill_budget})",
                       True, defaults.prefill_chunk, defaults.prefill_budget),
        }
        for label, mix, chunk, budget in (variants[v] for v in args.poisson_variants):
            sched.mix_decode, sched.prefill_chunk, sched.prefill_budget = mix, chunk, budget
            for prompt, _ in load[:3]:  # warm-up: kernel choices for one prompt at a time (no run above had those)
                run_engine(engine, [(prompt, 4)], adapter_names=names[:1])
            with StepTrace(sched, device) as trace:
                metrics = run_engine(engine, load, adapter_names=names, poisson_rate=args.poisson_rate, seed=args.seed)
            metrics["steps"] = trace.summary()
            record(f"Poisson {args.poisson_rate:g}/s, {args.poisson_requests} requests, {args.adapters} adapters, "
                   f"{label}", metrics)
            print(trace.report(), flush=True)
        sched.mix_decode, sched.prefill_chunk, sched.prefill_budget = True, config.prefill_chunk, config.prefill_budget

    single = (main_load[0][0][:128], 16 if tiny else 256)
    for label, adapters in (("single request, eager graphs", []), ("single request + adapter, eager graphs", ["a0"])):
        metrics = run_engine(engine, [single], adapter_names=adapters)
        results[label] = 1000 / metrics["tpot_p50_ms"]
        print(f"{label}: {results[label]:.0f} tok/s", flush=True)
    long_prompt = [rng.randrange(3, vocab) for _ in range(2000 if not tiny else 60)]
    ttft = min(run_engine(engine, [(long_prompt, 1)], adapter_names=["a0"])["ttft_p50_ms"] for _ in range(3))
    results["ttft_lone_prompt_ms"] = ttft
    print(f"TTFT of a lone {len(long_prompt)}-token prompt (adapter a0): {ttft:.1f} ms", flush=True)

    if device.type == "cuda" and not args.no_profile:
        profile(engine, names, device, at=1500, rows=min(128, rows))
    engine.close()
    del engine
    free_memory(device)

    compiled_single = args.compiled_single if args.compiled_single is not None else device.type == "cuda"
    for variant in args.inductor if compiled_single else []:
        if time.perf_counter() - started > args.time_limit - 120:
            print(f"compiled single-request run ({variant}) skipped: time limit", flush=True)
            continue
        inductor_settings(variant)
        one = Engine.from_model(model, config=EngineConfig(max_rows=1, max_len=max_len, adapter_slots=1,
                                                            max_rank=args.rank, compile=True))
        one.adapters.load_weights("a0", {"r": args.rank, "lora_alpha": 2 * args.rank},
                                  random_adapter(model, args.rank, args.seed), source="random adapter 0")
        suffix = "" if variant == "default" else f", inductor {variant}"
        for label, adapters in (("single request, compiled graphs", []),
                                ("single request + adapter, compiled graphs", ["a0"])):
            run_engine(one, [single], adapter_names=adapters)
            metrics = run_engine(one, [single], adapter_names=adapters)
            results[label + suffix] = 1000 / metrics["tpot_p50_ms"]
            print(f"{label}{suffix}: {results[label + suffix]:.0f} tok/s", flush=True)
        if device.type == "cuda":
            results["single step" + suffix] = single_step_profile(one, device, at=len(single[0]) + single[1] // 2,
                                                                  tpot_ms=1000 / results["single request, compiled graphs" + suffix])
        if variant == args.inductor[0]:
            ttft = min(run_engine(one, [(long_prompt, 1)], adapter_names=["a0"])["ttft_p50_ms"] for _ in range(3))
            results["ttft_lone_prompt_compiled_ms"] = ttft
            print(f"TTFT of a lone {len(long_prompt)}-token prompt, compiled engine: {ttft:.1f} ms", flush=True)
        one.close()
        del one
        free_memory(device)
    print(f"total {time.perf_counter() - started:.0f}s", flush=True)
    out = os.environ.get("OUT")
    if out:
        Path(out, f"engine_paged_bench_{args.shape}.json").write_text(json.dumps(results, indent=2, default=str))
    return 0


def main_runs(engine, load, names, args, record, *, suffix: str = "") -> dict[str, float]:
    """The main load without adapters, with them, and (--ahead-compare) with every decode step read before
    the next is launched, --repeats times in turn; with repeats, the medians of each."""
    variants = [("no adapters", [], True), (f"{args.adapters} adapters", names, True)]
    if args.ahead_compare:
        variants.append((f"{args.adapters} adapters, every step read first", names, False))
    figures = {label: [] for label, _, _ in variants}
    for run in range(args.repeats):
        for label, adapters, ahead in variants:
            engine.scheduler.decode_ahead = ahead
            metrics = run_engine(engine, load, adapter_names=adapters)
            engine.scheduler.decode_ahead = True
            figures[label].append(metrics["tok_s"])
            run_label = f" (run {run + 1})" if args.repeats > 1 else ""
            record(f"{args.requests} at once, {label}{suffix}{run_label}", metrics, load)
    median = {label: statistics.median(values) for label, values in figures.items()}
    base, mixed = median["no adapters"], median[f"{args.adapters} adapters"]
    if args.repeats > 1:
        print(f"medians of {args.repeats}{suffix}: " + ", ".join(f"{label} {v:.0f} tok/s" for label, v in median.items()),
              flush=True)
    print(f"ratio {args.adapters} adapters / no adapters{suffix}: {mixed / base:.2f}", flush=True)
    return median


@contextlib.contextmanager
def prompt_blocks_of(rows: int):
    """Prompt groups' LoRA block plans cut into blocks of ``rows`` tokens (the engine picks 64 for groups of
    8,192 tokens and more, see segments.prompt_block) while inside."""
    from server.engine import segments

    chosen = segments.prompt_block
    segments.prompt_block = lambda tokens: rows if tokens >= 64 * 128 else chosen(tokens)
    try:
        yield
    finally:
        segments.prompt_block = chosen


def prompt_block_sweep(engine, names, device, *, sizes, group: int = 8, n: int = 1500) -> None:
    """GPU time of one prompt forward (``group`` x ``n`` tokens, one adapter each) with its LoRA plan cut into
    blocks of each of ``sizes`` rows, and without adapters: what the block size costs the prompt LoRA."""
    from server.engine.segments import segment_prompts, to_segments

    cache, model = engine.cache, engine.model
    ids = torch.arange(group * cache.max_blocks) % (cache.num_blocks - 1) + 1
    tables = ids.view(group, cache.max_blocks).to(torch.int32).to(device)
    slots = [engine.adapters.acquire(names[i % len(names)]) for i in range(group)]
    toks = torch.randint(3, model.shape.vocab_size, (group, n), device=device)
    pos = torch.arange(n, device=device)[None].expand(group, n)
    timings = {}
    for size in [None, *sizes]:
        segments = None if size is None else to_segments(segment_prompts([n] * group, slots, width=None, block_m=size),
                                                        device=device)
        # packed, as the engine runs a group of prompts
        run = dict(cache=cache, block_tables=tables, adapters=engine.adapters if size else None, segments=segments,
                   cached=0, pack=torch.arange(group * n, device=device),
                   logits_at=torch.full((group,), n - 1, device=device))
        model.forward(toks, pos, **run)
        sync(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            model.forward(toks, pos, **run)
        end.record()
        sync(device)
        timings[size] = start.elapsed_time(end) / 5
    for slot in slots:
        engine.adapters.release(slot)
    base = timings.pop(None)
    print(f"prompt forward {group} x {n} tokens: {base:.1f} ms without adapters; with {group} adapters: "
          + ", ".join(f"blocks of {size}: {ms:.1f} ms (LoRA {ms - base:.1f})" for size, ms in timings.items()),
          flush=True)


class StepTrace:
    """Times every scheduler round of a run (wall clock) with what it did: prompt tokens prefilled and requests
    that got a token. A round ends once the tokens it read are delivered; with decode ahead, a decode step's
    tokens are read, and counted, in the round after the one that launched it. Explains TTFT/TPOT tails."""

    def __init__(self, scheduler, device):
        self.scheduler, self.device, self.steps = scheduler, device, []

    def __enter__(self):
        sched, inner = self.scheduler, self.scheduler.step

        def timed_step():
            running = [s for s in sched.rows if s is not None]
            before = {s.seq_id: (s.computed, len(s.generated)) for s in running}
            t0 = time.perf_counter()
            inner()
            ms = (time.perf_counter() - t0) * 1000
            admitted = [s for s in sched.rows if s is not None and s.seq_id not in before]
            prompt = sum(s.computed - before[s.seq_id][0] for s in running) + sum(s.computed - s.cached
                                                                                   for s in admitted)
            decoded = sum(1 for s in running if len(s.generated) > before[s.seq_id][1] > 0)
            self.steps.append((ms, prompt, decoded))

        sched.step = timed_step
        return self

    def __exit__(self, *exc):
        del self.scheduler.step

    def summary(self) -> dict:
        times = [ms for ms, _, _ in self.steps]
        with_prompt = [ms for ms, prompt, _ in self.steps if prompt]
        decode_only = [ms for ms, prompt, decoded in self.steps if not prompt and decoded]
        return {"steps": len(times), "step_p50_ms": percentile(times, 50), "step_p99_ms": percentile(times, 99),
                "step_max_ms": max(times, default=float("nan")),
                "prompt_steps": len(with_prompt), "prompt_step_p50_ms": percentile(with_prompt, 50),
                "decode_only_step_p50_ms": percentile(decode_only, 50)}

    def report(self) -> str:
        s = self.summary()
        slowest = sorted(self.steps, reverse=True)[:5]
        return (f"  steps {s['steps']}: p50 {s['step_p50_ms']:.1f} ms, p99 {s['step_p99_ms']:.1f} ms, max "
                f"{s['step_max_ms']:.1f} ms; {s['prompt_steps']} with prompt tokens (p50 {s['prompt_step_p50_ms']:.1f}"
                f" ms), decode-only p50 {s['decode_only_step_p50_ms']:.1f} ms; slowest (ms, prompt tokens, decoded): "
                + ", ".join(f"({ms:.0f}, {p}, {d})" for ms, p, d in slowest))


_ENGINE_FEW_ROWS: int | None = None  # the engine's own FEW_ROWS, read before any variant changes it


def inductor_settings(variant: str) -> None:
    """Compile settings for the next single-request engine (dynamo's caches are reset so the layer compiles
    again): "default" as the engine compiles (tuned layer for steps of a few rows), "untuned" (the plain
    compiled layer for every step, as before the tuned one), "max-autotune" (default plus inductor's GEMM
    autotuning)."""
    import torch._dynamo
    import torch._inductor.config as inductor

    import server.engine.model as engine_model

    global _ENGINE_FEW_ROWS
    if _ENGINE_FEW_ROWS is None:
        _ENGINE_FEW_ROWS = engine_model.FEW_ROWS
    torch._dynamo.reset()
    engine_model.FEW_ROWS = 0 if variant == "untuned" else _ENGINE_FEW_ROWS
    inductor.max_autotune_gemm = variant == "max-autotune"


def single_step_profile(engine, device, *, at: int, tpot_ms: float) -> dict:
    """One-row decode: GPU time of the captured step replayed back to back (the GPU's share) against the
    measured time per token (the rest: time the GPU is not running the step, the host's work between steps
    that decode ahead does not hide), and the kernels of one step."""
    decode = engine.scheduler.decode
    table = (torch.arange(engine.cache.max_blocks) % (engine.cache.num_blocks - 1) + 1).to(torch.int32)[None]
    for lora in (False, True):
        step = ([5], [at], [1 if lora else 0], table)
        decode(*step).argmax(-1).tolist()
        graph, _ = decode.graphs[(decode.buckets[0], lora)]
        sync(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(50):
            graph.replay()
        end.record()
        sync(device)
        gpu_ms = start.elapsed_time(end) / 50
        if not lora:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                graph.replay()
                sync(device)
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=10, max_name_column_width=60))
            host_ms = tpot_ms - gpu_ms
            print(f"single-row decode step at {at} tokens: {gpu_ms:.2f} ms of GPU time replayed back to back, "
                  f"{tpot_ms:.2f} ms per token measured: {host_ms:.2f} ms ({host_ms / tpot_ms:.0%}) outside the step",
                  flush=True)
            result = {"gpu_ms": gpu_ms, "tpot_ms": tpot_ms}
        else:
            result["gpu_ms_adapter"] = gpu_ms
    return result


def profile(engine, names, device, *, at: int, rows: int):
    """GPU time of one decode step of ``rows`` rows at ``at`` cached tokens each (32 adapters and none), and of
    one 8 x 1,500 prefill group, by kernel: where the time goes, measured."""
    from server.engine.segments import segment_prompts, to_segments

    cache, model, decode = engine.cache, engine.model, engine.scheduler.decode
    ids = torch.arange(rows * cache.max_blocks) % (cache.num_blocks - 1) + 1
    tables = ids.view(rows, cache.max_blocks).to(torch.int32)
    slots = [engine.adapters.acquire(names[i % len(names)]) for i in range(rows)]
    for lora in (False, True):
        step = ([5] * rows, [at] * rows, slots if lora else [0] * rows, tables)
        for _ in range(3):
            decode(*step).argmax(-1).tolist()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(10):
            decode(*step).argmax(-1).tolist()
        sync(device)
        ms = (time.perf_counter() - t0) / 10 * 1000
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            decode(*step)
            sync(device)
        print(f"\ndecode step, {rows} rows at {at} tokens, adapters {'on' if lora else 'off'}: {ms:.2f} ms a step "
              f"(with the host's argmax and copy)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
    for slot in slots:
        engine.adapters.release(slot)
    group, n = 8, 1500
    toks = torch.randint(3, model.shape.vocab_size, (group, n), device=device)
    pos = torch.arange(n, device=device)[None].expand(group, n)
    plan = segment_prompts([n] * group, [1 + i for i in range(group)], width=n)
    segments = to_segments(plan, device=device)
    run = dict(cache=cache, block_tables=tables[:group].to(device), adapters=engine.adapters, segments=segments,
               cached=0)
    model.forward(toks, pos, **run)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(3):
        model.forward(toks, pos, **run)
    sync(device)
    ms = (time.perf_counter() - t0) / 3 * 1000
    flops = 2 * group * n * sum(w.numel() for w in (model.layers[0].qkv, model.layers[0].o, model.layers[0].gate_up,
                                                   model.layers[0].down)) * model.shape.layers
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        model.forward(toks, pos, **run)
        sync(device)
    print(f"\nprefill group {group} x {n} tokens, 8 adapters: {ms:.1f} ms, {flops / ms / 1e9:.0f} TFLOP/s in the "
          f"linear layers' base GEMMs' terms")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    raise SystemExit(main())
