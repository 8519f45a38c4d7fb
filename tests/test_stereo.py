"""STEREO (erase/lora/stereo.py): settings, the reference's targets written out, the search rounds, the artifact in
plain diffusers, resuming."""

import dataclasses

import numpy as np
import pytest
import torch

import erase
from erase import ConceptSpec, erase_concepts
from erase.lora import stereo
from erase.lora.stereo import MICRO, StereoConfig, compositional_target, search_target

#: Seconds on tiny: two rounds, a few steps each.
FAST = dict(
    steps=6, lr=1e-2, pool_images=1, pool_steps=3, n_iterations=2, ste_steps=3, ste_lr=1e-2, ci_steps=4, ci_lr=2e-2,
    gallery_images=2, gallery_steps=3, eval_pairs=4, num_adv_concepts=2, composition_anchor_count=2,
)  # fmt: skip


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"n_iterations": 0}, "n_iterations"),
        ({"num_adv_concepts": 5}, "num_adv_concepts=5"),
        ({"negative_guidance": 1.0}, "negative_guidance"),
        ({"compositional_guidance": 0.5}, "compositional_guidance"),
        ({"gallery_images": 3}, "gallery_images=3"),
        ({"ci_steps": 0}, "ci_steps"),
        ({"ste_lr": 0.0}, "ste_lr"),
        ({"init_word": " "}, "init_word"),
        ({"composition_anchors": ("",)}, "composition_anchors"),
        ({"preset": "fast"}, "preset"),
        ({"train": "everything"}, "train"),
    ],
)
def test_bad_settings_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        StereoConfig(**bad)


def test_defaults_are_the_reference_code_and_micro_is_an_option():
    config = StereoConfig()
    reference = dict(n_iterations=4, ste_steps=200, ste_lr=5e-6, negative_guidance=2.0, ci_steps=3000, ci_lr=5e-3,
                     ci_batch=1, ci_weight_decay=1e-2, num_adv_concepts=4, compositional_guidance=2.0, lr=2e-5,
                     steps=200, pool_guidance=3.0, pool_steps=50)  # fmt: skip
    assert {k: getattr(config, k) for k in reference} == reference
    micro = StereoConfig(preset="micro", ci_steps=50)
    assert micro.ci_steps == 50  # set explicitly: kept
    assert all(getattr(micro, k) == v for k, v in MICRO.items() if k != "ci_steps")


def test_bad_settings_exit_2_in_one_line_before_the_model_loads(capsys):
    from erase.cli import main

    code = main(["--model", "micro", "--concept", "van gogh", "--method", "stereo", "--no-check",
                 "--set", "num_adv_concepts=6"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "num_adv_concepts=6" in err


def _project(v0, v1):
    """utils/apg.py's ``project``, written out: v0's parts along and across v1 (float64)."""
    v1 = torch.nn.functional.normalize(v1.double(), dim=[-1, -2, -3])
    parallel = (v0.double() * v1).sum(dim=[-1, -2, -3], keepdim=True) * v1
    return parallel, v0.double() - parallel


def test_targets_are_the_codes_apg_formulas_at_eta_1():
    """``normalized_compositional_guidance`` (erase conditions at scale -g, anchors at +g, each (scale - 1) times its
    APG-normalised difference, averaged within each sign, added to e_0) and ``normalized_guidance`` (e_p - (g - 1)
    times the normalised difference), written out from the reference's utils/apg.py."""
    gen = torch.Generator().manual_seed(0)
    e0, ea = torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64), torch.randn(2, 4, 8, 8, generator=gen)
    erased = [torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64) for _ in range(5)]
    ea = ea.double()
    for g in (2.0, 3.5):
        negative = torch.zeros_like(e0)
        for cond in erased:
            parallel, orthogonal = _project(cond - e0, cond)
            negative += (-g - 1) * (orthogonal + 1.0 * parallel)
        parallel, orthogonal = _project(ea - e0, ea)
        positive = (g - 1) * (orthogonal + 1.0 * parallel)
        reference = e0 + positive / 1 + negative / len(erased)
        assert torch.allclose(compositional_target(e0, [ea], erased, g), reference, atol=1e-12)
        parallel, orthogonal = _project(ea - e0, ea)
        assert torch.allclose(search_target(ea, e0, g), ea - (g - 1) * (orthogonal + parallel), atol=1e-12)
    assert torch.allclose(search_target(ea, e0, 2.0), e0)  # eta = g - 2 = 0: the target is the unconditional


