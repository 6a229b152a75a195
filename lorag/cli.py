"""The ``lorag`` command: one sub-command per job, each a thin shell over its package's library.

Packages register their own sub-commands (``ingest.cli``, ``retrieval.cli``, ``training.cli``,
``server.serve_cli``); this module only wires them together and converts errors once.
Sub-command modules import heavy libraries (torch, faiss) inside their handlers so ``--help`` is fast.
The serving code itself never imports ``training``: only this dispatcher does, for ``lorag train``.
"""

import argparse
import importlib
import logging
import sys

from core.errors import LoragError

COMMAND_MODULES = ("ingest.cli", "retrieval.cli", "server.serve_cli", "training.cli", "evaluation.cli", "lorag.db_cli")

EPILOG = """examples:
  lorag ingest data/ --tenant acme            parse, chunk, embed and index a folder
  lorag search "what is covered?" --tenant acme -k 5
  lorag tenant add acme                       prints the tenant's API key once
  lorag serve --port 8000                     OpenAI-compatible chat with citations
  lorag train --tenant acme --data data/train/sample.jsonl --base Qwen/Qwen2.5-0.5B-Instruct
"""


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", help="where indexes, tenants and adapters live (env LORAG_DATA_DIR)")
    common.add_argument("--config", help="TOML settings file (env LORAG_CONFIG)")
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    parser = argparse.ArgumentParser(
        prog="lorag",
        description="Answers from your own documents, in your domain's voice, with cited sources.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {lorag_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:  # a real import problem inside the module: show it
                raise
            continue
        module.add_commands(subparsers, common)
    return parser


def lorag_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lorag")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # a bare `lorag`: show what it can do rather than an argparse error
        parser.print_help()
        return 0
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Libraries' warnings (a transformers FutureWarning about its own internals) become log records of
    # "py.warnings": shown with -v, otherwise kept out of the command's output.
    logging.captureWarnings(True)
    if not args.verbose:
        quiet_library_loggers()
    try:
        return int(args.handler(args) or 0)
    except LoragError as error:
        print(f"lorag {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"lorag {args.command}: interrupted", file=sys.stderr)
        return 130


def quiet_library_loggers() -> None:
    """Keep libraries' INFO/DEBUG lines (faiss's loader, model loading, HTTP clients) out of lorag's output."""
    for noisy in ("faiss.loader", "sentence_transformers", "httpx", "httpx2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # bitsandbytes warns on import about optional CPU kernels lorag never uses (4-bit runs on CUDA only).
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("py.warnings").setLevel(logging.ERROR)


if __name__ == "__main__":
    sys.exit(main())
