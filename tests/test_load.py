"""``erase.load``: one entry point for every artifact kind on a plain diffusers ``StableDiffusionPipeline``. The loaded
pipeline draws what the in-memory erased model draws, a second load is refused, and ``remove()`` (or leaving the
``with`` block) restores the pipeline bit for bit."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

import erase
from erase import ConceptSpec, erase_concepts
from erase.sae.sae import SAETrainConfig, build_sae
from pipelines import load_pipeline
from pipelines.tiny import tiny_sd_pipeline
from pipelines.wrapper import PipelineWrapper

TEXT_HOOK = "text_encoder.encoder.layers.1"
WORDS = "red blue green cat dog house tree car city night sun moon river boat bird star".split()
PROMPTS, SEEDS = ["a painting by van gogh", "a red car"], [0, 1]
LORA_FAST = dict(steps=2, lr=1e-2, pool_images=2, pool_steps=4)
STEPS = {"esd": 2, "spm": 8}  # spm's transport scales its adapter down: a visible edit takes a few more steps


@pytest.fixture(scope="module")
def base():
    return load_pipeline("tiny")


@pytest.fixture(scope="module")
def sae_store(base, tmp_path_factory):
    """An SAE at itd's default hook point of the tiny pipeline, trained in seconds."""
    store = tmp_path_factory.mktemp("saes")
    rng = np.random.default_rng(0)
    prompts = [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 6)))) for _ in range(48)]
    build_sae(base, TEXT_HOOK, prompts, store / "text", SAETrainConfig(expansion=4, k=8, batch_size=512, epochs=3))
    return store


def _config(method, store):
    config_class = erase.get_method(method).config_class
    if method in STEPS:
        return config_class(**{**LORA_FAST, "steps": STEPS[method]})
    if method == "itd":
        return config_class(sae_stores=(str(store),), top_features=8)
    return None


def _pixels(wrapper):
    images = wrapper.generate(PROMPTS, SEEDS, steps=3, progress=False)
    return np.stack([np.asarray(i, dtype=np.float32) for i in images])


def _state(pipe):
    return {f"{c}.{k}": v.clone() for c in ("unet", "text_encoder") for k, v in getattr(pipe, c).state_dict().items()}


def _same_state(pipe, state):
    return all(torch.equal(v, state[k]) for k, v in _state(pipe).items()) and set(_state(pipe)) == set(state)


@pytest.mark.parametrize("method", ["uce", "esd", "spm", "itd"])
def test_load_draws_the_erased_model_refuses_a_second_load_and_removes_bit_for_bit(base, sae_store, method, tmp_path):
    artifact = erase_concepts(base, ConceptSpec(("van gogh",)), method, _config(method, sae_store))
    assert method != "spm" or artifact.payload("transport") is not None  # spm's default has facilitated transport
    folder = erase.save_artifact(artifact, tmp_path / method, base)
    with artifact.applied(base):
        in_memory = _pixels(base)
    pipe = tiny_sd_pipeline(0)  # a plain diffusers pipeline with the same base weights
    assert type(pipe) is StableDiffusionPipeline
    plain = PipelineWrapper(pipe, "plain")  # only to generate with the same sampler settings
    original, state = _pixels(plain), _state(pipe)

    handle = erase.load(pipe, folder)
    loaded = _pixels(plain)
    assert np.abs(loaded - in_memory).max() <= 1.0
    assert np.abs(loaded - original).max() > 1.0  # the edit is in force
    with pytest.raises(erase.ArtifactMismatchError, match="already"):
        erase.load(pipe, folder)
    assert np.array_equal(_pixels(plain), loaded)  # the refused load changed nothing
    handle.remove()
    assert not handle.active and _same_state(pipe, state)
    assert np.array_equal(_pixels(plain), original)

    with erase.load(pipe, folder) as again:
        assert again.artifact.method == method and np.array_equal(_pixels(plain), loaded)
    assert _same_state(pipe, state) and np.array_equal(_pixels(plain), original)


def test_a_failed_load_installs_nothing(base, tmp_path):
    """Every payload is checked against the live pipeline before the first is installed: an artifact whose weight
    change fits, but whose second payload does not, leaves the pipeline as it was."""
    artifact = erase_concepts(base, ConceptSpec(("van gogh",)), "spm", erase.get_method("spm").config_class(
        **LORA_FAST, facilitated_transport=True))  # fmt: skip
    transport = artifact.payload("transport")
    transport.embeddings = transport.embeddings[:, :, :-1]  # a text width the pipeline does not have
    pipe = tiny_sd_pipeline(0)
    state = _state(pipe)
    with pytest.raises(erase.ArtifactMismatchError, match="prompt embeddings"):
        erase.load(pipe, artifact)
    assert _same_state(pipe, state)


def test_old_names_are_aliases_of_load(base, tmp_path, artifact_dir):
    pipe = tiny_sd_pipeline(0)
    state = _state(pipe)
    with erase.attach(pipe, artifact_dir) as handle:
        assert isinstance(handle, erase.ArtifactHandle)
    with erase.apply_artifact(pipe, artifact_dir):
        assert not _same_state(pipe, state)
    assert _same_state(pipe, state)
