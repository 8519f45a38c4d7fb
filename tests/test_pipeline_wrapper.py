import numpy as np
import pytest
import torch

from pipelines import ModelNotFoundError, load_pipeline


def _pixels(images):
    return np.stack([np.asarray(i, dtype=np.int16) for i in images])


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl"])
def test_loads_and_generates(model):
    wrapper = load_pipeline(model)
    images = wrapper.generate(["a red star", "a blue moon"], [0, 1], steps=2, progress=False)
    assert len(images) == 2 and images[0].size == (wrapper.image_size, wrapper.image_size)
    assert wrapper.is_sdxl == (model == "tiny-sdxl")


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl"])
def test_same_prompt_and_seed_same_image_whatever_the_batch(model):
    wrapper = load_pipeline(model)
    alone = _pixels(wrapper.generate(["a red star"], [7], steps=3, progress=False))
    prompts, seeds = ["a cat", "a red star", "a dog"], [1, 7, 2]
    batch = _pixels(wrapper.generate(prompts, seeds, steps=3, batch_size=3, progress=False))
    assert np.abs(alone[0] - batch[1]).max() <= 2
    other_seed = _pixels(wrapper.generate(["a red star"], [8], steps=3, progress=False))
    assert np.abs(alone - other_seed).max() > 2


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["EulerAncestralDiscreteScheduler", "sde-dpmsolver++"])
def test_stochastic_samplers_draw_their_step_noise_from_the_seed(sampler):
    """A sampler that adds noise at each step (the micro model ships one) must not make images depend on the global
    RNG or on the batch: the step noise comes from each image's seed, as a plain ``pipe(generator=...)`` draws it."""
    import diffusers
    from diffusers import StableDiffusionPipeline

    wrapper = load_pipeline("tiny")
    config = wrapper.pipe.scheduler.config
    if sampler == "sde-dpmsolver++":
        wrapper.pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(config, algorithm_type=sampler)
    else:
        wrapper.pipe.scheduler = getattr(diffusers, sampler).from_config(config)
    torch.manual_seed(0)
    alone = _pixels(wrapper.generate(["a red star"], [7], steps=4, progress=False))
    torch.manual_seed(1)
    batch = _pixels(wrapper.generate(["a cat", "a red star"], [1, 7], steps=4, batch_size=2, progress=False))
    assert np.abs(alone[0] - batch[1]).max() <= 2
    plain = StableDiffusionPipeline(**wrapper.pipe.components)
    plain.set_progress_bar_config(disable=True)
    out = plain(
        "a red star", num_inference_steps=4, generator=torch.Generator("cpu").manual_seed(7), output_type="np"
    ).images[0]
    assert np.abs(alone[0] - (np.clip(out, 0, 1) * 255).round()).max() <= 2


def test_cross_attention_layers_by_name(tiny):
    layers = tiny.cross_attention_layers()
    assert layers and all(layer.name.split(".")[-2] == "attn2" for layer in layers)
    assert {layer.name.split(".")[-1] for layer in layers} == {"to_k", "to_v"}
    assert all(layer.in_features == tiny.pipe.text_encoder.config.hidden_size for layer in layers)
    only_keys = tiny.cross_attention_layers(["*attn2.to_k"])
    assert len(only_keys) == len(layers) // 2
    with pytest.raises(ValueError, match="no UNet module matches"):
        tiny.cross_attention_layers(["*attn9.to_q"])


def test_sdxl_embeddings_concatenate_both_encoders(tiny_sdxl):
    enc = tiny_sdxl.encode_prompts(["a red star"])
    assert enc.embeddings.shape == (1, 77, 64) and enc.pooled.shape == (1, 32)
    assert tiny_sdxl.cross_attention_layers()[0].in_features == 64


def test_encoding_positions_and_noise_prediction(tiny):
    enc = tiny.encode_prompts(["a red star in the style of van gogh", "a cat"])
    assert enc.embeddings.shape == (2, 77, 32)
    assert enc.lengths.tolist() == [11, 4]
    pos = tiny.phrase_positions("a red star in the style of van gogh", "van gogh")
    ids = enc.input_ids[0, pos].tolist()
    assert tiny.pipe.tokenizer.decode(ids).strip() == "van gogh"
    eps = tiny.noise_prediction(tiny.initial_latents(0), 500, tiny.encode_prompts(["x"]))
    assert eps.shape == tiny.initial_latents(0).shape and torch.isfinite(eps).all()


def test_prompt_checks(tiny):
    with pytest.raises(ValueError, match="empty"):
        tiny.check_prompt("   ")
    with pytest.raises(ValueError, match="tokens"):
        tiny.check_prompt("word " * 100)
    assert tiny.check_prompt("  van gogh ") == "van gogh"


