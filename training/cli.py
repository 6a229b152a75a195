"""``lorag train`` and ``lorag adapters list|show|delete|merge``: thin shells over the recipe and the registry."""

import argparse
import json
import logging
import sys

log = logging.getLogger(__name__)

TRAIN_EPILOG = """examples:
  lorag train --tenant acme --data data/train/sample.jsonl --base Qwen/Qwen2.5-0.5B-Instruct --name support-v1
  lorag train --tenant acme --data qa.jsonl --base Qwen/Qwen2.5-0.5B-Instruct --with-retrieval --k 4
  lorag train --tenant acme --data qa.jsonl --base Qwen/Qwen2.5-7B-Instruct --method qlora --gradient-checkpointing
  lorag train --tenant acme --data qa.jsonl --base Qwen/Qwen2.5-0.5B-Instruct --name support-v1 --resume
  accelerate launch -m lorag.cli train ...     data parallel over the visible GPUs

Data: JSON or JSONL in alpaca (instruction/input/output), sharegpt (conversations with from/value) or
OpenAI messages (messages with role/content) format. Bad records are reported as file:line: reason and
skipped (--strict fails instead). Ctrl-C saves a checkpoint; --resume continues it exactly.
"""


def add_commands(subparsers, common: argparse.ArgumentParser) -> None:
    train = subparsers.add_parser(
        "train",
        parents=[common],
        help="fine-tune a LoRA/QLoRA/DoRA adapter for a tenant",
        description="Fine-tune an adapter on chat examples and register it in the tenant's adapter directory.",
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--tenant", required=True)
    train.add_argument("--data", required=True, metavar="FILE", help="training examples (JSON or JSONL)")
    train.add_argument("--base", metavar="MODEL", help="base model hub id or path (training.base_model)")
    train.add_argument("--name", help="adapter name (default: METHOD-YYYYmmdd-HHMMSS)")
    group = train.add_argument_group("adapter")
    group.add_argument("--method", choices=("lora", "qlora", "dora"))
    group.add_argument("--rslora", action="store_true", default=None, help="rank-stabilised scaling")
    group.add_argument("--rank", type=int)
    group.add_argument("--alpha", type=float)
    group.add_argument("--dropout", type=float)
    group.add_argument("--target-modules", help="'all-linear' (default) or comma-separated module names")
    group = train.add_argument_group("optimisation")
    group.add_argument("--epochs", type=float)
    group.add_argument("--max-steps", type=int, help="optimizer steps; overrides --epochs")
    group.add_argument("--lr", type=float)
    group.add_argument("--warmup-ratio", type=float)
    group.add_argument("--batch-size", type=int, help="sequences per micro-batch per process")
    group.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    group.add_argument("--max-seq-len", type=int)
    group.add_argument("--precision", choices=("auto", "bf16", "fp32"))
    group.add_argument("--packing", action="store_true", default=None, help="pack several examples per row")
    group.add_argument("--gradient-checkpointing", action="store_true", default=None)
    group.add_argument("--compile", action="store_true", default=None, help="torch.compile the decoder layers")
    group.add_argument("--seed", type=int)
    group = train.add_argument_group("validation and checkpoints")
    split = group.add_mutually_exclusive_group()
    split.add_argument("--val-split", type=float, help="share of examples held out (default 0.1)")
    split.add_argument("--val-file", metavar="F", help="validation examples instead of a split")
    group.add_argument("--eval-steps", type=int, help="evaluate every N steps (default: once per epoch)")
    group.add_argument("--save-steps", type=int, help="resumable checkpoint every N steps")
    group.add_argument("--patience", type=int, help="stop after N evaluations without improvement")
    group.add_argument("--resume", action="store_true", help="continue the interrupted run --name")
    group = train.add_argument_group("data")
    group.add_argument("--strict", action="store_true", default=None, help="fail on the first bad record")
    group.add_argument("--with-retrieval", action="store_true", default=None, help="RAFT: train with retrieved passages")
    group.add_argument("--k", type=int, help="passages per example with --with-retrieval")
    group.add_argument("--no-oracle-p", type=float, dest="raft_no_oracle_p", help="share of examples without the relevant passage")
    group.add_argument("--distractors", type=int, dest="raft_distractors",
                       help="passages retrieved for other questions mixed into each example")
    group.add_argument("--cite", action=argparse.BooleanOptionalAction, default=None, dest="raft_cite",
                       help="target answers cite the relevant passage's [n] (default on)")
    group.add_argument("--replay", metavar="FILE", dest="replay_data",
                       help="general prompts whose base-model answers are mixed in, so the adapter keeps what the base "
                       "model does without documents")
    group.add_argument("--replay-share", type=float, dest="replay_share",
                       help="share of training examples replayed from --replay (default 0.25)")
    train.set_defaults(handler=run_train)

    adapters = subparsers.add_parser("adapters", parents=[common], help="list, show, delete or merge a tenant's adapters")
    commands = adapters.add_subparsers(dest="adapters_command", metavar="ACTION", required=True)
    for action, text in (("list", "the tenant's adapters"), ("show", "one adapter's manifest"), ("delete", "remove an adapter")):
        sub = commands.add_parser(action, parents=[common], help=text)
        sub.add_argument("--tenant", required=True)
        if action != "list":
            sub.add_argument("name")
        if action != "delete":
            sub.add_argument("--json", action="store_true", help="JSON output")
        sub.set_defaults(handler=run_adapters)
    merge = commands.add_parser("merge", parents=[common], help="write base + adapter as one plain model")
    merge.add_argument("--tenant", required=True)
    merge.add_argument("name")
    merge.add_argument("--out", required=True, metavar="DIR")
    merge.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                       help="dtype of the written weights (default: auto, the base model's own dtype)")
    merge.add_argument("--base", help="merge into this copy of the base model (bf16/fp32, never 4-bit)")
    merge.set_defaults(handler=run_adapters)


