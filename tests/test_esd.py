"""ESD (erase/esd.py) on the tiny random pipeline: settings, target, variants, anchors, artifact and script."""

import json

import numpy as np
import pytest
import torch

from erase import ConceptSpec, erase_concepts
from erase.lora.esd import ESDConfig, esd_target

FAST = dict(steps=8, lr=1e-2, pool_images=2, pool_steps=4)


def _pixels(images):
    return np.stack([np.asarray(i, dtype=np.float32) for i in images])


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"train": "everything"}, "train"),
        ({"negative_guidance": 0.0}, "negative_guidance"),
        ({"anchor_weight": -1.0}, "anchor_weight"),
        ({"anchor_prompts": ("",)}, "anchor_prompts"),
        ({"steps": 0}, "steps"),
        ({"rank": 0}, "rank"),
        ({"layers": ()}, "layers"),
    ],
)
def test_config_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        ESDConfig(**bad)


def test_defaults_are_the_reference_script_in_the_papers_form():
    config = ESDConfig()
    assert (config.lr, config.steps, config.negative_guidance, config.pool_guidance, config.pool_steps) == (
        5e-5, 200, 1.0, 3.0, 50,
    )  # fmt: skip
    assert config.train == "xattn" and config.anchor_prompts == ()
    # ESD-x: a UNet's cross-attention; in an SD3/Flux transformer, the joint attention's text side
    assert config.patterns[:4] == ("*attn2.to_q", "*attn2.to_k", "*attn2.to_v", "*attn2.to_out.0")
    assert config.patterns[4:] == ("*attn.add_q_proj", "*attn.add_k_proj", "*attn.add_v_proj", "*attn.to_add_out")


def test_target_is_the_paper_and_esd_sd_with_guidance_plus_one():
    gen = torch.Generator().manual_seed(0)
    e_c, e_0 = torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen)
    assert torch.allclose(esd_target(e_c, e_0, 1.0), e_0 - (e_c - e_0))
    newer_script_ng2 = e_c - 2 * (e_c - e_0)  # esd_sd.py: noise_pred_erase_from - ng * (erase - null), ng = 2
    assert torch.allclose(esd_target(e_c, e_0, 1.0), newer_script_ng2)


