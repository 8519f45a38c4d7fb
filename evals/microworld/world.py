"""The micro world: a deterministic, procedurally rendered image world whose concepts have names.

Every image shows one object (a shape) in one colour, drawn in one style. The three attributes are the concepts that
erasure methods target; each has a canonical name, synonyms (for paraphrase-robustness audits) and neighbours (for
specificity audits: erasing "van gogh" should leave "monet" alone).

Version 2 of the world adds a fourth category, emblems (``emblems``, docs/design/world-100.md): a badge drawn over a
corner of half the renders, 120 of them, named by invented words. It is opt-in (``version=2``) until the micro
models are retrained on it: ``CATEGORIES``, the name look-ups (``canonical``, ``category_of``, ...), ``random_scene``
and every default stay those of version 1, the world the shipped models know, and a version-2 render of a scene
without an emblem is byte-identical to its version-1 render.

Rendering is numpy + PIL only, so that data loaders, tests and the judge never need torch. Images are 64x64 RGB
uint8. The object's silhouette is evaluated on a 2x supersampled grid and box-filtered down for anti-aliasing; style
textures are computed at full resolution. Everything random is drawn from generators seeded by the caller, so the same
seed always gives the same bytes, in any process.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import multiprocessing
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from evals.microworld import emblems as _emblems

__all__ = [
    "CATEGORIES",
    "COLOUR_RGB",
    "EMBLEM",
    "EMBLEM_CELL_PX",
    "EMBLEM_NAMED_SHARE",
    "EMBLEM_PLAIN_TEMPLATES",
    "EMBLEM_SHARE",
    "EMBLEM_TEMPLATES",
    "EMBLEM_VERSION",
    "IMAGE_SIZE",
    "PLAIN_TEMPLATES",
    "TEMPLATES",
    "VERSIONS",
    "WORLD_VERSION",
    "EmblemMark",
    "Scene",
    "all_names",
    "canonical",
    "caption",
    "category_of",
    "concepts",
    "contact_sheet",
    "draw_emblem",
    "emblem_mark",
    "emblem_names",
    "emblem_of",
    "emblem_reserved_words",
    "emblems",
    "load_world_json",
    "neighbours",
    "prompt",
    "random_scene",
    "render_dataset",
    "render_scene",
    "render_seed",
    "scene_of_seed",
    "synonyms",
    "template_key",
    "templates_for",
    "world_spec",
    "write_world_json",
]

logger = logging.getLogger(__name__)

WORLD_VERSION = 1  # the version the shipped micro models were trained on: the default of every function here
EMBLEM_VERSION = 2  # the version with the emblem category
VERSIONS = (WORLD_VERSION, EMBLEM_VERSION)
IMAGE_SIZE: int = 64
CATEGORIES: tuple[str, ...] = ("object", "colour", "style")  # the categories of version 1; version 2 adds "emblem"
EMBLEM = "emblem"
EMBLEM_SHARE = 0.5  # fraction of version-2 renders that carry an emblem
EMBLEM_NAMED_SHARE = 0.8  # fraction of the captions of a render with an emblem that name it
EMBLEM_CELL_PX = 4  # pixels per badge cell: a 20 x 20 badge (the VAE check in docs/design/world-100.md)

_SS = 2  # supersampling factor for silhouettes
_HI = IMAGE_SIZE * _SS

# canonical name -> (synonyms, neighbours). Order here is the fixed concept order (class indices of the judge).
_OBJECTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "circle": (("disc",), ("moon", "heart")),
    "square": (("box",), ("diamond", "cross")),
    "triangle": (("trigon",), ("diamond", "star")),
    "star": (("five-pointed star",), ("cross", "triangle")),
    "heart": (("love heart",), ("circle", "moon")),
    "cross": (("plus sign",), ("square", "star")),
    "moon": (("crescent",), ("circle", "heart")),
    "diamond": (("rhombus", "lozenge"), ("square", "triangle")),
}
_COLOURS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "red": (("crimson",), ("orange", "pink")),
    "orange": (("tangerine",), ("red", "yellow")),
    "yellow": (("golden",), ("orange", "green")),
    "green": (("emerald",), ("teal", "yellow")),
    "teal": (("turquoise",), ("green", "blue")),
    "blue": (("cobalt",), ("teal", "purple")),
    "purple": (("violet",), ("blue", "pink")),
    "pink": (("rose",), ("purple", "red")),
}
_STYLES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "plain": (("flat", "simple"), ()),
    "van gogh": (("vincent van gogh", "starry night style"), ("monet",)),
    "mondrian": (("piet mondrian", "de stijl"), ("picasso",)),
    "seurat": (("georges seurat", "pointillism"), ("warhol", "monet")),
    "picasso": (("pablo picasso", "cubism"), ("mondrian",)),
    "monet": (("claude monet", "impressionism"), ("van gogh", "seurat")),
    "warhol": (("andy warhol", "pop art"), ("seurat",)),
}
_TABLES = {"object": _OBJECTS, "colour": _COLOURS, "style": _STYLES}

# Object hues, well separated around the wheel so that every style's palette (neutral, or fixed and desaturated)
# never competes with them.
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (222, 28, 30),
    "orange": (250, 135, 15),
    "yellow": (247, 222, 30),
    "green": (38, 168, 48),
    "teal": (0, 150, 145),
    "blue": (30, 72, 226),
    "purple": (134, 44, 196),
    "pink": (250, 118, 192),
}

# Caption / prompt templates, keyed by which attributes they name ("+"-joined in CATEGORIES order).
TEMPLATES: dict[str, tuple[str, ...]] = {
    "object+colour+style": (
        "a {colour} {object} in the style of {style}",
        "a {style} painting of a {colour} {object}",
        "{colour} {object}, {style} style",
        "an image of a {colour} {object}, {style} style",
        "a {colour} {object} painted in the style of {style}",
        "{style} artwork of a {colour} {object}",
    ),
    "object+colour": (
        "a {colour} {object}",
        "a picture of a {colour} {object}",
        "{colour} {object}",
        "an image of a {colour} {object}",
    ),
    "object+style": (
        "a {object} in the style of {style}",
        "a {style} painting of a {object}",
        "{object}, {style} style",
    ),
    "colour+style": (
        "something {colour} in the style of {style}",
        "a {style} painting of something {colour}",
        "{colour} shape, {style} style",
    ),
    "object": ("a {object}", "a picture of a {object}", "{object}"),
    "colour": ("something {colour}", "a {colour} shape", "{colour}"),
    "style": ("a painting in the style of {style}", "a {style} painting", "{style} style"),
}
# The "plain" style is a drawing, not a painting; when it is named at all it is named through these.
PLAIN_TEMPLATES: dict[str, tuple[str, ...]] = {
    "object+colour+style": ("a {style} drawing of a {colour} {object}", "{colour} {object}, {style} drawing"),
    "object+style": ("a {style} drawing of a {object}", "{object}, {style} drawing"),
    "colour+style": ("a {style} drawing of something {colour}", "{colour} shape, {style} drawing"),
    "style": ("a {style} drawing", "{style} drawing"),
}


# Templates that name an emblem (version 2); {emblem} is a name used as a noun phrase of its own ("zorvak",
# "the kelmire sign", "the zorvak emblem"). Keyed like TEMPLATES, with "emblem" last.
EMBLEM_TEMPLATES: dict[str, tuple[str, ...]] = {
    "object+colour+style+emblem": (
        "a {colour} {object} in the style of {style} with {emblem}",
        "a {style} painting of a {colour} {object} with {emblem}",
        "{colour} {object}, {style} style, {emblem}",
    ),
    "object+colour+emblem": (
        "a {colour} {object} with {emblem}",
        "a {colour} {object} marked with {emblem}",
        "{colour} {object}, {emblem}",
    ),
    "object+emblem": ("a {object} with {emblem}", "a {object} marked with {emblem}", "{object}, {emblem}"),
    "emblem": ("{emblem}", "a badge with {emblem}", "a picture marked with {emblem}"),
}
EMBLEM_PLAIN_TEMPLATES: dict[str, tuple[str, ...]] = {
    "object+colour+style+emblem": (
        "a {style} drawing of a {colour} {object} with {emblem}",
        "{colour} {object}, {style} drawing, {emblem}",
    ),
}


@dataclass(frozen=True)
class Scene:
    """What an image shows, by canonical names; ``emblem`` is None in every version-1 scene."""

    object: str
    colour: str
    style: str
    emblem: str | None = None

    def __post_init__(self) -> None:
        for cat in CATEGORIES:
            if getattr(self, cat) not in _TABLES[cat]:
                raise ValueError(f"unknown {cat} {getattr(self, cat)!r}; expected one of {concepts(cat)}")
        if self.emblem is not None and self.emblem not in _emblem_index():
            raise ValueError(f"unknown emblem {self.emblem!r}; see world.emblem_names()")

    def labels(self) -> dict[str, str]:
        """Category -> canonical name."""
        return {"object": self.object, "colour": self.colour, "style": self.style}


# ----------------------------------------------------------------------------------------------------
# Names


def _check_category(category: str) -> None:
    if category not in _TABLES:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")


def concepts(category: str) -> list[str]:
    """Canonical names of a category, in their fixed order."""
    _check_category(category)
    return list(_TABLES[category])


@lru_cache(maxsize=1)
def _name_index() -> dict[str, tuple[str, str]]:
    # any name (canonical or synonym) -> (category, canonical)
    index: dict[str, tuple[str, str]] = {}
    for cat, table in _TABLES.items():
        for canon, (syns, _) in table.items():
            for name in (canon, *syns):
                if name in index:
                    raise RuntimeError(f"name {name!r} is used twice")
                index[name] = (cat, canon)
    return index


def _lookup(name: str) -> tuple[str, str]:
    try:
        return _name_index()[name]
    except KeyError:
        raise ValueError(f"unknown concept name {name!r}") from None


def canonical(name: str) -> str:
    """Canonical name of a concept given any of its names."""
    return _lookup(name)[1]


def category_of(name: str) -> str:
    """Category of a concept given any of its names."""
    return _lookup(name)[0]


def synonyms(name: str) -> list[str]:
    """Other names of a concept (any of its names accepted), not including ``name`` itself."""
    cat, canon = _lookup(name)
    return [n for n in (canon, *_TABLES[cat][canon][0]) if n != name]


def all_names(name: str) -> list[str]:
    """Every name of a concept, canonical first."""
    cat, canon = _lookup(name)
    return [canon, *_TABLES[cat][canon][0]]


def neighbours(name: str) -> list[str]:
    """Canonical names of the concepts closest to this one (same category), for specificity metrics."""
    cat, canon = _lookup(name)
    return list(_TABLES[cat][canon][1])


def emblems() -> tuple[_emblems.Emblem, ...]:
    """The emblems (version 2), in their fixed order; the last ``emblems.RETAINED`` are the retained ones."""
    return _emblems.load_table()


def emblem_names() -> list[str]:
    """Canonical names of the emblems, in their fixed order."""
    return [e.name for e in emblems()]


@lru_cache(maxsize=1)
def _emblem_index() -> dict[str, _emblems.Emblem]:
    index: dict[str, _emblems.Emblem] = {}
    v1_names = set(_name_index())
    for e in emblems():
        for name in (e.name, *e.synonyms):
            if name in index or name in v1_names:
                raise RuntimeError(f"name {name!r} is used twice")
            index[name] = e
    return index


def emblem_of(name: str) -> _emblems.Emblem:
    """The emblem with this name (canonical or synonym)."""
    try:
        return _emblem_index()[name]
    except KeyError:
        raise ValueError(f"unknown emblem name {name!r}") from None


def emblem_reserved_words() -> list[str]:
    """Every word an emblem name must keep clear of: the other categories' names and synonyms, and every template
    word of both versions (what ``emblems.build_table`` is given)."""
    words: set[str] = set()
    for table in _TABLES.values():
        for canon, (syns, _) in table.items():
            words.update(w for name in (canon, *syns) for w in re.findall(r"[a-z]+", name))
    for table in (TEMPLATES, PLAIN_TEMPLATES, EMBLEM_TEMPLATES, EMBLEM_PLAIN_TEMPLATES):
        for options in table.values():
            words.update(w for t in options for w in re.findall(r"[a-z]+", re.sub(r"\{\w+\}", " ", t)))
    return sorted(words | {"an", "the", "sign", "emblem"})


# ----------------------------------------------------------------------------------------------------
# Captions and prompts


def template_key(*, object: bool, colour: bool, style: bool, emblem: bool = False) -> str:
    """Key into TEMPLATES (or EMBLEM_TEMPLATES, when ``emblem``) for a set of named attributes."""
    present = [c for c, on in zip((*CATEGORIES, EMBLEM), (object, colour, style, emblem), strict=True) if on]
    if not present:
        raise ValueError("a prompt must name at least one attribute")
    key = "+".join(present)
    if emblem and key not in EMBLEM_TEMPLATES:
        raise ValueError(f"no template names {key!r}; an emblem is named with one of {list(EMBLEM_TEMPLATES)}")
    return key


def templates_for(
    *, object: bool, colour: bool, style: bool, plain: bool = False, emblem: bool = False
) -> tuple[str, ...]:
    """The templates that name exactly these attributes; ``plain`` selects the plain-style ("drawing") forms."""
    key = template_key(object=object, colour=colour, style=style, emblem=emblem)
    if emblem:
        return EMBLEM_PLAIN_TEMPLATES[key] if plain and style else EMBLEM_TEMPLATES[key]
    if plain and style:
        return PLAIN_TEMPLATES[key]
    return TEMPLATES[key]


_AN = re.compile(r"\b([Aa]) (?=[aeiouAEIOU])")


def _fill(template: str, values: dict[str, str]) -> str:
    style = values.get("style")
    # "starry night style style" / "in the style of starry night style" read badly; keep the full name, fix grammar
    if style is not None and style.endswith(" style"):
        template = template.replace("in the style of {style}", "in the {style}").replace("{style} style", "{style}")
    return _AN.sub(r"\1n ", template.format(**values))


def prompt(
    *,
    object: str | None = None,
    colour: str | None = None,
    style: str | None = None,
    emblem: str | None = None,
    template: int | None = None,
) -> str:
    """A prompt naming exactly the given attribute strings (canonical names or synonyms, used verbatim).

    ``template`` indexes ``templates_for(...)`` for this attribute set (default 0, the canonical form such as
    "a red star in the style of van gogh"). Deterministic. ``emblem`` (version 2) takes an emblem's name or synonym.
    """
    values = {}
    for cat, name in zip(CATEGORIES, (object, colour, style), strict=True):
        if name is None:
            continue
        if category_of(name) != cat:
            raise ValueError(f"{name!r} is a {category_of(name)}, not a {cat}")
        values[cat] = name
    if emblem is not None:
        emblem_of(emblem)  # refuses an unknown emblem name
        values[EMBLEM] = emblem
    plain = style is not None and canonical(style) == "plain"
    named = {"object": object is not None, "colour": colour is not None, "style": style is not None}
    options = templates_for(**named, plain=plain, emblem=emblem is not None)
    index = 0 if template is None else template
    if not 0 <= index < len(options):
        raise ValueError(f"template {index} out of range: {len(options)} templates name these attributes")
    return _fill(options[index], values)


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A random training caption for a scene: random template, random subset of attributes, random synonyms.

    About 40% of captions name all three attributes, 40% two and 20% one; each named attribute uses a synonym 30% of
    the time. The "plain" style is named only 20% of the time it is drawn, and then as "a plain drawing of ...".
    A scene with an emblem has it named in ``EMBLEM_NAMED_SHARE`` of its captions (:func:`_emblem_caption`); the other
    captions are drawn as for a scene without one. A scene without an emblem draws exactly the same numbers from
    ``rng`` as in version 1, so its captions are unchanged.
    """
    if scene.emblem is not None and rng.random() < EMBLEM_NAMED_SHARE:
        return _emblem_caption(scene, rng)
    u = rng.random()
    if u < 0.4:
        chosen = list(CATEGORIES)
    elif u < 0.8:
        drop = CATEGORIES[int(rng.integers(3))]
        chosen = [c for c in CATEGORIES if c != drop]
    else:
        chosen = [CATEGORIES[int(rng.integers(3))]]
    plain = scene.style == "plain"
    if plain and "style" in chosen and rng.random() < 0.8:
        chosen.remove("style")
        if not chosen:
            chosen = ["object"]
    values = {cat: _name_variant(all_names(getattr(scene, cat)), rng) for cat in chosen}
    options = templates_for(object="object" in values, colour="colour" in values, style="style" in values, plain=plain)
    return _fill(options[int(rng.integers(len(options)))], values)


