"""Runs an evaluation top to bottom: retrieval per mode, answers per model mode, general set, perplexity.

The backend (in-process chat service or a running server) answers; this module only asks and scores,
and returns one JSON-ready dict that report.py turns into Markdown, HTML and plots.
"""

import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

from core.errors import LoragError
from retrieval.ranking_metrics import mean_scores, ranking_scores
from evaluation.answer_metrics import answer_scores, conflicting_values, is_abstention
from evaluation.backends import BASE_MODEL, Reply
from evaluation.citation_metrics import NliJudge, citation_scores
from evaluation.datasets import EvalQuestion, QuestionSet

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MODES = ("base", "rag", "adapter", "rag+adapter")
RETRIEVAL_MODES = ("dense", "keyword", "hybrid")
CUTOFFS = (1, 5, 10)
ANSWER_METRICS = ("exact_match", "f1", "rouge_l", "contains_gold")
CITATION_METRICS = ("citation_precision", "citation_recall", "page_accuracy", "no_citation")


@dataclass
class EvalOptions:
    modes: Sequence[str] = ("base", "rag")
    adapter: str | None = None
    attribution: bool | None = None  # post-hoc attribution in rag modes; None: the server's default
    k: int | None = None  # passages per answer; None = the retrieval settings' k
    max_tokens: int = 256
    retrieval_modes: Sequence[str] = RETRIEVAL_MODES
    retrieval_only: bool = False
    nli: NliJudge | None = None
    progress: bool | None = None  # None: a bar only when stderr is a terminal
    extra: dict = field(default_factory=dict)  # recorded in the results as given (command line, settings)

    def check(self) -> None:
        """Raises: LoragError: an unknown mode, an adapter mode without an adapter name, or k/max_tokens < 1."""
        if self.k is not None and self.k < 1:
            raise LoragError(f"--k {self.k}: passages per answer must be at least 1")
        if self.max_tokens < 1:
            raise LoragError(f"--max-tokens {self.max_tokens}: must be at least 1")
        for mode in self.modes:
            if mode not in MODES:
                raise LoragError(f"unknown answer mode {mode!r} in --modes", hint=f"Use any of {', '.join(MODES)}")
        if not self.modes and not self.retrieval_only:
            raise LoragError("--modes is empty", hint=f"Use any of {', '.join(MODES)}")
        for mode in self.retrieval_modes:
            if mode not in RETRIEVAL_MODES:
                raise LoragError(f"unknown retrieval mode {mode!r}", hint=f"Use any of {', '.join(RETRIEVAL_MODES)}")
        if any("adapter" in mode for mode in self.modes) and not self.adapter and not self.retrieval_only:
            raise LoragError(f"answer modes {', '.join(self.modes)} include an adapter mode but no --adapter NAME was given")


def run_evaluation(
    backend, questions: QuestionSet, options: EvalOptions, *, general: QuestionSet | None = None,
    perplexity: Callable[[], dict] | None = None,
) -> dict:
    """Evaluate and return the results dict (``format_version`` 1; see benchmarks/RESULTS.md "Evaluation").

    Raises:
        LoragError: bad options, or an adapter the backend does not know.
    """
    options.check()
    if not options.retrieval_only and options.adapter and any("adapter" in m for m in options.modes):
        known = backend.adapters()
        if options.adapter not in known:
            raise LoragError(f"adapter {options.adapter!r} is not available for this tenant (known: {', '.join(known) or 'none'})",
                             hint="Train one with `lorag train` or check `lorag adapters list`")
    results = {
        "format_version": FORMAT_VERSION,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "backend": backend.description,
        "question_set": {"name": questions.name, "format": questions.format, "questions": len(questions.questions),
                         "unanswerable": len(questions.questions) - len(questions.answerable),
                         "bad_records": [str(b) for b in questions.bad]},
        "options": {"modes": [] if options.retrieval_only else list(options.modes), "adapter": options.adapter,
                    "k": options.k, "max_tokens": options.max_tokens, "nli": options.nli is not None, **options.extra},
    }
    with_sources = [q for q in questions.questions if q.sources]
    if with_sources:
        results["retrieval"] = evaluate_retrieval(backend, with_sources, modes=options.retrieval_modes,
                                                  progress=options.progress)
    if options.retrieval_only:
        return results
    results["answers"] = evaluate_answers(backend, questions.questions, options, label="answers")
    results["generator"] = backend.generator_name
    if general is not None and options.adapter:
        modes = [m for m in ("base", "adapter") if m in options.modes] or ["base", "adapter"]
        general_options = EvalOptions(modes=modes, adapter=options.adapter, max_tokens=options.max_tokens,
                                      progress=options.progress)
        general_results = evaluate_answers(backend, general.questions, general_options, label="general")
        general_results["set"] = general.name
        summary = general_results["summary"]
        if "base" in summary and "adapter" in summary:
            general_results["drop"] = {
                metric: summary["base"][metric] - summary["adapter"][metric]
                for metric in ANSWER_METRICS
                if summary["base"].get(metric) is not None and summary["adapter"].get(metric) is not None
            }
        results["general"] = general_results
    if perplexity is not None:
        results["perplexity"] = perplexity()
    return results


