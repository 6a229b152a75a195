"""Greedy parity of the engine with transformers + peft at a real model size, one mixed-adapter batch.

GPU:  python benchmarks/engine_parity.py --shape qwen2.5-0.5b
CPU smoke:  python benchmarks/engine_parity.py --shape tiny

Every row of one batch (rows with different adapters and one without, prompts of different lengths, so
prompts are prefilled as a padded group through the segmented kernels and decoded together) is compared
token by token with peft's greedy ``generate`` of the same prompt and adapter. float32 by default: random
weights give near-flat logits, so in bfloat16 two correct implementations that round differently part
ways after a few tokens; ``--dtype bfloat16`` reports where they do. Exit status 1 when a float32 row
differs.
"""

import argparse
import random
import sys
import tempfile
import threading
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.engine_bench import SHAPES, build_adapters  # noqa: E402
from server.engine.engine import Engine, EngineConfig  # noqa: E402
from server.engine.scheduler import Sequence  # noqa: E402
from tests.model_factory import build_model, build_tokenizer  # noqa: E402
from tests.peft_reference import greedy_tokens, load_peft_model  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--adapters", type=int, default=4, help="distinct adapters; one more row runs without one")
    p.add_argument("--prompt-tokens", type=int, nargs=2, default=None, metavar=("MIN", "MAX"))
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compiled decode layers (default: on CUDA)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def engine_tokens(engine, rows: list[tuple[list[int], str | None]], new_tokens: int) -> list[list[int]]:
    """All rows submitted before the first step, so they share prefill groups and decode steps."""
    outputs = [[] for _ in rows]
    done = [threading.Event() for _ in rows]

    def emit_to(i):
        def emit(tokens, finish, error):
            outputs[i].extend(tokens)
            if finish is not None:
                done[i].set()
        return emit

    for i, (prompt, adapter) in enumerate(rows):
        engine.scheduler.submit(Sequence(prompt=prompt, max_tokens=new_tokens, emit=emit_to(i),
                                         adapter_slot=engine.adapters.acquire(adapter)))
    while not all(event.is_set() for event in done):
        engine.scheduler.step()
    return outputs


def peft_tokens(hf_model, dirs: list[Path], names: list[str], rows, new_tokens: int) -> list[list[int]]:
    model = load_peft_model(hf_model, dict(zip(names, dirs)))
    outputs = [greedy_tokens(model, prompt, adapter, new_tokens) for prompt, adapter in rows]
    model.unload()
    return outputs


def main(argv=None) -> int:
    from transformers import AutoModelForCausalLM

    args = parse_args(argv)
    tiny = args.shape == "tiny"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    rng = random.Random(args.seed)
    prompt_range = args.prompt_tokens or ((10, 40) if tiny else (300, 900))
    tmp = Path(tempfile.mkdtemp(prefix="engine-parity-"))
    model_path = build_model(tmp / "model", dtype=dtype, tokenizer=build_tokenizer(), **SHAPES[args.shape])
    hf_model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
    vocab = hf_model.config.vocab_size
    dirs = build_adapters(hf_model, tmp / "adapters", args.adapters, 16, args.seed)
    names = [f"a{i}" for i in range(args.adapters)]
    rows = [([rng.randrange(3, vocab) for _ in range(rng.randint(*prompt_range))],
             None if i == args.rows - 1 else names[i % args.adapters]) for i in range(args.rows)]

    compiled = args.compile if args.compile is not None else device.type == "cuda"
    config = EngineConfig(max_rows=args.rows, max_len=prompt_range[1] + args.new_tokens + 1,
                          adapter_slots=args.adapters, max_rank=16, prefill_chunk=1024, prefill_budget=16384,
                          cuda_graphs=device.type == "cuda", compile=compiled)
    engine = Engine.from_hf(hf_model, config=config, device=device, dtype=dtype, start=False)
    for name, path in zip(names, dirs):
        engine.adapters.load(name, path)
    got = engine_tokens(engine, rows, args.new_tokens)
    engine.close()
    expected = peft_tokens(hf_model, dirs, names, rows, args.new_tokens)

    print(f"{args.shape} {args.dtype} on {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, "
          f"compiled decode {compiled}: {args.rows} rows, prompts {prompt_range} tokens, {args.new_tokens} new tokens")
    differing = 0
    for i, ((prompt, adapter), ours, theirs) in enumerate(zip(rows, got, expected)):
        same = next((t for t, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        if same is None and len(ours) != len(theirs):  # one side stopped early
            same = min(len(ours), len(theirs))
        differing += same is not None
        status = "identical" if same is None else f"first difference at token {same}"
        print(f"row {i}: adapter {adapter or '-':4} prompt {len(prompt):4} tokens: {status}")
    print(f"{args.rows - differing}/{args.rows} rows identical to transformers + peft")
    return 1 if differing and args.dtype == "float32" else 0


if __name__ == "__main__":
    raise SystemExit(main())
