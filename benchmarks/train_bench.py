"""Claim: lorag's training step beats a plain HF Trainer + peft step on tokens/s and peak memory, same losses.

Both train the same rank-16 all-linear adapter with gradient checkpointing on the same rows, in the same
order, from the same initial adapter weights, in one process. Prints a table with ratios and writes JSON
to $OUT (or --out) when set.

    python benchmarks/train_bench.py --shape qwen2.5-0.5b --steps 30      # GPU: LoRA and QLoRA, compiled layers
    python benchmarks/train_bench.py --shape qwen2.5-0.5b --steps 30 --no-compile   # GPU, eager lorag step
    python benchmarks/train_bench.py --shape tiny --steps 3               # CPU smoke run
"""

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from tests.model_factory import QWEN25_05B, build_model  # noqa: E402
from training.batches import Row, collate  # noqa: E402

SHAPES = {
    "qwen2.5-0.5b": dict(shape=QWEN25_05B, batch=8, seq=1024),
    "tiny": dict(shape={}, batch=8, seq=128),
}


def synthetic_rows(n: int, *, seq: int, vocab: int, answer_fraction: float, seed: int) -> list[Row]:
    """Full-length rows of random tokens; the last ``answer_fraction`` of each row is the trained answer."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(16, vocab, (seq,), generator=generator).tolist()
        answer_start = seq - int(seq * answer_fraction)
        labels = [-100] * answer_start + ids[answer_start:]
        rows.append(Row(ids, labels, list(range(seq))))
    return rows


def run_lorag(model_path: Path, rows: list[Row], *, method: str, args) -> dict:
    """lorag's own path: bf16 weights (or 4-bit), chunked assistant-only loss, the recipe's optimizer step."""
    from accelerate import Accelerator
    from transformers import get_cosine_schedule_with_warmup

    from training.loss import CausalLMLoss
    from training.model import attach_adapter, build_optimizer, compile_layers, load_base_model, use_bf16
    from training.recipe import optimizer_step
    from training.settings import TrainingSettings

    cfg = TrainingSettings(
        base_model=str(model_path), method=method, rank=16, alpha=32, dropout=0.0, target_modules="all-linear",
        gradient_checkpointing=True, lr=2e-4, warmup_ratio=0.0, batch_size=args.batch, grad_accum=1,
        max_seq_len=args.seq, compile=args.compile,
    )
    accelerator = Accelerator()
    bf16 = use_bf16(cfg.precision)
    _reset_memory()
    base = load_base_model(str(model_path), cfg)
    torch.manual_seed(0)  # same initial adapter weights as the baseline
    peft_model = attach_adapter(base, cfg)
    if method != "qlora":
        peft_model.to(accelerator.device)
    if cfg.compile:
        compile_layers(peft_model)
    model = accelerator.prepare_model(CausalLMLoss(peft_model, chunk_tokens=cfg.loss_chunk_tokens),
                                      device_placement=method != "qlora")
    optimizer = build_optimizer(peft_model.parameters(), cfg)
    scheduler = get_cosine_schedule_with_warmup(optimizer, 0, args.steps)
    losses, times = [], []
    for step in range(args.steps):
        batch = collate(rows[step * args.batch : (step + 1) * args.batch], pad_id=0)
        _sync()
        started = time.perf_counter()
        loss = optimizer_step(model, [batch], optimizer=optimizer, scheduler=scheduler, accelerator=accelerator,
                              bf16=bf16, max_grad_norm=1.0)
        _sync()
        times.append(time.perf_counter() - started)
        losses.append(loss)
    result = _summary("lorag", method, losses, times, args)
    accelerator.free_memory()
    del model, peft_model, base, optimizer, scheduler
    return result


def run_baseline(model_path: Path, rows: list[Row], *, method: str, args) -> dict:
    """The usual recipe: fp32 weights + bf16 autocast (or 4-bit + prepare_model_for_kbit_training), HF Trainer."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    cuda = torch.cuda.is_available()
    _reset_memory()
    kwargs = {"dtype": torch.float32, "attn_implementation": "sdpa"}
    if method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs.update(dtype=torch.bfloat16, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16))
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    if method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    dataset = [{"input_ids": torch.tensor(r.input_ids), "labels": torch.tensor(r.labels)} for r in rows[: args.steps * args.batch]]

    times, losses = [], []

    class Timing(TrainerCallback):
        def on_step_begin(self, *_, **__):
            _sync()
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__):
            _sync()
            times.append(time.perf_counter() - self.started)

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    sequential = {}
    trainer_class = Trainer
    if "train_sampling_strategy" in TrainingArguments.__dataclass_fields__:
        sequential["train_sampling_strategy"] = "sequential"
    else:  # older transformers: same order as lorag's run through a sequential sampler
        class SequentialTrainer(Trainer):
            def _get_train_sampler(self, *args, **kwargs):
                return torch.utils.data.SequentialSampler(self.train_dataset)

        trainer_class = SequentialTrainer
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = TrainingArguments(
            output_dir=output_dir, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
            max_steps=args.steps, learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0,
            max_grad_norm=1.0, bf16=cuda and torch.cuda.is_bf16_supported(), gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": False}, logging_steps=1, save_strategy="no",
            report_to=[], dataloader_num_workers=0, seed=0, **sequential,
            optim="paged_adamw_8bit" if method == "qlora" else "adamw_torch", use_cpu=not cuda,
            disable_tqdm=True,
        )
        trainer = trainer_class(model=model, args=training_args, train_dataset=dataset, callbacks=[Timing()])
        trainer.train()
    result = _summary("baseline", method, losses, times, args)
    trainer.accelerator.free_memory()
    del trainer, model
    return result


