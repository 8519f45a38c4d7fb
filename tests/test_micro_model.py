"""The shipped micro world: plain diffusers loads it, its CLIP scores it, and the README command erases from it."""

import json
import runpy
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from evals.microworld import world
from pipelines import DEFAULT_GUIDANCE, DEFAULT_STEPS, load_pipeline, micro_model_path

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    not (micro_model_path() / "model_index.json").is_file(), reason="micro model not built (scripts/train_micro.py)"
)


@pytest.mark.slow
def test_plain_diffusers_loads_and_generates():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(micro_model_path()))
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red star in the style of van gogh", num_inference_steps=4, output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all() and image.std() > 0.02


# PNDM at SD 1.x's own 50 steps: at 20 it draws the colour right but a circle in ~45% of images (DPM-Solver++ 100%)
@pytest.mark.slow
@pytest.mark.parametrize(
    "name, steps", [("DDIMScheduler", 20), ("EulerAncestralDiscreteScheduler", 20), ("PNDMScheduler", 50)]
)
def test_swapped_samplers_draw_what_the_prompt_says(name, steps):
    """SD 1.x users swap samplers with ``Other.from_config(pipe.scheduler.config)``; on the micro model that must give
    readable images (DDIM once clipped the latents and drew noise)."""
    import diffusers
    from diffusers import StableDiffusionPipeline

    from evals.microworld.judge import load_judge

    pipe = StableDiffusionPipeline.from_pretrained(str(micro_model_path()))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config)
    generators = [torch.Generator().manual_seed(i) for i in range(8)]
    images = pipe(["a blue circle"] * 8, num_inference_steps=steps, generator=generators, output_type="np")
    labels = load_judge().predict(images.images)
    assert np.mean([c == "blue" for c in labels["colour"]]) >= 0.75, labels
    assert np.mean([o == "circle" for o in labels["object"]]) >= 0.75, labels


def test_shipped_scheduler_is_the_inference_scheduler():
    from diffusers import DPMSolverMultistepScheduler

    from evals.microworld.sd_model import inference_scheduler

    shipped = DPMSolverMultistepScheduler.from_pretrained(str(micro_model_path() / "scheduler"))
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(shipped.config) == public(inference_scheduler().config)


def test_world_json_is_the_world():
    assert world.load_world_json(micro_model_path() / "world.json") == world.world_spec()


@pytest.mark.slow
def test_micro_clip_classifies_rendered_images():
    from evals.probes import world_labels
    from evals.scorer import TEMPLATES, ClipScorer

    scorer = ClipScorer.from_pretrained("micro", progress=False)
    images, scenes = world.render_dataset(range(10_000_000, 10_000_000 + 160))
    # Objects are the shipped CLIP's hardest category (96.0% on 1024 held-out renders, 91-93% on the busy picasso,
    # seurat and mondrian backgrounds): the bar leaves room for a 160-image sample's spread.
    bars = {"object": 0.9, "colour": 0.95, "style": 0.95}
    for category, labels in world_labels().items():
        truth = [getattr(s, category) for s in scenes]
        predicted = scorer.zero_shot(images, labels, TEMPLATES[category]).predictions
        accuracy = np.mean([p == t for p, t in zip(predicted, truth, strict=True)])
        assert accuracy >= bars[category], f"{category}: {accuracy:.1%}"


