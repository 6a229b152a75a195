"""Multi-GPU adapter training with FSDP2: tokens/s, scaling efficiency and peak memory per GPU.

Runs lorag's own training step (training.sharding.shard, training.loss.CausalLMLoss,
training.recipe.optimizer_step) on a random-weight model of a real shape. The model is built on the meta
device and its shards are initialised on each GPU, so nothing is downloaded or written to disk and a
70B shape never exists whole anywhere. One launch measures one world size; ``--report`` puts the JSON of
several launches side by side with the scaling efficiency (tokens/s at N GPUs / (N x tokens/s at 1 GPU)).

    # 8B-shape LoRA and QLoRA at 1, 2 and 4 GPUs, then the table:
    for n in 1 2 4; do for m in lora qlora; do
      torchrun --standalone --nproc_per_node $n benchmarks/fsdp_train.py --shape llama3-8b --method $m --out $OUT/8b-$m-$n.json
    done; done
    python benchmarks/fsdp_train.py --report $OUT/8b-*.json
    # A 70B-shape LoRA step on 8 GPUs:
    torchrun --standalone --nproc_per_node 8 benchmarks/fsdp_train.py --shape llama3-70b --steps 4 --warmup 1 --out $OUT/70b.json
    # CPU dry run of the same code path (gloo, tiny shape):
    torchrun --standalone --nproc_per_node 2 benchmarks/fsdp_train.py --shape tiny --dry-run
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.model_factory import LLAMA3_8B  # noqa: E402

LLAMA3_70B = dict(
    architecture="llama", hidden_size=8192, layers=80, heads=64, kv_heads=8,
    intermediate_size=28672, vocab_size=128256, max_positions=8192,
)
TINY = dict(architecture="llama", hidden_size=64, layers=2, heads=4, kv_heads=2, intermediate_size=128, vocab_size=512,
            max_positions=4096)
SHAPES = {
    "llama3-8b": dict(shape=LLAMA3_8B, batch=2, seq=2048),
    "llama3-70b": dict(shape=LLAMA3_70B, batch=1, seq=2048),
    "tiny": dict(shape=TINY, batch=2, seq=64),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--method", choices=("lora", "qlora"), default="lora")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps (the first --warmup are not timed)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, help="sequences per GPU per step (default per shape)")
    parser.add_argument("--seq", type=int, help="tokens per sequence (default per shape)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    parser.add_argument("--dry-run", action="store_true", help="2 steps, CPU allowed: checks the code path, measures nothing")
    parser.add_argument("--out", type=Path, help="write the result as JSON (main process)")
    parser.add_argument("--report", nargs="+", type=Path, metavar="JSON", help="print a table of earlier results and exit")
    args = parser.parse_args(argv)
    if args.report:
        return args
    defaults = SHAPES[args.shape]
    args.batch = args.batch or defaults["batch"]
    args.seq = args.seq or defaults["seq"]
    if args.dry_run:
        args.steps, args.warmup = 2, 0
    if args.warmup >= args.steps:
        parser.error(f"--warmup {args.warmup} leaves no timed step of --steps {args.steps}")
    if min(args.batch, args.seq, args.rank) < 1:
        parser.error("--batch, --seq and --rank must be positive")
    if args.method == "qlora" and args.shape == "llama3-70b":
        # The random 4-bit model is quantized from a whole bf16 model on each GPU: 140 GB for 70B.
        parser.error("--method qlora is measured on the 8B shape; the 70B step is --method lora (FSDP)")
    return args


def build_model(args, device):
    """The shape's random-weight model + a LoRA adapter, FSDP-sharded, each process initialising its own shards."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, LlamaConfig

    from training.loss import CausalLMLoss
    from training.model import attach_adapter, freeze_base
    from training.sharding import shard
    from training.settings import TrainingSettings

    shape = dict(SHAPES[args.shape]["shape"])
    shape.pop("architecture")
    config = LlamaConfig(
        vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=shape["max_positions"], tie_word_embeddings=False,
    )
    bf16 = device.type == "cuda"
    dtype = torch.bfloat16 if bf16 else torch.float32
    cfg = TrainingSettings(base_model=args.shape, method=args.method, rank=args.rank, alpha=2 * args.rank, dropout=0.0,
                           target_modules="all-linear", gradient_checkpointing=args.gradient_checkpointing,
                           lr=2e-4, batch_size=args.batch, max_seq_len=args.seq)
    if args.method == "qlora":
        base = _quantized_model(config, device)
    else:
        # Parameters on meta, buffers (rotary frequencies) real: nothing of the weights is allocated yet.
        with init_empty_weights(include_buffers=False):
            base = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    freeze_base(base, gradient_checkpointing=args.gradient_checkpointing)
    peft_model = attach_adapter(base, cfg)
    if args.method == "lora":
        # peft made the adapter on meta with the base; train it in fp32 as lorag does.
        for param in peft_model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    loss_module = CausalLMLoss(peft_model, chunk_tokens=cfg.loss_chunk_tokens)
    shard(loss_module, device=device, bf16=bf16)
    if args.method == "lora":
        _initialise_shards(loss_module, device)
    return loss_module, peft_model, cfg, bf16


