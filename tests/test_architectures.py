"""SD 2.x (v-prediction), SD3 and Flux through the pipeline wrapper, UCE on Flux against the reference formula, and
ESD on velocity predictions, on the tiny pipelines built in code."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

import erase
from erase.core.registry import ConceptSpec
from pipelines import load_pipeline
from pipelines.tokenizer import offline_t5_tokenizer


@pytest.fixture(scope="module")
def sd2():
    return load_pipeline("tiny-sd2")


@pytest.fixture(scope="module")
def sd3():
    return load_pipeline("tiny-sd3")


@pytest.fixture(scope="module")
def flux():
    return load_pipeline("tiny-flux")


def test_tiny_pipelines_say_what_they_are(sd2, sd3, flux):
    assert (sd2.architecture, sd2.prediction_type, sd2.denoiser_name) == ("sd", "v_prediction", "unet")
    assert (sd3.architecture, sd3.prediction_type, sd3.denoiser_name) == ("sd3", "flow", "transformer")
    assert (flux.architecture, flux.prediction_type, flux.denoiser_name) == ("flux", "flow", "transformer")
    with pytest.raises(TypeError, match="transformer, not a UNet"):
        flux.unet  # noqa: B018
    # the reference UCE-Flux script tells the pooled input from the token input by its width: 768 and not 768
    transformer = flux.denoiser.config
    assert transformer.pooled_projection_dim == 768 and transformer.joint_attention_dim != 768
    layers = {layer.name: layer.reads for layer in flux.cross_attention_layers()}
    assert layers == {"context_embedder": "tokens", "time_text_embed.text_embedder.linear_1": "pooled"}


def test_offline_t5_tokenizer_follows_t5_conventions_and_saves(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = offline_t5_tokenizer()
    ids = tokenizer("van gogh", padding="max_length", max_length=8)
    assert ids["input_ids"][2:4] == [tokenizer.eos_token_id, tokenizer.pad_token_id] == [1, 0]  # no BOS, </s>, <pad>
    assert sum(ids["attention_mask"]) == 3 and tokenizer.bos_token_id is None
    tokenizer.save_pretrained(tmp_path)
    assert (
        AutoTokenizer.from_pretrained(tmp_path)("a painting of a cat")["input_ids"]
        == tokenizer("a painting of a cat")["input_ids"]
    )


def test_prompt_positions_follow_the_position_tokenizer(sd3, flux):
    assert flux.text_length == 512  # FluxPipeline's default T5 length, the reference script's for FLUX.1-dev
    assert flux.phrase_positions("a painting by van gogh", "van gogh") == [3, 4]  # T5: no BOS, first word is row 0
    assert flux.last_token_position("van gogh") == 1 and flux.last_token_position("") == 511  # -1: last padding row
    enc3 = sd3.encode_prompts(["van gogh"])
    assert enc3.embeddings.shape == (1, 77 + 256, 96) and enc3.pooled.shape == (1, 64)
    assert sd3.phrase_positions("a painting by van gogh", "van gogh") == [4, 5]  # CLIP rows: BOS is row 0
    assert sd3.last_token_position("") == 0


@pytest.mark.parametrize("model", ["sd3", "flux"])
def test_prediction_is_what_the_pipeline_computes_at_recorded_inputs(model, request):
    """noise_prediction on a trajectory's recorded (x_t, t) reproduces the denoiser output of the pipeline's own call
    (conditional half), so training on trajectories trains what the pipeline samples with."""
    from pipelines.sampling import FLUX_EMBEDDED_GUIDANCE

    wrapper = request.getfixturevalue(model)
    outputs = []

    def keep(_module, _inputs, output):  # noqa: ANN001, ANN202
        outputs.append((output[0] if isinstance(output, tuple) else output.sample).detach())

    handle = wrapper.denoiser.register_forward_hook(keep)
    try:
        latents, timesteps = wrapper.sample_trajectories(["van gogh"], [3], steps=2, guidance=FLUX_EMBEDDED_GUIDANCE)
    finally:
        handle.remove()
    assert latents.shape == (1, 2, 4, 16, 16) and timesteps.shape == (2,)
    encoding = wrapper.encode_prompts(["van gogh"])
    for k in range(2):
        predicted = wrapper.noise_prediction(latents[:, k], timesteps[k], encoding)
        called = outputs[k][-1:]
        if called.dim() == 3:  # Flux's packed tokens
            called = wrapper.pipe._unpack_latents(called, 32, 32, wrapper.pipe.vae_scale_factor)
        assert predicted.shape == (1, 4, 16, 16)
        assert torch.allclose(predicted, called, atol=1e-4), (model, k)


def test_velocity_esd_target_is_the_noise_target_in_velocity_form():
    """Design note section 6: at one x_t, eps is affine in the prediction with coefficients shared by every
    condition, and ESD's target combines predictions with coefficients summing to 1, so the target computed on raw
    velocities (flow matching) or v (SD 2.x) is the noise-form target expressed in that form."""
    from erase.lora.esd import esd_target

    gen = torch.Generator().manual_seed(0)
    x_t, v_c, v_0 = (torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    eta = 1.7
    sigma = 0.6  # flow matching: x_t = (1 - sigma) x_0 + sigma eps, v = eps - x_0  =>  eps = x_t + (1 - sigma) v
    to_eps = lambda v: x_t + (1 - sigma) * v  # noqa: E731
    assert torch.allclose(to_eps(esd_target(v_c, v_0, eta)), esd_target(to_eps(v_c), to_eps(v_0), eta))
    alpha, s = 0.8, 0.6  # v-prediction: v = alpha eps - s x_0  =>  eps = alpha v + s x_t
    to_eps = lambda v: alpha * v + s * x_t  # noqa: E731
    assert torch.allclose(to_eps(esd_target(v_c, v_0, eta)), esd_target(to_eps(v_c), to_eps(v_0), eta))


def _reference_uce_flux(wrapper, edit, guides, preserve, erase_scale=1.0, preserve_scale=1.0, lamb=0.5):
    """``trainscripts/uce_flux_edit.py`` (rohitgandikota/unified-concept-editing) written out in float64: keys from
    ``pipe.encode_prompt`` (T5 row ``attention_mask.sum() - 2`` of ``tokenizer_2`` at length 512, or the pooled CLIP
    vector for the 768-input layer), targets ``module(c_guide)`` with the bias, and

        W_new = (lamb W + s_e sum v*_g c_i^T + s_p sum v*_j c_j^T) (lamb I + s_e sum c_i c_i^T + s_p sum c_j c_j^T)^-1
    """
    pipe = wrapper.pipe
    keys = {}
    for text in dict.fromkeys([*edit, *guides, *preserve]):
        t5, pooled, _ = pipe.encode_prompt(prompt=text, prompt_2=None, device="cpu", max_sequence_length=512)
        mask = pipe.tokenizer_2(text, padding="max_length", max_length=512, truncation=True, return_tensors="pt")
        index = int(mask["attention_mask"].sum()) - 2
        keys[text] = (t5[0, index].double(), pooled[0].double())
    # the reference's routing: the 768-input layer reads the pooled vector
    widths = {n: pipe.transformer.get_submodule(n).weight.shape[1] for n in ("context_embedder", _POOLED)}
    routed = {text: {n: [key[1 if w == 768 else 0]] for n, w in widths.items()} for text, key in keys.items()}
    return _uce_formula(wrapper, edit, guides, preserve, routed, erase_scale, preserve_scale, lamb)


_POOLED = "time_text_embed.text_embedder.linear_1"


def _uce_formula(wrapper, edit, guides, preserve, keys, erase_scale=1.0, preserve_scale=1.0, lamb=0.5):
    """The reference formula with bias-carrying targets, float64, per text projection; ``keys[text][module]`` lists
    the rows of ``text`` that projection reads (the k-th of a concept paired with the k-th of its guide)."""
    weights = {}
    for name in ("context_embedder", _POOLED):
        module = wrapper.pipe.transformer.get_submodule(name)
        w, b = module.weight.detach().double(), module.bias.detach().double()
        left, right = lamb * w, lamb * torch.eye(w.shape[1], dtype=torch.float64)
        for concept, guide in zip(edit, guides, strict=True):
            for c, g in zip(keys[concept][name], keys[guide][name], strict=True):
                left, right = left + erase_scale * torch.outer(w @ g + b, c), right + erase_scale * torch.outer(c, c)
        for concept in preserve:
            for c in keys[concept][name]:
                left = left + preserve_scale * torch.outer(w @ c + b, c)
                right = right + preserve_scale * torch.outer(c, c)
        weights[name] = left @ torch.linalg.inv(right)
    return weights


def _relative_gaps(wrapper, artifact, reference):
    gaps = {}
    for name, expected in reference.items():
        ours = wrapper.module(f"transformer.{name}").weight.detach().double() + artifact.deltas[f"transformer.{name}"]
        gaps[name] = float((ours - expected).norm() / expected.norm())  # ours: float32 weights plus the change
    return gaps


@pytest.mark.parametrize(
    "edit, guide, preserve",
    [
        (["van gogh"], "", []),
        pytest.param(["van gogh", "claude monet"], "art", ["a dog", "pablo picasso"], marks=pytest.mark.slow),
    ],
)
def test_uce_on_flux_equals_the_reference_formula(flux, edit, guide, preserve):
    """Our uce on Flux gives the reference's weights (relative Frobenius <= 1e-5): same layers, same keys (the empty
    guide's last *padding* row of T5 included), same bias-carrying targets (the bias direction is one more rank of
    the change)."""
    with torch.no_grad():
        reference = _reference_uce_flux(flux, edit, [guide] * len(edit), preserve)
    artifact = erase.erase_concepts(flux, ConceptSpec(tuple(edit), (guide,), tuple(preserve)), "uce")
    gaps = _relative_gaps(flux, artifact, reference)
    assert max(gaps.values()) <= 1e-5, gaps
    ranks = {name: a.shape[0] for name, (a, _) in artifact.payload("weights").lora_factors().items()}
    assert set(ranks.values()) == {len(edit) + 1}


def test_uce_on_sd3_edits_both_projections_and_both_token_streams(sd3):
    """SD3's ``context_embedder`` reads CLIP's rows and T5's: each prompt's last-token row of both streams (T5's at
    77 + its ``attention_mask.sum() - 2``) goes into its solve, the pooled vector into ``linear_1``'s; the edit equals
    the formula written out in float64, with exact low-rank factors (two erased rows and the bias direction)."""
    pipe, keys = sd3.pipe, {}
    with torch.no_grad():
        for text in ("van gogh", "", "a dog"):
            embeddings, _, pooled, _ = pipe.encode_prompt(text, None, None, device="cpu", max_sequence_length=256,
                                                          do_classifier_free_guidance=False)  # fmt: skip
            clip = int(pipe.tokenizer(text, padding="max_length", max_length=77)["attention_mask"].count(1)) - 2
            t5 = sum(pipe.tokenizer_3(text, padding="max_length", max_length=256)["attention_mask"]) - 2
            rows = [embeddings[0, clip].double(), embeddings[0, 77 + t5 % 256].double()]
            keys[text] = {"context_embedder": rows, _POOLED: [pooled[0].double()]}
    artifact = erase.erase_concepts(sd3, ConceptSpec(("van gogh",), preserve=("a dog",)), "uce")
    gaps = _relative_gaps(sd3, artifact, _uce_formula(sd3, ["van gogh"], [""], ["a dog"], keys))
    assert max(gaps.values()) <= 1e-5, gaps
    factors = artifact.payload("weights").lora_factors()
    ranks = {name.rpartition("transformer.")[2]: lora_a.shape[0] for name, (lora_a, _) in factors.items()}
    assert ranks == {"context_embedder": 3, _POOLED: 2}
    for name, (lora_a, lora_b) in factors.items():
        assert torch.allclose(lora_b @ lora_a, artifact.deltas[name], atol=1e-6)


def test_methods_declare_where_they_run_and_refuse_elsewhere_in_one_line(flux, monkeypatch):
    """Every shipped method runs on every architecture; one registered for SD 1.x/2.x alone (for the test) is
    refused on Flux in one line saying why, before its edit runs."""
    from erase.core import registry
    from pipelines import ARCHITECTURES

    for name in erase.available_methods():
        assert set(erase.get_method(name).capabilities.architectures) == set(ARCHITECTURES), name
    uce = erase.get_method("uce")
    only_sd = dataclasses.replace(uce.capabilities, architectures=("sd",), unported="its layers are UNet attention")
    ran = []
    method = dataclasses.replace(uce, name="sd_only", capabilities=only_sd, run=lambda *a: ran.append(a))
    monkeypatch.setitem(registry._REGISTRY, "sd_only", method)
    refusal = r"method 'sd_only' does not run on flux pipelines: its layers are UNet attention \(it runs on sd\)"
    with pytest.raises(ValueError, match=refusal):
        erase.erase_concepts(flux, ["van gogh"], "sd_only")
    assert not ran


@pytest.mark.slow
@pytest.mark.parametrize("method", ["uce", "esd"])
def test_erase_script_on_saved_sd3_and_flux_folders(method, tmp_path_factory, capsys):
    """``scripts/erase.py --model <folder> --no-check`` (its ``erase.cli.main``) for uce and esd on saved tiny SD3
    and Flux folders; the artifact loads with the pipeline's own ``load_lora_weights`` and its change equals the
    artifact's. ESD's LoRA sits on the joint attention's text side and trains on velocity predictions."""
    from diffusers import DiffusionPipeline

    from erase.cli import main
    from erase.core.artifact import load_artifact
    from pipelines.tiny import tiny_pipeline

    for name in ("tiny-sd3", "tiny-flux"):
        model = tmp_path_factory.getbasetemp() / f"model-{name}"
        if not model.exists():
            tiny_pipeline(name).save_pretrained(model)
        out = tmp_path_factory.mktemp("out") / f"{method}-{name}"
        quick = ["--set", "steps=2", "--set", "pool_images=1", "--set", "pool_steps=2"] if method == "esd" else []
        argv = ["--model", str(model), "--concept", "van gogh", "--method", method, "--no-check", "--out", str(out),
                "--quiet", *quick]  # fmt: skip
        assert main(argv) == 0, capsys.readouterr().err[-2000:]
        artifact = load_artifact(out)
        if method == "esd":
            assert all(".attn.add_" in n or ".attn.to_add_out" in n for n in artifact.layers)
        pipe = DiffusionPipeline.from_pretrained(model)
        modules = {n: pipe.transformer.get_submodule(n.partition(".")[2]) for n in artifact.layers}
        before = {n: m.weight.detach().clone() for n, m in modules.items()}
        pipe.load_lora_weights(out)
        pipe.fuse_lora()
        for layer, delta in artifact.deltas.items():
            change = modules[layer].weight.detach() - before[layer]
            assert torch.allclose(change, delta, atol=1e-3 * max(delta.abs().max().item(), 1e-6) + 1e-7), layer


