"""Does a tenant's RAFT adapter beat RAG alone? Document-held-out splits of real data, the four modes, one run.

For each dataset the documents are split three ways (seeded): TRAIN documents (ingested; their questions train
the adapter, and some are asked again as "seen"), HELD-OUT documents (ingested; their questions are never
trained on) and ABSENT documents (not ingested: their questions are unanswerable for this tenant). Then, with
lorag's own commands:

    lorag ingest <train + held-out documents> --tenant T
    lorag train --tenant T --with-retrieval ...        one adapter per RAFT recipe variant
    lorag eval --modes base,rag,adapter,rag+adapter     per variant, attribution on (and off for the comparison)

and prints the four-mode table per question type (held-out, seen, unanswerable), the recipe comparison and
the general-ability check (data/eval/general.jsonl). Everything lands in --work; results.json per eval.

    python benchmarks/raft_hybrid.py --dataset covidqa --work /tmp/raft --base packaged
"""

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATASETS = Path(os.environ.get("LORAG_DATASETS", ROOT.parent / "shared" / "datasets"))

# Recipe variants: name -> `lorag train` flags. "raft" is lorag's default recipe.
VARIANTS = {
    "raft": [],
    "no-cite": ["--no-cite"],
    "oracle-always": ["--no-oracle-p", "0"],
    "no-distractors": ["--distractors", "0"],
    # The base model's own answers to general questions of ANOTHER dataset mixed in (training/replay.py)
    "replay": ["--replay", "{replay}", "--replay-share", "0.25"],
}
REPLAY_PROMPTS = 400


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=("covidqa", "hotpotqa", "financebench"), default="covidqa")
    parser.add_argument("--work", type=Path, required=True, help="working directory (data dir, splits, reports)")
    parser.add_argument("--base", default="packaged", help="base model for training and serving")
    parser.add_argument("--variants", default="raft", help=f"comma-separated of {', '.join(VARIANTS)}")
    parser.add_argument("--train-questions", type=int, default=600)
    parser.add_argument("--eval-questions", type=int, default=60, help="per type (held-out, seen, unanswerable)")
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--max-steps", type=int, help="cap training steps (quick runs)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-len", type=int, default=1536)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--device", help="torch device for eval (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--adapter-modes-only", action="store_true",
                        help="evaluate only adapter and rag+adapter (another run of the same split measures base and rag)")
    parser.add_argument("--attribution-off", action="store_true", help="also evaluate rag modes without attribution")
    args = parser.parse_args()

    from lorag.cli import main as lorag

    args.work.mkdir(parents=True, exist_ok=True)
    data_dir = args.work / "data"
    split = _split(args)
    print(f"split: {json.dumps({k: len(v) for k, v in split['counts'].items()})}", file=sys.stderr)
    common = ["--data-dir", str(data_dir)]
    timings = {}
    if not (data_dir / "tenants" / "raft" / "index").is_dir():
        started = time.perf_counter()
        _run(lorag, ["ingest", *split["ingest"], "--tenant", "raft", *common])
        timings["ingest_s"] = time.perf_counter() - started
    reports = {}
    for position, variant in enumerate(args.variants.split(",")):
        name = f"{args.dataset}-{variant}"
        if not (data_dir / "tenants" / "raft" / "adapters" / name).is_dir():
            started = time.perf_counter()
            steps = ["--max-steps", str(args.max_steps)] if args.max_steps else []
            _run(lorag, ["train", "--tenant", "raft", "--data", str(split["train"]), "--base", args.base,
                         "--name", name, "--with-retrieval", "--k", str(args.k), "--epochs", str(args.epochs),
                         "--batch-size", str(args.batch_size), "--max-seq-len", str(args.max_seq_len),
                         "--lr", str(args.lr), "--seed", str(args.seed), *steps,
                         *(flag.format(replay=split["replay"]) for flag in VARIANTS[variant]), *common])
            timings[f"train_{variant}_s"] = time.perf_counter() - started
        # base and rag do not depend on the adapter: measured with the first variant only
        modes = "base,rag,adapter,rag+adapter" if position == 0 and not args.adapter_modes_only else "adapter,rag+adapter"
        for attribution in ("on", "off") if args.attribution_off and position == 0 else ("on",):
            if attribution == "off":
                modes = "rag,rag+adapter"  # attribution only changes the modes with passages
            out = args.work / "eval" / f"{variant}-attribution-{attribution}"
            started = time.perf_counter()
            device = ["--device", args.device] if args.device else []
            _run(lorag, ["eval", "--tenant", "raft", "--questions", str(split["eval"]), "--model", args.base,
                         "--adapter", name, "--modes", modes, "--k", str(args.k),
                         "--max-tokens", str(args.max_tokens), "--general", str(ROOT / "data" / "eval" / "general.jsonl"),
                         "--attribution", attribution, "--retrieval-modes", "hybrid", "--out", str(out),
                         "--no-progress", *device, *common])
            timings[f"eval_{variant}_{attribution}_s"] = time.perf_counter() - started
            reports[(variant, attribution)] = json.loads((out / "results.json").read_text())
    _print(reports, args, timings)
    return 0