def _initialise_shards(module, device) -> None:
    """Give every process's meta shards random values on ``device`` (norms 1, LoRA B 0, as a fresh adapter)."""
    import torch
    from torch.distributed.tensor import DTensor

    buffers = {name: buffer.detach().to(device) for name, buffer in module.named_buffers()}
    module.to_empty(device=device)
    with torch.no_grad():
        for name, param in module.named_parameters():
            local = param.to_local() if isinstance(param, DTensor) else param
            if "norm" in name:
                local.fill_(1.0)
            elif "lora_B" in name:
                local.zero_()
            else:
                local.normal_(0.0, 0.02)
        for name, value in buffers.items():
            module.get_buffer(name).copy_(value)


def _quantized_model(config, device):
    """4-bit NF4 base (bf16 storage, so FSDP can shard it) with random weights made on this GPU.

    Each decoder Linear is replaced by a bitsandbytes Linear4bit quantized from random bf16 values on the
    GPU, one layer at a time; embeddings, norms and lm_head stay bf16 as in a QLoRA checkpoint.
    """
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    if device.type != "cuda":
        raise SystemExit("--method qlora needs CUDA (bitsandbytes 4-bit kernels)")
    import bitsandbytes as bnb

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    _initialise_shards(model, device)  # whole bf16 model on this GPU (16 GB for 8B), quantized layer by layer below
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for child_name, child in list(parent.named_children()):
                if not isinstance(child, torch.nn.Linear):
                    continue
                quantized = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias=False, compute_dtype=torch.bfloat16,
                    quant_type="nf4", quant_storage=torch.bfloat16, device="meta",
                )
                # module=: the layer keeps the quantization state, which FSDP's parameter swap would lose.
                quantized.weight = bnb.nn.Params4bit(
                    child.weight.data, requires_grad=False, quant_type="nf4", quant_storage=torch.bfloat16,
                    compress_statistics=True, module=quantized,
                ).to(device)  # quantizes (the data is already on the GPU)
                setattr(parent, child_name, quantized)
        torch.cuda.empty_cache()
    model.is_loaded_in_4bit = True
    return model


