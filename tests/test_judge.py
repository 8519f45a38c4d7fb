"""The shipped ground-truth judge reads fresh held-out renders correctly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from evals.microworld import world
from evals.microworld.judge import (
    HELDOUT_SEED_OFFSET,
    NO_EMBLEM,
    Judge,
    JudgeConfig,
    degrade,
    evaluate,
    judge_classes,
    judge_path,
    load_judge,
    scene_label,
    train_judge,
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


def test_shipped_judge_is_version_1(judge: Judge) -> None:
    assert judge.config.world_version == 1 and set(judge.config.classes) == set(world.CATEGORIES)


def test_version_2_judge_has_an_emblem_head(tmp_path, caplog) -> None:
    classes = judge_classes(world.EMBLEM_VERSION)
    assert classes["emblem"] == [NO_EMBLEM, *world.emblem_names()] and len(classes["emblem"]) == 121
    assert {k: v for k, v in classes.items() if k != "emblem"} == judge_classes(1)
    scenes = [world.scene_of_seed(s, version=2) for s in range(40)]
    with_badge = next(s for s in scenes if s.emblem is not None)
    without = next(s for s in scenes if s.emblem is None)
    assert scene_label(with_badge, "emblem") == with_badge.emblem and scene_label(without, "emblem") == NO_EMBLEM
    judge = Judge(JudgeConfig(widths=(4, 8), world_version=2))
    assert {k: v.out_features for k, v in judge.heads.items()} == {"object": 8, "colour": 8, "style": 7, "emblem": 121}
    judge.save_pretrained(tmp_path)
    with caplog.at_level("WARNING"):
        again = Judge.from_pretrained(tmp_path)
    assert again.config.world_version == 2 and "other concepts" not in caplog.text
    with pytest.raises(ValueError, match="classes"):
        JudgeConfig(world_version=2, classes=judge_classes(1))
    with pytest.raises(ValueError, match="world_version"):
        JudgeConfig(world_version=3)


def _darken(images: np.ndarray) -> np.ndarray:  # a stand-in for a VAE round trip: deterministic, label-preserving
    return (images.astype(np.int32) * 3 // 4).astype(np.uint8)


@pytest.mark.slow
def test_judge_training_resumes_exactly(tmp_path) -> None:
    """A version-2 judge (VAE share on) stopped after step 3, checkpointed at step 2, and rerun ends with the weights
    of an uninterrupted run; a checkpoint of other settings is refused."""
    config = JudgeConfig(
        widths=(4, 8), steps=6, batch_size=8, pool_size=48, eval_size=24, render_workers=1, world_version=2,
        vae_fraction=0.25, vae_pool_size=16, checkpoint_every=2,
    )  # fmt: skip

    def stop_at_3(stage, step, total, metrics):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_judge(config, seed=1, progress=False, work_dir=tmp_path / "a", reconstruct=_darken, callback=stop_at_3)
    seen: list[int] = []
    resumed = train_judge(
        config, seed=1, progress=False, work_dir=tmp_path / "a", reconstruct=_darken,
        callback=lambda stage, step, total, m: seen.append(step),
    )  # fmt: skip
    assert seen == [3, 4, 5, 6] and resumed.metrics["resumed_from_step"] == 2
    fresh = train_judge(config, seed=1, progress=False, work_dir=tmp_path / "b", reconstruct=_darken)
    for (k, a), b in zip(resumed.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert set(fresh.metrics["heldout_accuracy_vae"]) == {"object", "colour", "style", "emblem"}
    assert "heldout_accuracy_with_badge" in fresh.metrics and "heldout_accuracy_vae_without_badge" in fresh.metrics
    with pytest.raises(ValueError, match="of other settings"):
        train_judge(JudgeConfig(**{**config.to_dict(), "lr": 1e-3, "widths": (4, 8)}), seed=1, progress=False,
                    work_dir=tmp_path / "a", reconstruct=_darken)  # fmt: skip
    with pytest.raises(ValueError, match="reconstruct"):
        train_judge(config, seed=1, progress=False)
