"""Checks every registered erasure method gets, table-driven over the registry."""

import fnmatch
import json

import numpy as np
import pytest
import torch

import erase
from erase import ConceptSpec, erase_concepts


def _pixels(images):
    return np.stack([np.asarray(i, dtype=np.float32) for i in images])


def _method_param(name: str):
    """A method as a test parameter; slow: the trained ones and rece (its adversarial-embedding search), seconds to a
    minute each on tiny."""
    slow = erase.get_method(name).capabilities.training or name == "rece"
    return pytest.param(name, marks=pytest.mark.slow if slow else ())


@pytest.fixture(params=[_method_param(m) for m in erase.available_methods() if not erase.get_method(m).runtime])
def method(request):
    """Every weight-editing method (the runtime family, which edits no weight, is tested in test_sae.py)."""
    return request.param


def _fast_config(method):
    """The method's declared quick config (``Capabilities.quick``): seconds on tiny."""
    return erase.get_method(method).quick_config()


def _edited_patterns(method):
    """The module-name patterns a method's default config edits: K/V for closed forms, the config's for LoRA."""
    config = _fast_config(method)
    return getattr(config, "patterns", None) or getattr(config, "layers", None) or ("*attn2.to_k", "*attn2.to_v")


def test_every_method_declares_what_it_can_do_and_registration_checks_it():
    """Methods are found in their family packages, and their capabilities name fields their configs have."""
    from erase.core.registry import Capabilities

    runtime = {m for m in erase.available_methods() if erase.get_method(m).runtime}
    assert {"uce", "time", "rece", "esd", "ca", "spm"} <= set(erase.available_methods()) - runtime
    for name in erase.available_methods():
        method = erase.get_method(name)
        assert method.runtime == (method.family == "runtime")
        config = method.quick_config()
        assert config is None or isinstance(config, method.config_class)
    spec = erase.get_method("uce")
    with pytest.raises(ValueError, match="does not have"):
        erase.register_method("other", spec.config_class, "closed_form", capabilities=Capabilities(templates="nope"))
    with pytest.raises(ValueError, match="does not have"):
        erase.register_method("other", spec.config_class, "closed_form", capabilities=Capabilities(quick={"x": 1}))


def test_registry_lists_methods_and_refuses_duplicates():
    assert {"uce", "time"} <= set(erase.available_methods())
    spec = erase.get_method("uce")
    with pytest.raises(ValueError, match="already registered"):
        erase.register_method("uce", spec.config_class, "closed_form")(spec.run)
    with pytest.raises(ValueError, match="unknown erasure method"):
        erase.get_method("nope")


def test_method_changes_target_and_leaves_other_modules_bit_identical(tiny, method):
    before = {k: v.clone() for k, v in tiny.pipe.unet.state_dict().items()}
    text_before = {k: v.clone() for k, v in tiny.pipe.text_encoder.state_dict().items()}
    artifact = erase_concepts(tiny, ConceptSpec(("van gogh",), preserve=("monet",)), method, _fast_config(method))
    # Methods return the change; the pipeline is untouched until it is applied.
    assert all(torch.equal(v, tiny.pipe.unet.state_dict()[k]) for k, v in before.items())
    # UNet modules by their path, text-encoder modules qualified (as LoRA patterns name them)
    names = [name.removeprefix("unet.") for name in artifact.deltas]
    patterns = _edited_patterns(method)
    assert all(any(fnmatch.fnmatchcase(name, p) for p in patterns) for name in names)
    edited = {name + ".weight" for name in names if not name.startswith("text_encoder.")}
    text_edited = {n.removeprefix("text_encoder.") + ".weight" for n in names if n.startswith("text_encoder.")}
    base = _pixels(tiny.generate(["a painting by van gogh"], [0], steps=3, progress=False))
    if artifact.payload("transport") is not None:  # facilitated transport: applied as hooks, the weights stay
        tiny.apply_weight_deltas(artifact.deltas)
    else:
        erase.load(tiny, artifact)
    after_state = tiny.pipe.unet.state_dict()
    for key, value in before.items():
        if key in edited:
            assert not torch.equal(value, after_state[key]), key
        else:
            assert torch.equal(value, after_state[key]), key
    text_after = tiny.pipe.text_encoder.state_dict()
    assert all(torch.equal(v, text_after[k]) != (k in text_edited) for k, v in text_before.items())
    erased = _pixels(tiny.generate(["a painting by van gogh"], [0], steps=3, progress=False))
    assert np.abs(base - erased).max() > 1