@pytest.mark.slow
def test_readme_erase_command_on_micro(tmp_path):
    out = tmp_path / "vg"
    cmd = [sys.executable, str(ROOT / "scripts" / "erase.py"), "--concept", "van gogh", "--out", str(out), "--json"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    check = summary["check"]
    assert check["target_after"] < check["target_before"]
    assert (out / "before_after.png").is_file() and (out / "erasure.json").is_file()
    assert summary["weight_format"] == "lora" and summary["load_code"] == f'handle = erase.load(pipe, "{out}")'
    assert summary["edit_seconds"] > 0  # reported; how fast it is lives in scripts/bench_uce.py, not in a timed test


@pytest.mark.slow
def test_measure_erasure_script_on_micro(tmp_path):
    out = tmp_path / "m.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "measure_erasure.py"), "--concept", "van gogh", "--images", "6"]
    cmd += ["--group", "erased: van gogh", "--group", "monet", "--set", "preserve_scale=0.3", "--json", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    measured = json.loads(out.read_text())
    assert measured["config"]["preserve_scale"] == 0.3
    groups = measured["groups"]
    assert "kept style: monet" in groups and "erased: van gogh" in groups and "kept: objects" not in groups
    assert all(g["n"] == 6 and 0 <= g["clip_after"] <= 1 and 0 <= g["judge_before"] <= 1 for g in groups.values())
    # the erased target loses accuracy even on 6 images
    assert groups["erased: van gogh"]["clip_after"] < groups["erased: van gogh"]["clip_before"]
    # and what its images read as after the edit: styles, one verdict an image, van gogh's share is clip_after
    became = groups["erased: van gogh"]["after_reads_as"]
    assert sum(became.values()) == 6 and set(became) <= set(world.concepts("style"))
    assert became.get("van gogh", 0) / 6 == groups["erased: van gogh"]["clip_after"]
    row = next(line for line in result.stdout.splitlines() if line.startswith("erased: van gogh "))
    assert row.rstrip().endswith(", ".join(f"{c} {k / 6:.0%}" for c, k in list(became.items())[:2]))


@pytest.mark.slow
def test_saved_lora_reproduces_the_in_memory_edit(tmp_path):
    from diffusers import StableDiffusionPipeline

    import erase
    from erase.workflow import run_erase

    wrapper = load_pipeline("micro")
    run_erase(wrapper, ["van gogh"], out=tmp_path / "vg", check=False)  # the defaults of scripts/erase.py
    artifact = erase.load_artifact(tmp_path / "vg")
    meta = json.loads((tmp_path / "vg" / "erasure.json").read_text())
    assert meta["weight_format"] == "lora"  # the default artifact is a LoRA, the micro model included
    prompts = ["a red star in the style of van gogh", "a blue moon in the style of monet"]

    def run(pipe):
        pipe.set_progress_bar_config(disable=True)
        gen = [torch.Generator().manual_seed(s) for s in (0, 1)]
        return pipe(
            prompts,
            num_inference_steps=DEFAULT_STEPS,
            guidance_scale=DEFAULT_GUIDANCE,
            generator=gen,
            output_type="np",
        ).images

    with wrapper.weight_deltas(artifact.deltas):
        edited = run(wrapper.pipe)
    plain = StableDiffusionPipeline.from_pretrained(str(micro_model_path()))
    plain.load_lora_weights(str(tmp_path / "vg"))
    assert np.abs(run(plain) - edited).max() <= 1e-3
    fused = StableDiffusionPipeline.from_pretrained(str(micro_model_path()))
    erase.load(fused, tmp_path / "vg")  # the same edit through erase.load
    assert np.abs(run(fused) - edited).max() <= 1e-3


@pytest.mark.parametrize(
    "args, message",
    [
        (["--concept", ""], "empty"),  # M1
        (["--concept", "van gogh", "--method", "foo"], "unknown erasure method"),  # M2
        (["--concept", "van gogh", "--images", "0"], "--images must be >= 1"),  # M3
        (["--concept", "van gogh", "--json", "/proc/no/m.json"], "cannot write"),  # M4
        (["--concept", "banana"], "concept to erase 'banana' is no micro-world name; the world's concepts: "),  # M5
        (["--concept", "Van Gohg"], "near ones: 'van gogh'"),
        (["--concept", "van gogh", "--device", "nonsense"], "unknown device"),
        (["--concept", "van gogh", "--group", "no such group"], "no group matches"),
    ],
)
def test_measure_erasure_bad_input_is_one_line_before_any_image(capsys, args, message):
    import runpy

    code = runpy.run_path(str(ROOT / "scripts" / "measure_erasure.py"))["main"](args)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err


@pytest.mark.slow
def test_measure_erasure_groups_hold_at_least_the_images_asked():
    probe_groups = runpy.run_path(str(ROOT / "scripts" / "measure_erasure.py"), run_name="measure_erasure")[
        "probe_groups"
    ]
    groups = probe_groups(["van gogh", "seurat"], 100, 1234)
    assert all(len(probes) >= 100 for probes in groups.values())
    # the pooled groups hold each object (colour) equally often
    objects = Counter(p.concept for p in groups["kept: objects"])
    assert set(objects) == set(world.concepts("object")) and len(set(objects.values())) == 1
