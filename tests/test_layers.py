"""Imports run one way: scripts -> erase -> evals -> pipelines, and inside erase: api -> method families -> core.

A package may import the ones below it and never one above it (``pipelines`` imports nothing of ``evals``, ``erase``
or ``scripts``; ``evals``, ``evals.microworld`` included, nothing of ``erase`` or ``scripts``; ``erase`` nothing of
``scripts``). Inside ``erase``, ``core`` imports no family and nothing of the API (``erase/__init__.py`` and the
modules beside it), and a family (``closed_form``, ``lora``, ``sae``, any sub-package but ``core``) imports only
itself and ``core``. No module takes part in an import cycle. Imports inside functions count as much as those at the
top of a file, relative imports are resolved, and ``importlib.import_module("...")`` / ``__import__("...")`` with a
literal name counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Bottom to top.
LAYERS: tuple[str, ...] = ("pipelines", "evals", "erase", "scripts")
_RANK = {name: rank for rank, name in enumerate(LAYERS)}


def _imported_names(tree: ast.AST) -> list[tuple[int, str | None]]:
    """``(line, absolute module name)`` of every import in ``tree``; ``None`` for a relative import (its own
    package)."""
    found: list[tuple[int, str | None]] = []
    for node in ast.walk(tree):  # every node: imports inside functions, classes and ``if`` blocks too
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, None if node.level else node.module))
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
            first = node.args[0]
            if name in ("import_module", "__import__") and isinstance(first, ast.Constant):
                if isinstance(first.value, str) and not first.value.startswith("."):
                    found.append((node.lineno, first.value))
    return found


def upward_imports(source: str, layer: str, filename: str = "<source>") -> list[tuple[int, str]]:
    """``(line, package)`` for each import in ``source`` (code of the ``layer`` package) of a package above it."""
    own = _RANK[layer]
    upward = []
    for line, module in _imported_names(ast.parse(source, filename=filename)):
        top = module.split(".")[0] if module else layer
        if _RANK.get(top, -1) > own:
            upward.append((line, top))
    return sorted(upward)


def layer_files() -> dict[str, list[Path]]:
    return {layer: sorted((ROOT / layer).rglob("*.py")) for layer in LAYERS}


def test_checker_finds_an_upward_import_anywhere_in_a_file() -> None:
    source = (
        "import os\n"
        "import pipelines.wrapper\n"
        "from . import metrics\n"  # relative: its own package
        "from evals.microworld import world\n"
        "def load():\n"
        "    from erase.core.artifact import load_artifact\n"  # inside a function
        "    return load_artifact\n"
        "class Later:\n"
        "    def run(self):\n"
        "        import scripts.audit as audit\n"
        "        return importlib.import_module('erase.closed_form.uce'), __import__('os')\n"
    )
    assert upward_imports(source, "evals") == [(6, "erase"), (10, "scripts"), (11, "erase")]
    assert upward_imports(source, "erase") == [(10, "scripts")]
    assert upward_imports(source, "scripts") == []
    pipelines_source = "import torch\nfrom evals.microworld import world\n"
    assert upward_imports(pipelines_source, "pipelines") == [(2, "evals")]


def test_checker_sees_every_package() -> None:
    files = layer_files()
    assert all(files[layer] for layer in LAYERS), {layer: len(paths) for layer, paths in files.items()}
    assert ROOT / "evals" / "microworld" / "training.py" in files["evals"]  # subpackages are walked too


def _upward_imports_in_repo(layer: str) -> list[tuple[str, int, str]]:
    found = []
    for path in layer_files()[layer]:
        name = path.relative_to(ROOT).as_posix()
        found += [(name, line, package) for line, package in upward_imports(path.read_text("utf-8"), layer, name)]
    return found


@pytest.mark.parametrize("layer", LAYERS)
def test_no_package_imports_a_layer_above_it(layer: str) -> None:
    offending = [
        f"{name}:{line}: {layer} imports {package}, a layer above it"
        for name, line, package in _upward_imports_in_repo(layer)
    ]
    order = " -> ".join(reversed(LAYERS))
    assert not offending, f"imports must run {order}:\n" + "\n".join(offending)


# ---------------------------------------------------------------------------------------------------- module graph
def module_name(path: Path, root: Path = ROOT) -> tuple[str, bool]:
    """A file's dotted module name, and whether it is a package (``__init__.py``)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute name of ``from <level dots><name> import ...`` written in ``module``."""
    if not level:
        return name or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - (level - 1)]
    return ".".join([*base, name] if name else base)


