"""Does the extractive fallback decline what its passages do not answer, and still answer what they do?

Answerable cases: COVID-QA questions with the passages hybrid retrieval finds in a seeded sample of articles
(their own article included; one sample per seed), and data/eval/questions.jsonl over data/docs. Unanswerable
cases: the same COVID-QA questions with passages retrieved only from the OTHER articles of the sample, plus the
unanswerable questions of data/eval/questions.jsonl and those below, about topics data/docs does not cover.
Everything runs through the product: ingest pipeline, RetrievalService (the server's defaults, k = 5), and
ExtractiveGenerator as the server builds it (no embedder: support is word coverage) or, with --embedder, scoring
by cosine similarity. Prints, per support threshold, the share of unanswerable cases declined and of answerable
cases answered, then the generator's own answers at its default threshold.
    python benchmarks/extractive_abstention.py                     # seeds 0, 1 and 2, pooled and per seed
    python benchmarks/extractive_abstention.py --seeds 3           # another sample
    python benchmarks/extractive_abstention.py --embedder          # the generator built with the embedder
    python benchmarks/extractive_abstention.py --data-dir '/tmp/abst/data{seed}'  # keep the indexes for a rerun
"""

import argparse
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.records import Passage  # noqa: E402
from core.settings import Settings  # noqa: E402
from evaluation.answer_metrics import contains_gold, is_abstention  # noqa: E402
from evaluation.corpus import ingest_corpus  # noqa: E402
from evaluation.datasets import load_question_set, normalise_text, same_document  # noqa: E402
from ingest.pipeline import ingest_paths  # noqa: E402
from retrieval.service import RetrievalService  # noqa: E402
from server.generation.extractive import ExtractiveGenerator  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
COVIDQA = ROOT.parent / "shared" / "datasets" / "covidqa" / "covidQA.json"
SAMPLE_DOCS = ROOT / "data" / "docs"
SAMPLE_QUESTIONS = ROOT / "data" / "eval" / "questions.jsonl"
# Questions about things data/docs does not say (it covers the Kestrel Tide buoy, its care, returns and warranty,
# and Kestrel Cloud's FAQ); several are near misses that share most of their words with the documents.
UNANSWERABLE = (
    "What is the maximum wave height the Kestrel Tide buoy can survive?",
    "Does Kestrel Instruments offer a discount for universities or students?",
    "How many employees does Kestrel Instruments have?",
    "Which cloud provider hosts the Kestrel Cloud servers?",
    "What is the accuracy of the nitrate sensor?",
    "How much does shipping a buoy to Australia cost?",
    "Can the buoy measure chlorophyll concentration?",
    "Which programming languages have an official SDK for the Kestrel Cloud API?",
)
THRESHOLDS = [round(0.01 * i, 2) for i in range(0, 100)]  # the table prints every 5th and the chosen one


@dataclass
class Case:
    collection: str  # "covidqa" or "sample docs"
    seed: int | None  # the COVID-QA sample's seed
    question: str
    passages: list[Passage]
    answerable: bool
    golds: tuple[str, ...] = ()
    gold_in_passages: bool = False  # some passage contains a gold answer's text


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--covid-docs", type=int, default=30, help="COVID-QA articles in the corpus, seeded")
    p.add_argument("--limit", type=int, default=200, help="COVID-QA questions, a seeded sample of those articles'")
    p.add_argument("--seeds", default="0,1,2", help="one COVID-QA sample per seed, pooled in the report")
    p.add_argument("--k", type=int, default=5, help="passages per question (the server's default)")
    p.add_argument("--data-dir", default=None, help="where to build each seed's indexes, '{seed}' replaced by it "
                                                    "(default: temp dirs)")
    p.add_argument("--covidqa", type=Path, default=COVIDQA)
    p.add_argument("--embedder", action="store_true", help="score sentences with the embedding model")
    return p.parse_args(argv)


def _gold_in(passages: list[Passage], golds) -> bool:
    return any(normalise_text(g) in normalise_text(p.chunk.text) for p in passages for g in golds if g.strip())


