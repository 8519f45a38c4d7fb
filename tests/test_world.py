"""The micro world: determinism, names, captions, prompts, spec round-trip."""

from __future__ import annotations

import re

import numpy as np
import pytest

from evals.microworld import world

ALL_NAMES = {name: cat for cat in world.CATEGORIES for c in world.concepts(cat) for name in world.all_names(c)}
# words the templates themselves use (everything in a caption that is not an attribute name)
TEMPLATE_WORDS = {
    w
    for table in (world.TEMPLATES, world.PLAIN_TEMPLATES)
    for ts in table.values()
    for t in ts
    for w in re.findall(r"[a-z]+", re.sub(r"\{\w+\}", " ", t))
} | {"an"}


def _has_phrase(text: str, phrase: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(phrase)}(?![\w-])", text) is not None


def test_render_is_deterministic() -> None:
    for seed in (0, 1, 12345):
        a, sa = world.render_seed(seed)
        b, sb = world.render_seed(seed)
        assert sa == sb
        assert a.dtype == np.uint8 and a.shape == (world.IMAGE_SIZE, world.IMAGE_SIZE, 3)
        assert a.tobytes() == b.tobytes()
        assert a.tobytes() == world.render_scene(sa, seed).tobytes()
    assert world.render_seed(0)[0].tobytes() != world.render_seed(1)[0].tobytes()


def test_render_dataset_workers_identical() -> None:
    seeds = list(range(100, 260))
    a, sa = world.render_dataset(seeds, workers=1)
    b, sb = world.render_dataset(seeds, workers=2)
    assert a.shape == (len(seeds), 64, 64, 3)
    assert sa == sb
    assert np.array_equal(a, b)


def test_every_concept_appears() -> None:
    _, scenes = world.render_dataset(range(600))
    for cat in world.CATEGORIES:
        seen = {s.labels()[cat] for s in scenes}
        assert seen == set(world.concepts(cat))


def test_every_style_renders_every_object() -> None:
    # the object must be visible: its colour covers a fair part of the image in every style
    for style in world.concepts("style"):
        fractions = []
        for i, obj in enumerate(world.concepts("object")):
            colour = world.concepts("colour")[i]
            img = world.render_scene(world.Scene(obj, colour, style), seed=i).astype(float)
            target = np.asarray(world.COLOUR_RGB[colour], dtype=float)
            close = np.abs(img - target).max(axis=-1) < 60
            assert close.mean() > 0.015, (style, obj, colour, close.mean())
            fractions.append(close.mean())
        assert np.mean(fractions) > 0.035, (style, fractions)


def test_names() -> None:
    assert world.CATEGORIES == ("object", "colour", "style")
    assert len(world.concepts("object")) == 8
    assert len(world.concepts("colour")) == 8
    assert len(world.concepts("style")) == 7 and "plain" in world.concepts("style")
    for cat in world.CATEGORIES:
        for c in world.concepts(cat):
            assert world.category_of(c) == cat
            syns = world.synonyms(c)
            assert syns and c not in syns
            for s in syns:
                assert world.canonical(s) == c and world.category_of(s) == cat
                assert c in world.synonyms(s)
            for n in world.neighbours(c):
                assert world.category_of(n) == cat and n != c
    for style in world.concepts("style"):
        if style != "plain":
            assert len(world.synonyms(style)) >= 2
    # every name belongs to one concept only
    names = [n for cat in world.CATEGORIES for c in world.concepts(cat) for n in world.all_names(c)]
    assert len(names) == len(set(names))
    with pytest.raises(ValueError):
        world.category_of("unicorn")
    with pytest.raises(ValueError):
        world.Scene("unicorn", "red", "plain")


def test_captions_name_only_the_scene() -> None:
    rng = np.random.default_rng(0)
    named_counts = {1: 0, 2: 0, 3: 0}
    for _ in range(3000):
        scene = world.random_scene(rng)
        text = world.caption(scene, rng)
        own = {n for cat in world.CATEGORIES for n in world.all_names(scene.labels()[cat])}
        # no name of any other concept appears
        for name, _cat in ALL_NAMES.items():
            if name not in own and _has_phrase(text, name):
                # a name may contain another concept's name only inside one of the scene's own names
                assert any(_has_phrase(o, name) and o in text for o in own), (scene, text, name)
        # every word is a template word or part of one of the scene's names
        own_words = {w for n in own for w in re.findall(r"[a-z]+", n)}
        for w in re.findall(r"[a-z]+", text):
            assert w in TEMPLATE_WORDS or w in own_words, (scene, text, w)
        n_named = sum(any(_has_phrase(text, n) for n in world.all_names(scene.labels()[c])) for c in world.CATEGORIES)
        assert n_named >= 1
        named_counts[n_named] += 1
        if scene.style == "plain" and _has_phrase(text, "plain"):
            assert "drawing" in text
    assert all(v > 200 for v in named_counts.values()), named_counts


def test_caption_is_deterministic() -> None:
    scene = world.Scene("star", "red", "van gogh")
    a = [world.caption(scene, np.random.default_rng(7)) for _ in range(2)]
    assert a[0] == a[1]


def test_prompt_names_exactly_what_it_is_given() -> None:
    assert world.prompt(object="star", colour="red", style="van gogh") == "a red star in the style of van gogh"
    assert (
        world.prompt(object="star", colour="red", style="van gogh", template=1) == "a van gogh painting of a red star"
    )
    assert world.prompt(object="star", colour="red") == "a red star"
    assert world.prompt(object="star", colour="orange") == "an orange star"
    for obj in ("star", "five-pointed star", "moon", None):
        for col in ("red", "crimson", "teal", None):
            for sty in ("van gogh", "starry night style", "pop art", "plain", "flat", None):
                if obj is None and col is None and sty is None:
                    with pytest.raises(ValueError):
                        world.prompt()
                    continue
                opts = world.templates_for(
                    object=obj is not None,
                    colour=col is not None,
                    style=sty is not None,
                    plain=sty is not None and world.canonical(sty) == "plain",
                )
                for t in range(len(opts)):
                    text = world.prompt(object=obj, colour=col, style=sty, template=t)
                    assert text == world.prompt(object=obj, colour=col, style=sty, template=t)
                    given = {n for n in (obj, col, sty) if n is not None}
                    for n in given:
                        assert _has_phrase(text, n), (text, n)
                    for name in ALL_NAMES:
                        if name not in given and _has_phrase(text, name):
                            assert any(_has_phrase(g, name) for g in given), (text, name)
                with pytest.raises(ValueError):
                    world.prompt(object=obj, colour=col, style=sty, template=len(opts))
    with pytest.raises(ValueError):
        world.prompt(object="red")


def test_world_json_round_trip(tmp_path) -> None:
    path = tmp_path / "world.json"
    world.write_world_json(path)
    spec = world.load_world_json(path)
    assert spec == world.world_spec()
    assert spec["image_size"] == 64
    assert [c["name"] for c in spec["concepts"]["style"]] == world.concepts("style")
    assert spec["concepts"]["style"][1]["neighbours"] == world.neighbours("van gogh")


def test_contact_sheet() -> None:
    sheet = world.contact_sheet(seed=0, scale=1, label=False)
    assert sheet.size == (64 * 8, 64 * 7)