def import_graph(sources: dict[str, tuple[str, bool]]) -> dict[str, dict[str, int]]:
    """``{module: {imported module: line}}`` among the modules of ``sources`` (name -> (source, is_package)): every
    import anywhere in a file, relative ones resolved; ``from package import name`` is an edge to the submodule
    ``package.name`` where that is a module, else to the package."""
    known = set(sources)

    def ours(name: str) -> str | None:  # the module itself, or the nearest package of ours above it
        parts = name.split(".")
        for end in range(len(parts), 0, -1):
            if ".".join(parts[:end]) in known:
                return ".".join(parts[:end])
        return None

    graph: dict[str, dict[str, int]] = {}
    for module, (source, is_package) in sources.items():
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(source)):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, is_package, node.level, node.module)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
            elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
                if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                    targets = [node.args[0].value]
            for target in targets:
                found = ours(target)
                if found is not None and found != module:
                    edges.setdefault(found, node.lineno)
        graph[module] = edges
    return graph


def import_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan): each is at least one import cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for child in graph.get(node, {}):
            if child not in index:
                visit(child)
                low[node] = min(low[node], low[child])
            elif child in on_stack:
                low[node] = min(low[node], index[child])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(cycles)


#: erase's layers, bottom to top: core, the method families (every other sub-package), the API (the modules beside
#: ``erase/__init__.py``, and it)
ERASE_LAYERS = ("core", "family", "api")


def erase_layer(module: str) -> tuple[int, str]:
    """(rank, name) of an ``erase`` module's layer; the name is its family for a family module."""
    parts = module.split(".")
    if len(parts) == 1 or (len(parts) == 2 and parts[1] not in _ERASE_PACKAGES):
        return ERASE_LAYERS.index("api"), "api"
    if parts[1] == "core":
        return ERASE_LAYERS.index("core"), "core"
    return ERASE_LAYERS.index("family"), parts[1]


_ERASE_PACKAGES = {p.name for p in (ROOT / "erase").iterdir() if (p / "__init__.py").is_file()}


def erase_layer_violations(graph: dict[str, dict[str, int]]) -> list[str]:
    """Each import inside erase of a higher layer, or of another family."""
    found = []
    for module, edges in sorted(graph.items()):
        if module.split(".")[0] != "erase":
            continue
        rank, name = erase_layer(module)
        for target, line in sorted(edges.items()):
            if target.split(".")[0] != "erase":
                continue
            target_rank, target_name = erase_layer(target)
            if target_rank > rank:
                found.append(f"{module}:{line}: {name} imports {target} ({target_name}), a layer above it")
            elif target_rank == rank == ERASE_LAYERS.index("family") and target_name != name:
                found.append(f"{module}:{line}: family {name} imports family {target_name} ({target})")
    return found


def repo_sources() -> dict[str, tuple[str, bool]]:
    sources = {}
    for paths in layer_files().values():
        for path in paths:
            name, is_package = module_name(path)
            sources[name] = (path.read_text("utf-8"), is_package)
    return sources


def test_graph_resolves_relative_and_function_level_imports_and_finds_a_cycle() -> None:
    sources = {
        "pkg": ("", True),
        "pkg.sub": ("from .. import a\n", True),  # relative from a package: pkg.a
        "pkg.a": ("from .b import helper\n", False),
        "pkg.b": ("def later():\n    from .sub.c import thing\n", False),  # inside a function, two levels down
        "pkg.sub.c": ("import importlib\nimportlib.import_module('pkg.a')\n", False),  # by literal name
        "pkg.d": ("import os\nimport pkg.a\n", False),  # outside the cycle
    }
    graph = import_graph(sources)
    assert graph["pkg.sub"] == {"pkg.a": 1} and graph["pkg.b"] == {"pkg.sub.c": 2}
    assert import_cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c"]]
    sources["pkg.sub.c"] = ("import os\n", False)
    assert import_cycles(import_graph(sources)) == []


def test_erase_layer_check_finds_upward_and_sideways_imports() -> None:
    sources = {
        "erase": ("from .core import registry\n", True),  # api -> core: down, fine
        "erase.workflow": ("from .lora import esd\n", False),  # api -> family: fine
        "erase.core": ("", True),
        "erase.core.registry": ("def f():\n    from ..lora.esd import x\n", False),  # core -> family: up
        "erase.core.artifact": ("from .. import workflow\n", False),  # core -> api: up
        "erase.lora": ("", True),
        "erase.lora.esd": ("from ..core.registry import r\nfrom ..sae import itd\n", False),  # sideways
        "erase.sae": ("", True),
        "erase.sae.itd": ("from erase.core import registry\n", False),
    }
    assert erase_layer_violations(import_graph(sources)) == [
        "erase.core.artifact:1: core imports erase.workflow (api), a layer above it",
        "erase.core.registry:2: core imports erase.lora.esd (lora), a layer above it",
        "erase.lora.esd:2: family lora imports family sae (erase.sae.itd)",
    ]


def test_no_import_cycle_in_any_package() -> None:
    cycles = import_cycles(import_graph(repo_sources()))
    assert not cycles, "modules that import each other in a circle:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_erase_imports_run_api_to_families_to_core() -> None:
    graph = import_graph(repo_sources())
    assert {erase_layer(m)[1] for m in graph if m.startswith("erase.")} >= {"core", "api", "lora", "sae"}
    violations = erase_layer_violations(graph)
    assert not violations, "erase's imports must run api -> families -> core:\n" + "\n".join(violations)
