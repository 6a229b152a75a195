"""``lorag search``: show the passages a question would retrieve, with source, page and score."""

import argparse
import json
import sys


def add_commands(subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "search",
        parents=[common],
        help="show the passages retrieved for a question",
        description="Retrieve passages from a tenant's index and print them with source, page and score.",
        epilog='example: lorag search "what is the warranty period?" --tenant acme -k 5 --mode hybrid',
    )
    parser.add_argument("query", help="the question to retrieve passages for")
    parser.add_argument("--tenant", required=True, help="tenant whose index to search")
    parser.add_argument("-k", type=int, default=None, help="number of passages (default: retrieval.k)")
    parser.add_argument("--mode", choices=("hybrid", "dense", "keyword"), default=None,
                        help="retrievers to use (default: hybrid when both are enabled in settings)")
    parser.add_argument("--source", action="append", default=None, metavar="S",
                        help="only passages from this source (repeatable)")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of text")
    parser.set_defaults(handler=run_search)


def run_search(args: argparse.Namespace) -> int:
    from core.errors import NotFound
    from retrieval.service import RetrievalService
    from core.settings import Settings, load_settings
    from core.datadir import validate_tenant_name

    settings = load_settings(Settings, config_file=args.config, data_dir=args.data_dir)
    validate_tenant_name(args.tenant)
    service = RetrievalService(settings)
    if service.index(args.tenant) is None:
        raise NotFound(
            f"tenant {args.tenant!r} has no index in {str(settings.data_dir)!r}",
            hint=f"Ingest documents first: lorag ingest PATH --tenant {args.tenant}",
        )
    sources = _stored_sources(service, args.tenant, args.source) if args.source else None
    passages = service.retrieve(args.tenant, args.query, k=args.k, sources=sources, mode=args.mode)
    if args.json:
        json.dump([passage_json(p) for p in passages], sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
        return 0
    if not passages:
        print("no passages found")
    for number, passage in enumerate(passages, start=1):
        chunk = passage.chunk
        own = ", ".join(f"{name} {value:.4f}" for name, value in passage.scores.items())
        heading = f"  [{' > '.join(chunk.heading_path)}]" if chunk.heading_path else ""
        print(f"[{number}] {chunk.source}  page {chunk.page}  chars {chunk.start}-{chunk.end}  "
              f"score {passage.score:.4f} ({own}){heading}")
        print("    " + chunk.text.strip().replace("\n", "\n    "))
        print()
    return 0


def _stored_sources(service, tenant: str, given: list[str]) -> list[str]:
    """Map each ``--source`` to a stored source (as given, or as an absolute path).

    Raises:
        NotFound: a source matches no document, so the filter would silently find nothing.
    """
    import os

    from core.errors import NotFound

    stored = {record.source for record in service.documents(tenant)}
    matched, unknown = [], []
    for source in given:
        hit = next((s for s in (source, os.path.abspath(source)) if s in stored), None)
        (matched.append(hit) if hit else unknown.append(source))
    if unknown:
        raise NotFound(f"tenant {tenant!r} has no document from {', '.join(map(repr, unknown))}",
                       hint=f"List them with: lorag docs --tenant {tenant}")
    return matched


def passage_json(passage) -> dict:
    chunk = passage.chunk
    return {
        "id": chunk.id,
        "source": chunk.source,
        "page": chunk.page,
        "start": chunk.start,
        "end": chunk.end,
        "score": passage.score,
        "scores": passage.scores,
        "heading_path": list(chunk.heading_path),
        "text": chunk.text,
    }
