"""Do answers carry their proof? Real uvicorn, the official openai client, attribution off vs on in one run.

For each question of a set (default: the sample corpus's 40 answerable + 12 unanswerable questions) the server
is asked twice through the openai client: once with post-hoc attribution off (citations come only from the
model's own [n] markers and nothing is declined: lorag before attribution) and once with it on. Printed per
mode: answers containing the gold answer, answerable questions that carry a citation, citations whose
passage holds the answer (and, for gold pages, the cited page), unanswerable questions declined, answerable
questions wrongly declined, and responses or prompts carrying an absolute server path.

    python benchmarks/answer_proof.py                              # the packaged model (generation.model default)
    python benchmarks/answer_proof.py --generator extractive       # the extractive fallback
    python benchmarks/answer_proof.py --dataset financebench --limit 39
    python benchmarks/answer_proof.py --dataset covidqa --articles 12 --answerable 40 --unanswerable 20 \
        --modes before --out covidqa.jsonl                         # drafts to replay (answer_proof_sweep.py)
    python benchmarks/answer_proof.py --dataset hotpotqa --answerable 80 --unanswerable 40 --modes before \
        --data-dir /tmp/hotpot --out hotpotqa.jsonl                # questions that name their subject

COVID-QA: a seeded choice of ``--articles`` of its 98 articles is ingested; answerable questions are asked about
them, unanswerable ones are questions of the articles left out (skipping any whose answer text an ingested
article contains). HotpotQA: see ``_hotpotqa``. ``--out`` keeps, per answer, the model's draft, the retrieved passages in prompt order and the
attribution, so that benchmarks/answer_proof_sweep.py re-runs attribution over them at other thresholds without
generating again. With attribution off (``before``) the draft is exactly what the model writes with it on
(greedy decoding; attribution only reads the answer afterwards), for every question.
"""

import argparse
import hashlib
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FINANCEBENCH = ROOT.parent / "shared" / "datasets" / "financebench"
COVIDQA = ROOT.parent / "shared" / "datasets" / "covidqa" / "covidQA.json"
HOTPOTQA = ROOT.parent / "shared" / "datasets" / "hotpotqa" / "dev_subsampled.jsonl"
MODES = ("before", "after")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=("sample", "financebench", "covidqa", "hotpotqa"), default="sample")
    parser.add_argument("--questions", type=Path, help="a lorag question set (default: the dataset's)")
    parser.add_argument("--docs", type=Path, help="documents to ingest (default: the dataset's)")
    parser.add_argument("--generator", choices=("model", "extractive"), default="model")
    parser.add_argument("--model", help="generation.model (default: the server's default)")
    parser.add_argument("--limit", type=int, default=0, help="first N questions only (0: all)")
    parser.add_argument("--max-tokens", type=int, default=120)
    parser.add_argument("--data-dir", type=Path, help="reuse an ingested data dir")
    parser.add_argument("--out", type=Path, help="write every answer (draft, passages, attribution) as JSON lines here")
    parser.add_argument("--modes", default="before,after",
                        help="comma-separated: before (attribution off), after (on); default both")
    parser.add_argument("--covidqa", type=Path, default=COVIDQA, help="COVID-QA's covidQA.json")
    parser.add_argument("--hotpotqa", type=Path, default=HOTPOTQA, help="HotpotQA's dev_subsampled.jsonl")
    parser.add_argument("--articles", type=int, default=12, help="COVID-QA articles ingested")
    parser.add_argument("--answerable", type=int, default=40,
                        help="COVID-QA questions about ingested articles; HotpotQA questions whose paragraphs are ingested")
    parser.add_argument("--unanswerable", type=int, default=20,
                        help="COVID-QA questions of articles not ingested; HotpotQA questions whose paragraphs are not")
    parser.add_argument("--seed", type=int, default=0, help="the choice of COVID-QA articles, HotpotQA questions")
    args = parser.parse_args()
    args.modes = tuple(m for m in MODES if m in args.modes.split(","))
    if not args.modes:
        parser.error(f"--modes: name one or both of {', '.join(MODES)}")

    from evaluation.datasets import load_question_set

    questions, docs = _dataset(args)
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="lorag-proof-"))
    if args.dataset == "covidqa":
        questions, docs = _covidqa(args, data_dir / "covidqa")
    elif args.dataset == "hotpotqa":
        questions, docs = _hotpotqa(args, data_dir / "hotpotqa")
    question_set = load_question_set(questions)
    items = question_set.questions[: args.limit or None]
    key, app = _server(data_dir, docs, args)
    from openai import OpenAI

    from server.background import serving

    secret_paths = [str(docs.resolve()), str(data_dir.resolve())]
    rows = []
    with serving(app) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=600)
        for question in items:
            for mode in args.modes:
                rows.append(_ask(client, question, mode, args.max_tokens, secret_paths))
                if args.out:  # as they come: a long CPU run keeps what it has answered
                    with args.out.open("a" if len(rows) > 1 else "w") as out:
                        out.write(json.dumps(rows[-1]) + "\n")
            print(f"  {question.id}: {rows[-1]['answer'][:100]!r}", file=sys.stderr)
    _report(rows, args)
    return 0


