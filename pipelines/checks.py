"""Checks of user input and settings shared by every layer, without torch: the scripts run them before a model
loads (``pipelines`` loads its torch modules on first use), the method and attack configs in ``__post_init__``.

Every number a user can set goes through :func:`check_number`: a real number, never a bool (JSON's ``true`` is not
1 here), finite, an integer where one is asked for, and inside its range. A config states its ranges once, as
``NUMBER_RANGES`` (field -> range), and :func:`check_number_fields` checks every number field of it, ranged or not.
Every text setting is a string, every list of texts a list of strings (:func:`check_text_fields`): ``--set
layers=attn2`` is one text where a list is asked, not five one-letter patterns. :func:`check_config_fields` checks
both kinds; the shared paths that build a config from user settings call it, so every config gets it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import sys
from collections.abc import Callable, Mapping

__all__ = [
    "SEED_RANGE",
    "check_config_fields",
    "check_number",
    "check_number_fields",
    "check_number_values",
    "check_option_minimums",
    "check_text_fields",
    "error_line",
    "number_kind",
    "run_script",
    "text_kind",
]

#: The range of every seed a user sets (``--seed``, a config's ``seed`` or ``*_seed``): 32 bits, as numpy's legacy
#: seeding takes. Seeds are derived from it (``seed * 1_000_003 + index`` for probes, sums for streams) and a torch
#: generator refuses one past 64 bits only when the first image is drawn, after the model loaded and the work began.
SEED_RANGE = "[0, 4294967295]"

#: A range as configs write it: ``"> 0"``, ``">= 1"``, ``"< 0"``, ``"<= 0"``, or an interval ``"(0, 1]"``.
_BOUND = re.compile(r"^(>=|>|<=|<)\s*(-?[\d.e+-]+)$")
_INTERVAL = re.compile(r"^([(\[])\s*(-?[\d.e+-]+)\s*,\s*(-?[\d.e+-]+)\s*([)\]])$")


def error_line(err: BaseException) -> str:
    """The one line a script prints after ``error:`` for a refused input: a file error as ``path: reason``, a
    ``KeyError`` without its quotes, anything else as its message's first line (its type's name when it has none)."""
    if isinstance(err, OSError) and err.filename is not None:
        return f"{err.filename}: {err.strerror or err}"
    text = str(err.args[0] if isinstance(err, KeyError) and err.args else err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def run_script(main: Callable[[], int | None]) -> int:
    """A script's ``main()`` and its exit code, its output made safe to write: a character standard output cannot
    encode (``LC_ALL=C``, ``PYTHONIOENCODING=ascii``) is written escaped, not a ``UnicodeEncodeError``; a reader that
    went away (``| head``) ends the script quietly with exit 1; any other file error that reaches here (standard
    output on a full disk) is one ``error:`` line and exit 1, not a traceback after the work is done."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError, OSError):  # None (closed), or a stream of another kind
            stream.reconfigure(errors="backslashreplace")
    try:
        code = main()
        if sys.stdout is not None:
            sys.stdout.flush()  # here, not at exit, where a failed flush is a message Python prints itself
    except BrokenPipeError:
        with contextlib.suppress(OSError, AttributeError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the flush at exit fails no more
        return 1
    except OSError as err:
        with contextlib.suppress(OSError, AttributeError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print(f"error: {error_line(err) if err.filename is not None else err.strerror or err}", file=sys.stderr)
        return 1
    return code if isinstance(code, int) else 0


def _in_range(value: float, spec: str) -> bool:
    bound = _BOUND.match(spec)
    if bound:
        op, limit = bound.group(1), float(bound.group(2))
        return {">": value > limit, ">=": value >= limit, "<": value < limit, "<=": value <= limit}[op]
    interval = _INTERVAL.match(spec)
    if interval is None:
        raise ValueError(f"bad range {spec!r}: expected '> x', '>= x', '< x', '<= x' or an interval such as '(0, 1]'")
    left, low, high, right = interval.group(1), float(interval.group(2)), float(interval.group(3)), interval.group(4)
    return (value > low if left == "(" else value >= low) and (value < high if right == ")" else value <= high)


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int past float's range is no finite float
        return False


def check_number(name: str, value: object, spec: str = "", *, integer: bool = False, optional: bool = False) -> None:
    """``ValueError`` in one line naming ``name`` unless ``value`` is a finite real number (an ``int`` when
    ``integer``; never a bool) inside ``spec`` (see ``NUMBER_RANGES``; ``""``: any), or ``None`` when ``optional``."""
    if value is None and optional:
        return
    what = "an integer" if integer else "a finite number"
    where = f" {spec}" if spec else ""
    if spec.startswith(("(", "[")):
        where = f" in {spec}"
    ok = (
        not isinstance(value, bool)
        and isinstance(value, int if integer else int | float)
        and (integer or _finite(value))
        and (not spec or _in_range(value, spec))
    )
    if not ok:
        none = " or null" if optional else ""
        raise ValueError(f"{name} must be {what}{where}{none}, got {value!r}")


def number_kind(annotation: object) -> tuple[str, bool] | None:
    """What a dataclass field's annotation asks for: ``("int" | "float" | "bool", optional)``, ``("int[]" |
    "float[]", False)`` for a tuple of numbers, or ``None`` for anything else."""
    text = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    text = text.replace("typing.", "").replace(" ", "")
    parts = set(text.split("|"))
    optional = "None" in parts
    parts -= {"None"}
    if parts == {"bool"}:
        return "bool", optional
    if parts == {"int"}:
        return "int", optional
    if parts and parts <= {"int", "float"}:
        return "float", optional
    for kind in ("int", "float"):
        if text in (f"tuple[{kind},...]", f"Sequence[{kind}]", f"list[{kind}]"):
            return f"{kind}[]", False
    return None


def check_number_fields(config: object, ranges: Mapping[str, str] | None = None) -> None:
    """Check every number of the dataclass ``config``: each field annotated ``int``, ``float`` (``| None``) or a
    tuple of them with :func:`check_number` in its range (``ranges``, default the class's ``NUMBER_RANGES``; an
    unranged number must still be finite; an integer ``seed`` or ``*_seed`` also in :data:`SEED_RANGE`), and each
    ``bool`` field is a bool. ``ValueError`` names the first bad
    field."""
    ranges = dict(getattr(type(config), "NUMBER_RANGES", {}) if ranges is None else ranges)
    kinds = {f.name: number_kind(f.type) for f in dataclasses.fields(config)}
    unknown = sorted(set(ranges) - {n for n, k in kinds.items() if k is not None and k[0] != "bool"})
    if unknown:
        raise TypeError(f"{type(config).__name__} has no number field {unknown[0]!r} to range")
    for name, kind in kinds.items():
        if kind is None:
            continue
        value, spec = getattr(config, name), ranges.get(name, "")
        if kind[0] == "bool":
            if not isinstance(value, bool) and not (kind[1] and value is None):
                raise ValueError(f"{name} must be true or false, got {value!r}")
        elif kind[0].endswith("[]"):
            if not isinstance(value, tuple | list):
                raise ValueError(f"{name} must be a list of numbers, got {value!r}")
            for i, item in enumerate(value):
                check_number(f"{name}[{i}]", item, spec, integer=kind[0] == "int[]")
        else:
            check_number(name, value, spec, integer=kind[0] == "int", optional=kind[1])
            if _is_seed(name) and kind[0] == "int":  # whatever the config's own range says
                check_number(name, value, SEED_RANGE, integer=True, optional=kind[1])


def text_kind(annotation: object) -> tuple[str, bool] | None:
    """What a dataclass field's annotation asks for when it is text: ``("str" | "str[]", optional)`` for ``str`` or
    a tuple of them (``| None``), or ``None`` for anything else."""
    text = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    parts = set(text.replace("typing.", "").replace(" ", "").split("|"))
    optional = "None" in parts
    parts -= {"None"}
    if parts == {"str"}:
        return "str", optional
    if len(parts) == 1 and parts.pop() in ("tuple[str,...]", "Sequence[str]", "list[str]"):
        return "str[]", optional
    return None


def check_text_fields(config: object, values: Mapping[str, object] | None = None) -> None:
    """``ValueError`` naming the first text field of the dataclass ``config`` that is not a string, or list field
    that is not a list of strings (``None`` where the annotation allows it). ``values``: the settings about to build
    ``config`` (a class), checked before its ``__post_init__`` reads them; default: the instance's own fields."""
    for f in dataclasses.fields(config):
        kind = text_kind(f.type)
        if kind is None or (values is not None and f.name not in values):
            continue
        value = getattr(config, f.name) if values is None else values[f.name]
        if kind[1] and value is None:
            continue
        none = " or null" if kind[1] else ""
        if kind[0] == "str" and not isinstance(value, str):
            raise ValueError(f"{f.name} must be a text{none}, got {value!r}")
        if kind[0] == "str[]" and (not isinstance(value, tuple | list) or not all(isinstance(v, str) for v in value)):
            example = f' (a JSON list: {f.name}=["{value}"])' if isinstance(value, str) else ""
            raise ValueError(f"{f.name} must be a list of texts{none}{example}, got {value!r}")


def check_config_fields(config: object) -> None:
    """Every number, switch and text of the dataclass ``config`` (:func:`check_number_fields`,
    :func:`check_text_fields`): what the shared paths from user settings to a config ask of every config, whatever
    its own ``__post_init__`` checks."""
    check_number_fields(config)
    check_text_fields(config)


def check_number_values(values: Mapping[str, object], ranges: Mapping[str, str], where: str) -> None:
    """The numbers of a settings mapping read from a file (an intervention's ``settings``): ``ranges`` maps each
    required key to its range, ``"int ..."`` for an integer, ``"... | null"`` where null is allowed. ``ValueError``
    names ``where`` and the key."""
    for key, spec in ranges.items():
        optional = spec.endswith("| null")
        spec = spec.removesuffix("| null").strip()
        integer = spec.startswith("int")
        spec = spec.removeprefix("int").strip()
        if key not in values:
            raise ValueError(f"{where}: the setting {key!r} is missing")
        try:
            check_number(key, values[key], spec, integer=integer, optional=optional)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None


def _is_seed(name: str) -> bool:
    return name == "seed" or name.endswith("_seed")


def check_option_minimums(args: object, minimums: dict[str, float]) -> None:
    """``ValueError`` naming the first command-line option (an ``argparse`` attribute) below its minimum or not
    finite, as ``--option-name must be >= minimum, got value``; options left unset (``None``) pass. Every seed
    option (``--seed``, ``--*-seed``) is checked too, listed or not: an integer in :data:`SEED_RANGE`."""
    for name, value in sorted(vars(args).items()):
        if _is_seed(name) and value is not None:
            try:
                check_number(name, value, SEED_RANGE, integer=True)
            except ValueError:
                option = f"--{name.replace('_', '-')}"
                raise ValueError(f"{option} must be an integer in {SEED_RANGE}, got {value}") from None
    for name, minimum in minimums.items():
        value = getattr(args, name)
        try:
            check_number(name, value, f">= {minimum}", optional=True)
        except ValueError:
            finite = "" if isinstance(value, int | float) and math.isfinite(value) else " (a finite number)"
            raise ValueError(f"--{name.replace('_', '-')} must be >= {minimum}{finite}, got {value}") from None
