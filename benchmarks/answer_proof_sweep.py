"""Sweep the abstention and quote bars over answers saved by answer_proof.py, without generating again.

answer_proof.py ``--out`` keeps each question's draft (what the model wrote) and the passages it was shown. Here
each draft goes once through the server's own post-generation step (``server.chat_service.prove``, with the
shipped support thresholds and the numeric check), and then each pair of bars decides what the client gets:

- ``abstain_below`` (attribution.abstain_below): below this answerability no answer is generated, it is declined;
- ``quote_min_support`` (attribution.quote_min_support): a draft none of whose claims a passage supports is
  replaced by quotes of the passages when their best sentence supports the question this well, else declined.

Choosing: the bars that meet both targets (cited >= 95% of answerable, declined >= 80% of unanswerable) on the
choosing half of every set. When none do: the bars that keep both targets met on every set where some bars
meet them, and among those the least total shortfall from the targets (cited and declined below target,
summed over sets); when no bars keep them met either, the least total shortfall over all bars.
Per set and half (a fixed half of each set chooses, the other reports; see answer_proof.split_of): answerable
questions cited, citations whose passage holds the answer, citations on the gold document, unanswerable
questions declined, answerable ones declined. A row with ``--check`` compares a replay at the shipped settings
with the server's own ``after`` answers in the same file (they must agree: the replay is the server's code).

Answerability weighs the question's words by their rarity in the tenant's index (RetrievalService.term_weights):
name each run's data dir (``NAME=answers.jsonl@DATA_DIR``, tenant ``proof`` as answer_proof.py ingests it) for
the replay to do the same; without it the replay has no index and uses plain word overlap. ``--blends`` sweeps
answerability's blend (cosine weight, rarity weight: support.COS_WEIGHT, RARE_WEIGHT) as a third bar.

    python benchmarks/answer_proof_sweep.py sample=proof-sample.jsonl@/tmp/sample covidqa=proof-covidqa.jsonl@/tmp/covid
"""

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.answer_proof import split_of  # noqa: E402

ABSTAIN_BARS = (0.0, *(round(0.4 + 0.01 * step, 2) for step in range(23)))  # 0, 0.40 .. 0.62
QUOTE_BARS = (0.0, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.64, 0.7, 0.8, 1.01)  # 1.01: never quote, decline instead
CITED_TARGET, DECLINED_TARGET = 0.95, 0.80


@dataclass
class Replayed:
    """One question's draft through the server's post-generation step, before the bars decide."""

    id: str
    set: str
    half: str
    unanswerable: bool
    question: object  # evaluation.datasets.EvalQuestion
    answerability: float  # at the shipped blend
    draft_text: str  # the draft with its markers fixed (what the client gets when the draft stands)
    draft_cited: list[int]
    draft_stands: bool  # a claim of it is supported: neither quoted nor declined (a claimless draft is either)
    quote_support: float  # the quoter's support for the question
    quote_text: str | None  # the quote answer, when the quoter finds sentences to quote
    quote_cited: list[int]
    passages: list
    blended: dict = field(default_factory=dict)  # (cos weight, rare weight) -> answerability at that blend


def _pair(text: str) -> tuple[float, float]:
    """"A,B" as two numbers (a blend or a pair of bars)."""
    try:
        first, second = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected two numbers as A,B") from None
    return first, second


