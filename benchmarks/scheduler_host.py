"""The scheduler's host side on the engine benchmark's workload: how much of a prompt group's (prompts, width)
layout is padding, and the host's time per step, which the GPU waits for before a prompt forward.

The scheduler groups whole prompts by length and lays each group out padded to its longest prompt (rounded up
to ``--pad``); attention runs over that layout, and before prompts were packed every GEMM did too. This drives
the real Scheduler through the workload with the model's forward and decode step replaced by stand-ins that
count laid-out and real tokens and return at once (no model, no GPU: what is timed is the host's own work).

    python benchmarks/scheduler_host.py
"""

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.engine_paged_bench import NEW_RANGE, PROMPT_RANGE, SHAPES, workload  # noqa: E402
from server.engine.kv_cache import PagedKVCache  # noqa: E402
from server.engine.scheduler import Scheduler, Sequence  # noqa: E402


class CountingForward:
    """Stands in for EngineModel.forward: counts the (prompts, width) layout's tokens and the real ones."""

    device = torch.device("cpu")

    def __init__(self):
        self.laid_out = self.real = 0

    def forward(self, tokens, positions, *, decode=None, **_):
        self.laid_out += tokens.numel()
        self.real += int((positions >= 0).sum())
        return torch.zeros(tokens.shape[0] + (len(decode.tokens) if decode is not None else 0), 8)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--prefill-budget", type=int, default=16384)
    p.add_argument("--pads", type=int, nargs="+", default=[64, 16, 1])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("requests", "prefill_budget", "seed"):
        if getattr(args, name) < (0 if name == "seed" else 1):
            p.error(f"--{name.replace('_', '-')} must be at least {0 if name == 'seed' else 1}")
    if min(args.pads) < 1:
        p.error("--pads must be at least 1")
    vocab = SHAPES["llama3-8b"]["vocab_size"]
    load = workload(random.Random(args.seed), args.requests, PROMPT_RANGE, NEW_RANGE, vocab)
    max_len = PROMPT_RANGE[1] + NEW_RANGE[1] + 1
    for pad in args.pads:
        cache = PagedKVCache(layers=1, num_blocks=args.requests * -(-max_len // 16) + 1, block_size=16, kv_heads=1,
                             head_dim=8, max_len=max_len, rows=args.requests, dtype=torch.float32, device="cpu",
                             prefix_cache=False)
        model = CountingForward()
        scheduler = Scheduler(model, cache, None, decode=lambda tokens, *_: torch.zeros(len(tokens), 8),
                              prefill_chunk=2048, prefill_budget=args.prefill_budget, prefill_pad=pad)
        for prompt, new in load:
            scheduler.submit(Sequence(prompt=prompt, max_tokens=new, emit=lambda *a: None))
        prompt_steps, decode_steps = [], []
        while scheduler.busy:
            before = model.real
            started = time.perf_counter()
            scheduler.step()
            (prompt_steps if model.real > before else decode_steps).append((time.perf_counter() - started) * 1000)
        print(f"groups rounded to {pad:3} tokens: {model.laid_out:,} tokens laid out for {model.real:,} real "
              f"({1 - model.real / model.laid_out:.1%} padding); host time per step, median: "
              f"{statistics.median(prompt_steps[1:]):.2f} ms with a prompt forward (the first, which admits "
              f"every request: {prompt_steps[0]:.1f} ms), {statistics.median(decode_steps):.2f} ms for a decode step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