@pytest.fixture
def sd_only_attack(monkeypatch):
    """An attack registered for SD 1.x/2.x and SDXL alone for the test (every shipped attack runs everywhere), so
    that the refusal of the others is exercised."""
    from evals.attacks import available_attacks, base
    from evals.attacks.ring_a_bell import RingABellConfig

    available_attacks()  # the shipped attacks first, so that the registry is complete when the test's joins it
    attack = base.Attack("sd_only", RingABellConfig, lambda target, config, seed: None, "a test attack", "embedding",
                         None, ("sd", "sdxl"), "its tokens are one CLIP's")  # fmt: skip
    monkeypatch.setitem(base._REGISTRY, "sd_only", attack)
    return attack


def test_attacks_declare_where_they_run_and_refuse_elsewhere_in_one_line(flux, sd_only_attack):
    """Every shipped attack runs on every architecture (the token attacks read CLIP's and T5's tokens, noise_probe
    re-samples the flow path); ``"all"`` on a kind of model means the attacks that run on it, a named one that does
    not is refused in one line, and so is a target of that kind."""
    from evals.attacks import AttackTarget, attack_probes, available_attacks, check_attack, get_attack, resolve_attacks
    from pipelines import ARCHITECTURES

    shipped = [n for n in available_attacks() if n != "sd_only"]
    for name in shipped:
        assert get_attack(name).architectures == ARCHITECTURES and get_attack(name).runs_on("flux")
    assert resolve_attacks(["all"], "flux") == shipped
    assert resolve_attacks(["all"], "sd") == resolve_attacks(["all"]) == available_attacks()
    with pytest.raises(ValueError, match="attack 'sd_only' does not run on Flux pipelines: ") as refused:
        resolve_attacks(["ring_a_bell", "sd_only"], "flux")
    assert "\n" not in str(refused.value) and sd_only_attack.unported in str(refused.value)
    target = AttackTarget(flux, lambda w: contextlib.nullcontext(), "van gogh", attack_probes("van gogh", 1))
    with pytest.raises(ValueError, match="attack 'sd_only' does not run on Flux pipelines"):
        check_attack("sd_only", target)


