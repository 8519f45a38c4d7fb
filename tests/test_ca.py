"""Concept ablation (erase/ca.py) on the tiny random pipeline: settings, loss, modules, pool, anchors, artifact."""

import json

import numpy as np
import pytest
import torch

from erase import ConceptSpec, erase_concepts
from erase.lora.ca import CAConfig, ca_loss
from erase.lora.trainer import Batch

FAST = dict(steps=8, lr=1e-2, pool_images=2, pool_steps=4, batch_size=2)


def _pixels(images):
    return np.stack([np.asarray(i, dtype=np.float32) for i in images])


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"train": "noxattn"}, "train"),
        ({"anchor_weight": -1.0}, "anchor_weight"),
        ({"anchor_prompts": (" ",)}, "anchor_prompts"),
        ({"lr": 0.0}, "lr"),
        ({"batch_size": 0}, "batch_size"),
        ({"layers": ()}, "layers"),
    ],
)
def test_config_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        CAConfig(**bad)


def test_defaults_are_the_reference_style_command():
    """diffusers/train.py's style command: K/V, 2e-6 x batch 4 x 2 GPUs, 100 steps, images at 25 steps, guidance 6."""
    config = CAConfig()
    assert (config.lr, config.steps, config.batch_size, config.pool_steps, config.pool_guidance) == (
        1.6e-5, 100, 8, 25, 6.0,
    )  # fmt: skip
    assert config.train == "kv" and config.patterns[:2] == ("*attn2.to_k", "*attn2.to_v")
    assert config.patterns[2:] == ("*attn.add_k_proj", "*attn.add_v_proj")  # SD3/Flux: joint attention's text side
    assert config.anchor_prompts == ()


class _Recorder:
    """Predictions stand-in: the tiny UNet's own prediction, ``offset`` added to the trained one; records prompts."""

    def __init__(self, wrapper, offset):
        self.wrapper, self.offset, self.asked = wrapper, offset, {"trained": [], "frozen": []}

    def trained(self, x, t, encoding):
        self.asked["trained"].append(list(encoding.prompts))
        return self.wrapper.noise_prediction(x, t, encoding) + self.offset

    def frozen(self, x, t, encoding):
        self.asked["frozen"].append(list(encoding.prompts))
        with torch.no_grad():
            return self.wrapper.noise_prediction(x, t, encoding)


@torch.no_grad()
def test_loss_target_is_the_frozen_anchor_prediction(tiny):
    """L = ||eps(x, concept) - eps*(x, anchor)||^2 (+ w ||eps(x, a) - eps*(x, a)||^2), the anchor being the guide."""
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 4, 16, 16, generator=gen), torch.tensor([50, 400, 900])
    owners = torch.zeros(3, dtype=torch.long)
    spec = ConceptSpec(("van gogh",), guides=("painting",))

    loss = ca_loss(tiny, spec, CAConfig())
    assert loss.pool_prompts == ["painting"] and loss.anchors == []
    recorder = _Recorder(tiny, 0.0)
    value = loss(Batch(x, t, owners, torch.Generator().manual_seed(1)), recorder)
    concept = tiny.noise_prediction(x, t, tiny.encode_prompts(["van gogh"] * 3))
    anchor = tiny.noise_prediction(x, t, tiny.encode_prompts(["painting"] * 3))
    assert torch.allclose(value, torch.nn.functional.mse_loss(concept, anchor), rtol=1e-5, atol=1e-7)
    assert recorder.asked == {"trained": [["van gogh"] * 3], "frozen": [["painting"] * 3]}

    # With an anchor prompt the regularization term compares the trained and frozen predictions on it.
    loss = ca_loss(tiny, spec, CAConfig(anchor_prompts=("a cat",), anchor_weight=3.0))
    recorder = _Recorder(tiny, 0.1)
    value = loss(Batch(x, t, owners, torch.Generator().manual_seed(1)), recorder)
    expected = torch.nn.functional.mse_loss(concept + 0.1, anchor) + 3.0 * 0.01
    assert torch.allclose(value, expected, rtol=1e-5, atol=1e-7)
    assert recorder.asked["frozen"] == [["painting"] * 3 + ["a cat"] * 3]
    assert recorder.asked["trained"] == [["van gogh"] * 3 + ["a cat"] * 3]


