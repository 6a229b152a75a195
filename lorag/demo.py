"""The main job end to end: ingest data/docs/ for tenant 'demo', serve, ask one question with the openai client,
print the answer with its cited passages. Run ``python -m lorag.demo`` (``make demo``)."""

import argparse
import logging
import sys
from pathlib import Path

from core.errors import LoragError
from core.settings import load_settings
from lorag.cli import quiet_library_loggers

REPO_ROOT = Path(__file__).resolve().parent.parent
TENANT = "demo"
QUESTION = "How long is the warranty on a Kestrel Tide buoy?"  # answered in data/docs/policies/returns-and-warranty.txt
EXCERPT_CHARS = 160


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorag.demo", description=__doc__)
    parser.add_argument("--data-dir", default=".lorag", help="demo state (default ./.lorag)")
    parser.add_argument("--corpus", default=str(REPO_ROOT / "data" / "docs"), help="folder to ingest (default data/docs/)")
    parser.add_argument("--question", default=QUESTION)
    parser.add_argument("--config", help="TOML settings file (env LORAG_CONFIG)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    quiet_library_loggers()
    try:
        run(args)
    except LoragError as error:
        print(f"demo: error: {error}", file=sys.stderr)
        return error.exit_code
    return 0


def run(args: argparse.Namespace) -> None:
    from ingest.pipeline import ingest_paths
    from retrieval.service import RetrievalService
    from server.app import create_app
    from server.background import serving
    from server.settings import ServerSettings
    from server.tenants import TenantRegistry

    settings = load_settings(ServerSettings, config_file=args.config, data_dir=args.data_dir)
    print(f"data dir: {settings.data_dir.resolve()}")
    retrieval = RetrievalService(settings)
    report = ingest_paths([Path(args.corpus)], tenant=TENANT, settings=settings, embedder=retrieval.embedder)
    print(report.format_table())

    registry = TenantRegistry(settings.data_dir)
    if any(tenant.id == TENANT for tenant in registry.tenants()):
        key = registry.rotate_key(TENANT)
    else:
        _, key = registry.add(TENANT)

    app = create_app(settings, retrieval=retrieval)
    print(f"loading generator (model {settings.generation.model!r}) and starting the server ...")
    with serving(app) as base_url:
        ask(base_url, key, args.question, settings)


def ask(base_url: str, key: str, question: str, settings) -> None:
    import httpx
    from openai import OpenAI

    ready = httpx.get(f"{base_url}/readyz").json()
    if ready["generator_kind"] == "extractive":
        if settings.generation.model:
            print(
                f"\nNOTE: model {settings.generation.model!r} could not be loaded (offline, or not downloaded), so\n"
                "the server FELL BACK TO EXTRACTIVE ANSWERS: it quotes the best passages instead of generating.\n"
                "Point LORAG_GENERATION__MODEL at a local model directory for generated answers.\n"
            )
        else:
            print("\nNOTE: no model configured: answers are extractive (quoted passages).\n")
    print(f"server: {base_url}  generator: {ready['generator']}")

    client = OpenAI(base_url=f"{base_url}/v1", api_key=key)
    completion = client.chat.completions.create(
        model="lorag",
        messages=[{"role": "user", "content": question}],
        max_tokens=200,
        extra_body={"retrieval": {"k": 4}},
    )
    extra = completion.model_extra or {}
    print(f"\nQ: {question}\nA: {completion.choices[0].message.content.strip()}\n")
    citations = extra.get("citations", [])
    if not citations:
        print("(the answer cites no passage)")
    for citation in citations:
        excerpt = " ".join(citation["text"].split())[:EXCERPT_CHARS]
        print(f"[{citation['number']}] {citation['source']} page {citation['page']} "
              f"(chars {citation['start']}-{citation['end']})")
        print(f"    {excerpt}...")
        print(f"    {base_url}{citation['url']}")
    print(f"\ngenerator: {extra.get('generator')}  usage: {completion.usage}")


if __name__ == "__main__":
    sys.exit(main())