def _dataset(args) -> tuple[Path | None, Path | None]:
    if args.dataset in ("covidqa", "hotpotqa"):
        return None, None  # written into the data dir once it is known
    if args.dataset == "financebench":
        return args.questions or FINANCEBENCH / "questions.jsonl", args.docs or FINANCEBENCH / "pdfs"
    return args.questions or ROOT / "data" / "eval" / "questions-full.jsonl", args.docs or ROOT / "data" / "docs"


def _covidqa(args, where: Path) -> tuple[Path, Path]:
    """Write the chosen COVID-QA articles as text files and the question set as lorag JSONL under ``where``."""
    data = json.loads(args.covidqa.read_text())
    articles = {}  # file name -> (text, [(id, question, answer)])
    for item in data["data"]:
        for paragraph in item["paragraphs"]:
            qas = [(f"covid-{qa['id']}", qa["question"], qa["answers"][0]["text"].strip())
                   for qa in paragraph["qas"] if not qa.get("is_impossible") and qa["answers"]
                   and qa["answers"][0]["text"].strip()]
            articles[f"covid-{paragraph['document_id']}.txt"] = (paragraph["context"], qas)
    rng = random.Random(args.seed)
    names = sorted(articles)
    rng.shuffle(names)
    ingested, left_out = names[: args.articles], names[args.articles :]
    docs = where / "docs"
    docs.mkdir(parents=True, exist_ok=True)
    for name in ingested:
        (docs / name).write_text(articles[name][0])
    corpus = " ".join(" ".join(articles[name][0].lower().split()) for name in ingested)
    answerable = [(name, *qa) for name in ingested for qa in articles[name][1]]
    # An absent article's question is answerable after all when an ingested article holds its answer text.
    absent = [(name, *qa) for name in left_out for qa in articles[name][1]
              if " ".join(qa[2].lower().split()) not in corpus]
    rng.shuffle(answerable)
    rng.shuffle(absent)
    rows = [{"id": qid, "question": question, "answer": answer, "evidence": answer, "sources": [{"doc": name}]}
            for name, qid, question, answer in answerable[: args.answerable]]
    rows += [{"id": qid, "question": question, "unanswerable": True}
             for name, qid, question, answer in absent[: args.unanswerable]]
    questions = where / "questions.jsonl"
    questions.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"covidqa: {len(ingested)} articles ingested, {sum(1 for r in rows if not r.get('unanswerable'))} "
          f"answerable and {sum(1 for r in rows if r.get('unanswerable'))} unanswerable questions (seed {args.seed})",
          file=sys.stderr)
    return questions, docs