def synthetic_batch(args, vocab: int, step: int, rank: int):
    """Full-length random rows; the last half of each row is the trained answer."""
    import torch

    generator = torch.Generator().manual_seed(1000 * step + rank)
    ids = torch.randint(16, vocab, (args.batch, args.seq), generator=generator)
    labels = ids.clone()
    labels[:, : args.seq // 2] = -100
    positions = torch.arange(args.seq).expand(args.batch, -1).contiguous()
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def run(args) -> dict | None:
    import torch
    import torch.distributed as dist
    from accelerate import Accelerator
    from transformers import get_cosine_schedule_with_warmup

    from training.model import build_optimizer
    from training.recipe import optimizer_step

    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        raise SystemExit("no CUDA device: measure on GPUs, or check the code path with --shape tiny --dry-run")
    accelerator = Accelerator(cpu=not cuda)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", world_size=1, rank=0, init_method="tcp://127.0.0.1:29517")
    device, world, rank = accelerator.device, dist.get_world_size(), dist.get_rank()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    model, peft_model, cfg, bf16 = build_model(args, device)
    build_s = time.perf_counter() - started
    optimizer = build_optimizer(peft_model.parameters(), cfg, sharded=True)
    scheduler = get_cosine_schedule_with_warmup(optimizer, 0, args.steps)
    vocab = SHAPES[args.shape]["shape"]["vocab_size"]
    times, losses = [], []
    for step in range(args.steps):
        batch = synthetic_batch(args, vocab, step, rank)
        _sync(cuda)
        step_started = time.perf_counter()
        loss = optimizer_step(model, [batch], optimizer=optimizer, scheduler=scheduler, accelerator=accelerator,
                              bf16=bf16, max_grad_norm=1.0)
        _sync(cuda)
        times.append(time.perf_counter() - step_started)
        losses.append(loss)
    peak = torch.tensor([torch.cuda.max_memory_allocated() if cuda else 0], device=device)
    peaks = [torch.zeros_like(peak) for _ in range(world)]
    dist.all_gather(peaks, peak)
    measured = times[args.warmup :]
    tokens_per_step = args.batch * args.seq * world
    result = {
        "shape": args.shape, "method": args.method, "gpus": world if cuda else 0, "processes": world,
        "device": torch.cuda.get_device_name() if cuda else "cpu", "batch_per_gpu": args.batch, "seq": args.seq,
        "rank": args.rank, "gradient_checkpointing": args.gradient_checkpointing, "steps": args.steps,
        "tokens_per_s": tokens_per_step / statistics.mean(measured), "step_s_median": statistics.median(measured),
        "peak_memory_bytes_per_gpu": [int(p.item()) for p in peaks], "build_s": build_s, "losses": losses,
        "dry_run": args.dry_run, "torch": torch.__version__,
    }
    # Every rank leaves the group before exiting: a process that exits with gloo's threads still running aborts
    # ("terminate called without an active exception"), which a loaded machine turned into a failed run.
    dist.barrier()
    dist.destroy_process_group()
    if not all(map(_finite, losses)):
        raise SystemExit(f"non-finite loss: {losses}")
    if rank != 0:
        return None
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return result


def report(paths: list[Path]) -> str:
    """A table of results; scaling efficiency against the 1-GPU run of the same shape and method."""
    results = [json.loads(path.read_text()) for path in paths]
    single = {(r["shape"], r["method"]): r["tokens_per_s"] for r in results if r["processes"] == 1}
    lines = ["| shape | method | GPUs | tokens/s | scaling efficiency | peak memory per GPU (GiB) | step (s) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in sorted(results, key=lambda r: (r["shape"], r["method"], r["processes"])):
        base = single.get((r["shape"], r["method"]))
        efficiency = f"{r['tokens_per_s'] / (r['processes'] * base):.2f}" if base else "-"
        peak = max(r["peak_memory_bytes_per_gpu"]) / 2**30
        lines.append(f"| {r['shape']} | {r['method']} | {r['processes']} | {r['tokens_per_s']:.0f} | {efficiency} "
                     f"| {peak:.1f} | {r['step_s_median']:.3f} |")
    return "\n".join(lines)


def _finite(value: float) -> bool:
    return value == value and abs(value) != float("inf")


def _sync(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.report:
        print(report(args.report))
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run(args)


if __name__ == "__main__":
    main()
    # Leave without the interpreter's finalization: a process of a gloo group now and then aborted there ("terminate
    # called without an active exception") after destroy_process_group and after its result was written, failing
    # the run. Gloo's worker threads releasing finished work (and its tensors) during teardown is the likely cause
    # (the abandoned pytorch/pytorch#179291 describes that crash for groups never destroyed). A failure raised
    # above exits as usual.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
