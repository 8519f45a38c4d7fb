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
