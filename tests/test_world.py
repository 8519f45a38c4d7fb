"""The micro world: determinism, names, captions, prompts, spec round-trip."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evals.microworld import emblems, world

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


# ----------------------------------------------------------------------------------------------------
# Emblems (world version 2)

EMBLEM_TEMPLATE_WORDS = TEMPLATE_WORDS | {
    w
    for table in (world.EMBLEM_TEMPLATES, world.EMBLEM_PLAIN_TEMPLATES)
    for ts in table.values()
    for t in ts
    for w in re.findall(r"[a-z]+", re.sub(r"\{\w+\}", " ", t))
}


@pytest.fixture(scope="module")
def micro_tokenize():
    from transformers import CLIPTokenizer

    # the shipped micro tokenizer, read from its folder (pipelines.micro_model_path would import diffusers)
    folder = Path(__file__).resolve().parents[1] / "pipelines" / "micro" / "tokenizer"
    return CLIPTokenizer.from_pretrained(str(folder)).tokenize


def test_emblem_table_is_the_generators_and_keeps_its_rules(micro_tokenize) -> None:
    reserved = world.emblem_reserved_words()
    committed = json.loads(emblems.TABLE_PATH.read_text(encoding="utf-8"))
    assert emblems.build_table(micro_tokenize, reserved) == committed
    assert emblems.table_problems(committed, micro_tokenize, reserved) == []
    table = world.emblems()
    assert len(table) == emblems.COUNT >= 100 and sum(e.retained for e in table) == emblems.RETAINED
    assert all(e.retained for e in table[-emblems.RETAINED :])
    # the rules, checked here without the generator's helpers
    words = [e.name for e in table] + [e.synonyms[0].split()[1] for e in table]
    tokens = [micro_tokenize(w) for w in words]
    assert all(2 <= len(t) <= 3 for t in tokens)
    assert len({t[-1] for t in tokens}) == len(words)
    for i, w in enumerate(words):
        assert not any(w in o or o in w for o in words[i + 1 :]), w
        assert not any(w in r or (len(r) > 2 and r in w) for r in reserved), w
    cells = np.array([e.cells().ravel() for e in table])
    dist = (cells[:, None, :] != cells[None, :, :]).sum(-1)
    np.fill_diagonal(dist, 99)
    assert dist.min() >= 4
    for i, e in enumerate(table):
        nearest = sorted(range(len(table)), key=lambda j: (dist[i, j], j))[:3]
        assert list(e.neighbours) == [table[j].name for j in nearest]
    v1 = {n for cat in world.CATEGORIES for c in world.concepts(cat) for n in world.all_names(c)}
    for e in table:
        assert e.synonyms == (e.synonyms[0], f"the {e.name} emblem") and world.emblem_of(e.synonyms[0]) == e
        assert not v1 & {e.name, *e.synonyms}
    with pytest.raises(ValueError):
        world.category_of(table[0].name)  # the version-1 look-ups do not know emblems


def test_emblem_free_renders_are_byte_identical_and_badges_stay_in_their_box() -> None:
    scenes = [world.scene_of_seed(s, version=2) for s in range(1000)]
    assert 0.45 < np.mean([s.emblem is not None for s in scenes]) < 0.55
    assert len({s.emblem for s in scenes}) > 110
    for seed in range(24):
        v1, scene1 = world.render_seed(seed)
        v2, scene2 = world.render_seed(seed, version=2)
        assert (scene2.object, scene2.colour, scene2.style) == (scene1.object, scene1.colour, scene1.style)
        if scene2.emblem is None:
            assert v2.tobytes() == v1.tobytes() and world.emblem_mark(scene2, seed) is None
            continue
        mark = world.emblem_mark(scene2, seed)
        assert v2.tobytes() == world.render_scene(scene2, seed).tobytes()
        changed = np.argwhere((v2 != v1).any(-1))
        assert changed.size and (changed.min(0) >= (mark.y, mark.x)).all()
        assert (changed.max(0) < (mark.y + mark.size, mark.x + mark.size)).all()
        assert mark.size == 20 and mark.to_dict()["name"] == scene2.emblem
        # the badge sits in a corner, away from the object's half of the image
        assert min(mark.x, 64 - mark.size - mark.x) <= 3 and min(mark.y, 64 - mark.size - mark.y) <= 3
    images, scenes2 = world.render_dataset(range(64), workers=2, version=2)
    assert scenes2 == [world.scene_of_seed(s, version=2) for s in range(64)]
    assert all(images[s].tobytes() == world.render_seed(s, version=2)[0].tobytes() for s in range(0, 64, 9))
    with pytest.raises(ValueError):
        world.render_seed(0, version=3)
    with pytest.raises(ValueError):
        world.Scene("star", "red", "plain", emblem="unicorn")


def test_emblems_read_back_from_renders() -> None:
    codes = [e.code for e in world.emblems()]
    names = world.emblem_names()
    for k, name in enumerate(names[::7]):
        scene = world.Scene(world.concepts("object")[k % 8], world.concepts("colour")[k % 8],
                            world.concepts("style")[k % 7], emblem=name)  # fmt: skip
        image = world.render_scene(scene, seed=1000 + k)
        mark = world.emblem_mark(scene, 1000 + k)
        code, level = mark.read(image)
        assert code == world.emblem_of(name).code and names[emblems.nearest_code(code, codes)] == name
        assert (np.abs(level - level.round()) < 0.1).all()
        # the same scene with a neighbouring emblem reads as that one
        other = world.emblem_of(world.emblem_of(name).neighbours[0])
        swapped = world.draw_emblem(image, world.EmblemMark(other.name, other.code, mark.x, mark.y, mark.cell_px,
                                                            mark.ink, mark.field))  # fmt: skip
        assert mark.read(swapped)[0] == other.code and emblems.hamming(code, other.code) >= 4
    # a larger badge for the same scene
    big = world.emblem_mark(scene, 5, cell_px=7)
    assert big.size == 32 and big.read(world.draw_emblem(world.render_scene(scene, 5), big))[0] == big.code


def test_emblem_captions_and_prompts() -> None:
    rng = np.random.default_rng(3)
    # every emblem's identifying words (its name, its synonym's invented word) -> the emblem
    emblem_words = {w: e.name for e in world.emblems() for w in (e.name, e.synonyms[0].split()[1])}
    named = 0
    n = 1000
    for i in range(n):
        scene = world.scene_of_seed(i, version=2)
        if scene.emblem is None:
            scene = world.Scene(scene.object, scene.colour, scene.style, emblem=world.emblem_names()[i % 120])
        text = world.caption(scene, rng)
        own_emblem = world.emblem_of(scene.emblem)
        own = {nm for cat in world.CATEGORIES for nm in world.all_names(scene.labels()[cat])}
        own |= {own_emblem.name, *own_emblem.synonyms}
        own_words = {w for nm in own for w in re.findall(r"[a-z]+", nm)}
        for w in re.findall(r"[a-z]+", text):
            assert w in EMBLEM_TEMPLATE_WORDS or w in own_words, (scene, text, w)
        hits = {emblem_words[w] for w in re.findall(r"[a-z]+", text) if w in emblem_words}
        assert hits <= {scene.emblem}, (scene, text)
        named += bool(hits)
    assert 0.75 < named / n < 0.85
    e = world.emblems()[0]
    assert world.prompt(emblem=e.name) == e.name
    assert world.prompt(object="star", colour="red", style="monet", emblem=e.synonyms[1]) == (
        f"a red star in the style of monet with {e.synonyms[1]}"
    )
    assert world.prompt(object="star", colour="red", style="plain", emblem=e.name, template=1) == (
        f"red star, plain drawing, {e.name}"
    )
    with pytest.raises(ValueError):
        world.prompt(colour="red", emblem=e.name)  # no template names a colour and an emblem alone
    with pytest.raises(ValueError):
        world.prompt(emblem="red")


def test_world_json_version_2_keeps_version_1(tmp_path) -> None:
    v1, v2 = world.world_spec(), world.world_spec(version=2)
    assert v1["version"] == world.WORLD_VERSION == 1 and v2["version"] == world.EMBLEM_VERSION == 2
    assert {k: v for k, v in v2.items() if k not in ("version", "emblem")} == {
        k: v for k, v in v1.items() if k != "version"
    }
    path = tmp_path / "world.json"
    world.write_world_json(path, version=2)
    spec = world.load_world_json(path)
    assert spec == v2
    emblem = spec["emblem"]
    assert [c["name"] for c in emblem["concepts"]] == world.emblem_names()
    assert emblem["badge_px"] == emblems.badge_size(emblem["cell_px"]) == 20
    for c in emblem["concepts"]:
        # a reader decodes a badge from the file alone: cells row by row, 1 is ink
        assert int(c["cells"][::-1], 2) == c["code"] == world.emblem_of(c["name"]).code
    assert emblem["templates"] == {k: list(v) for k, v in world.EMBLEM_TEMPLATES.items()}


def test_emblem_readback_tells_a_faithful_path_from_a_blurring_one() -> None:
    from PIL import ImageFilter

    from evals.microworld import emblem_check

    images, scenes, marks = emblem_check.badge_renders(range(24))
    assert {s.emblem for s in scenes} == set(world.emblem_names()[:24]) and all(m.size == 20 for m in marks)
    exact = emblem_check.emblem_readback(images, marks, lambda x: x.copy())
    assert exact["emblem_accuracy"] == exact["cell_accuracy"] == 1.0 and exact["psnr_badge"] == float("inf")

    def blur(x: np.ndarray) -> np.ndarray:
        return np.stack([np.asarray(Image.fromarray(i).filter(ImageFilter.GaussianBlur(6))) for i in x])

    blurred = emblem_check.emblem_readback(images, marks, blur)
    assert blurred["emblem_accuracy"] < 0.5 and blurred["cell_accuracy"] < 0.75
    assert blurred["psnr_badge"] < blurred["psnr_image"] < 40
    with pytest.raises(ValueError):
        emblem_check.emblem_readback(images, marks, lambda x: x[:, :32])