def _run(text: str) -> tuple[str, Path, str]:
    """NAME=answers.jsonl[@DATA_DIR] as (name, answers file, data dir or "")."""
    name, _, rest = text.partition("=")
    path, _, data_dir = rest.partition("@")
    if not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=answers.jsonl[@DATA_DIR]")
    if not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"{text!r}: no file {path}")
    if data_dir and not Path(data_dir).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: no directory {data_dir}")
    return name, Path(path), data_dir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=_run, help="NAME=answers.jsonl[@DATA_DIR] from answer_proof.py "
                        "--out [--data-dir]")
    parser.add_argument("--blends", nargs="*", default=[], type=_pair, metavar="COS,RARE",
                        help="answerability blends to sweep besides the shipped one (cosine weight, rarity weight)")
    parser.add_argument("--check", action="store_true", help="compare a replay at the shipped settings with the "
                        "file's own 'after' answers")
    parser.add_argument("--show", action="append", default=[], type=_pair, metavar="ABSTAIN,QUOTE",
                        help="also print full figures for these bars (repeatable)")
    args = parser.parse_args()

    from core.settings import load_settings
    from retrieval.service import RetrievalService
    from server.attribution.attributor import Attributor
    from server.settings import ServerSettings

    from server.attribution.support import COS_WEIGHT, RARE_WEIGHT

    settings = load_settings(ServerSettings)
    retrieval = RetrievalService(settings)
    attributor = Attributor(retrieval.embed_texts, settings.attribution)  # the server's embedder
    shipped_blend = (COS_WEIGHT, RARE_WEIGHT)
    blends = [shipped_blend] + [blend for blend in args.blends if blend != shipped_blend]
    replayed: list[Replayed] = []
    for name, path, data_dir in args.runs:
        # The run's own index, for the rarity of the question's words (the embedder is the same).
        rarity = (RetrievalService(load_settings(ServerSettings, data_dir=data_dir), embedder=retrieval.embedder)
                  if data_dir else None)
        if rarity is not None and rarity.index("proof") is None:
            parser.error(f"{name}: {data_dir} holds no index of tenant 'proof' (answer_proof.py --data-dir)")
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        drafts = {row["id"]: row for row in rows if row.get("mode") == "before" and "error" not in row}
        for row in drafts.values():
            replayed.append(_replay(name, row, attributor, settings, rarity, blends, shipped_blend))
        print(f"{name}: {len(drafts)} drafts from {path}" + (f", rarity from {data_dir}" if data_dir else ""),
              file=sys.stderr)
        if args.check:
            _check(name, rows, attributor, settings, rarity)
    shipped = (settings.attribution.abstain_below, settings.attribution.quote_min_support)
    for blend in blends:
        for item in replayed:
            item.answerability = item.blended[blend]
        print(f"\n=== answerability blend: cosine weight {blend[0]}, rarity weight {blend[1]}"
              + (" (shipped)" if blend == shipped_blend else ""))
        _print_sweep(replayed, shipped, args.show, grid=blend == shipped_blend)
    return 0


def _replay(name: str, row: dict, attributor, settings, rarity_from=None, blends=(), shipped_blend=None) -> Replayed:
    import numpy as np

    from core.prompt import strip_prompt_markup
    from server.attribution.support import answerability as blended_answerability
    from server.chat_service import prove
    from server.generation.extractive import ExtractiveGenerator

    question, passages = _question(row), _passages(row["passages"])
    evidence = attributor.evidence(passages)
    rarity = rarity_from.term_weights("proof", row["question"]) if rarity_from is not None else None
    answerability = attributor.answerability(row["question"], passages, evidence=evidence, rarity=rarity) \
        if passages else 0.0
    # The server's own blend is the answerability just computed.
    blended = {blend: answerability if blend == shipped_blend or not passages else None for blend in blends}
    others = [blend for blend, score in blended.items() if score is None]
    if others:
        vector = np.asarray(attributor.embed_texts([row["question"]]), dtype=np.float32)[0]
        for cos_weight, rare_weight in others:
            blended[(cos_weight, rare_weight)] = blended_answerability(
                row["question"], vector, [evidence[p.chunk.id] for p in passages], rarity=rarity,
                cos_weight=cos_weight, rare_weight=rare_weight)
    quoter = ExtractiveGenerator(min_support=0.0)  # quotes whenever it finds sentences; the bar is applied below
    row["draft"] = strip_prompt_markup(row["draft"])  # as the server hands every answer on (drafts saved before did not)
    draft_text, draft_cited, stands = row["draft"], [], True
    quote_text, quote_cited = None, []
    if passages and row["draft"].strip():
        attribution, text, cited = prove(attributor, quoter, "quote", row["draft"], passages,
                                         question=row["question"], evidence=evidence, answerability=answerability)
        if attribution.quoted:
            stands, quote_text, quote_cited = False, text, cited
            draft_text = attribution.draft
        elif attribution.abstained:
            stands = False
            draft_text = attribution.draft
        else:
            draft_text, draft_cited = text, cited
    return Replayed(row["id"], name, split_of(row["id"]), row["unanswerable"], question, answerability, draft_text,
                    draft_cited, stands, quoter.support(row["question"], passages) if passages else 0.0, quote_text,
                    quote_cited, passages, blended)


