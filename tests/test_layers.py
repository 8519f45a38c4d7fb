"""Imports run one way: scripts -> erase -> evals -> pipelines.

A package may import the ones below it and never one above it (``pipelines`` imports nothing of ``evals``, ``erase``
or ``scripts``; ``evals``, ``evals.microworld`` included, nothing of ``erase`` or ``scripts``; ``erase`` nothing of
``scripts``). Imports inside functions count as much as those at the top of a file, and so does
``importlib.import_module("...")`` / ``__import__("...")`` with a literal name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Bottom to top.
LAYERS: tuple[str, ...] = ("pipelines", "evals", "erase", "scripts")
_RANK = {name: rank for rank, name in enumerate(LAYERS)}
#: Upward imports that exist and are yet to be removed: (file, package imported) -> why. Nothing may join this list;
#: an entry whose import is gone fails ``test_known_upward_imports_still_exist`` until it is deleted here.
KNOWN_UPWARD: dict[tuple[str, str], str] = {}


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
        if (name, package) not in KNOWN_UPWARD
    ]
    order = " -> ".join(reversed(LAYERS))
    assert not offending, f"imports must run {order}:\n" + "\n".join(offending)


def test_known_upward_imports_still_exist() -> None:
    found = {(name, package) for layer in LAYERS for name, _, package in _upward_imports_in_repo(layer)}
    gone = sorted(set(KNOWN_UPWARD) - found)
    assert not gone, f"these upward imports are gone: delete them from KNOWN_UPWARD: {gone}"