@pytest.fixture(scope="module")
def tiny_module():
    from pipelines import load_pipeline

    return load_pipeline("tiny")


@pytest.mark.slow
def test_each_round_erases_the_previous_rounds_token_on_top_of_the_earlier_rounds(tiny_module):
    """Round 0 erases the concept's text, round i > 0 the token round i - 1 found, starting from the model the
    earlier rounds made: its LoRA moves that model's prediction on the token towards its target, and the model the
    inversion attacks is every round so far."""
    tiny = tiny_module
    config = StereoConfig(**{**FAST, "n_iterations": 3, "ste_steps": 8, "ste_lr": 3e-3, "gallery_images": 3})
    rounds = stereo.search_thoroughly(tiny, "van gogh", config)
    assert [r.erased for r in rounds] == ["van gogh", rounds[0].token.name, rounds[1].token.name]
    x = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([100, 300, 600, 900])
    uncond = tiny.encode_prompts([""] * 4)
    before: dict[str, torch.Tensor] = {}
    for i, r in enumerate(rounds):
        for name, delta in r.cumulative.items():
            assert torch.allclose(delta, before.get(name, 0) + r.edit.deltas[name].cpu(), atol=1e-7), name
        prompt = tiny.encode_prompts(["van gogh"] * 4) if i == 0 else stereo._token_encoding(tiny, rounds[i - 1].token)
        prompt = prompt.select([0] * 4)
        with torch.no_grad(), tiny.weight_deltas(before):
            target = search_target(tiny.noise_prediction(x, t, prompt), tiny.noise_prediction(x, t, uncond), 2.0)
            start = float((tiny.noise_prediction(x, t, prompt) - target).norm())
        with torch.no_grad(), tiny.weight_deltas(r.cumulative):
            end = float((tiny.noise_prediction(x, t, prompt) - target).norm())
        assert end < start, (i, start, end)
        before = r.cumulative
    assert all(r.token.vector.shape == (1, 32) for r in rounds)
    assert len({tuple(r.token.vector.reshape(-1).tolist()) for r in rounds}) == 3  # a new token every round


@pytest.mark.slow
def test_artifact_loads_in_plain_diffusers_and_reproduces_the_in_memory_model(tiny_module, tmp_path):
    """Stage 2's LoRA is the artifact: a fresh plain diffusers pipeline with ``load_lora_weights`` draws what the
    in-memory edit draws (float images within 1e-3), and the found tokens are in the artifact's JSON."""
    import json

    from pipelines.tiny import tiny_sd_pipeline

    tiny = tiny_module
    artifact = erase_concepts(tiny, ConceptSpec(("van gogh",)), "stereo", StereoConfig(**FAST))
    folder = erase.save_artifact(artifact, tmp_path / "vg", tiny)
    meta = json.loads((folder / "erasure.json").read_text())
    assert meta["weight_format"] == "lora" and len(meta["info"]["found_tokens"]) == 2
    assert meta["info"]["erase_set"] == ["van gogh", "<stereo van gogh 0>", "<stereo van gogh 1>"]
    assert [s["stage"] for s in meta["info"]["stages"]][-1] == "robust erase"

    def draw(pipe):
        pipe.set_progress_bar_config(disable=True)
        return np.stack([pipe("a painting by van gogh", generator=torch.Generator("cpu").manual_seed(s),
                              num_inference_steps=4, output_type="np").images[0] for s in (0, 1)])  # fmt: skip

    base = draw(tiny.pipe)
    with tiny.weight_deltas(artifact.deltas):
        in_memory = draw(tiny.pipe)
    plain = tiny_sd_pipeline(0)
    plain.load_lora_weights(str(folder))
    loaded = draw(plain)
    assert np.abs(loaded - in_memory).max() <= 1e-3
    assert np.abs(base - in_memory).max() > 1e-3  # the edit is visible, so the comparison means something