def evaluate_retrieval(backend, questions: Sequence[EvalQuestion], *, modes: Sequence[str], progress=None) -> dict:
    """hit@k, recall@k, MRR and nDCG@10 per retrieval mode over questions with gold sources.

    A passage counts as relevant when it covers a gold source (document/page/span) no earlier passage
    covered, so recall@k is the share of gold sources found and nDCG stays within [0, 1].
    """
    k = max(CUTOFFS)
    per_mode: dict[str, list[dict]] = {mode: [] for mode in modes}
    rows = []
    for question in _bar(questions, "retrieval", progress):
        row = {"id": question.id, "question": question.question, "modes": {}}
        for mode in modes:
            passages = backend.retrieve(question.question, k=k, mode=mode)
            flags, covered = [], set()
            for passage in passages:
                new = set(question.matched_sources(passage)) - covered
                covered |= new
                flags.append(bool(new))
            scores = ranking_scores(flags, relevant=len(question.sources), cutoffs=CUTOFFS)
            per_mode[mode].append(scores)
            first = next((i + 1 for i, flag in enumerate(flags) if flag), None)
            row["modes"][mode] = {"first_relevant_rank": first, "top": [f"{p.source}#p{p.page}" for p in passages[:3]]}
        rows.append(row)
    return {"k": k, "questions": len(questions), "summary": {mode: mean_scores(per_mode[mode]) for mode in modes},
            "per_question": rows}


def evaluate_answers(backend, questions: Sequence[EvalQuestion], options: EvalOptions, *, label: str) -> dict:
    """Ask every question in every mode; score answers, abstentions and citations."""
    per_question = []
    scored: dict[str, list[dict]] = {mode: [] for mode in options.modes}
    by_type: dict[str, dict[str, list[dict]]] = {}
    for question in _bar(questions, label, options.progress):
        entry = {"id": question.id, "question": question.question, "gold": question.answer,
                 "unanswerable": question.unanswerable, "type": question.type,
                 "sources": [{"doc": s.doc, "page": s.page} for s in question.sources], "answers": {}}
        for mode in options.modes:
            started = time.perf_counter()
            reply = backend.chat(question.question, model=options.adapter if "adapter" in mode else BASE_MODEL,
                                 retrieval=mode.startswith("rag"), k=options.k, max_tokens=options.max_tokens,
                                 attribution=options.attribution)
            scores = score_reply(reply, question, retrieval=mode.startswith("rag"), nli=options.nli)
            scores["seconds"] = time.perf_counter() - started
            scored[mode].append(scores)
            by_type.setdefault(question.type, {}).setdefault(mode, []).append(scores)
            entry["answers"][mode] = {"text": reply.text, "error": reply.error, "error_kind": reply.error_kind,
                                      "scores": scores, "citations": [c.as_dict() for c in reply.citations]}
        per_question.append(entry)
    return {"modes": list(options.modes), "summary": {mode: summarise(scored[mode]) for mode in options.modes},
            "by_type": {kind: {mode: summarise(rows) for mode, rows in modes.items()}
                        for kind, modes in sorted(by_type.items())},
            "per_question": per_question}


def score_reply(reply: Reply, question: EvalQuestion, *, retrieval: bool, nli: NliJudge | None = None) -> dict:
    """Every per-answer metric; None where it does not apply (e.g. EM of an unanswerable question)."""
    abstained = is_abstention(reply.text) if reply.error is None else None
    scores: dict[str, float | None] = dict.fromkeys((*ANSWER_METRICS, "conflicting"))
    if reply.error is None and not question.unanswerable and question.answers:
        scores |= answer_scores(reply.text, question.answers)
        # An answer that gives the gold value and another of the same kind hedges: flagged, and not credited.
        scores["conflicting"] = float(conflicting_values(reply.text, question.answers))
        if scores["conflicting"]:
            scores["contains_gold"] = 0.0
    scores["abstention_accuracy"] = float(abstained) if question.unanswerable and abstained is not None else None
    scores["false_abstention"] = float(abstained) if not question.unanswerable and abstained is not None else None
    if retrieval and reply.error is None and (question.answers or question.unanswerable):
        scores |= citation_scores(reply.text, reply.citations, question, nli=nli)
    else:
        scores |= dict.fromkeys(CITATION_METRICS)
    scores["error"] = float(reply.error is not None and reply.error_kind != "timeout")
    scores["timeout"] = float(reply.error_kind == "timeout")
    return scores


def summarise(rows: Sequence[dict]) -> dict:
    """Per metric: the mean over the answers it applies to (None when it applies to none)."""
    names = list(dict.fromkeys(name for row in rows for name in row))
    summary = {}
    for name in names:
        values = [row[name] for row in rows if row.get(name) is not None]
        summary[name] = sum(values) / len(values) if values else None
    summary["answers"] = len(rows)
    return summary


def _bar(items, label: str, progress):
    from tqdm import tqdm

    disable = not sys.stderr.isatty() if progress is None else not progress
    return tqdm(items, desc=label, unit="q", disable=disable, file=sys.stderr)