def _outcome(item: Replayed, abstain_below: float, quote_bar: float) -> tuple[str, list[int]]:
    """(the answer text, cited passage numbers) the client gets at these bars."""
    from core.prompt import ABSTENTION_ANSWER

    if abstain_below > 0 and item.answerability < abstain_below:
        return ABSTENTION_ANSWER, []
    if item.draft_stands:
        return item.draft_text, item.draft_cited
    if item.quote_text is not None and item.quote_support >= quote_bar:
        return item.quote_text, item.quote_cited
    return ABSTENTION_ANSWER, []


def _scores(items: list[Replayed], abstain_below: float, quote_bar: float) -> dict:
    from evaluation.answer_metrics import is_abstention
    from evaluation.backends import PassageRef
    from evaluation.citation_metrics import citation_scores
    from evaluation.datasets import same_document

    cited, holds, docs, declined, false_declined = [], [], [], [], []
    for item in items:
        text, numbers = _outcome(item, abstain_below, quote_bar)
        if item.unanswerable:
            declined.append(is_abstention(text))
            continue
        false_declined.append(is_abstention(text))
        refs = [PassageRef(p.chunk.id, p.chunk.source, p.chunk.page, p.chunk.start, p.chunk.end, p.chunk.text, n)
                for n, p in ((n, item.passages[n - 1]) for n in numbers)]
        cited.append(bool(refs))
        precision = citation_scores(text, refs, item.question)["citation_precision"]
        if precision is not None:
            holds.append(precision)
        if refs and item.question.sources:
            docs.append(sum(any(same_document(r.source, g.doc) for g in item.question.sources) for r in refs) / len(refs))
    return {"cited": _mean(cited), "holds": _mean(holds), "doc": _mean(docs), "declined": _mean(declined),
            "false_declined": _mean(false_declined), "n": (len(cited), len(declined))}


