"""Every number of every config is checked the same way: a finite real number, never a bool, in its range; every text
setting is a text and every list of texts a list of them."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest

from erase.core.inputs import config_from_overrides
from erase.core.registry import available_methods, get_method
from erase.sae.sae import SAETrainConfig
from evals.attacks import attack_configs, available_attacks, get_attack
from pipelines.checks import check_number, check_number_fields, check_number_values, number_kind, text_kind

CONFIGS = {f"method {n}": get_method(n).config_class for n in available_methods()}
CONFIGS |= {f"attack {n}": get_attack(n).config_class for n in available_attacks()}
CONFIGS["SAE training"] = SAETrainConfig


def _fields(kinds: tuple[str, ...]) -> list[tuple[str, type, str, tuple[str, bool]]]:
    return [
        (owner, cls, f.name, kind)
        for owner, cls in CONFIGS.items()
        for f in dataclasses.fields(cls)
        if (kind := number_kind(f.type)) is not None and kind[0] in kinds
    ]


NUMBERS = _fields(("int", "float"))
BOOLS = _fields(("bool",))


def _ids(cases: list) -> list[str]:
    return [f"{owner}.{name}" for owner, _, name, _ in cases]


def test_every_registered_config_has_numbers_to_check():
    assert len(CONFIGS) >= 14 and len(NUMBERS) >= 60 and BOOLS


@pytest.mark.parametrize("owner, cls, name, kind", NUMBERS, ids=_ids(NUMBERS))
def test_every_number_field_has_a_stated_range(owner, cls, name, kind):
    assert name in cls.NUMBER_RANGES, f"{owner}: {name} has no range in NUMBER_RANGES"
    cls()  # the defaults are inside their ranges


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, True, False, "1"], ids=repr)
@pytest.mark.parametrize("owner, cls, name, kind", NUMBERS, ids=_ids(NUMBERS))
def test_every_number_field_refuses_non_finite_bool_and_text_in_one_line(owner, cls, name, kind, bad):
    with pytest.raises(ValueError) as refused:
        cls(**{name: bad})
    message = str(refused.value)
    assert message.startswith(f"{name} must be ") and "\n" not in message, message


@pytest.mark.parametrize("owner, cls, name, kind", NUMBERS, ids=_ids(NUMBERS))
def test_negative_is_refused_where_a_minimum_applies_and_integers_refuse_fractions(owner, cls, name, kind):
    spec = cls.NUMBER_RANGES[name]
    low = re.match(r"^(?:>=?\s*|[(\[]\s*)(-?[\d.]+)", spec)
    if low is not None and float(low.group(1)) >= 0:
        with pytest.raises(ValueError, match=f"^{name} must be "):
            cls(**{name: -1 if kind[0] == "int" else -1.0})
    if kind[0] == "int":
        with pytest.raises(ValueError, match=f"^{name} must be an integer"):
            cls(**{name: getattr(cls(), name) or 1} | {name: float(getattr(cls(), name) or 1)})


@pytest.mark.parametrize("owner, cls, name, kind", BOOLS, ids=_ids(BOOLS))
@pytest.mark.parametrize("bad", [1, 0, "true", None])
def test_every_switch_is_a_bool(owner, cls, name, kind, bad):
    with pytest.raises(ValueError, match=f"^{name} must be true or false"):
        cls(**{name: bad})


def test_optional_numbers_take_null_and_the_range_is_inclusive_as_written():
    @dataclasses.dataclass
    class Settings:
        NUMBER_RANGES = {"rate": "(0, 1]", "count": ">= 2", "scale": "<= 0"}
        rate: float | None = None
        count: int = 2
        scale: float = 0.0

    check_number_fields(Settings())
    check_number_fields(Settings(rate=1, count=3, scale=-2.5))
    for bad in ({"rate": 0.0}, {"count": 1}, {"scale": 1e-9}, {"rate": 1.0000001}):
        with pytest.raises(ValueError, match=f"^{next(iter(bad))} must be"):
            check_number_fields(Settings(**bad))


def test_a_range_for_a_field_that_is_no_number_is_a_programming_error():
    @dataclasses.dataclass
    class Settings:
        NUMBER_RANGES = {"name": "> 0"}
        name: str = "x"

    with pytest.raises(TypeError, match="no number field 'name'"):
        check_number_fields(Settings())


def test_settings_read_from_a_file_are_checked_by_the_same_rule():
    ranges = {"scale": "<= 0", "gate_steps": "int >= 1", "gate": "(0, 1] | null"}
    check_number_values({"scale": -8.0, "gate_steps": 2, "gate": None}, ranges, "an intervention")
    for bad in ({"scale": math.nan}, {"gate_steps": True}, {"gate_steps": 1.5}, {"gate": math.inf}):
        values = {"scale": -8.0, "gate_steps": 2, "gate": 0.5} | bad
        with pytest.raises(ValueError, match=f"^an intervention: {next(iter(bad))} must be"):
            check_number_values(values, ranges, "an intervention")
    with pytest.raises(ValueError, match="'scale' is missing"):
        check_number_values({"gate_steps": 1, "gate": None}, ranges, "an intervention")


def test_huge_integers_and_tiny_floats_are_numbers_and_a_float_past_its_range_is_not():
    for value in (10**400, -0.0, 5e-324):
        check_number("x", value, "", integer=isinstance(value, int))
    with pytest.raises(ValueError, match="x must be a finite number"):
        check_number("x", 10**400, "> 0")


TEXTS = [
    (owner, cls, f.name, kind)
    for owner, cls in CONFIGS.items()
    for f in dataclasses.fields(cls)
    if (kind := text_kind(f.type)) is not None
]


def _from_settings(owner: str, cls: type, settings: dict) -> object:
    """The config as the scripts build it from --set: attack.py's path for an attack, erase.py's for the rest."""
    if owner.startswith("attack "):
        return attack_configs({owner.removeprefix("attack "): settings})[owner.removeprefix("attack ")]
    return config_from_overrides(cls, settings, owner)


@pytest.mark.parametrize("owner, cls, name, kind", TEXTS, ids=_ids(TEXTS))
def test_every_text_setting_refuses_numbers_bools_and_a_lone_text_for_a_list_in_one_line(owner, cls, name, kind):
    bads = [5, True, 1.5, None] if not kind[1] else [5, True, 1.5]
    bads.append("attn2" if kind[0] == "str[]" else ("attn2",))
    for bad in bads:
        with pytest.raises(ValueError) as refused:
            _from_settings(owner, cls, {name: bad})
        message = str(refused.value)
        assert f"{name} must be a " in message and "\n" not in message, message
    if kind[0] == "str[]":
        assert "a JSON list: " in str(pytest.raises(ValueError, _from_settings, owner, cls, {name: "attn2"}).value)


def test_the_shared_paths_check_every_field_of_a_config_that_checks_nothing_itself():
    @dataclasses.dataclass
    class Unchecked:
        NUMBER_RANGES = {"rate": "> 0"}
        rate: float = 1.0
        steps: int = 2
        fast: bool = False
        layers: tuple[str, ...] = ("a",)
        folder: str | None = None

    assert config_from_overrides(Unchecked, {"layers": ("x", "y"), "folder": "f"}, "it").layers == ("x", "y")
    refusals = [
        ({"rate": math.nan}, "rate must be"),
        ({"steps": True}, "steps must be an integer"),
        ({"fast": 1}, "fast must be true or false"),
        ({"layers": "x"}, "layers must be a list"),
        ({"layers": ("x", 1)}, "layers must be a list"),
        ({"folder": 5}, "folder must be a text or null"),
    ]
    for bad, refused in refusals:
        with pytest.raises(ValueError, match=f"^{refused}"):
            config_from_overrides(Unchecked, bad, "it")


SEEDS = [case for case in NUMBERS if case[3][0] == "int" and (case[2] == "seed" or case[2].endswith("_seed"))]


def test_there_are_seed_settings_to_check():
    assert len(SEEDS) >= 4, SEEDS


@pytest.mark.parametrize("owner, cls, name, kind", SEEDS, ids=_ids(SEEDS))
def test_every_seed_setting_refuses_one_a_generator_cannot_take(owner, cls, name, kind):
    """A seed past 32 bits would be refused by torch only when the first image is drawn (or derived seeds would
    overflow): refused with the config, in one line, whatever the config's own range says."""
    for bad in (2**32, 10**23, -1):
        with pytest.raises(ValueError, match=rf"^{name} must be an integer") as refused:
            _from_settings(owner, cls, {name: bad})
        assert "\n" not in str(refused.value)
    _from_settings(owner, cls, {name: 2**32 - 1})
