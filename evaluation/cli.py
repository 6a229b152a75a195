"""``lorag eval``: base vs RAG vs adapter vs RAG + adapter on a question set, in-process or against a server."""

import argparse
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

EVAL_EPILOG = """examples:
  lorag eval --tenant acme --questions data/eval/questions.jsonl --adapter support-v1 \\
      --general data/eval/general.jsonl --heldout data/train/sample.jsonl --out eval-acme
  lorag eval --server http://127.0.0.1:8000 --api-key $KEY --questions data/eval/questions.jsonl --adapter support-v1
  lorag eval --retrieval-only --tenant covid --ingest --questions covidQA.json --limit 200 --corpus-docs 30
  lorag eval --tenant acme --questions q.jsonl --modes rag,rag+adapter --adapter support-v1 --blind

Question sets: lorag JSONL ({question, answer, sources: [{doc, page}], unanswerable?, evidence?}), SQuAD JSON
(e.g. COVID-QA) or a BEIR directory (corpus.jsonl, queries.jsonl, qrels/test.tsv). Modes: base (model alone),
rag (base + retrieval), adapter (adapter alone), rag+adapter. Output: results.json, report.md, report.html and
plots/*.png in --out (default <data-dir>/eval/<time>).
"""


def add_commands(subparsers, common: argparse.ArgumentParser) -> None:
    ev = subparsers.add_parser(
        "eval", parents=[common], help="measure retrieval, answers, citations and perplexity per mode",
        description="Evaluate base model, RAG, a LoRA adapter and RAG + adapter on the same questions.",
        epilog=EVAL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ev.add_argument("--questions", required=True, metavar="PATH", help="question set file or BEIR directory")
    ev.add_argument("--format", choices=("lorag", "squad", "beir"), help="question set format (default: detected)")
    ev.add_argument("--limit", type=_non_negative, default=0, help="seeded sample of N questions (0 = all)")
    ev.add_argument("--corpus-docs", type=_non_negative, default=0,
                    help="SQuAD/BEIR: keep N seeded documents and their questions (0 = all)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--strict", action="store_true", help="fail on the first bad question record")
    where = ev.add_argument_group("where answers come from (one of)")
    where.add_argument("--tenant", help="in-process: build the server's chat service for this tenant")
    where.add_argument("--server", metavar="URL", help="a running lorag server (with --api-key)")
    where.add_argument("--api-key", help="the tenant's API key for --server")
    where.add_argument("--model", help="in-process base model: 'packaged', a hub id or a directory (generation.model)")
    where.add_argument("--generator", choices=("auto", "extractive"), default="auto",
                       help="in-process: 'extractive' quotes passages instead of loading a model")
    where.add_argument("--device", help="torch device for in-process models")
    what = ev.add_argument_group("what to measure")
    what.add_argument("--modes", default=None, help="comma-separated: base,rag,adapter,rag+adapter "
                      "(default: all four with --adapter, else base,rag)")
    what.add_argument("--adapter", metavar="NAME", help="the tenant's adapter for the adapter modes")
    what.add_argument("--k", type=int, help="passages per answer (default: retrieval.k)")
    what.add_argument("--max-tokens", type=int, default=256)
    what.add_argument("--attribution", choices=("on", "off"), help="post-hoc attribution and abstention in the rag "
                      "modes (default: the server's attribution.enabled); run twice to compare")
    what.add_argument("--retrieval-only", action="store_true", help="only hit@k, recall@k, MRR, nDCG@10")
    what.add_argument("--retrieval-modes", default="dense,keyword,hybrid")
    what.add_argument("--ingest", action="store_true", help="in-process: ingest a SQuAD/BEIR set's corpus first")
    what.add_argument("--nli-model", help="cross-encoder NLI model judging citations (skipped when unavailable)")
    what.add_argument("--heldout", metavar="FILE", help="instruction set (training formats) for base vs adapter perplexity")
    what.add_argument("--base", metavar="MODEL", help="base model for perplexity (default: the adapter's manifest)")
    what.add_argument("--general", metavar="FILE", help="general-ability questions (e.g. data/eval/general.jsonl)")
    out = ev.add_argument_group("output")
    out.add_argument("--out", metavar="DIR", help="report directory (default <data-dir>/eval/<UTC time>)")
    out.add_argument("--blind", action="store_true", help="shuffle and unlabel answers; key in blind_key.json")
    out.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="progress bar (default: when stderr is a terminal)")
    ev.set_defaults(handler=run_eval)


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; use 0 for all")
    return value


