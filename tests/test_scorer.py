"""evals.scorer on a tiny random CLIP folder, a tiny CLIP trained on red vs blue, and a random open_clip model."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from tiny_clip import save_clip_folder, tiny_clip_config  # noqa: E402
from transformers import CLIPImageProcessor, CLIPModel  # noqa: E402

from evals.microworld.clip import CLIP_MEAN, CLIP_STD  # noqa: E402
from evals.scorer import DEFAULT_TEMPLATES, TEMPLATES, ClipScorer, ZeroShotResult  # noqa: E402
from pipelines.tokenizer import clean_prompt, offline_clip_tokenizer  # noqa: E402

PROJ = 16
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220)}


def _images(n: int, size: tuple[int, int] = (64, 64), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *size, 3), dtype=np.uint8)


def _solid(rgb: tuple[int, int, int], n: int, rng: np.random.Generator) -> np.ndarray:
    noise = rng.integers(-30, 31, size=(n, 64, 64, 3))
    return np.clip(np.array(rgb)[None, None, None] + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def random_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return save_clip_folder(
        CLIPModel(tiny_clip_config(projection_dim=PROJ)).eval(), tmp_path_factory.mktemp("random_clip")
    )


@pytest.fixture(scope="module")
def scorer(random_clip_dir: Path) -> ClipScorer:
    return ClipScorer.from_pretrained(str(random_clip_dir), batch_size=64, progress=False)


# --------------------------------------------------------------------------------------------------------------------
# Loading and shapes
# --------------------------------------------------------------------------------------------------------------------


def test_embeddings_are_normalised(scorer: ClipScorer) -> None:
    images = scorer.image_embeddings(_images(5))
    texts = scorer.text_embeddings(["a red star", "", "word " * 100])
    assert images.shape == (5, PROJ) and texts.shape == (3, PROJ)
    assert images.dtype == texts.dtype == torch.float32
    torch.testing.assert_close(images.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(texts.norm(dim=-1), torch.ones(3))


def test_batching_invariant(random_clip_dir: Path, scorer: ClipScorer) -> None:
    small = ClipScorer.from_pretrained(random_clip_dir, batch_size=2, progress=True)
    images = _images(7)
    texts = [f"a photo of {i} cats" for i in range(7)]
    torch.testing.assert_close(small.image_embeddings(images), scorer.image_embeddings(images), atol=1e-5, rtol=0)
    torch.testing.assert_close(small.text_embeddings(texts), scorer.text_embeddings(texts), atol=1e-5, rtol=0)


def test_image_formats_agree(scorer: ClipScorer) -> None:
    images = _images(3)
    from_uint8 = scorer.image_embeddings(images)
    torch.testing.assert_close(scorer.image_embeddings([Image.fromarray(im) for im in images]), from_uint8)
    torch.testing.assert_close(scorer.image_embeddings(images.astype(np.float32) / 255.0), from_uint8)
    torch.testing.assert_close(scorer.image_embeddings(images[0]), from_uint8[:1])
    torch.testing.assert_close(scorer.image_embeddings(list(images)), from_uint8)
    with pytest.raises(TypeError):
        scorer.image_embeddings(Image.fromarray(images[0]))  # type: ignore[arg-type]


def test_preprocessing_matches_clip_image_processor(random_clip_dir: Path, scorer: ClipScorer) -> None:
    # A non-square, larger image exercises the shortest-edge resize and the centre crop.
    images = _images(2, size=(80, 112), seed=1)
    reference = CLIPImageProcessor.from_pretrained(random_clip_dir)(list(images), return_tensors="pt")["pixel_values"]
    ours = scorer._backend.transform(list(images))  # type: ignore[attr-defined]
    assert ours.shape == reference.shape == (2, 3, 64, 64)
    # One uint8 step of rounding after resize is 1/255/std ~ 0.015 in normalised units.
    assert (ours - reference).abs().max() < 0.02
    # Mixed sizes in one batch go through the per-image path.
    mixed = [Image.fromarray(images[0]), Image.fromarray(_images(1)[0])]
    assert scorer.image_embeddings(mixed).shape == (2, PROJ)


def test_texts_are_cleaned(scorer: ClipScorer) -> None:
    # clean_prompt unescapes HTML and collapses whitespace, so these tokenize identically.
    a, b = scorer.text_embeddings(["a  red &amp; blue\n star", clean_prompt("a red & blue star")])
    torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------------------------


def test_clip_score_definition(scorer: ClipScorer) -> None:
    images, texts = _images(4), ["a cat", "a dog", "a red star", "blue"]
    cos = (scorer.image_embeddings(images) * scorer.text_embeddings(texts)).sum(-1)
    scores = scorer.clip_score(images, texts)
    torch.testing.assert_close(scores, 100 * cos.clamp(min=0))
    broadcast = scorer.clip_score(images, "a cat")
    torch.testing.assert_close(broadcast, scorer.clip_score(images, ["a cat"] * 4))
    with pytest.raises(ValueError):
        scorer.clip_score(images, texts[:3])


def test_image_similarity(scorer: ClipScorer) -> None:
    a, b = _images(3, seed=2), _images(3, seed=3)
    torch.testing.assert_close(scorer.image_similarity(a, a), torch.ones(3))
    sim = scorer.image_similarity(a, b)
    assert sim.shape == (3,) and bool((sim.abs() <= 1 + 1e-6).all())


def test_zero_shot_shapes(scorer: ClipScorer) -> None:
    labels = ["cat", "dog", "star"]
    result = scorer.zero_shot(_images(5), labels)
    assert isinstance(result, ZeroShotResult)
    assert result.labels == tuple(labels) and result.probs.shape == (5, 3) and result.indices.shape == (5,)
    torch.testing.assert_close(result.probs.sum(-1), torch.ones(5))
    assert result.predictions == tuple(labels[i] for i in result.indices.tolist())
    class_emb = scorer.class_embeddings(labels, DEFAULT_TEMPLATES)
    torch.testing.assert_close(class_emb.norm(dim=-1), torch.ones(3))
    with pytest.raises(ValueError):
        scorer.zero_shot(_images(1), labels, templates=["no placeholder"])


def test_templates() -> None:
    assert set(TEMPLATES) == {"object", "colour", "style"}
    assert all("{}" in t for templates in TEMPLATES.values() for t in templates)


# --------------------------------------------------------------------------------------------------------------------
# Real behaviour: a tiny CLIP trained on red vs blue
# --------------------------------------------------------------------------------------------------------------------


def _train_red_blue(steps: int = 100) -> CLIPModel:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = CLIPModel(tiny_clip_config(projection_dim=PROJ)).train()
    tokenizer = offline_clip_tokenizer()
    captions = {c: [clean_prompt(t.replace("{}", c)) for t in TEMPLATES["colour"]] for c in COLOURS}
    ids = {
        c: tokenizer(caps, padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
        for c, caps in captions.items()
    }
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # Two threads fighting over two busy cores make these tiny steps ~10x slower than one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            # One image per colour per step: no duplicate captions, so the CLIP loss has no false negatives.
            images = np.concatenate([_solid(rgb, 1, rng) for rgb in COLOURS.values()])
            batch_ids = torch.stack([ids[c][rng.integers(len(ids[c]))] for c in COLOURS])
            pixels = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std
            loss = model(input_ids=batch_ids, pixel_values=pixels, return_loss=True).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@pytest.mark.slow
def test_trained_tiny_clip_separates_colours(tmp_path: Path) -> None:
    scorer = ClipScorer.from_pretrained(save_clip_folder(_train_red_blue(), tmp_path), progress=False)
    rng = np.random.default_rng(1)
    test_images = np.concatenate([_solid(rgb, 8, rng) for rgb in COLOURS.values()])
    truth = ["red"] * 8 + ["blue"] * 8
    result = scorer.zero_shot(test_images, list(COLOURS), templates=TEMPLATES["colour"])
    assert list(result.predictions) == truth  # 100% zero-shot accuracy
    matched = scorer.clip_score(test_images, [f"a {c} object" for c in truth])
    swapped = scorer.clip_score(test_images, [f"a {c} object" for c in reversed(truth)])
    assert bool((matched > swapped).all())


# --------------------------------------------------------------------------------------------------------------------
# open_clip backend and loading errors
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_open_clip_random_weights_end_to_end(tmp_path: Path) -> None:
    import open_clip

    # A tiny architecture registered under a test-only name: open_clip builds it with random weights, no download.
    name = "erase-test-tiny-clip"
    config = {
        "embed_dim": PROJ,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (tmp_path / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / f"{name}.json")

    scorer = ClipScorer.from_open_clip(name, pretrained=None, batch_size=2, progress=False)
    images = _images(3, size=(48, 40))
    embeddings = scorer.image_embeddings(images)
    assert embeddings.shape == (3, PROJ)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(3))
    assert scorer.clip_score(images, ["a cat", "a dog", "a star"]).shape == (3,)
    result = scorer.zero_shot(images, ["cat", "dog"])
    assert result.probs.shape == (3, 2) and set(result.predictions) <= {"cat", "dog"}
    torch.testing.assert_close(scorer.image_similarity(images, images), torch.ones(3))


def test_from_pretrained_rejects_bad_specs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="open_clip:NAME/PRETRAINED"):
        ClipScorer.from_pretrained("open_clip:ViT-L-14")  # no pretrained tag: refuse random weights
    with pytest.raises(ValueError, match="cannot load"):
        ClipScorer.from_pretrained(tmp_path / "missing")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="CLIPModel"):
        ClipScorer.from_pretrained(tmp_path)


class _Built(Exception):
    pass


def test_open_clip_pickle_checkpoints_are_refused_before_loading(tmp_path: Path, monkeypatch) -> None:
    import pickle

    import open_clip

    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    def create(*args, **kwargs):
        raise _Built(kwargs.get("pretrained"))

    monkeypatch.setattr(open_clip, "create_model_and_transforms", create)
    for name in ("evil.bin", "evil.pt", "evil"):
        (tmp_path / name).write_bytes(pickle.dumps(Payload()))
        with pytest.raises(
            ValueError, match=rf"refusing to load the open_clip checkpoint .*{name}: only .safetensors"
        ):
            ClipScorer.from_pretrained(f"open_clip:ViT-B-32/{tmp_path / name}")
        with pytest.raises(ValueError, match="only .safetensors"):
            ClipScorer.from_open_clip("ViT-B-32", str(tmp_path / name))
    assert not marker.exists()
    with pytest.raises(ValueError, match="unknown open_clip model 'no-such-model'"):
        ClipScorer.from_pretrained("open_clip:no-such-model/openai")
    # a safetensors file and a known tag whose weights are cached go on to open_clip (which reads safetensors
    # without unpickling)
    monkeypatch.setattr("evals.scorer._open_clip_cached", lambda repo_id, filename: True)
    (tmp_path / "weights.safetensors").write_bytes(b"{}")
    for pretrained in (str(tmp_path / "weights.safetensors"), "openai"):
        with pytest.raises(_Built, match=pretrained):
            ClipScorer.from_pretrained(f"open_clip:ViT-B-32/{pretrained}")


def test_micro_clip_loads_if_shipped() -> None:
    micro_clip = pytest.importorskip("evals.microworld.clip")
    if not (micro_clip.micro_clip_path() / "config.json").is_file():
        pytest.skip("the micro CLIP is not built yet")
    scorer = ClipScorer.from_pretrained("micro", progress=False)
    assert scorer.image_embeddings(_images(2)).shape[0] == 2


def test_a_model_is_read_as_the_world_it_draws_not_by_its_name(tmp_path):
    """A retrained world model (a folder with ``world.json``, as train_micro exports it) gets the world's scorer and
    judge like the shipped one; a hub id, a tiny model or a folder without a world gets the hub scorer."""
    from evals.scorer import DEFAULT_HUB_SCORER, default_scorer
    from pipelines import micro_model_path, world_file

    retrained = tmp_path / "my-micro"
    retrained.mkdir()
    (retrained / "model_index.json").write_text("{}")
    (retrained / "world.json").write_text((micro_model_path() / "world.json").read_text())
    plain = tmp_path / "plain-sd"
    plain.mkdir()
    (plain / "model_index.json").write_text("{}")
    assert world_file("micro") == micro_model_path() / "world.json"
    assert world_file(str(retrained)) == retrained / "world.json"
    assert default_scorer("micro") == default_scorer(str(retrained)) == "micro"
    for other in (str(plain), "CompVis/stable-diffusion-v1-4", "tiny", ""):
        assert world_file(other) is None
        assert default_scorer(other) == DEFAULT_HUB_SCORER