def test_attack_script_refuses_an_attack_the_model_does_not_run_before_loading_it(flux, sd_only_attack, tmp_path,
                                                                                   capsys):  # fmt: skip
    """``scripts/attack.py`` on tiny Flux: a named attack Flux does not run is one line, exit 2, with no output
    folder made, before the scorer or the model loads (the name, or a folder's ``model_index.json``, says Flux)."""
    import json
    import runpy

    from pipelines import model_architecture

    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    assert model_architecture(str(tmp_path / "folder")) == "flux" and model_architecture("tiny-sd3") == "sd3"
    assert model_architecture("micro") == "sd" and model_architecture("owner/hub-id") is None
    erase.save_artifact(erase.erase_concepts(flux, ConceptSpec(("van gogh",)), "uce"), tmp_path / "uce", flux)
    main = runpy.run_path("scripts/attack.py", run_name="attack_script")["main"]
    capsys.readouterr()
    out = tmp_path / "out-sd_only"
    argv = ["--erasure", str(tmp_path / "uce"), "--model", "tiny-flux", "--attack", "sd_only", "--out", str(out)]
    assert main([*argv, "--scorer", "no-such-scorer", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: attack 'sd_only' does not run on Flux pipelines:") and "\n" not in err
    assert not out.exists()


@pytest.mark.parametrize("model", ["flux", pytest.param("sd3", marks=pytest.mark.slow)])
def test_rece_embedding_restores_both_text_projections_of_a_transformer(model, request):
    """On SD3/Flux the attack maps the token rows through ``context_embedder``'s solve and the pooled vector through
    ``linear_1``'s: each undoes nearly all of uce's change to its projection (a small ridge: the tiny projections'
    smallest singular values are near the default lambda's scale)."""
    from evals.attacks import AttackTarget, attack_probes, run_attack
    from evals.attacks.rece_embedding import ReceEmbeddingConfig

    wrapper = request.getfixturevalue(model)
    uce = erase.erase_concepts(wrapper, ConceptSpec(("van gogh",)), "uce")
    target = AttackTarget(wrapper, uce.applied, "van gogh", attack_probes("van gogh", 2, 1), steps=2, progress=False)
    result = run_attack("rece_embedding", target, ReceEmbeddingConfig(regularization=1e-6), seed=0)
    info = result.info
    assert len(result.images) == 2 and info["layers_matched"] == info["layers_edited"] == 2
    assert info["restored_share"] > 0.99 and info["restored_share_pooled"] > 0.99, info
    assert result.embeddings.shape[-1] == wrapper.denoiser.config.joint_attention_dim


def test_lora_patterns_name_each_text_encoder_by_its_component(sd2, sd3):
    """``text_encoder_2.<pattern>`` adapts the second text encoder (SD3's CLIP-G here); a pipeline without one says so
    in one line."""
    names = sd3.lora_modules(["*attn.add_k_proj", "text_encoder.*q_proj", "text_encoder_2.*q_proj"])
    assert {n.partition(".")[0] for n in names if n.startswith("text_encoder")} == {"text_encoder", "text_encoder_2"}
    assert all(n.startswith("transformer_blocks.") for n in names if not n.startswith("text_encoder"))
    with pytest.raises(ValueError, match="^LoRA patterns name text_encoder_2 modules, but the pipeline has no "):
        sd2.lora_modules(["text_encoder_2.*q_proj"])


@pytest.mark.parametrize(
    "model, hook",
    [
        ("sd3", "transformer.transformer_blocks.0"),
        pytest.param("flux", "transformer.single_transformer_blocks.0", marks=pytest.mark.slow),
    ],
)
def test_an_sae_trains_on_a_transformer_block_and_edits_its_image_tokens(model, hook, request, tmp_path):
    """SD3/Flux transformer blocks are hook points: their activations are the image tokens (not the text ones) at
    every sampling step, a tiny SAE trains on them, and an output edit there reaches the prediction (the identity
    edit bit for bit)."""
    from erase.sae.sae import SAETrainConfig, build_sae, load_sae

    wrapper = request.getfixturevalue(model)
    assert hook in wrapper.hook_points()
    config = wrapper.denoiser.config
    width, image_tokens = wrapper.hook_width(hook), (16 // config.patch_size) ** 2 if model == "sd3" else 8 * 8
    acts, timesteps = wrapper.unet_activations(hook, ["van gogh", "a red star"], [0, 1], steps=2)
    assert acts.shape == (2, 2, image_tokens, width) and timesteps.shape == (2,)
    prompts = ["van gogh", "a red star", "a blue house at night", "a boat on a river"]
    settings = SAETrainConfig(expansion=2, k=4, batch_size=128, epochs=2, dead_tokens=500)
    build_sae(wrapper, hook, prompts, tmp_path / "sae", settings, steps=2, guidance=2.0)
    sae, meta = load_sae(tmp_path / "sae")
    assert sae.d_in == width and meta["hook_point"] == hook and meta["collection"]["steps"] == 2
    assert meta["collection"]["tokens"] == len(prompts) * 2 * image_tokens
    latents, t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    encoding = wrapper.encode_prompts(["van gogh"])
    with torch.no_grad():
        before = wrapper.noise_prediction(latents, t, encoding)
        with wrapper.add_output_edit(hook, lambda tokens, _t: tokens):
            same = wrapper.noise_prediction(latents, t, encoding)
        with wrapper.add_output_edit(hook, lambda tokens, _t: sae(tokens.float()).to(tokens.dtype)):
            reconstructed = wrapper.noise_prediction(latents, t, encoding)
    assert torch.equal(same, before) and (reconstructed - before).abs().max() > 0