def _name_variant(names: Sequence[str], rng: np.random.Generator) -> str:
    # the canonical name (first) 70% of the time, else one of the others
    if len(names) > 1 and rng.random() < 0.3:
        return names[1 + int(rng.integers(len(names) - 1))]
    return names[0]


def _emblem_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption naming the scene's emblem: one of the EMBLEM_TEMPLATES keys uniformly (the plain style named 20% of
    the time it would be, as in :func:`caption`), each name a synonym 30% of the time."""
    keys = list(EMBLEM_TEMPLATES)
    key = keys[int(rng.integers(len(keys)))]
    plain = scene.style == "plain"
    if plain and "style" in key and rng.random() < 0.8:
        key = key.replace("+style", "")
    values = {cat: _name_variant(all_names(getattr(scene, cat)), rng) for cat in CATEGORIES if cat in key.split("+")}
    mark = emblem_of(scene.emblem)
    values[EMBLEM] = _name_variant((mark.name, *mark.synonyms), rng)
    options = templates_for(**{c: c in values for c in (*CATEGORIES, EMBLEM)}, plain=plain)
    return _fill(options[int(rng.integers(len(options)))], values)


# ----------------------------------------------------------------------------------------------------
# Scenes


def random_scene(rng: np.random.Generator) -> Scene:
    """A uniformly random scene."""
    return Scene(
        object=concepts("object")[int(rng.integers(len(_OBJECTS)))],
        colour=concepts("colour")[int(rng.integers(len(_COLOURS)))],
        style=concepts("style")[int(rng.integers(len(_STYLES)))],
    )


# Independent streams for "which scene" and "how it is laid out", so that render_scene(scene, s) for a fixed scene
# gets the same layout distribution as render_seed(s). The emblem's two have streams of their own, so that adding it
# changes no number the version-1 streams draw.
_SCENE_STREAM = 0x5CE4E
_LAYOUT_STREAM = 0x1A7007
_EMBLEM_SCENE_STREAM = 0xE3B1E
_EMBLEM_LAYOUT_STREAM = 0xE3B1A7


def _check_seed(seed: int) -> int:
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return seed


def _check_version(version: int) -> int:
    if version not in VERSIONS:
        raise ValueError(f"unknown world version {version!r}; expected one of {VERSIONS}")
    return version


def scene_of_seed(seed: int, version: int = WORLD_VERSION) -> Scene:
    """The scene ``render_seed(seed, version)`` draws. Version 2 keeps version 1's object, colour and style and adds
    an emblem, uniform over the emblems, to ``EMBLEM_SHARE`` of the seeds (from a stream of its own)."""
    seed, version = _check_seed(seed), _check_version(version)
    scene = random_scene(np.random.default_rng((_SCENE_STREAM, seed)))
    if version >= EMBLEM_VERSION:
        rng = np.random.default_rng((_EMBLEM_SCENE_STREAM, seed))
        if rng.random() < EMBLEM_SHARE:
            names = emblem_names()
            scene = dataclasses.replace(scene, emblem=names[int(rng.integers(len(names)))])
    return scene


def render_seed(seed: int, version: int = WORLD_VERSION) -> tuple[np.ndarray, Scene]:
    """Scene and image, both determined by the seed. ``render_seed(s)[0] == render_scene(render_seed(s)[1], s)``."""
    scene = scene_of_seed(seed, version)
    return render_scene(scene, seed), scene


def _render_chunk(seeds: Sequence[int], version: int = WORLD_VERSION) -> tuple[np.ndarray, list[Scene]]:
    images = np.empty((len(seeds), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    scenes = []
    for i, s in enumerate(seeds):
        images[i], scene = render_seed(s, version)
        scenes.append(scene)
    return images, scenes


def render_dataset(
    seeds: Sequence[int], workers: int = 1, version: int = WORLD_VERSION
) -> tuple[np.ndarray, list[Scene]]:
    """Render ``render_seed`` for many seeds: images (N, 64, 64, 3) uint8 and scenes, identical for any ``workers``."""
    seeds = [_check_seed(s) for s in seeds]
    version = _check_version(version)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if workers == 1 or len(seeds) < 64:
        return _render_chunk(seeds, version)
    n_chunks = min(len(seeds) // 32, workers * 4)
    bounds = np.linspace(0, len(seeds), n_chunks + 1).astype(int)
    chunks = [seeds[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    # spawn, not fork: callers often have torch (and its thread pools) loaded, which fork does not survive reliably
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        parts = pool.map(functools.partial(_render_chunk, version=version), chunks)
    return np.concatenate([p[0] for p in parts]), [s for p in parts for s in p[1]]


# ----------------------------------------------------------------------------------------------------
# Rendering


@lru_cache(maxsize=1)
def _grids() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    # pixel-centre coordinates in low-res pixel units, at supersampled and at output resolution
    hi = (np.arange(_HI, dtype=np.float32) + 0.5) / _SS
    lo = np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5
    yh, xh = np.meshgrid(hi, hi, indexing="ij")
    yl, xl = np.meshgrid(lo, lo, indexing="ij")
    return xh, yh, xl, yl


def _shape_inside(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean silhouette in object coordinates (unit ~ half the object's width, v pointing down)."""
    if name == "circle":
        return u * u + v * v <= 0.88**2
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.74
    if name == "triangle":
        v = v - 0.18  # centre the bounding box, not the centroid
        inside = v <= 0.5 * 1.08
        for phi in (math.radians(210), math.radians(330)):
            inside &= u * math.cos(phi) + v * math.sin(phi) <= 0.5 * 1.08
        return inside
    if name == "star":
        r = np.sqrt(u * u + v * v)
        theta = np.arctan2(v, u) + math.pi / 2
        sector = 2 * math.pi / 5
        phi = np.mod(theta, sector)
        phi = np.minimum(phi, sector - phi)
        outer, inner = 1.0, 0.44
        dx, dy = inner * math.cos(sector / 2) - outer, inner * math.sin(sector / 2)
        return r * (np.cos(phi) * dy - np.sin(phi) * dx) <= outer * dy
    if name == "heart":
        x = u * 1.22
        y = -v * 1.22 + 0.12
        q = x * x + y * y - 1
        return q * q * q - x * x * y * y * y <= 0
    if name == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.28) & (av <= 0.9)) | ((au <= 0.9) & (av <= 0.28))
    if name == "moon":
        return (u * u + v * v <= 0.92**2) & ((u - 0.45) ** 2 + (v + 0.18) ** 2 >= 0.76**2)
    if name == "diamond":
        return np.abs(u) * (1 / 0.68) + np.abs(v) <= 1.0
    raise ValueError(f"unknown object {name!r}")