def covid_cases(retrieval: RetrievalService, settings: Settings, args, seed: int) -> list[Case]:
    questions = load_question_set(args.covidqa, corpus_docs=args.covid_docs, limit=args.limit, seed=seed)
    ingest_corpus(questions, tenant="covid", settings=settings, embedder=retrieval.embedder)
    sources = [record.source for record in retrieval.index("covid").documents()]
    cases = []
    for question in questions.answerable:
        own = question.sources[0].doc
        others = [source for source in sources if not same_document(source, own)]
        found = retrieval.retrieve("covid", question.question, k=args.k)
        elsewhere = retrieval.retrieve("covid", question.question, k=args.k, sources=others)
        cases.append(Case("covidqa", seed, question.question, found, True, question.answers,
                          _gold_in(found, question.answers)))
        cases.append(Case("covidqa", seed, question.question, elsewhere, False, question.answers,
                          _gold_in(elsewhere, question.answers)))
    return cases


def sample_cases(retrieval: RetrievalService, settings: Settings, args) -> list[Case]:
    report = ingest_paths([SAMPLE_DOCS], tenant="sample", settings=settings, embedder=retrieval.embedder)
    if report.failed:
        raise SystemExit(f"{report.failed} sample documents failed to ingest")
    questions = load_question_set(SAMPLE_QUESTIONS)
    asked = [(q.question, not q.unanswerable, q.answers) for q in questions.questions]
    asked += [(question, False, ()) for question in UNANSWERABLE]
    cases = []
    for question, answerable, golds in asked:
        passages = retrieval.retrieve("sample", question, k=args.k)
        cases.append(Case("sample docs", None, question, passages, answerable, golds, _gold_in(passages, golds)))
    return cases


@dataclass
class Outcome:
    case: Case
    support: float
    declined_anyway: bool  # declined whatever the threshold: no passage, or no sentence shares a word
    quoted_gold: bool  # the answer, when it quotes, contains a gold answer


class MemoEmbedder:
    """The embedder with each sentence embedded once: measuring asks for the same sentences several times."""

    def __init__(self, embedder):
        self.embedder = embedder
        self.vectors: dict[str, np.ndarray] = {}

    def embed_documents(self, texts: list[str]) -> np.ndarray:
        missing = [text for text in dict.fromkeys(texts) if text not in self.vectors]
        if missing:
            self.vectors.update(zip(missing, self.embedder.embed_documents(missing)))
        return np.stack([self.vectors[text] for text in texts])

    def embed_query(self, text: str) -> np.ndarray:
        return self.embedder.embed_query(text)


def measure(cases: list[Case], *, embedder=None) -> list[Outcome]:
    """Each case's support and what the generator answers when the threshold does not decline it."""
    generator = ExtractiveGenerator(embedder=embedder, min_support=-math.inf)
    outcomes = []
    for case in cases:
        text = "".join(generator.answer_pieces(case.question, case.passages))
        quoted_gold = any(contains_gold(text, gold) for gold in case.golds)
        support = generator.support(case.question, case.passages)
        outcomes.append(Outcome(case, support, is_abstention(text), quoted_gold))
    return outcomes


def rates(outcomes: list[Outcome], threshold: float) -> dict[str, float]:
    answerable = [o for o in outcomes if o.case.answerable]
    unanswerable = [o for o in outcomes if not o.case.answerable]
    answered = [o for o in answerable if not o.declined_anyway and o.support >= threshold]
    return {
        "answered": len(answered) / max(1, len(answerable)),
        "declined": sum(o.declined_anyway or o.support < threshold for o in unanswerable) / max(1, len(unanswerable)),
        "answered_with_gold": sum(o.quoted_gold for o in answered) / max(1, len(answered)),
    }