@pytest.mark.slow
def test_capture_and_intervene_remove_their_hooks(tiny):
    name = "unet." + tiny.cross_attention_layers()[0].name
    module = tiny.module(name)
    with tiny.capture([name]) as seen:
        tiny.generate(["a star"], [0], steps=2, progress=False)
    assert seen[name] and not module._forward_hooks
    base = _pixels(tiny.generate(["a star"], [0], steps=2, progress=False))
    with tiny.intervene({name: lambda out: out * 0}):
        zeroed = _pixels(tiny.generate(["a star"], [0], steps=2, progress=False))
    assert not module._forward_hooks and np.abs(base - zeroed).max() > 0
    with pytest.raises(RuntimeError), tiny.intervene({name: lambda out: out}):
        raise RuntimeError("boom")
    assert not module._forward_hooks


def test_missing_models_fail_with_one_line(tmp_path):
    with pytest.raises(ModelNotFoundError, match="model_index.json"):
        load_pipeline(str(tmp_path))
    with pytest.raises(ModelNotFoundError) as err:
        load_pipeline("no-such-org/no-such-model")
    assert "\n" not in str(err.value)
    with pytest.raises(ModelNotFoundError, match="does not exist"):  # a path, not a hub id: known without the hub
        load_pipeline(str(tmp_path / "models" / "sd"))


def test_a_step_count_the_sampler_cannot_run_is_one_clear_error(tmp_path):
    """SD 1.x ships PNDM, which cannot run fewer than 4 steps: a ValueError naming it, before any work."""
    from diffusers import PNDMScheduler

    from erase.workflow import run_erase

    wrapper = load_pipeline("tiny")
    wrapper.pipe.scheduler = PNDMScheduler.from_config(wrapper.pipe.scheduler.config)
    wrapper.check_sampler_steps(4)
    with pytest.raises(ValueError, match="PNDMScheduler\\) cannot run 2 steps"):
        wrapper.generate(["a cat"], [0], steps=2, progress=False)
    overrides = {"steps": 1, "pool_steps": 2, "pool_images": 1}
    with pytest.raises(ValueError, match="cannot run 2 steps"):
        run_erase(wrapper, ["van gogh"], method="esd", out=tmp_path / "o", check=False, config_overrides=overrides)
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------- pipelines.modules
def test_modules_by_qualified_name_and_by_pattern(tiny):
    from pipelines import CROSS_ATTENTION_PATTERNS, LORA_TARGETS

    assert tiny.module("unet") is tiny.unet
    with pytest.raises(KeyError, match="no pipeline component 'unett'"):
        tiny.module("unett.mid_block")
    with pytest.raises(KeyError, match="no module 'unet.mid_block.nowhere'"):
        tiny.module("unet.mid_block.nowhere")
    assert set(tiny.components()) >= {"unet", "vae", "text_encoder"} and "scheduler" not in tiny.components()
    # the "kv" LoRA targets are the cross-attention layers a closed-form edit reaches
    assert tiny.lora_modules(LORA_TARGETS["kv"]) == sorted(
        layer.name for layer in tiny.cross_attention_layers(CROSS_ATTENTION_PATTERNS)
    )
    transformer = tiny.lora_modules(LORA_TARGETS["transformer"])
    assert set(tiny.lora_modules(LORA_TARGETS["xattn"])) < set(transformer)
    with pytest.raises(ValueError, match="no UNet Linear module matches"):
        tiny.lora_modules(["*conv_nowhere"])


# ---------------------------------------------------------------------------------------------- pipelines.text
def test_prompt_encodings_select_rows_and_tokens_decode_back(tiny):
    encoding = tiny.encode_prompts(["a cat", "a red star"])
    picked = encoding.select([1, 1, 0])
    assert picked.prompts == ["a red star", "a red star", "a cat"]
    assert torch.equal(picked.embeddings[0], encoding.embeddings[1]) and picked.lengths.tolist() == [5, 5, 4]
    tokenizer = tiny.pipe.tokenizer
    assert {tokenizer.bos_token_id, tokenizer.eos_token_id} <= tiny.special_token_ids()
    ids = encoding.input_ids[1, : encoding.lengths[1]]
    assert tiny.decode_tokens(ids) == "a red star"  # BOS and EOS dropped
    assert tiny.token_count("a red star") == 3 == int(encoding.lengths[1]) - 2