def _print_sweep(items: list[Replayed], shipped: tuple[float, float], shown: list[tuple[float, ...]], *,
                 grid: bool = True) -> None:
    """The grid of bars (``grid``), the choice, and full figures for the shipped, chosen and ``shown`` bars."""
    sets = sorted({item.set for item in items})
    groups = {(s, h): [i for i in items if i.set == s and (h == "all" or i.half == h)]
              for s in sets for h in ("tune", "report", "all")}
    for (s, h), group in groups.items():
        answerable = sum(not i.unanswerable for i in group)
        print(f"{s} {h}: {answerable} answerable, {len(group) - answerable} unanswerable")
    print(f"\nchoosing half: cited (answerable with a citation) / declined (unanswerable) per set; "
          f"* = both targets (cited >= {CITED_TARGET:.0%}, declined >= {DECLINED_TARGET:.0%}) met on every set")
    header = "abstain  quote  " + "  ".join(f"{s + ' cited/decl':>22}" for s in sets)
    print(header + "  shortfall")
    meeting, shortfalls, met = [], {}, {}
    for abstain_below in ABSTAIN_BARS:
        for quote_bar in QUOTE_BARS:
            scores = [_scores(groups[(s, "tune")], abstain_below, quote_bar) for s in sets]
            for s, x in zip(sets, scores):
                met[(s, (abstain_below, quote_bar))] = x["cited"] >= CITED_TARGET and x["declined"] >= DECLINED_TARGET
            ok = all(met[(s, (abstain_below, quote_bar))] for s in sets)
            if ok:
                meeting.append((abstain_below, quote_bar))
            shortfall = sum(max(0.0, CITED_TARGET - x["cited"]) + max(0.0, DECLINED_TARGET - x["declined"])
                            for x in scores)
            shortfalls[(abstain_below, quote_bar)] = shortfall
            mark = "*" if ok else ""
            mark += " <- shipped" if (abstain_below, quote_bar) == shipped else ""
            if grid:
                print(f"{abstain_below:>7.2f} {quote_bar:>6.2f}  "
                      + "  ".join(f"{_pct(x['cited']):>14}/{_pct(x['declined']):>7}" for x in scores)
                      + f"  {shortfall:>9.2f} {mark}")
    print(f"\nsettings meeting both targets on the choosing half of every set: {meeting or 'none'}")
    least = sorted(shortfalls, key=lambda bars: (shortfalls[bars], -bars[0], -bars[1]))[:3]
    if not meeting:
        print("least total shortfall (cited and declined below target, summed over sets): "
              + ", ".join(f"{bars} {shortfalls[bars]:.2f}" for bars in least))
        reachable = [s for s in sets if any(met[(s, bars)] for bars in shortfalls)]
        kept = [bars for bars in shortfalls if all(met[(s, bars)] for s in reachable)]
        chosen = sorted(kept, key=lambda bars: (shortfalls[bars], -bars[0], -bars[1]))[:1]
        print(f"targets reachable on: {', '.join(reachable) or 'no set'}; keeping them met, least shortfall: "
              + (", ".join(f"{bars} {shortfalls[bars]:.2f}" for bars in chosen)
                 or f"no bars keep them met: the least total shortfall, {least[0]}, is the choice"))
        least = chosen + least
    print("\nfull figures (shipped settings first):")
    print(f"{'abstain':>7} {'quote':>6} {'set':<10} {'half':<7} {'cited':>6} {'holds':>6} {'doc ok':>7} "
          f"{'declined':>9} {'false decl':>10}")
    listed = [shipped] + [b for b in (meeting or least) if b != shipped][:4] + shown
    for bars in dict.fromkeys(listed):  # each pair of bars once
        for (s, h), group in groups.items():
            x = _scores(group, *bars)
            print(f"{bars[0]:>7.2f} {bars[1]:>6.2f} {s:<10} {h:<7} {_pct(x['cited']):>6} {_pct(x['holds']):>6} "
                  f"{_pct(x['doc']):>7} {_pct(x['declined']):>9} {_pct(x['false_declined']):>10}")


def _check(name: str, rows: list[dict], attributor, settings, rarity_from=None) -> None:
    """The replay at the shipped settings against what the server answered (``after`` rows)."""
    from core.prompt import strip_markers

    before = {r["id"]: r for r in rows if r.get("mode") == "before" and "error" not in r}
    after = [r for r in rows if r.get("mode") == "after" and "error" not in r and r["id"] in before]
    same = 0
    for row in after:
        item = _replay(name, before[row["id"]], attributor, settings, rarity_from)
        text, _ = _outcome(item, settings.attribution.abstain_below, settings.attribution.quote_min_support)
        if " ".join(strip_markers(text).split()) == " ".join(strip_markers(row["answer"]).split()):
            same += 1
        else:
            print(f"  {name} {row['id']}: replay {text[:80]!r} / server {row['answer'][:80]!r}", file=sys.stderr)
    print(f"{name}: the replay at the shipped settings gives the server's answer for {same} of {len(after)} questions")


def _question(row: dict):
    from evaluation.datasets import EvalQuestion, GoldSource

    return EvalQuestion(row["id"], row["question"], answers=tuple(row.get("answers") or ()),
                        sources=tuple(GoldSource(s["doc"], s.get("page")) for s in row.get("sources") or ()),
                        evidence=tuple(row.get("evidence") or ()), unanswerable=row["unanswerable"])


def _passages(saved: list[dict]) -> list:
    from core.records import Chunk, Passage

    return [Passage(Chunk(id=p["id"], tenant="proof", document_id=p["document_id"], source=p["source"],
                          page=p["page"], start=p["start"], end=p["end"], text=p["text"],
                          heading_path=tuple(p.get("heading_path") or ()), name=p["source"]),
                    score=p.get("score") or 0.0, scores=p.get("scores") or {}) for p in saved]


def _mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else float("nan")


def _pct(value: float) -> str:
    return "-" if value != value else f"{100 * value:.0f}%"


if __name__ == "__main__":
    sys.exit(main())