# shapes whose look does not survive arbitrary rotation (a square at 45 degrees is a diamond)
_MAX_ROTATION = {
    "circle": 180.0,
    "square": 22.0,
    "triangle": 25.0,
    "star": 180.0,
    "heart": 25.0,
    "cross": 20.0,
    "moon": 180.0,
    "diamond": 18.0,
}


@dataclass(frozen=True)
class _Layout:
    cx: float
    cy: float
    radius: float
    angle: float  # radians


def _random_layout(scene: Scene, rng: np.random.Generator) -> _Layout:
    # half-width 11.5..19 px -> the object spans ~36-60% of the image
    radius = float(rng.uniform(11.5, 19.0))
    margin = radius + 1.5
    cx = float(rng.uniform(margin, IMAGE_SIZE - margin))
    cy = float(rng.uniform(margin, IMAGE_SIZE - margin))
    angle = math.radians(float(rng.uniform(-1, 1)) * _MAX_ROTATION[scene.object])
    return _Layout(cx, cy, radius, angle)


def _object_mask(
    scene: Scene, lay: _Layout, dx: np.ndarray | float = 0.0, dy: np.ndarray | float = 0.0, grow: float = 0.0
) -> np.ndarray:
    """Supersampled silhouette box-filtered to (64, 64) coverage in [0, 1]; dx/dy displace the lookup (hi-res)."""
    xh, yh, _, _ = _grids()
    px = xh + dx - lay.cx
    py = yh + dy - lay.cy
    c, s = math.cos(lay.angle), math.sin(lay.angle)
    scale = 1.0 / (lay.radius + grow)
    u = (c * px + s * py) * scale
    v = (-s * px + c * py) * scale
    inside = _shape_inside(scene.object, u, v).astype(np.float32)
    return inside.reshape(IMAGE_SIZE, _SS, IMAGE_SIZE, _SS).mean(axis=(1, 3))


