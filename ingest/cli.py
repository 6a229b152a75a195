"""``lorag ingest``, ``lorag remove`` and ``lorag docs``: thin shells over ``ingest.pipeline``."""

import argparse
import json
import os
import sys
from dataclasses import asdict

INGEST_EPILOG = """examples:
  lorag ingest data/ --tenant acme                 add or update every supported file under data/
  lorag ingest data/ --tenant acme --prune         also drop documents whose file was deleted
  lorag ingest report.pdf notes.md --tenant acme --chunk-tokens 128

Supported: .pdf (text layer; no OCR), .md/.markdown, .txt/.text, .html/.htm. Hidden files are skipped.
Text that is not valid UTF-8 is decoded with U+FFFD replacements and a warning naming the file.
Exit status 1 when any file failed; the other files are still ingested.
"""


def add_commands(subparsers, common: argparse.ArgumentParser) -> None:
    ingest = subparsers.add_parser(
        "ingest",
        parents=[common],
        help="parse, chunk, embed and index files or folders for a tenant",
        description="Parse, chunk, embed and index documents. Unchanged files are skipped cheaply.",
        epilog=INGEST_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ingest.add_argument("paths", nargs="+", metavar="PATH", help="files or folders (walked recursively)")
    ingest.add_argument("--tenant", required=True, help="tenant name (lowercase letters, digits, - and _)")
    ingest.add_argument("--prune", action="store_true", help="remove documents whose file under PATH no longer exists")
    ingest.add_argument("--chunk-tokens", type=int, help="chunk size in embedder tokens (chunking.chunk_tokens)")
    ingest.add_argument("--overlap-tokens", type=int, help="overlap between chunks (chunking.overlap_tokens)")
    ingest.add_argument("--window-tokens", type=int,
                        help="sentence window size, one vector each; 0 = one vector per chunk (chunking.window_tokens)")
    ingest.add_argument("--json", action="store_true", help="print the full report as JSON instead of the table")
    ingest.set_defaults(handler=run_ingest)

    remove = subparsers.add_parser(
        "remove",
        parents=[common],
        help="delete ingested documents from a tenant's index",
        description="Delete documents by source path (a folder removes every document under it).",
    )
    remove.add_argument("sources", nargs="+", metavar="SOURCE", help="source path as shown by `lorag docs`")
    remove.add_argument("--tenant", required=True)
    remove.set_defaults(handler=run_remove)

    docs = subparsers.add_parser(
        "docs", parents=[common], help="list a tenant's documents with page and chunk counts"
    )
    docs.add_argument("--tenant", required=True)
    docs.add_argument("--json", action="store_true", help="one JSON array instead of a table")
    docs.set_defaults(handler=run_docs)


def _settings(args: argparse.Namespace, **sections):
    from ingest.settings import IngestAppSettings
    from core.settings import load_settings

    return load_settings(IngestAppSettings, config_file=args.config, data_dir=args.data_dir, **sections)


def run_ingest(args: argparse.Namespace) -> int:
    import logging

    from tqdm.contrib.logging import logging_redirect_tqdm

    from ingest.pipeline import ingest_paths
    from ingest.progress import IngestProgress, should_show_progress

    settings = _settings(
        args,
        chunking={"chunk_tokens": args.chunk_tokens, "overlap_tokens": args.overlap_tokens,
                  "window_tokens": args.window_tokens},
    )
    progress = IngestProgress() if should_show_progress(sys.stderr, os.environ) else None
    with logging_redirect_tqdm(loggers=[logging.getLogger()]):
        report = ingest_paths(args.paths, tenant=args.tenant, settings=settings, prune=args.prune, progress=progress)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    else:
        print(report.format_table())
        for outcome in report.of("failed"):
            print(f"  failed: {outcome.source}: {outcome.reason}")
    return 1 if report.failed else 0


def run_remove(args: argparse.Namespace) -> int:
    from ingest.pipeline import remove_sources

    removed = remove_sources(args.sources, tenant=args.tenant, settings=_settings(args))
    print(f"removed {removed} document{'s' if removed != 1 else ''} from tenant {args.tenant!r}")
    return 0


def run_docs(args: argparse.Namespace) -> int:
    from ingest.pipeline import list_documents

    records = list_documents(tenant=args.tenant, settings=_settings(args))
    if args.json:
        print(json.dumps([asdict(record) for record in records], indent=2, ensure_ascii=False))
        return 0
    if not records:
        print(f"tenant {args.tenant!r} has no documents")
        return 0
    header = ("pages", "chunks", "size", "ingested", "document", "source")
    rows = [
        (str(r.pages), str(r.chunk_count), _size(r.size_bytes), r.ingested_at, r.document_id[:12], r.source)
        for r in records
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    return 0


def _size(size: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if size < 1024 or unit == "MiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)