# ---------------------------------------------------------------------------------------------- pipelines.sampling
def test_guidance_halves_inside_a_guided_call_only(tiny):
    """The UNet's batch is [unconditional; conditional] inside a guided pipeline call, and a plain batch inside
    ``noise_prediction`` or an unguided call: what a per-prompt LoRA's strengths depend on."""
    seen = []
    handle = tiny.unet.register_forward_pre_hook(lambda *_: seen.append(tiny.guidance_halves()))
    try:
        tiny.generate(["a cat"], [0], steps=2, guidance=7.5, progress=False)
        guided, seen[:] = list(seen), []
        # after a guided call the pipeline still reports guidance; a direct UNet call is a plain batch all the same
        tiny.noise_prediction(tiny.initial_latents(0), 500, tiny.encode_prompts(["a cat"]))
        direct, seen[:] = list(seen), []
        tiny.generate(["a cat"], [0], steps=2, guidance=1.0, progress=False)
    finally:
        handle.remove()
    assert guided == [True, True] and direct == [False] and seen == [False, False]


def test_ddim_sampling_swaps_the_scheduler_for_the_call_only(tiny):
    from diffusers import EulerDiscreteScheduler

    tiny.pipe.scheduler = EulerDiscreteScheduler.from_config(tiny.pipe.scheduler.config)
    original = tiny.pipe.scheduler
    own = _pixels(tiny.generate(["a cat"], [0], steps=3, progress=False))
    ddim = _pixels(tiny.generate(["a cat"], [0], steps=3, eta=0.0, progress=False))
    assert tiny.pipe.scheduler is original and np.abs(own - ddim).max() > 0
    with pytest.raises(ValueError, match="eta must be in"):
        tiny.generate(["a cat"], [0], steps=3, eta=1.5, progress=False)
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        tiny.generate(["a cat", "a dog"], [0], steps=3, progress=False)
    assert tiny.pipe.scheduler is original


# ---------------------------------------------------------------------------------------------- pipelines.weights
def test_weight_edits_are_all_or_nothing_and_undone_exactly(tiny):
    first, second = (f"unet.{layer.name}" for layer in tiny.cross_attention_layers()[:2])
    before = {name: tiny.module(name).weight.detach().clone() for name in (first, second)}
    fingerprint = tiny.fingerprint([first, second])
    delta = torch.randn_like(before[first]) * 0.1
    with pytest.raises(ValueError, match="weight change of shape"):
        tiny.apply_weight_deltas({first: delta, second: torch.zeros(3, 3)})
    assert torch.equal(tiny.module(first).weight, before[first])  # nothing changed: the bad shape came second
    with tiny.weight_deltas({first: delta}):
        assert torch.allclose(tiny.module(first).weight, before[first] + delta)
        assert tiny.fingerprint([first, second]) != fingerprint
    assert torch.equal(tiny.module(first).weight, before[first]) and tiny.fingerprint([first, second]) == fingerprint
    norms = tiny.weight_norms([first])
    assert norms[first] == pytest.approx(float(before[first].double().norm()))
    assert tiny.parameter_norm(first) >= norms[first]  # the bias, where there is one, adds to the weight's norm


def test_a_saved_lora_reproduces_the_change_in_plain_diffusers(tiny, tmp_path):
    from pipelines.tiny import tiny_sd_pipeline

    name = f"unet.{tiny.cross_attention_layers()[0].name}"
    weight = tiny.module(name).weight
    generator = torch.Generator().manual_seed(0)
    lora_a = torch.randn(2, weight.shape[1], generator=generator)
    lora_b = torch.randn(weight.shape[0], 2, generator=generator) * 0.1
    tiny.save_lora_weights(tmp_path, {name: (lora_a, lora_b)})
    plain = tiny_sd_pipeline(0)
    plain.load_lora_weights(str(tmp_path))
    plain.fuse_lora()
    path = name.partition(".")[2]
    assert torch.allclose(plain.unet.get_submodule(path).weight, weight + lora_b @ lora_a, atol=1e-5)


# ---------------------------------------------------------------------------------------------- pipelines.hooks
def test_hook_points_and_output_edits_come_off_with_their_handle(tiny):
    points = tiny.hook_points()
    assert any(p.startswith("text_encoder.") for p in points) and any(p.startswith("unet.") for p in points)
    with pytest.raises(ValueError, match="is not a hook point of this pipeline"):
        tiny.hook_point("unet.conv_in")
    point = next(p for p in points if p.startswith("unet."))
    module = tiny.hook_point(point)
    base = _pixels(tiny.generate(["a star"], [0], steps=2, progress=False))
    times = []

    def zero(tokens, timestep):
        assert tokens.dim() == 3 and tokens.shape[-1] == tiny.hook_width(point)
        times.append(timestep)
        return tokens * 0

    with tiny.add_output_edit(point, zero) as handle:
        edited = _pixels(tiny.generate(["a star"], [0], steps=2, progress=False))
        assert handle.active
    assert not handle.active and not module._forward_hooks and not tiny.unet._forward_pre_hooks
    assert np.abs(base - edited).max() > 0 and len(times) == 2 and all(t is not None for t in times)
    again = _pixels(tiny.generate(["a star"], [0], steps=2, progress=False))
    assert np.array_equal(base, again)