def test_each_concept_is_paired_with_its_own_anchor(tiny):
    spec = ConceptSpec(("van gogh", "monet", "picasso"), guides=("painting", "art", "painting"))
    loss = ca_loss(tiny, spec, CAConfig())
    assert loss.pool_prompts == ["painting", "art"] and loss.concepts_of == [[0, 2], [1]]
    recorder = _Recorder(tiny, 0.0)
    x, t = torch.randn(6, 4, 16, 16), torch.full((6,), 500)
    with torch.no_grad():
        loss(Batch(x, t, torch.tensor([0, 1, 0, 1, 0, 0]), torch.Generator().manual_seed(2)), recorder)
    pairs = set(zip(recorder.asked["trained"][0], recorder.asked["frozen"][0], strict=True))
    assert pairs <= {("van gogh", "painting"), ("picasso", "painting"), ("monet", "art")}
    assert ("monet", "art") in pairs


@pytest.mark.slow
def test_default_adapts_only_cross_attention_keys_and_values_on_anchor_trajectories(tiny):
    artifact = erase_concepts(tiny, ConceptSpec(("van gogh",), guides=("painting",)), "ca", CAConfig(**FAST))
    names = set(artifact.deltas)
    assert names and all(name.endswith(("attn2.to_k", "attn2.to_v")) for name in names)
    assert {name.rsplit(".", 1)[1] for name in names} == {"to_k", "to_v"}
    assert len(names) == len(tiny.lora_modules(("*attn2.to_k", "*attn2.to_v")))
    assert artifact.info["pool_prompts"] == ["painting"] and artifact.info["variant"] == "kv"
    xattn = erase_concepts(tiny, ConceptSpec(("van gogh",), guides=("painting",)), "ca",
                           CAConfig(train="xattn", **FAST))  # fmt: skip
    assert {name.rsplit(".", 1)[1] for name in xattn.deltas} == {"to_q", "to_k", "to_v", "0"}


@pytest.mark.slow
def test_anchor_regularization_keeps_anchor_predictions_closer(tiny):
    """The same steps with and without the anchor term: the anchor prompt's prediction moves less with it."""
    x = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([100, 300, 600, 900])
    anchor = tiny.encode_prompts(["a photo of a cat"] * 4)
    original = tiny.noise_prediction(x, t, anchor).detach()
    moved = {}
    for weight in (0.0, 10.0):
        config = CAConfig(anchor_weight=weight, anchor_prompts=("a photo of a cat",), **{**FAST, "steps": 20})
        artifact = erase_concepts(tiny, ConceptSpec(("van gogh",), guides=("painting",)), "ca", config)
        with torch.no_grad(), tiny.weight_deltas(artifact.deltas):
            moved[weight] = float((tiny.noise_prediction(x, t, anchor) - original).norm())
        assert artifact.info["anchors"] == ["a photo of a cat"]
    assert moved[10.0] < moved[0.0], moved


@pytest.mark.slow
def test_erase_script_runs_ca_with_guide_and_preserve(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("erase_script", Path(__file__).parents[1] / "scripts" / "erase.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "vg"
    argv = ["--model", "tiny", "--concept", "van gogh", "--method", "ca", "--guide", "painting", "--no-check",
            "--preserve", "monet", "--out", str(out), "--json"]  # fmt: skip
    argv += ["--set", "steps=3", "--set", "pool_steps=3", "--set", "pool_images=1", "--set", "batch_size=2"]
    assert script.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "ca"
    meta = json.loads((out / "erasure.json").read_text())
    assert meta["config"]["anchor_prompts"] == ["monet"] and meta["guides"] == ["painting"]
    assert meta["info"]["pool_prompts"] == ["painting"] and meta["info"]["anchors"] == ["monet"]