def test_save_load_round_trip(tiny, method, tmp_path):
    artifact = erase_concepts(tiny, ConceptSpec(("van gogh", "monet")), method, _fast_config(method))
    erase.save_artifact(artifact, tmp_path / "a", tiny)
    loaded = erase.load_artifact(tmp_path / "a")
    assert loaded.method == method and loaded.concepts == ["van gogh", "monet"]
    assert loaded.base_fingerprint == artifact.base_fingerprint
    for name, delta in artifact.deltas.items():
        assert torch.allclose(loaded.deltas[name], delta, atol=1e-4), name


def test_method_config_validation_names_the_bad_value(method):
    config_class = erase.get_method(method).config_class
    bad = "lr" if erase.get_method(method).capabilities.training else "lamb"
    with pytest.raises(ValueError, match="-1"):
        config_class(**{bad: -1.0})
    with pytest.raises(ValueError, match="layers"):
        config_class(layers=())


def test_uce_update_solves_the_papers_equation():
    """W (I + U V) equals the paper's (sum v* c^T + sum W c c^T + lambda W)(sum c c^T + sum c c^T + lambda I)^-1."""
    from erase.closed_form.uce import uce_update

    gen = torch.Generator().manual_seed(0)
    d, out = 12, 7
    w = torch.randn(out, d, generator=gen, dtype=torch.float64)
    c_e, c_g = (
        torch.randn(5, d, generator=gen, dtype=torch.float64),
        torch.randn(5, d, generator=gen, dtype=torch.float64),
    )
    c_p = torch.randn(9, d, generator=gen, dtype=torch.float64)
    s_e, s_p, lamb = 1.5, 0.3, 0.5
    v_star = c_g @ w.T
    left = s_e * v_star.T @ c_e + s_p * w @ c_p.T @ c_p + lamb * w
    right = s_e * c_e.T @ c_e + s_p * c_p.T @ c_p + lamb * torch.eye(d, dtype=torch.float64)
    expected = left @ torch.linalg.inv(right)
    u, v = uce_update(c_e, c_g, c_p, s_e, s_p, lamb)
    assert torch.allclose(w @ (torch.eye(d, dtype=torch.float64) + u @ v), expected, atol=1e-10)
    # With a tiny ridge and no preserve set, erased embeddings land exactly on their guides' values.
    u, v = uce_update(c_e, c_g, None, 1.0, 0.0, 1e-9)
    assert torch.allclose((w @ (torch.eye(d, dtype=torch.float64) + u @ v)) @ c_e.T, w @ c_g.T, atol=1e-5)


@pytest.mark.slow
def test_uce_erases_twenty_concepts_at_once(tiny_sdxl):
    """Each of 20 targets' edited embeddings maps (nearly) where its own guide's does; a preserved concept keeps its
    mapping. Two embeddings per prompt ("last": last token and EOS) keep the 40 rows within tiny SDXL's 64 dims."""
    from erase.closed_form.uce import UCEConfig, concept_embeddings

    targets = tuple(f"concept number {i}" for i in range(20))
    guides = tuple(f"guide number {i}" for i in range(20))
    config = UCEConfig(token_positions="last", lamb=1e-3)
    spec = ConceptSpec(targets, guides=guides, preserve=("a house",))
    artifact = erase_concepts(tiny_sdxl, spec, "uce", config)
    c_e, c_g = concept_embeddings(tiny_sdxl, targets, guides, config)
    c_p, _ = concept_embeddings(tiny_sdxl, ("a house",), None, config)
    assert c_e.shape[0] == 40
    for name, delta in artifact.deltas.items():
        w = tiny_sdxl.module(name).weight.detach().double()
        w_new = w + delta.double()
        before = (c_e @ w.T - c_g @ w.T).norm(dim=1)
        after = (c_e @ w_new.T - c_g @ w.T).norm(dim=1)
        assert (after < 0.05 * before).all(), name  # every one of the 20, not just on average
        assert (c_p @ w_new.T - c_p @ w.T).norm() < 0.05 * (c_p @ w.T).norm(), name