def _summary(implementation: str, method: str, losses: list[float], times: list[float], args) -> dict:
    measured = times[args.warmup :] or times  # the first steps pay for allocator growth and kernel selection
    tokens = args.batch * args.seq
    return {
        "implementation": implementation, "method": method, "steps": len(times),
        "tokens_per_s": tokens / statistics.mean(measured),
        "step_s_median": statistics.median(measured),
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "losses": losses,
    }


def _reset_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        # Anything still allocated here would count in the next run's peak: show it.
        print(f"allocated before run: {torch.cuda.memory_allocated() / 2**20:.0f} MiB", flush=True)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def compare(lorag: dict, baseline: dict) -> dict:
    diffs = [abs(a - b) / max(abs(b), 1e-9) for a, b in zip(lorag["losses"], baseline["losses"])]
    peak = None
    if lorag["peak_memory_bytes"] and baseline["peak_memory_bytes"]:
        peak = lorag["peak_memory_bytes"] / baseline["peak_memory_bytes"]
    return {
        "method": lorag["method"],
        "speedup": lorag["tokens_per_s"] / baseline["tokens_per_s"],
        "peak_memory_ratio": peak,
        "max_loss_rel_diff": max(diffs) if diffs else None,
        "loss_steps_compared": len(diffs),
    }


def print_table(runs: list[dict], comparisons: list[dict]) -> None:
    gib = lambda b: "-" if b is None else f"{b / 2**30:.2f}"  # noqa: E731
    print(f"\n{'method':<7} {'impl':<9} {'tokens/s':>10} {'step s':>8} {'peak GiB':>9} {'first loss':>10} {'last loss':>10}")
    for run in runs:
        print(f"{run['method']:<7} {run['implementation']:<9} {run['tokens_per_s']:>10.0f} {run['step_s_median']:>8.3f} "
              f"{gib(run['peak_memory_bytes']):>9} {run['losses'][0]:>10.4f} {run['losses'][-1]:>10.4f}")
    print(f"\n{'method':<7} {'speedup':>8} {'peak mem ratio':>15} {'max loss diff':>14}")
    for c in comparisons:
        peak = "-" if c["peak_memory_ratio"] is None else f"{c['peak_memory_ratio']:.2f}x"
        print(f"{c['method']:<7} {c['speedup']:>7.2f}x {peak:>15} {100 * c['max_loss_rel_diff']:>13.3f}%")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the throughput (compilation)")
    parser.add_argument("--batch", type=int, help="sequences per optimizer step (default 8)")
    parser.add_argument("--seq", type=int, help="tokens per sequence (default 1024; tiny: 128)")
    parser.add_argument("--answer-fraction", type=float, default=0.25, help="share of each row that is trained answer")
    parser.add_argument("--methods", default="lora,qlora")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="lorag side: torch.compile the decoder layers (default: on with CUDA, off on CPU)")
    parser.add_argument("--no-baseline", action="store_true", help="lorag runs only (quick experiments)")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="directory for train_bench.json")
    args = parser.parse_args(argv)
    preset = SHAPES[args.shape]
    args.batch = args.batch or preset["batch"]
    args.seq = args.seq or preset["seq"]
    args.warmup = min(args.warmup, max(args.steps - 1, 0))
    if args.compile is None:
        args.compile = torch.cuda.is_available()  # compiling on CPU takes longer than the smoke run itself

    methods = [m for m in args.methods.split(",") if m]
    if "qlora" in methods and not torch.cuda.is_available():
        print("qlora: skipped (needs CUDA)")
        methods.remove("qlora")
    runs, comparisons = [], []
    with tempfile.TemporaryDirectory() as tmp:
        model_path = build_model(Path(tmp) / "model", **preset["shape"])
        vocab = json.loads((model_path / "config.json").read_text())["vocab_size"]
        rows = synthetic_rows(args.steps * args.batch, seq=args.seq, vocab=vocab, answer_fraction=args.answer_fraction, seed=0)
        for method in methods:
            lorag = run_lorag(model_path, rows, method=method, args=args)
            if args.no_baseline:
                runs.append(lorag)
                continue
            baseline = run_baseline(model_path, rows, method=method, args=args)
            runs += [baseline, lorag]
            comparisons.append(compare(lorag, baseline))
    print_table(runs, comparisons)
    report = {
        "shape": args.shape, "batch": args.batch, "seq": args.seq, "steps": args.steps, "warmup": args.warmup,
        "answer_fraction": args.answer_fraction, "compile": args.compile,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "versions": {"torch": torch.__version__, **_versions()}, "runs": runs, "comparisons": comparisons,
    }
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "train_bench.json").write_text(json.dumps(report, indent=1))
    return 0


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("transformers", "peft", "accelerate", "bitsandbytes"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


if __name__ == "__main__":
    sys.exit(main())