def _hotpotqa(args, where: Path) -> tuple[Path, Path]:
    """Write HotpotQA paragraphs as text files and the question set as lorag JSONL under ``where``.

    A seeded choice of ``--answerable`` questions has all ten of its paragraphs ingested (the two supporting ones
    and eight distractors), each as a file named by its title; ``--unanswerable`` other questions, none of whose
    supporting paragraphs is ingested and whose answer no ingested paragraph holds, are the unanswerable ones.
    Unlike COVID-QA's, a HotpotQA question names its subject, so it means the same whatever else is ingested."""
    records = [json.loads(line) for line in args.hotpotqa.read_text().splitlines() if line.strip()]
    rng = random.Random(args.seed)
    rng.shuffle(records)

    def file_name(title: str) -> str:
        return "".join(ch if ch.isalnum() else "-" for ch in title)[:80] + ".txt"

    def answers_of(record: dict) -> list[str]:
        return [span for answer in record["answers_objects"] for span in answer.get("spans", []) if span.strip()]

    usable = [r for r in records if answers_of(r) and any(c["is_supporting"] for c in r["contexts"])]
    chosen, rest = usable[: args.answerable], usable[args.answerable :]
    docs = where / "docs"
    docs.mkdir(parents=True, exist_ok=True)
    texts = {}
    for record in chosen:
        for context in record["contexts"]:
            texts.setdefault(file_name(context["title"]), f"{context['title']}\n\n{context['paragraph_text']}")
    for name, text in texts.items():
        (docs / name).write_text(text)
    corpus = " ".join(" ".join(text.lower().split()) for text in texts.values())
    rows = [{"id": f"hotpot-{r['question_id']}", "question": r["question_text"],
             "answers": answers_of(r),
             "sources": [{"doc": file_name(c["title"])} for c in r["contexts"] if c["is_supporting"]]}
            for r in chosen]
    absent = [r for r in rest
              if not any(c["is_supporting"] and file_name(c["title"]) in texts for c in r["contexts"])
              and not any(" ".join(a.lower().split()) in corpus for a in answers_of(r))]
    rows += [{"id": f"hotpot-{r['question_id']}", "question": r["question_text"], "unanswerable": True}
             for r in absent[: args.unanswerable]]
    questions = where / "questions.jsonl"
    questions.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"hotpotqa: {len(texts)} paragraphs ingested, {len(chosen)} answerable and "
          f"{sum(1 for r in rows if r.get('unanswerable'))} unanswerable questions (seed {args.seed})", file=sys.stderr)
    return questions, docs


