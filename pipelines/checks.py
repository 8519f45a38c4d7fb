"""Checks of user input and settings shared by every layer, without torch: the scripts run them before a model
loads (``pipelines`` loads its torch modules on first use), the method and attack configs in ``__post_init__``."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["check_integer_fields", "check_number_fields", "check_option_minimums", "error_line"]


def error_line(err: BaseException) -> str:
    """The one line a script prints after ``error:`` for a refused input: a file error as ``path: reason``, a
    ``KeyError`` without its quotes, anything else as its message's first line (its type's name when it has none)."""
    if isinstance(err, OSError) and err.filename is not None:
        return f"{err.filename}: {err.strerror or err}"
    text = str(err.args[0] if isinstance(err, KeyError) and err.args else err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def check_option_minimums(args: object, minimums: dict[str, float]) -> None:
    """``ValueError`` naming the first command-line option (an ``argparse`` attribute) below its minimum, as
    ``--option-name must be >= minimum, got value``; options left unset (``None``) pass, NaN fails."""
    for name, minimum in minimums.items():
        value = getattr(args, name)
        if value is not None and not value >= minimum:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")


def check_integer_fields(config: object, names: Sequence[str], minimum: int = 1) -> None:
    """``ValueError`` naming the first of a config's fields that is not an integer >= ``minimum`` (bools refused)."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_number_fields(config: object, positive: Sequence[str] = (), non_negative: Sequence[str] = ()) -> None:
    """``ValueError`` naming the first of a config's ``positive`` fields not > 0 or ``non_negative`` fields not >= 0
    (NaN fails both)."""
    for names, bound, ok in ((positive, "> 0", lambda v: v > 0), (non_negative, ">= 0", lambda v: v >= 0)):
        for name in names:
            value = getattr(config, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not ok(value):
                raise ValueError(f"{name} must be a number {bound}, got {value!r}")
