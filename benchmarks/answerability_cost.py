"""What pooling two windows costs: answerability of a question comparing two subjects, pooled and not.

A question that compares two named subjects is also matched by pairs of windows (server/attribution/support.py,
``answerability``). The pairs are searched most-covering first and cut off once no pair can beat the best score;
this times that search in its worst case: a long question whose every window holds a different share of its
words, with the default 5 passages and with 50 (the most a request may ask for: ``server.max_k``), 15 windows
each. The evidence is given (the server embeds it once per request for attribution too), so this is the added
CPU time alone.

    python benchmarks/answerability_cost.py
"""

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from retrieval.keyword import TermWeights  # noqa: E402
from server.attribution import support  # noqa: E402

DIMENSION = 384  # the embedder's (all-MiniLM-L6-v2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=_positive, default=7)
    parser.add_argument("--windows", type=_positive, default=15, help="windows per passage")
    args = parser.parse_args()
    rng = random.Random(0)
    vectors = np.random.default_rng(0)
    vocabulary = [f"word{i}" for i in range(400)]
    asked = vocabulary[:60]  # every window holds 8 of the question's 60 words: thousands of distinct unions
    question = "Who came first, Alpha Beta or Gamma Delta, " + " ".join(asked) + "?"
    rarity = TermWeights({word: 1.0 + i / 10 for i, word in enumerate([*asked, "alpha", "beta", "gamma", "delta"])})

    def passage() -> support.PassageEvidence:
        windows = [" ".join(rng.sample(asked, 8) + rng.sample(vocabulary, 22)) for _ in range(args.windows)]
        unit = vectors.standard_normal((len(windows), DIMENSION)).astype(np.float32)
        unit /= np.linalg.norm(unit, axis=1, keepdims=True)
        return support.PassageEvidence.of(" ".join(windows), windows, unit)

    query = vectors.standard_normal(DIMENSION).astype(np.float32)
    query /= np.linalg.norm(query)
    assert support.compares_subjects(question)
    support.answerability(question, query, [passage()], rarity=rarity)  # warm: the stemmer, the tokenizer
    print(f"question of {len(question.split())} words comparing two subjects; {args.windows} windows per passage; "
          f"median of {args.runs} runs")
    print(f"{'passages':>8} {'pooled (ms)':>12} {'one window (ms)':>16} {'ratio':>6}")
    for count in (5, 50):
        passages = [passage() for _ in range(count)]
        pooled = _median_ms(lambda: support.answerability(question, query, passages, rarity=rarity), args.runs)
        # The same words asked without naming two subjects: no pairs are tried.
        single_question = question.replace(" or ", " then ")
        assert not support.compares_subjects(single_question)
        single = _median_ms(lambda: support.answerability(single_question, query, passages, rarity=rarity),
                            args.runs)
        print(f"{count:>8} {pooled:>12.1f} {single:>16.1f} {pooled / single:>6.2f}")
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _median_ms(call, runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


if __name__ == "__main__":
    sys.exit(main())