def run_train(args: argparse.Namespace) -> int:
    from core.settings import load_settings
    from training.recipe import train_adapter
    from training.settings import TrainSettings

    flags = {
        key: getattr(args, key)
        for key in (
            "method", "rslora", "rank", "alpha", "dropout", "target_modules", "epochs", "max_steps", "lr",
            "warmup_ratio", "batch_size", "grad_accum", "max_seq_len", "precision", "packing",
            "gradient_checkpointing", "compile", "seed", "val_split", "eval_steps", "save_steps", "patience", "strict",
            "with_retrieval", "k", "raft_no_oracle_p", "raft_distractors", "raft_cite", "replay_data", "replay_share",
        )
    }
    flags["base_model"] = args.base
    settings = load_settings(TrainSettings, config_file=args.config, data_dir=args.data_dir, training=flags)
    try:
        result = train_adapter(
            settings, tenant=args.tenant, data_file=args.data, name=args.name, val_file=args.val_file,
            resume=args.resume,
        )
    finally:
        _leave_process_group()
    if result.interrupted:
        print(f"interrupted at step {result.step}; continue with: lorag train ... --name {result.name} --resume", file=sys.stderr)
        return 128 + int(result.stop_signal or 2)  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
    if result.manifest is None:  # not the main process of a data-parallel run: it reports
        return 0
    metrics = result.manifest.metrics
    print(f"adapter {args.tenant}/{result.name} saved to {result.adapter_dir}")
    print(f"  steps {metrics.steps}  train loss {_fmt(metrics.train_loss)}  val loss {_fmt(metrics.val_loss)}  "
          f"val perplexity base {_fmt(metrics.base_val_perplexity)} -> adapter {_fmt(metrics.val_perplexity)}")
    return 0


def _leave_process_group() -> None:
    """Under ``accelerate launch``/``torchrun`` every rank leaves its process group before the process exits:
    a group left to the interpreter's exit keeps gloo/NCCL threads alive, which can abort a rank (and torch
    warns of it). The command owns the group it ran in, so the command ends it, not train_adapter."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as error:  # noqa: BLE001 - never mask what training itself raised
            log.warning("could not leave the process group: %s", error)


def run_adapters(args: argparse.Namespace) -> int:
    from core.settings import Settings, load_settings
    from adapters.manifest import prompt_format_warning
    from adapters.registry import AdapterRegistry
    from training.merge import merge_adapter

    settings = load_settings(Settings, config_file=args.config, data_dir=args.data_dir)
    registry = AdapterRegistry(settings.data_dir)
    action = args.adapters_command
    if action == "list":
        manifests = registry.list(args.tenant)
        if args.json:
            print(json.dumps([m.model_dump(mode="json") for m in manifests], indent=2))
        elif not manifests:
            print(f"tenant {args.tenant!r} has no adapters")
        else:
            print(f"{'NAME':<28} {'METHOD':<6} {'RANK':>4}  {'VAL PPL':>8}  {'BASE MODEL':<36} CREATED")
            for m in manifests:
                ppl = m.metrics.val_perplexity if m.metrics else None
                print(f"{m.name:<28} {m.method:<6} {m.rank:>4}  {_fmt(ppl):>8}  {m.base_model:<36} {m.created_at}")
            for m in manifests:
                if (warning := prompt_format_warning(m)) is not None:
                    print(f"warning: {warning}", file=sys.stderr)
    elif action == "show":
        manifest = registry.show(args.tenant, args.name)
        print(json.dumps(manifest.model_dump(mode="json"), indent=2))
    elif action == "delete":
        registry.remove(args.tenant, args.name)
        print(f"deleted adapter {args.tenant}/{args.name}")
    else:
        merged = merge_adapter(registry, args.tenant, args.name, args.out, dtype=args.dtype, base_model=args.base)
        print(f"merged {args.tenant}/{args.name} into {merged.path}: {merged.dtype} weights, "
              f"{merged.parameters:,} parameters, {merged.bytes / 1e6:.1f} MB of safetensors (base {merged.base})")
    return 0


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"