@pytest.mark.slow
def test_an_interrupted_run_resumed_equals_an_uninterrupted_one(tiny_module, tmp_path, monkeypatch):
    """Killed in round 1's inversion (after its checkpoint at step 2), the same call continues from the stages on
    disk and ends with the uninterrupted run's LoRA and tokens; another run's settings are refused there."""
    tiny = tiny_module
    spec = ConceptSpec(("van gogh",))
    whole = erase_concepts(tiny, spec, "stereo", StereoConfig(**FAST))
    folder = tmp_path / "ckpt"
    config = StereoConfig(**FAST, checkpoint_dir=str(folder), checkpoint_every=2)
    step = stereo.matching_step
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == FAST["ci_steps"] + 3:  # round 1's third step
            raise KeyboardInterrupt
        return step(*args, **kwargs)

    monkeypatch.setattr(stereo, "matching_step", dying)
    with pytest.raises(KeyboardInterrupt):
        erase_concepts(tiny, spec, "stereo", config)
    monkeypatch.setattr(stereo, "matching_step", step)
    stages = sorted(p.name for p in (folder / "concept-0").iterdir())
    assert stages == ["round-0-erase", "round-0-gallery.safetensors", "round-0-inversion.safetensors",
                      "round-1-erase", "round-1-gallery.safetensors", "round-1-inversion.safetensors"]  # fmt: skip
    resumed = erase_concepts(tiny, spec, "stereo", config)
    assert set(resumed.deltas) == set(whole.deltas)
    for name, delta in whole.deltas.items():
        assert (resumed.deltas[name] - delta).abs().max() <= 1e-6, name
    for a, b in zip(resumed.info["found_tokens"], whole.info["found_tokens"], strict=True):
        assert np.abs(np.array(a["embedding"]) - np.array(b["embedding"])).max() <= 1e-6
    again = erase_concepts(tiny, spec, "stereo", config)  # everything on disk: nothing trains again
    assert again.info["resumed_from_step"] == FAST["steps"]
    with pytest.raises(ValueError, match="another run"):  # a search setting
        erase_concepts(tiny, spec, "stereo", dataclasses.replace(config, ci_lr=1e-2))
    other = erase_concepts(tiny, spec, "stereo", dataclasses.replace(config, lr=3e-3, compositional_guidance=3.0))
    assert other.info["found_tokens"] == resumed.info["found_tokens"]
    assert len(list(folder.glob("stage-2-*"))) == 2  # stage 2 again in a folder of its own, on the search on disk
    assert any((other.deltas[n] - d).abs().max() > 1e-6 for n, d in whole.deltas.items())


@pytest.mark.parametrize("model", ["tiny-sdxl", pytest.param("tiny-sd3", marks=pytest.mark.slow),
                                   pytest.param("tiny-flux", marks=pytest.mark.slow)])  # fmt: skip
def test_a_found_token_holds_rows_of_every_encoder_and_its_prompt_keeps_the_pooled_vector(model):
    """Beyond SD 1.x a found token holds one token's input rows in every text encoder side by side (SDXL's two CLIPs,
    SD3's CLIPs and T5, Flux's CLIP and T5); its bare prompt, joined into the erase set, carries the pooled vector:
    with a real token's rows it is that word's own prompt."""
    from evals.attacks.concept_inversion import init_token
    from pipelines import load_pipeline

    wrapper, word = load_pipeline(model), "cat"
    vector = wrapper.token_rows([init_token(wrapper, word)]).float()
    encoders = [getattr(wrapper.pipe, f"text_encoder{s}", None) for s in ("", "_2", "_3")]
    assert vector.shape[1] == sum(e.get_input_embeddings().embedding_dim for e in encoders if e is not None)
    token = stereo.FoundToken("van gogh", 0, vector, [], 0.0, 0.0, 0.0, [])
    joined = stereo._join([wrapper.encode_prompts(["van gogh"]), stereo._token_encoding(wrapper, token)])
    plain = wrapper.encode_prompts(["van gogh", word])
    assert joined.prompts == ["van gogh", token.name] and joined.pooled.shape == plain.pooled.shape
    torch.testing.assert_close(joined.embeddings, plain.embeddings, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(joined.pooled, plain.pooled, atol=1e-5, rtol=1e-5)