def print_report(outcomes: list[Outcome], *, embedder=None) -> None:
    default = ExtractiveGenerator(embedder=embedder).min_support
    collections = sorted({o.case.collection for o in outcomes})
    by = {name: [o for o in outcomes if o.case.collection == name] for name in collections}
    seeds = sorted({o.case.seed for o in outcomes if o.case.seed is not None})
    for name in collections:
        cases = [o.case for o in by[name]]
        answerable = [c for c in cases if c.answerable]
        unanswerable = [c for c in cases if not c.answerable]
        print(f"\n## {name}: {len(answerable)} answerable ({sum(c.gold_in_passages for c in answerable)} with a gold "
              f"answer in their passages), {len(unanswerable)} unanswerable "
              f"({sum(c.gold_in_passages for c in unanswerable)} with a gold answer in their passages anyway)")
    chosen = next((t for t in THRESHOLDS if all(rates(by[n], t)["declined"] >= 0.8 for n in collections)), None)
    print(f"\n{'support >=':>10s}" + "".join(f"{name + ': answered':>26s}{'declined':>10s}" for name in collections))
    for threshold in THRESHOLDS:
        if round(threshold * 100) % 5 and threshold not in (chosen, default):
            continue
        row = [rates(by[name], threshold) for name in collections]
        mark = ("  <- default" if threshold == default else "") + ("  <- 80% rule" if threshold == chosen else "")
        print(f"{threshold:10.2f}" + "".join(f"{r['answered']:26.3f}{r['declined']:10.3f}" for r in row) + mark)
    print(f"\nlowest threshold declining >= 80% of the unanswerable cases of every collection: {chosen} "
          f"(the generator's default min_support: {default})")

    print(f"\nAt the default ({default}), against never declining for lack of support, same cases:")
    groups = [(name, by[name]) for name in collections]
    if len(seeds) > 1:
        groups += [(f"covidqa seed {seed}", [o for o in by["covidqa"] if o.case.seed == seed]) for seed in seeds]
    for name, group in groups:
        now, never = rates(group, default), rates(group, -math.inf)
        print(f"  {name}: unanswerable declined {now['declined']:.1%} (was {never['declined']:.1%}); answerable "
              f"answered {now['answered']:.1%} (was {never['answered']:.1%}), "
              f"ratio {now['answered'] / never['answered']:.3f}; answers quoting a gold answer "
              f"{now['answered_with_gold']:.1%} (was {never['answered_with_gold']:.1%})")
    # The threshold sweep above must be what the generator itself does at its default.
    generator = ExtractiveGenerator(embedder=embedder)
    for outcome in outcomes:
        text = "".join(generator.answer_pieces(outcome.case.question, outcome.case.passages))
        expected = outcome.declined_anyway or outcome.support < default
        assert is_abstention(text) == expected, (outcome.case.question, text[:200])


def main(argv=None) -> int:
    args = parse_args(argv)
    seeds = [int(seed) for seed in args.seeds.split(",")]
    started = time.perf_counter()
    embedder = None
    cases = []
    with tempfile.TemporaryDirectory(prefix="lorag-abstention-") as tmp:
        for seed in seeds:
            root = args.data_dir or str(Path(tmp) / "seed{seed}")
            data_dir = Path(root.replace("{seed}", str(seed)) if "{seed}" in root else Path(root) / f"seed{seed}")
            settings = Settings(data_dir=data_dir)
            retrieval = RetrievalService(settings, embedder=embedder)
            if embedder is None:
                embedder = retrieval.embedder
                print(f"embedder {embedder.name}, seeds {seeds}, {args.covid_docs} COVID-QA articles and {args.limit} "
                      f"questions per seed, k={args.k}, {datetime.now(timezone.utc).isoformat(timespec='seconds')}")
                cases += sample_cases(retrieval, settings, args)  # the same for every seed
            cases += covid_cases(retrieval, settings, args, seed)
    print(f"{len(cases)} cases built in {time.perf_counter() - started:.0f} s")
    scorer = MemoEmbedder(embedder) if args.embedder else None
    print_report(measure(cases, embedder=scorer), embedder=scorer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