def _prepare_output(out: Path) -> None:
    """Raises: LoragError: ``out`` is a file, or cannot be created or written."""
    from core.errors import LoragError

    if out.exists() and not out.is_dir():
        raise LoragError(f"report directory {str(out)!r} is a file", hint="Pass a new or existing directory to --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise LoragError(f"cannot create report directory {str(out)!r}: {error.strerror or error}") from error
    if not os.access(out, os.W_OK):
        raise LoragError(f"report directory {str(out)!r} is not writable")


def run_eval(args: argparse.Namespace) -> int:
    from core.errors import LoragError
    from core.settings import load_settings
    from server.settings import ServerSettings
    from evaluation.citation_metrics import load_nli
    from evaluation.datasets import load_question_set
    from evaluation.report import MARKDOWN_FILE, summary_tables, write_report
    from evaluation.runner import EvalOptions, run_evaluation

    if not args.server and not args.tenant:
        raise LoragError("lorag eval needs --tenant T (in-process) or --server URL --api-key KEY")
    if args.server and not args.api_key:
        raise LoragError("--server needs --api-key: the tenant's key from `lorag tenant add`")
    settings = load_settings(ServerSettings, config_file=args.config, data_dir=args.data_dir,
                             generation={"model": args.model, "device": args.device})
    if args.generator == "extractive":
        settings.generation.model = None  # no model: the factory builds the extractive generator
    modes = _split(args.modes) if args.modes else (["base", "rag", "adapter", "rag+adapter"] if args.adapter else ["base", "rag"])
    options = EvalOptions(
        modes=modes, adapter=args.adapter, k=args.k, max_tokens=args.max_tokens,
        attribution=None if args.attribution is None else args.attribution == "on",
        retrieval_modes=_split(args.retrieval_modes), retrieval_only=args.retrieval_only, progress=args.progress,
        extra={"questions": str(args.questions), "limit": args.limit, "corpus_docs": args.corpus_docs, "seed": args.seed},
    )
    options.check()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else Path(settings.data_dir) / "eval" / stamp
    _prepare_output(out)  # before the evaluation, which can take long, not after it
    questions = load_question_set(args.questions, format=args.format, limit=args.limit, corpus_docs=args.corpus_docs,
                                  seed=args.seed, strict=args.strict)
    general = load_question_set(args.general, strict=args.strict) if args.general and not args.retrieval_only else None

    backend = _backend(args, settings, questions)
    try:
        options.nli = None if args.retrieval_only else load_nli(args.nli_model, device=args.device)
        perplexity = None
        if args.heldout and not args.retrieval_only:
            perplexity = _perplexity(args, settings)
        results = run_evaluation(backend, questions, options, general=general, perplexity=perplexity)
    finally:
        backend.close()
    write_report(results, out, blind=args.blind, seed=args.seed)
    for title, header, rows in summary_tables(results):
        print(f"\n{title}")
        widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
        for row in (header, *rows):
            print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    print(f"\nreport: {out / MARKDOWN_FILE} (also report.html, results.json, plots/)", file=sys.stderr)
    return 0


def _backend(args, settings, questions):
    from core.errors import LoragError
    from evaluation.backends import HttpBackend, InProcessBackend

    if args.server:
        if args.ingest:
            raise LoragError("--ingest works in-process only (--tenant)",
                             hint="Upload the documents to the server, or run with --tenant on the server's data dir")
        return HttpBackend(args.server, args.api_key)
    from retrieval.service import RetrievalService
    from evaluation.corpus import ingest_corpus

    retrieval = RetrievalService(settings)
    if args.ingest:
        ingest_corpus(questions, tenant=args.tenant, settings=settings, embedder=retrieval.embedder)
    if retrieval.index(args.tenant) is None:
        raise LoragError(f"tenant {args.tenant!r} has no index in {str(settings.data_dir)!r}",
                         hint="Ingest its documents with `lorag ingest`, or pass --ingest for a SQuAD/BEIR set")
    return InProcessBackend(settings, tenant=args.tenant, retrieval=retrieval, generate=not args.retrieval_only)


def _perplexity(args, settings):
    from core.errors import LoragError
    from evaluation.perplexity import measure_perplexity
    from adapters.registry import AdapterRegistry
    from models.packaged import ensure_packaged_model, is_packaged

    if not args.tenant:
        raise LoragError("--heldout needs --tenant: perplexity loads the adapter from the tenant's adapter directory")
    adapter_dir = AdapterRegistry(settings.data_dir).existing(args.tenant, args.adapter) if args.adapter else None
    base = args.base
    if base is None and adapter_dir is not None:
        base = AdapterRegistry(settings.data_dir).show(args.tenant, args.adapter).base_model
    base = base or settings.generation.model
    if not base:
        raise LoragError("--heldout needs a base model: pass --base MODEL or --adapter NAME")
    if is_packaged(base):  # the alias generation.model defaults to: the converted directory
        base = str(ensure_packaged_model(settings.generation.models_dir))
    return lambda: measure_perplexity(args.heldout, base_model=base, adapter_dir=adapter_dir, device=args.device).as_dict()


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]
