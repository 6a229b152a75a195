"""How much of a prompt group's (prompts, width) layout is padding, for the engine benchmark's workload.

The scheduler groups whole prompts by length and lays each group out padded to its longest prompt (rounded up
to ``--pad``); attention runs over that layout, and before prompts were packed every GEMM did too. This drives
the real Scheduler through the prefill of the workload with the model's forward replaced by a stand-in that
counts laid-out and real tokens (no model, no GPU: the grouping is host logic), for each rounding.

    python benchmarks/prompt_padding.py
"""

import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.engine_paged_bench import workload  # noqa: E402
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
    if args.requests < 1 or args.prefill_budget < 1 or min(args.pads) < 1:
        p.error("--requests, --prefill-budget and --pads must be at least 1")
    load = workload(random.Random(args.seed), args.requests, (1000, 2000), (128, 256), 128256)
    for pad in args.pads:
        cache = PagedKVCache(layers=1, num_blocks=args.requests * 150 + 1, block_size=16, kv_heads=1, head_dim=8,
                             max_len=2257, rows=args.requests, dtype=torch.float32, device="cpu", prefix_cache=False)
        model = CountingForward()
        scheduler = Scheduler(model, cache, None, decode=lambda *a: torch.zeros(args.requests, 8),
                              prefill_chunk=2048, prefill_budget=args.prefill_budget, prefill_pad=pad)
        for prompt, new in load:
            scheduler.submit(Sequence(prompt=prompt, max_tokens=new, emit=lambda *a: None))
        while scheduler._waiting or any(s is not None and s.computed < len(s.prompt) for s in scheduler.rows):
            scheduler.step()
        print(f"groups rounded to {pad:3} tokens: {model.laid_out:,} tokens laid out for {model.real:,} real "
              f"({1 - model.real / model.laid_out:.1%} padding)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