def _reference_uce_weights(pipe, edit, guides, preserve, erase_scale=1.0, preserve_scale=1.0, lamb=0.5):
    """The reference UCE script's closed form (trainscripts/uce_sd_erase.py), written out independently of
    erase.closed_form.uce and evaluated in float64: one embedding per prompt, at attention_mask.sum() - 2 (the last
    real token; BOS for the empty prompt), and per K/V module W_new = (lamb W + sum v* c^T)(lamb I + sum c c^T)^-1."""
    embeds = {}
    for text in {*edit, *guides, *preserve}:
        emb = pipe.encode_prompt(text, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)[0]
        mask = pipe.tokenizer(text, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt")["attention_mask"]  # fmt: skip
        embeds[text] = emb[0, int(mask.sum()) - 2].double()
    weights = {}
    for name, module in pipe.unet.named_modules():
        if "attn2" in name and name.endswith(("to_k", "to_v")):
            w = module.weight.detach().double()
            mat1, mat2 = lamb * w, lamb * torch.eye(w.shape[1], dtype=torch.float64)
            for concept, guide in zip(edit, guides, strict=True):
                c, v_star = embeds[concept][:, None], w @ embeds[guide][:, None]
                mat1, mat2 = mat1 + erase_scale * v_star @ c.T, mat2 + erase_scale * c @ c.T
            for concept in preserve:
                c = embeds[concept][:, None]
                mat1, mat2 = mat1 + preserve_scale * (w @ c) @ c.T, mat2 + preserve_scale * c @ c.T
            weights[f"unet.{name}"] = mat1 @ torch.linalg.inv(mat2)
    return weights


@pytest.mark.parametrize(
    "model, edit, guides, preserve",
    [
        ("micro", ("van gogh",), ("art",), ()),
        ("micro", ("van gogh", "monet"), ("art", "art"), ("picasso", "a red star")),
        ("tiny", ("van gogh",), ("",), ("claude monet",)),
    ],
)
def test_uce_defaults_are_the_reference_closed_form(model, edit, guides, preserve):
    """Our default UCE weights within 1e-5 (relative Frobenius) of the reference formula in float64."""
    from pipelines import load_pipeline, micro_model_path

    if model == "micro" and not (micro_model_path() / "model_index.json").is_file():
        pytest.skip("micro model not built")
    wrapper = load_pipeline(model)
    artifact = erase_concepts(wrapper, ConceptSpec(edit, guides=guides, preserve=preserve), "uce")
    reference = _reference_uce_weights(wrapper.pipe, edit, guides, preserve)
    assert set(reference) == set(artifact.deltas)
    for name, expected in reference.items():
        ours = wrapper.module(name).weight.detach().double() + artifact.deltas[name].double()
        assert (ours - expected).norm() / expected.norm() <= 1e-5, name
        # and the change itself, which is small against W, agrees too
        change = expected - wrapper.module(name).weight.detach().double()
        assert (artifact.deltas[name].double() - change).norm() / change.norm() <= 1e-4, name


@pytest.mark.slow
def test_audit_script_takes_lora_artifacts_unchanged(tmp_path, clip_dir, capsys):
    """``scripts/audit.py --erasure`` on LoRA artifacts as ``scripts/erase.py`` saves them: esd (cross-attention)
    and spm (every transformer-block Linear, rank 1), side by side in one audit."""
    import runpy
    from pathlib import Path

    from pipelines import load_pipeline

    tiny = load_pipeline("tiny")
    folders = []
    for method in ("esd", "spm"):
        artifact = erase_concepts(tiny, ConceptSpec(("van gogh",)), method, _fast_config(method))
        folders.append(erase.save_artifact(artifact, tmp_path / method, tiny))
    prompts = tmp_path / "p.csv"
    prompts.write_text(
        "prompt,seed,concept,category,role\na painting by van gogh,1,van gogh,style,target\n"
        "a painting by monet,2,monet,style,neighbour\na red star,3,star,object,unrelated\n"
    )
    script = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "audit.py"), run_name="audit_script")
    args = ["--model", "tiny", "--scorer", str(clip_dir), "--prompts", str(prompts)]
    args += [a for folder in folders for a in ("--erasure", str(folder))]
    out = tmp_path / "audit"
    assert script["main"]([*args, "--steps", "2", "--images-per-prompt", "1", "--quiet", "--out", str(out)]) == 0
    saved = json.loads((out / "metrics.json").read_text())
    original, *erased = saved["models"]
    assert [m["artifact"]["method"] for m in erased] == ["esd", "spm"] and (out / "report.html").is_file()
    assert all(m["vs_original"]["image_similarity"]["all"]["n"] == 3 for m in erased)


def test_set_values_read_as_json_or_as_python_spells_them():
    from erase.core.inputs import parse_config_overrides

    parsed = parse_config_overrides(["a=False", "b=true", "c=None", "d=[1, 2]", "e=van gogh", "f=1e-3", "g= True "])
    assert parsed == {"a": False, "b": True, "c": None, "d": (1, 2), "e": "van gogh", "f": 1e-3, "g": True}
    spm = erase.get_method("spm").config_class
    assert spm(**parse_config_overrides(["facilitated_transport=False"])).facilitated_transport is False