@pytest.mark.slow
@pytest.mark.parametrize(
    "train, ends",
    [
        ("kv", ("attn2.to_k", "attn2.to_v")),
        ("noxattn", ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2")),
    ],
)
def test_variants_adapt_their_modules(tiny, train, ends):
    artifact = erase_concepts(tiny, ConceptSpec(("van gogh",)), "esd", ESDConfig(train=train, **FAST))
    assert artifact.deltas and all(name.endswith(ends) for name in artifact.deltas)
    assert artifact.info["variant"] == train


@pytest.mark.slow
def test_anchor_regularization_keeps_anchor_predictions_closer(tiny):
    """The same steps with and without the anchor term: the anchor prompt's prediction moves less with it."""
    x = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([100, 300, 600, 900])
    anchor = tiny.encode_prompts(["a photo of a cat"] * 4)
    original = tiny.noise_prediction(x, t, anchor).detach()
    moved = {}
    for weight in (0.0, 10.0):
        config = ESDConfig(anchor_weight=weight, anchor_prompts=("a photo of a cat",), **{**FAST, "steps": 20})
        artifact = erase_concepts(tiny, ConceptSpec(("van gogh",)), "esd", config)
        with torch.no_grad(), tiny.weight_deltas(artifact.deltas):
            moved[weight] = float((tiny.noise_prediction(x, t, anchor) - original).norm())
        assert artifact.info["anchors"] == ["a photo of a cat"]
    assert moved[10.0] < moved[0.0], moved


@pytest.mark.slow
def test_several_concepts_train_one_adapter(tiny):
    """One adapter on two concepts erases each: each concept's prediction ends nearer its ESD target than before and
    than under an adapter of the same steps trained on the other concept alone (so it was trained, not carried
    along); the artifact is one LoRA of the config's rank on the variant's modules, as for one concept."""
    concepts = ("van gogh", "claude monet")
    x = torch.randn(8, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([100, 200, 300, 400, 500, 600, 750, 900])
    encodings = {c: tiny.encode_prompts([c] * 8) for c in concepts}
    with torch.no_grad():
        uncond = tiny.noise_prediction(x, t, tiny.encode_prompts([""] * 8))
        targets = {c: esd_target(tiny.noise_prediction(x, t, encodings[c]), uncond, 1.0) for c in concepts}

    def distances(deltas):
        with torch.no_grad(), tiny.weight_deltas(deltas):
            return {c: float((tiny.noise_prediction(x, t, encodings[c]) - targets[c]).norm()) for c in concepts}

    config = ESDConfig(**{**FAST, "steps": 20, "lr": 3e-3})
    both = erase_concepts(tiny, ConceptSpec(concepts), "esd", config)
    alone = {c: erase_concepts(tiny, ConceptSpec((c,)), "esd", config) for c in concepts}
    before, after = distances({}), distances(both.deltas)
    for concept, other in zip(concepts, reversed(concepts), strict=True):
        under_other = distances(alone[other].deltas)[concept]
        assert after[concept] < before[concept] and after[concept] < under_other, (concept, before, after, under_other)
    assert both.concepts == list(concepts) and both.info["steps"] == config.steps
    one = alone["van gogh"].payload("weights").factors
    factors = both.payload("weights").factors
    assert set(both.deltas) == set(factors) == set(one) and both.info["lora_modules"] == len(one)
    for name, (a, b) in factors.items():
        assert a.shape == one[name][0].shape and b.shape == one[name][1].shape and a.shape[0] == config.rank


@pytest.mark.slow
def test_erase_script_runs_esd_with_set(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("erase_script", Path(__file__).parents[1] / "scripts" / "erase.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "vg"
    argv = ["--model", "tiny", "--concept", "van gogh", "--method", "esd", "--no-check", "--preserve", "monet",
            "--out", str(out), "--json"]  # fmt: skip
    argv += ["--steps", "3", "--lr", "1e-3", "--rank", "2", "--seed", "7", "--set", "pool_steps=3"]
    argv += ["--set", "pool_images=1"]
    assert script.main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "esd" and summary["weight_format"] == "lora"
    meta = json.loads((out / "erasure.json").read_text())
    assert meta["config"]["steps"] == 3 and meta["config"]["anchor_prompts"] == ["monet"]
    assert (meta["config"]["lr"], meta["config"]["rank"], meta["config"]["seed"]) == (1e-3, 2, 7)
    assert meta["preserve"] == ["monet"]


def test_esd_takes_no_guide(tiny):
    from erase.workflow import erasure_settings

    with pytest.raises(ValueError, match="takes no guide"):
        erasure_settings(tiny, ["van gogh"], "esd", guides=["art"])
    spec, _ = erasure_settings(tiny, ["van gogh"], "esd")
    assert spec.guides == ("",)  # no default guide recorded for a method that never reads it


_PLAIN_DIFFUSERS = """
import sys, numpy, torch
from diffusers import StableDiffusionPipeline
model, lora, out = sys.argv[1:4]
pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
pipe.set_progress_bar_config(disable=True)
pipe.load_lora_weights(lora)
images = [pipe("a painting by van gogh", generator=torch.Generator("cpu").manual_seed(seed), num_inference_steps=6,
               output_type="np").images[0] for seed in (0,)]
numpy.save(out, numpy.stack(images))
"""


@pytest.mark.slow
def test_a_fresh_plain_diffusers_process_draws_what_the_in_memory_edit_draws_on_micro(tmp_path):
    """The micro model, an ESD artifact, and a new interpreter that imports only diffusers: the same float images
    as the in-memory edit (max abs difference <= 1e-3 on the [0, 1] scale)."""
    import subprocess
    import sys

    import erase
    from pipelines import load_pipeline, micro_model_path

    micro = load_pipeline("micro")
    config = ESDConfig(steps=10, lr=1e-3, pool_images=1, pool_steps=5)
    artifact = erase_concepts(micro, ConceptSpec(("van gogh",)), "esd", config)
    folder = erase.save_artifact(artifact, tmp_path / "vg", micro)

    def draw():
        return np.stack([
            micro.pipe("a painting by van gogh", generator=torch.Generator("cpu").manual_seed(seed),
                       num_inference_steps=6, output_type="np").images[0]
            for seed in (0,)
        ])  # fmt: skip

    micro.pipe.set_progress_bar_config(disable=True)
    base = draw()
    with micro.weight_deltas(artifact.deltas):
        in_memory = draw()
    out = tmp_path / "plain.npy"
    result = subprocess.run(
        [sys.executable, "-c", _PLAIN_DIFFUSERS, str(micro_model_path()), str(folder), str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    plain = np.load(out)
    assert np.abs(plain - in_memory).max() <= 1e-3
    assert np.abs(base - in_memory).max() > 1e-2  # the edit is visible, so the comparison means something