def _run(lorag, argv: list[str]) -> None:
    print("lorag " + " ".join(argv), file=sys.stderr)
    code = lorag(argv)
    if code not in (0, 1):  # 1: some bad records or files were reported and skipped
        raise SystemExit(f"lorag {argv[0]} failed with exit code {code}")


def _split(args) -> dict:
    """Write the documents, the training file and the eval question set for the dataset; returns their paths."""
    rng = random.Random(args.seed)
    split_dir = args.work / "split"
    if split_dir.is_dir():
        shutil.rmtree(split_dir)
    split_dir.mkdir(parents=True)
    if args.dataset == "covidqa":
        docs, questions = _covidqa(split_dir / "docs")
    elif args.dataset == "hotpotqa":
        docs, questions = _hotpotqa(split_dir / "docs")
    else:
        docs, questions = _financebench()
    names = sorted(docs)
    rng.shuffle(names)
    absent_n = max(1, len(names) // 10)
    held_n = max(1, len(names) // 4)
    absent, held, train = set(names[:absent_n]), set(names[absent_n : absent_n + held_n]), set(names[absent_n + held_n :])
    by_doc: dict[str, list[dict]] = {}
    for question in questions:
        by_doc.setdefault(question["doc"], []).append(question)
    train_pool = [q for doc in sorted(train) for q in by_doc.get(doc, [])]
    rng.shuffle(train_pool)
    trained = train_pool[: args.train_questions]
    seen = trained[: args.eval_questions]
    heldout = [q for doc in sorted(held) for q in by_doc.get(doc, [])]
    rng.shuffle(heldout)
    unanswerable = [q for doc in sorted(absent) for q in by_doc.get(doc, [])]
    rng.shuffle(unanswerable)
    train_file = split_dir / "train.jsonl"
    train_file.write_text("".join(json.dumps({"instruction": q["question"], "output": q["answer"]}) + "\n" for q in trained))
    eval_rows = ([_eval_row(q, "held-out") for q in heldout[: args.eval_questions]]
                 + [_eval_row(q, "seen") for q in seen]
                 + [{"id": q["id"], "question": q["question"], "unanswerable": True, "type": "unanswerable"}
                    for q in unanswerable[: args.eval_questions]])
    eval_file = split_dir / "eval.jsonl"
    eval_file.write_text("".join(json.dumps(row) + "\n" for row in eval_rows))
    # Replay prompts from the other dataset, so none is a question the adapter is evaluated on.
    others = _hotpotqa(split_dir / "other-docs")[1] if args.dataset != "hotpotqa" else _covidqa(split_dir / "other-docs")[1]
    rng.shuffle(others)
    replay_file = split_dir / "replay.jsonl"
    replay_file.write_text("".join(json.dumps({"question": q["question"]}) + "\n" for q in others[:REPLAY_PROMPTS]))
    return {"train": train_file, "eval": eval_file, "replay": replay_file, "ingest": [str(docs[name]) for name in sorted(train | held)],
            "counts": {"train_docs": train, "held_out_docs": held, "absent_docs": absent, "trained": trained,
                       "eval": eval_rows}}


def _eval_row(question: dict, kind: str) -> dict:
    row = {"id": question["id"], "question": question["question"], "answer": question["answer"], "type": kind,
           "sources": [{"doc": question["doc"], **({"page": question["page"]} if question.get("page") else {})}]}
    if question.get("evidence"):
        row["evidence"] = question["evidence"]
    return row


def _covidqa(docs_dir: Path) -> tuple[dict[str, Path], list[dict]]:
    """Each article as a text file; each question with its (first) answer span text."""
    docs_dir.mkdir(parents=True)
    data = json.loads((DATASETS / "covidqa" / "covidQA.json").read_text())
    docs, questions = {}, []
    for item in data["data"]:
        for paragraph in item["paragraphs"]:
            name = f"covid-{paragraph['document_id']}.txt"
            path = docs_dir / name
            path.write_text(paragraph["context"])
            docs[name] = path
            for qa in paragraph["qas"]:
                answers = [a["text"].strip() for a in qa["answers"] if a["text"].strip()]
                if answers and not qa.get("is_impossible"):
                    questions.append({"id": f"covid-{qa['id']}", "doc": name, "question": qa["question"],
                                      "answer": answers[0]})
    return docs, questions


def _hotpotqa(docs_dir: Path) -> tuple[dict[str, Path], list[dict]]:
    """Each distinct paragraph as a text file named by its title; a question belongs to its first supporting
    paragraph's document (both supporting paragraphs are ingested together: they share the question's split
    only through that document, so a held-out question may still lean on a trained-on paragraph)."""
    docs_dir.mkdir(parents=True)
    docs, questions = {}, []
    for line in (DATASETS / "hotpotqa" / "dev_subsampled.jsonl").read_text().splitlines():
        record = json.loads(line)
        supporting = []
        for context in record["contexts"]:
            name = "".join(ch if ch.isalnum() else "-" for ch in context["title"])[:80] + ".txt"
            if name not in docs:
                path = docs_dir / name
                path.write_text(f"{context['title']}\n\n{context['paragraph_text']}")
                docs[name] = path
            if context["is_supporting"]:
                supporting.append(name)
        answers = [span for answer in record["answers_objects"] for span in answer.get("spans", []) if span]
        if answers and supporting:
            questions.append({"id": record["question_id"], "doc": supporting[0], "question": record["question_text"],
                              "answer": answers[0]})
    return docs, questions


def _financebench() -> tuple[dict[str, Path], list[dict]]:
    root = DATASETS / "financebench"
    docs = {path.name: path for path in sorted((root / "pdfs").glob("*.pdf"))}
    questions = []
    for line in (root / "questions.jsonl").read_text().splitlines():
        record = json.loads(line)
        evidence = record.get("evidence") or []
        questions.append({"id": record["id"], "doc": record["doc"], "question": record["question"],
                          "answer": record["answer"],
                          "page": evidence[0]["page_0based"] + 1 if evidence else None,
                          "evidence": [e["text"][:300] for e in evidence[:1]]})
    return docs, questions


def _print(reports: dict, args, timings: dict) -> None:
    metrics = ("f1", "contains_gold", "conflicting", "citation_recall", "citation_precision", "page_accuracy",
               "abstention_accuracy", "false_abstention", "error", "timeout", "seconds")
    print(f"\n{args.dataset}: base {args.base}, k={args.k}, max_tokens={args.max_tokens}")
    for (variant, attribution), results in reports.items():
        print(f"\nrecipe {variant!r}, attribution {attribution}")
        for kind, modes in results["answers"].get("by_type", {}).items():
            print(f"  type {kind}: " + "  ".join(metrics))
            for mode, summary in modes.items():
                values = "  ".join(_fmt(summary.get(m)) for m in metrics)
                print(f"    {mode:<12} {values}")
        general = results.get("general", {}).get("summary", {})
        if general:
            print("  general ability: " + "; ".join(
                f"{mode} contains_gold {_fmt(s.get('contains_gold'))} f1 {_fmt(s.get('f1'))} em {_fmt(s.get('exact_match'))}"
                for mode, s in general.items()))
    print("\ntimings: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    sys.exit(main())