def _server(data_dir: Path, docs: Path, args):
    from core.settings import load_settings
    from ingest.pipeline import ingest_paths
    from server.app import create_app
    from server.settings import ServerSettings
    from server.tenants import TenantRegistry

    settings = load_settings(ServerSettings, data_dir=str(data_dir), generation={"model": args.model},
                             server={"request_timeout_s": 600, "max_concurrent_requests": 1})
    if args.generator == "extractive":
        settings.generation.model = None  # no model: the factory builds the extractive generator
    if not (data_dir / "tenants" / "proof" / "index").is_dir():
        started = time.perf_counter()
        ingest_paths([docs], tenant="proof", settings=settings)
        print(f"ingested {docs} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    registry = TenantRegistry(data_dir)
    known = registry.path.is_file() and any(tenant.id == "proof" for tenant in registry.tenants())
    key = registry.rotate_key("proof") if known else registry.add("proof")[1]
    return key, create_app(settings)


def _ask(client, question, mode: str, max_tokens: int, secret_paths: list[str]) -> dict:
    from evaluation.answer_metrics import answer_scores, is_abstention
    from evaluation.citation_metrics import citation_scores
    from evaluation.backends import PassageRef

    started = time.perf_counter()
    row = {"id": question.id, "mode": mode, "unanswerable": question.unanswerable, "question": question.question,
           "answers": list(question.answers), "evidence": list(question.evidence),
           "sources": [{"doc": s.doc, "page": s.page} for s in question.sources]}
    try:
        reply = client.chat.completions.create(
            model="lorag", messages=[{"role": "user", "content": question.question}], max_tokens=max_tokens,
            extra_body={"retrieval": {"attribution": mode == "after"}},
        )
    except Exception as error:  # recorded, never retried: a failure is a result
        return row | {"error": f"{type(error).__name__}: {error}", "answer": "", "seconds": time.perf_counter() - started}
    body = reply.model_dump()
    answer = reply.choices[0].message.content or ""
    citations = [PassageRef.from_dict(c) for c in body.get("citations") or []]
    attribution = body.get("attribution") or {}
    row |= {
        # what the model wrote: the content with attribution off, else the withheld draft or the attributed text
        "draft": answer if mode == "before" else attribution.get("draft") or attribution.get("text") or answer,
        "passages": _retrieved(body),
        "attribution": attribution or None,
        "doc_accuracy": _doc_accuracy(citations, question),
        "answer": answer,
        "seconds": round(time.perf_counter() - started, 2),
        "generator": body.get("generator"),
        "abstained": is_abstention(answer),
        "cited": len(citations),
        "absolute_path": any(path in json.dumps(body) for path in secret_paths),
        "unsupported_sentences": (body.get("attribution") or {}).get("unsupported"),
    }
    if not question.unanswerable:
        row |= answer_scores(answer, question.answers) | citation_scores(answer, citations, question)
    return row


def _retrieved(body: dict) -> list[dict]:
    """The retrieved passages in prompt order ([1] first): each citation at its number, the uncited ones
    (``context``, in retrieval order) in the places left."""
    citations, context = body.get("citations") or [], list(body.get("context") or [])
    slots: list[dict | None] = [None] * (len(citations) + len(context))
    for citation in citations:
        slots[citation["number"] - 1] = {k: v for k, v in citation.items() if k not in ("number", "sentences")}
    return [slot if slot is not None else context.pop(0) for slot in slots]


def _doc_accuracy(citations, question) -> float | None:
    """Share of the citations on a gold document (None: nothing cited, or the question names none)."""
    from evaluation.datasets import same_document

    if not citations or not question.sources:
        return None
    return sum(any(same_document(c.source, g.doc) for g in question.sources) for c in citations) / len(citations)


def split_of(question_id: str) -> str:
    """"tune" or "report": a fixed half of every question set, by a hash of the question's id, so thresholds are
    chosen on one half and reported on the other."""
    return "tune" if hashlib.sha256(question_id.encode()).digest()[0] % 2 == 0 else "report"


def _report(rows: list[dict], args) -> None:
    print(f"\ndataset {args.dataset}, generator {rows[0].get('generator') if rows else '?'}, "
          f"{len(rows) // len(args.modes)} questions, max_tokens {args.max_tokens}")
    print(f"{'mode':<8} {'correct':>8} {'cited':>7} {'cite holds':>10} {'page ok':>8} {'doc ok':>7} {'declined':>9} "
          f"{'false decl':>10} {'abs path':>9} {'errors':>7} {'s/answer':>9}")
    for mode in args.modes:
        mine = [r for r in rows if r["mode"] == mode]
        answerable = [r for r in mine if not r["unanswerable"] and "error" not in r]
        unanswerable = [r for r in mine if r["unanswerable"] and "error" not in r]
        precision = [r["citation_precision"] for r in answerable if r.get("citation_precision") is not None]
        pages = [r["page_accuracy"] for r in answerable if r.get("page_accuracy") is not None]
        docs = [r["doc_accuracy"] for r in answerable if r.get("doc_accuracy") is not None]
        print(f"{mode:<8} {_share([r['contains_gold'] for r in answerable]):>8} "
              f"{_share([not r['no_citation'] for r in answerable]):>7} {_share(precision):>10} {_share(pages):>8} "
              f"{_share(docs):>7} "
              f"{_share([r['abstained'] for r in unanswerable]):>9} {_share([r['abstained'] for r in answerable]):>10} "
              f"{sum(r.get('absolute_path', False) for r in mine):>9} {sum('error' in r for r in mine):>7} "
              f"{_mean([r['seconds'] for r in mine]):>9}")
    print("correct: answer contains the gold answer or an accepted alternative; cited: answerable questions with "
          ">= 1 citation; cite holds: share of citations whose passage contains the answer or its evidence; page ok: "
          "share of citations on the gold page (questions with one); doc ok: share of citations on the gold document; declined: unanswerable questions declined; "
          "false decl: answerable questions declined; abs path: responses carrying an absolute server path")


def _share(values) -> str:
    values = [float(v) for v in values]
    return f"{100 * sum(values) / len(values):.0f}%" if values else "-"


def _mean(values) -> str:
    return f"{sum(values) / len(values):.1f}" if values else "-"


if __name__ == "__main__":
    sys.exit(main())
