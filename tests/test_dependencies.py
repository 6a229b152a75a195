"""Every third-party package the product's code imports is declared in pyproject's dependencies."""

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "adapters", "models", "ingest", "retrieval", "training", "evaluation", "server", "lorag")
# Imported only behind a guard, for an optional path; each says why it is not a dependency.
OPTIONAL = {
    "triton": "the engine's GPU LoRA kernels; CUDA builds of torch ship it, CPU serving never needs it",
    "langchain_openai": "only lorag/langchain_chat.py, the LangChain client class: the 'langchain' extra",
    "psycopg": "only retrieval/pg/, the PostgreSQL store (retrieval.store = postgresql://...): the 'postgres' extra",
    "psycopg_pool": "the PostgreSQL store's connection pool: the 'postgres' extra",
    "pgvector": "the PostgreSQL store's vector type adapter: the 'postgres' extra",
}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {_normalise(re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]) for requirement in project["dependencies"]}


def _imported_modules() -> dict[str, str]:
    """Top-level third-party module -> one file importing it."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in PACKAGES:
                        modules.setdefault(top, str(path.relative_to(ROOT)))
    return modules


def test_every_imported_package_is_declared():
    distributions = importlib.metadata.packages_distributions()
    declared = _declared()
    missing = []
    for module, where in sorted(_imported_modules().items()):
        if module in OPTIONAL:
            continue
        names = {_normalise(d) for d in distributions.get(module, [module])}
        if not names & declared:
            missing.append(f"{module} (imported by {where}; distribution {sorted(names)})")
    assert not missing, "imported but not in [project].dependencies: " + "; ".join(missing)
    assert "httpx" in declared
