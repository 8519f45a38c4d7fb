"""Method and payload-kind modules are found, not listed: every module of every sub-package of ``erase`` beside
``core`` (the method families) is imported once, and importing it registers what it defines.

The names of the registered methods are kept here too (``erase.core.registry`` records each), so that the artifact
format, which the registry builds on, can refuse an artifact naming a method no family defines."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

__all__ = ["discover_families", "family_packages", "method_names", "record_method_name"]

_ERASE = Path(__file__).resolve().parents[1]
_PACKAGE = __name__.rsplit(".", 2)[0]  # "erase"
_CORE = __name__.rsplit(".", 1)[0]  # "erase.core"
_discovered = False
_METHOD_NAMES: set[str] = set()


def family_packages() -> list[str]:
    """The method families: ``erase``'s sub-packages other than ``core``."""
    found = pkgutil.iter_modules([str(_ERASE)], f"{_PACKAGE}.")
    return sorted(info.name for info in found if info.ispkg and info.name != _CORE)


def discover_families() -> None:
    """Import every module of every family package (once), registering their methods and payload kinds."""
    global _discovered
    if _discovered:
        return
    for family in family_packages():
        package = importlib.import_module(family)
        for info in pkgutil.iter_modules(package.__path__, f"{family}."):
            importlib.import_module(info.name)
    _discovered = True


def record_method_name(name: str) -> None:
    """Note a registered method's name (``erase.core.registry.register_method`` calls it)."""
    _METHOD_NAMES.add(name)


def method_names() -> list[str]:
    """The names of every registered method, the families discovered first."""
    discover_families()
    return sorted(_METHOD_NAMES)
