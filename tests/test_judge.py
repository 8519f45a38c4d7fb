"""The shipped ground-truth judge reads fresh held-out renders correctly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from evals.microworld import world
from evals.microworld.judge import (
    HELDOUT_SEED_OFFSET,
    Judge,
    JudgeConfig,
    degrade,
    evaluate,
    judge_path,
    load_judge,
    warp_images,
)


@pytest.fixture(scope="module")
def judge() -> Judge:
    return load_judge()


def test_shipped_files_are_small() -> None:
    files = {p.name: p.stat().st_size for p in judge_path().iterdir()}
    assert set(files) >= {"model.safetensors", "config.json"}
    assert files["model.safetensors"] < 2 * 1024 * 1024


def test_shipped_judge_accuracy(judge: Judge) -> None:
    # seeds beyond the ones train_judge uses for its own held-out report
    seeds = range(HELDOUT_SEED_OFFSET + 500_000, HELDOUT_SEED_OFFSET + 500_300)
    images, scenes = world.render_dataset(seeds)
    acc = evaluate(judge, images, scenes)
    assert all(v >= 0.97 for v in acc.values()), acc
    # the degradations it was trained for do not throw it off either
    degraded = degrade(images, torch.Generator().manual_seed(0))
    assert degraded.dtype == torch.uint8 and degraded.shape == images.shape
    assert not torch.equal(degraded, torch.from_numpy(images))
    acc_aug = evaluate(judge, degraded.numpy(), scenes)
    assert all(v >= 0.95 for v in acc_aug.values()), acc_aug


def test_warped_renders_keep_their_labels(judge: Judge) -> None:
    """The warp that CLIP training uses bends shapes without turning one object into another: the judge, which never
    saw a warp, still reads them; and it is a real, seeded change of the image."""
    images, scenes = world.render_dataset(range(HELDOUT_SEED_OFFSET + 600_000, HELDOUT_SEED_OFFSET + 600_300))
    warped = warp_images(images, torch.Generator().manual_seed(0))
    assert warped.dtype == torch.uint8 and warped.shape == images.shape
    assert torch.equal(warped, warp_images(images, torch.Generator().manual_seed(0)))
    changed = (warped.float() - torch.from_numpy(images).float()).abs().mean(dim=(1, 2, 3))
    assert (changed > 1.0).float().mean() > 0.9
    acc = evaluate(judge, warped.numpy(), scenes)
    assert acc["object"] >= 0.9 and acc["colour"] >= 0.97 and acc["style"] >= 0.95, acc


def test_predict_input_forms(judge: Judge) -> None:
    images, scenes = world.render_dataset(range(8))
    a = judge.predict(images)
    b = judge.predict([Image.fromarray(im) for im in images])
    c = judge.predict(images.astype(np.float32) / 255)
    assert a == b == c
    assert set(a) == set(world.CATEGORIES) and all(len(v) == 8 for v in a.values())
    assert all(name in world.concepts(cat) for cat, names in a.items() for name in names)


def test_save_load_round_trip(tmp_path, judge: Judge) -> None:
    judge.save_pretrained(tmp_path)
    again = Judge.from_pretrained(tmp_path)
    x = torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        out_a, out_b = judge.eval()(x), again(x)
    for cat in out_a:
        torch.testing.assert_close(out_a[cat], out_b[cat])


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        JudgeConfig(steps=0)
    with pytest.raises(ValueError):
        JudgeConfig(widths=(16, 0))
    with pytest.raises(ValueError):
        JudgeConfig(seed_offset=HELDOUT_SEED_OFFSET)