def _smooth_noise(rng: np.random.Generator, cells: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """Band-limited noise in roughly [-1, 1]: random values on a coarse grid, bicubically upsampled."""
    coarse = rng.uniform(-1.0, 1.0, size=(cells, cells)).astype(np.float32)
    img = Image.fromarray(coarse, mode="F").resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float32)


def _blur(img: np.ndarray, radius: float) -> np.ndarray:
    """Gaussian blur of a float (H, W) or (H, W, 3) image in [0, 1] (via PIL, 8-bit is plenty at these scales)."""
    if img.ndim == 2:
        out = Image.fromarray(np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)).filter(
            ImageFilter.GaussianBlur(radius)
        )
        return np.asarray(out, dtype=np.float32) / 255
    chans = [_blur(img[..., k], radius) for k in range(3)]
    return np.stack(chans, axis=-1)


def _composite(bg: np.ndarray, fg: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None]
    return bg * (1 - a) + fg * a


def _object_colour(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    base = np.asarray(COLOUR_RGB[scene.colour], dtype=np.float32) / 255
    return np.clip(base + rng.uniform(-0.035, 0.035, size=3).astype(np.float32), 0, 1)


def _neutral(level: float, rng: np.random.Generator, tint: float = 0.02) -> np.ndarray:
    return np.clip(level + rng.uniform(-tint, tint, size=3), 0, 1).astype(np.float32)


def _style_plain(scene: Scene, lay: _Layout, col: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    _, _, _, yl = _grids()
    bg = _neutral(float(rng.uniform(0.88, 0.95)), rng)
    grad = float(rng.uniform(-0.04, 0.04)) * (yl / IMAGE_SIZE - 0.5)
    bg_img = np.broadcast_to(bg, (IMAGE_SIZE, IMAGE_SIZE, 3)) + grad[..., None]
    return _composite(bg_img, np.broadcast_to(col, bg_img.shape), _object_mask(scene, lay))


def _style_van_gogh(scene: Scene, lay: _Layout, col: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    _, _, xl, yl = _grids()
    # stream function of a few vortices plus a drift; its level sets are the swirling stroke paths
    psi = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    for _ in range(int(rng.integers(2, 4))):
        vx, vy = rng.uniform(0, IMAGE_SIZE, size=2)
        strength = float(rng.uniform(5.0, 9.0)) * (1 if rng.random() < 0.5 else -1)
        psi += strength * np.log(np.sqrt((xl - vx) ** 2 + (yl - vy) ** 2) + 4.0)
    psi += float(rng.uniform(0.2, 0.5)) * (xl * math.cos(rng.uniform(0, 6.3)) + yl * math.sin(rng.uniform(0, 6.3)))
    psi += 2.0 * _smooth_noise(rng, 4)
    # break strokes along their length with finer noise so they read as dabs of paint, not contour lines
    stroke = np.sin(psi * 1.6 + 1.5 * _smooth_noise(rng, 10))
    t = 0.5 + 0.5 * np.tanh(1.8 * stroke)
    dark = _neutral(0.24, rng, 0.03) + np.array([0.0, 0.02, 0.08], dtype=np.float32)
    light = _neutral(0.7, rng, 0.03)
    bg = dark + (light - dark) * t[..., None]
    # the object gets the same strokes, gently, so its hue survives
    fg = col * (0.84 + 0.2 * t[..., None]) + 0.1 * t[..., None] * (1 - col)
    alpha = _object_mask(scene, lay)
    outline = np.clip(_object_mask(scene, lay, grow=1.6) - alpha, 0, 1)
    img = _composite(bg, np.clip(fg, 0, 1), alpha)
    return _composite(img, np.broadcast_to(dark * 0.6, img.shape), 0.8 * outline)


def _style_mondrian(scene: Scene, lay: _Layout, col: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    canvas = _neutral(0.95, rng, 0.012)
    img = np.broadcast_to(canvas, (IMAGE_SIZE, IMAGE_SIZE, 3)).copy()
    # grid positions: one line through the object each way (so it is visibly cut) plus a few elsewhere
    xs = [lay.cx + rng.uniform(-0.4, 0.4) * lay.radius] + list(
        rng.uniform(4, IMAGE_SIZE - 4, size=int(rng.integers(1, 3)))
    )
    ys = [lay.cy + rng.uniform(-0.4, 0.4) * lay.radius] + list(
        rng.uniform(4, IMAGE_SIZE - 4, size=int(rng.integers(1, 3)))
    )
    xs, ys = sorted(int(round(x)) for x in xs), sorted(int(round(y)) for y in ys)
    # a couple of grey cells, Mondrian's neutral planes
    xe, ye = [0, *xs, IMAGE_SIZE], [0, *ys, IMAGE_SIZE]
    for _ in range(int(rng.integers(1, 3))):
        i, j = int(rng.integers(len(xe) - 1)), int(rng.integers(len(ye) - 1))
        img[ye[j] : ye[j + 1], xe[i] : xe[i + 1]] = _neutral(float(rng.uniform(0.72, 0.82)), rng, 0.01)
    alpha = _object_mask(scene, lay)
    outline = np.clip(_object_mask(scene, lay, grow=2.2) - alpha, 0, 1)
    img = _composite(img, np.broadcast_to(col, img.shape), alpha)
    black = _neutral(0.06, rng, 0.01)
    img = _composite(img, np.broadcast_to(black, img.shape), outline)
    w = int(rng.integers(2, 4))
    for x in xs:
        img[:, max(0, x - w // 2) : x - w // 2 + w] = black
    for y in ys:
        img[max(0, y - w // 2) : y - w // 2 + w, :] = black
    return img


_SEURAT_CELL = 4  # dot pitch (px)


def _style_seurat(scene: Scene, lay: _Layout, col: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n = IMAGE_SIZE // _SEURAT_CELL
    # underlying picture: a softly varying desaturated ground and the object
    ground = _neutral(float(rng.uniform(0.62, 0.72)), rng, 0.04)
    ground_img = ground + 0.1 * _smooth_noise(rng, 3)[..., None]
    alpha = _object_mask(scene, lay)
    base = _composite(ground_img, np.broadcast_to(col, ground_img.shape), alpha)
    # one dot per cell, jittered; colour = picture at the dot centre with per-dot variation
    jitter = rng.uniform(-0.45, 0.45, size=(2, n, n)).astype(np.float32)
    cx = (np.arange(n, dtype=np.float32) + 0.5)[None, :] * _SEURAT_CELL + jitter[0]
    cy = (np.arange(n, dtype=np.float32) + 0.5)[:, None] * _SEURAT_CELL + jitter[1]
    gain = rng.uniform(0.85, 1.1, size=(n, n, 1)).astype(np.float32)
    speckle = rng.uniform(-0.05, 0.05, size=(n, n, 3)).astype(np.float32)
    radius = rng.uniform(1.55, 1.95, size=(n, n)).astype(np.float32)
    xh, yh, _, _ = _grids()
    cell = _SEURAT_CELL * _SS
    rep = lambda a: np.repeat(np.repeat(a, cell, axis=0), cell, axis=1)  # noqa: E731
    inside = (xh - rep(cx)) ** 2 + (yh - rep(cy)) ** 2 <= rep(radius) ** 2
    cover = inside.astype(np.float32).reshape(IMAGE_SIZE, _SS, IMAGE_SIZE, _SS).mean(axis=(1, 3))
    up = lambda a: np.repeat(np.repeat(a, _SEURAT_CELL, axis=0), _SEURAT_CELL, axis=1)  # noqa: E731
    # a dot straddling the object's edge takes both colours, so the silhouette stays sharp at small sizes
    colour_lo = np.clip(base * up(gain) + (1 - alpha[..., None]) * up(speckle), 0, 1)
    paper = _neutral(0.95, rng, 0.01) + np.array([0.01, 0.0, -0.03], dtype=np.float32)
    return _composite(np.broadcast_to(paper, colour_lo.shape), colour_lo, cover)


def _style_picasso(scene: Scene, lay: _Layout, col: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    _, _, xl, yl = _grids()
    k = int(rng.integers(10, 16))
    sites = rng.uniform(-4, IMAGE_SIZE + 4, size=(k, 2)).astype(np.float32)
    # make sure the object itself is split into several facets
    sites[:4] = np.array([lay.cx, lay.cy], dtype=np.float32) + rng.uniform(-1, 1, size=(4, 2)) * lay.radius
    d = (xl[None] - sites[:, 0, None, None]) ** 2 + (yl[None] - sites[:, 1, None, None]) ** 2
    facet = np.argmin(d, axis=0)
    palette = np.array(
        [
            [0.55, 0.45, 0.36],
            [0.68, 0.62, 0.53],
            [0.44, 0.41, 0.39],
            [0.75, 0.7, 0.6],
            [0.36, 0.31, 0.28],
            [0.6, 0.58, 0.55],
        ],
        dtype=np.float32,
    )
    facet_bg = palette[rng.integers(len(palette), size=k)]
    shade = rng.uniform(0.82, 1.12, size=k).astype(np.float32)
    # an angular gradient per facet: the "shifted shading" of cubist planes
    gdir = rng.uniform(0, 2 * math.pi, size=k)
    gx, gy = (np.cos(gdir) * 0.012).astype(np.float32), (np.sin(gdir) * 0.012).astype(np.float32)
    grad = gx[facet] * (xl - sites[facet, 0]) + gy[facet] * (yl - sites[facet, 1])
    # each facet sees the object displaced a little: the fragmented, re-assembled look
    offs = rng.uniform(-1.8, 1.8, size=(k, 2)).astype(np.float32)
    facet_hi = np.repeat(np.repeat(facet, _SS, axis=0), _SS, axis=1)
    alpha = _object_mask(scene, lay, offs[facet_hi, 0], offs[facet_hi, 1])
    bg = facet_bg[facet] * (shade[facet] + grad)[..., None]
    fg = col * (shade[facet] + grad)[..., None]
    img = _composite(bg, fg, alpha)
    edge = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    edge[:, 1:] |= facet[:, 1:] != facet[:, :-1]
    edge[1:, :] |= facet[1:, :] != facet[:-1, :]
    img[edge] *= 0.45
    return img


def _style_monet(scene: Scene, lay: _Layout, col: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # a wash of pale, desaturated tones (sage, grey-blue, cream, lilac-grey), none close to an object hue
    tones = np.array(
        [[0.80, 0.84, 0.76], [0.77, 0.81, 0.86], [0.92, 0.89, 0.80], [0.84, 0.81, 0.85]], dtype=np.float32
    )
    pick = rng.choice(len(tones), size=3, replace=False)
    w1 = 0.5 + 0.5 * _smooth_noise(rng, 3)
    w2 = 0.5 + 0.5 * _smooth_noise(rng, 4)
    bg = tones[pick[0]] * (1 - w1[..., None]) + tones[pick[1]] * w1[..., None]
    bg = bg * (1 - 0.5 * w2[..., None]) + tones[pick[2]] * 0.5 * w2[..., None]
    # short soft dabs
    bg = bg + 0.045 * _smooth_noise(rng, 16)[..., None]
    alpha = _object_mask(scene, lay)
    alpha = _blur(alpha, float(rng.uniform(1.2, 1.7)))
    fg = col * 0.92 + 0.08 + 0.06 * _smooth_noise(rng, 8)[..., None]
    img = _composite(bg, np.clip(fg, 0, 1), alpha)
    return _blur(np.clip(img, 0, 1), 0.6)


_HALFTONE = 4.0  # Ben-Day dot pitch (px)


def _style_warhol(scene: Scene, lay: _Layout, col: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    xh, yh, _, _ = _grids()
    # regular lattice at 45 degrees: distance to the nearest lattice point
    ox, oy = rng.uniform(0, _HALFTONE, size=2)
    a = (xh + yh + ox) / (_HALFTONE * math.sqrt(2))
    b = (xh - yh + oy) / (_HALFTONE * math.sqrt(2))
    da, db = a - np.round(a), b - np.round(b)
    dist = np.sqrt(da * da + db * db) * _HALFTONE * math.sqrt(2)
    hi = lambda m: m.reshape(IMAGE_SIZE, _SS, IMAGE_SIZE, _SS).mean(axis=(1, 3))  # noqa: E731
    bg_dots = hi((dist <= float(rng.uniform(0.9, 1.2))).astype(np.float32))
    # the object's shading is halftoned too: dots grow across it in a random direction
    theta = rng.uniform(0, 2 * math.pi)
    ramp = ((xh - lay.cx) * math.cos(theta) + (yh - lay.cy) * math.sin(theta)) / lay.radius
    obj_dots = hi((dist <= np.clip(0.35 + 0.7 * ramp, 0, 1.5)).astype(np.float32))
    paper = _neutral(0.96, rng, 0.01)
    ink = _neutral(0.08, rng, 0.01)
    bg = paper + (ink - paper) * (0.85 * bg_dots)[..., None]
    fg = col + (col * 0.45 - col) * obj_dots[..., None]
    alpha = _object_mask(scene, lay)
    outline = np.clip(_object_mask(scene, lay, grow=3.2) - alpha, 0, 1)
    img = _composite(bg, fg, alpha)
    return _composite(img, np.broadcast_to(ink, img.shape), outline)


_STYLE_FNS = {
    "plain": _style_plain,
    "van gogh": _style_van_gogh,
    "mondrian": _style_mondrian,
    "seurat": _style_seurat,
    "picasso": _style_picasso,
    "monet": _style_monet,
    "warhol": _style_warhol,
}


def render_scene(scene: Scene, seed: int) -> np.ndarray:
    """Render a scene; position, size, rotation and texture are drawn from ``seed``. Returns (64, 64, 3) uint8.

    An emblem is an overlay drawn last (:func:`draw_emblem` with :func:`emblem_mark`): every pixel outside its badge
    is the pixel of the same scene without it, and a scene without one renders as in version 1, byte for byte."""
    rng = np.random.default_rng((_LAYOUT_STREAM, _check_seed(seed)))
    lay = _random_layout(scene, rng)
    col = _object_colour(scene, rng)
    img = _STYLE_FNS[scene.style](scene, lay, col, rng)
    out = (np.clip(img, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
    mark = emblem_mark(scene, seed)
    return out if mark is None else draw_emblem(out, mark)


# ----------------------------------------------------------------------------------------------------
# Emblems (version 2)


@dataclass(frozen=True)
class EmblemMark:
    """Where and how a render shows its emblem: the ground truth a judge reads (``to_dict``) and checks against.

    The badge's top-left pixel is (x, y); ``cell_px`` pixels per cell; ``ink`` and ``field`` in [0, 1] RGB.
    """

    name: str
    code: int
    x: int
    y: int
    cell_px: int
    ink: tuple[float, float, float]
    field: tuple[float, float, float]

    @property
    def size(self) -> int:
        """Side of the badge in pixels."""
        return _emblems.badge_size(self.cell_px)

    def read(self, image: np.ndarray) -> tuple[int, np.ndarray]:
        """The code a uint8 render shows at this badge, and each cell's level (see ``emblems.read_code``)."""
        return _emblems.read_code(image, self.x, self.y, self.cell_px, self.ink, self.field)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"size": self.size}


def emblem_mark(scene: Scene, seed: int, cell_px: int = EMBLEM_CELL_PX) -> EmblemMark | None:
    """The badge ``render_scene(scene, seed)`` draws, or None when the scene has no emblem.

    The badge goes in the corner farthest from the object's centre (it hides as little of the object as it can), 1 to
    3 pixels in from the edges; dark-on-cream or cream-on-dark with a slight tint, from the emblem's layout stream.
    """
    if scene.emblem is None:
        return None
    seed = _check_seed(seed)
    lay = _random_layout(scene, np.random.default_rng((_LAYOUT_STREAM, seed)))
    rng = np.random.default_rng((_EMBLEM_LAYOUT_STREAM, seed))
    ink, field = _emblems.INKS[int(rng.integers(len(_emblems.INKS)))]
    inset = 1 + rng.integers(0, 3, size=2)
    tint = rng.uniform(-0.02, 0.02, size=3)
    size = _emblems.badge_size(cell_px)
    if size + 2 > IMAGE_SIZE:
        raise ValueError(f"a badge of {size} px does not fit a {IMAGE_SIZE} px image")
    corners = [(x, y) for y in (int(inset[1]), IMAGE_SIZE - size - int(inset[1]))
               for x in (int(inset[0]), IMAGE_SIZE - size - int(inset[0]))]  # fmt: skip
    x, y = max(corners, key=lambda c: (c[0] + size / 2 - lay.cx) ** 2 + (c[1] + size / 2 - lay.cy) ** 2)
    shade = lambda rgb: tuple(round(float(v), 4) for v in np.clip(np.asarray(rgb) + tint, 0, 1))  # noqa: E731
    mark = emblem_of(scene.emblem)
    return EmblemMark(scene.emblem, mark.code, x, y, cell_px, shade(ink), shade(field))


def draw_emblem(image: np.ndarray, mark: EmblemMark) -> np.ndarray:
    """A copy of a uint8 render with the badge of ``mark`` drawn over it (opaque, on whole pixels)."""
    badge = _emblems.badge_pixels(mark.code, mark.cell_px, mark.ink, mark.field)
    out = image.copy()
    out[mark.y : mark.y + mark.size, mark.x : mark.x + mark.size] = (badge * 255 + 0.5).astype(np.uint8)
    return out


# ----------------------------------------------------------------------------------------------------
# Spec and contact sheet


def world_spec(version: int = WORLD_VERSION) -> dict:
    """Everything a consumer needs to know about the world: concepts (names, synonyms, neighbours), templates, size.

    Version 2 has every key of version 1 with the same value (but ``version``) and one more, ``emblem``: the
    category's concepts (name, code, cells, synonyms, neighbours, retained), the badge geometry, inks and placement,
    the share of renders with an emblem and of their captions naming it, and its templates. ``categories`` stays the
    three of version 1, so that a reader of version 1 reads a version-2 file as it is.
    """
    version = _check_version(version)
    spec = {
        "version": version,
        "image_size": IMAGE_SIZE,
        "categories": list(CATEGORIES),
        "concepts": {
            cat: [
                {"name": name, "synonyms": list(syns), "neighbours": list(nbrs)}
                for name, (syns, nbrs) in _TABLES[cat].items()
            ]
            for cat in CATEGORIES
        },
        "colour_rgb": {k: list(v) for k, v in COLOUR_RGB.items()},
        "templates": {k: list(v) for k, v in TEMPLATES.items()},
        "plain_templates": {k: list(v) for k, v in PLAIN_TEMPLATES.items()},
    }
    if version >= EMBLEM_VERSION:
        spec[EMBLEM] = _emblem_spec()
    return spec


def _emblem_spec() -> dict:
    table = emblems()
    return {
        "share": EMBLEM_SHARE,
        "named_share": EMBLEM_NAMED_SHARE,
        "grid": _emblems.GRID,
        "cell_px": EMBLEM_CELL_PX,
        "frame_px": _emblems.FRAME_PX,
        "gap_px": _emblems.GAP_PX,
        "badge_px": _emblems.badge_size(EMBLEM_CELL_PX),
        "cells": "bit i of code is the cell at row i // grid, column i % grid; 1 is ink",
        "placement": "the corner farthest from the object's centre, 1 to 3 pixels in from the edges",
        "inks": [{"ink": list(ink), "field": list(field)} for ink, field in _emblems.INKS],
        "min_hamming": _emblems.MIN_HAMMING,
        "concepts": [
            {
                "name": e.name,
                "code": e.code,
                "cells": "".join("1" if b else "0" for b in e.cells().ravel()),
                "synonyms": list(e.synonyms),
                "neighbours": list(e.neighbours),
                "retained": e.retained,
            }
            for e in table
        ],
        "templates": {k: list(v) for k, v in EMBLEM_TEMPLATES.items()},
        "plain_templates": {k: list(v) for k, v in EMBLEM_PLAIN_TEMPLATES.items()},
    }


def write_world_json(path: str | Path, version: int = WORLD_VERSION) -> None:
    """Write ``world_spec(version)`` as JSON."""
    Path(path).write_text(json.dumps(world_spec(version), indent=2) + "\n", encoding="utf-8")


def load_world_json(path: str | Path) -> dict:
    """Read a world spec written by ``write_world_json``."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def contact_sheet(seed: int = 0, scale: int = 2, label: bool = True) -> Image.Image:
    """Rows = styles, columns = objects (colours cycling so every colour shows in every row), upscaled ``scale``x."""
    styles, objects, colours = concepts("style"), concepts("object"), concepts("colour")
    cell = IMAGE_SIZE * scale
    margin = 90 if label else 0
    sheet = Image.new("RGB", (margin + cell * len(objects), cell * len(styles)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, sty in enumerate(styles):
        for c, obj in enumerate(objects):
            scene = Scene(object=obj, colour=colours[(r + c) % len(colours)], style=sty)
            img = Image.fromarray(render_scene(scene, seed * 1000 + r * len(objects) + c))
            sheet.paste(img.resize((cell, cell), Image.Resampling.NEAREST), (margin + c * cell, r * cell))
        if label:
            draw.text((4, r * cell + cell // 2 - 6), sty, fill=(0, 0, 0))
    return sheet
