"""The method x architecture matrix, one cell per (registered method, tiny pipeline of an architecture).

Each cell erases "van gogh" (the method's quick settings, two training steps), saves the artifact, loads it into a
freshly built plain diffusers pipeline of the same weights, generates with it, and checks the loaded change is the
in-memory one within 1e-3: weights by ``load_lora_weights`` (then ``fuse_lora``; the kohya-layout file too) or
``from_pretrained`` of the exported pipeline, runtime interventions by ``erase.load``'s own loader (the noise
prediction). The README's matrix table is the same cells.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import numpy as np
import pytest
import torch

import erase
from erase import ConceptSpec, erase_concepts
from erase.core.kohya import KOHYA_ARCHITECTURES, kohya_bytes
from erase.core.layout import KOHYA_FILE, LORA_FILE, PIPELINE_FOLDER
from erase.sae.sae import SAETrainConfig, build_sae
from pipelines import load_pipeline, wrap_pipeline
from pipelines.tiny import TINY_MODELS, tiny_pipeline

#: column -> the tiny pipeline of that architecture (``pipelines.tiny.TINY_MODELS``)
ARCHITECTURES = {"SD1": "tiny", "SD2-v": "tiny-sd2", "SDXL": "tiny-sdxl", "SD3": "tiny-sd3", "Flux": "tiny-flux"}
#: the runtime methods' SAE hook points (an SAE trained per model); the first text layer, as SDXL's UNet reads the
#: penultimate layer's output and the tiny encoders have two; on SD3/Flux T5's first block (the encoder of their token
#: rows) and a transformer block
SAE_HOOKS = {"text": "text_encoder.encoder.layers.0", "unet": "unet.up_blocks.0.attentions.1"}
TRANSFORMER_SAE_HOOKS = {
    "SD3": {"text": "text_encoder_3.encoder.block.0", "unet": "transformer.transformer_blocks.0"},
    "Flux": {"text": "text_encoder_2.encoder.block.0", "unet": "transformer.single_transformer_blocks.0"},
}
WORDS = "red blue green cat dog house tree car city night sun moon river boat bird star".split()


def _cell(method: str, column: str):
    """Fast: the refusals, and the closed forms but rece on SD1 and SDXL. Slow, seconds each on 2 shared cores: the
    trained methods (mace, stereo and the LoRA trainer's), the runtime ones (an SAE trained per model), rece (its
    adversarial-embedding rounds), and the SD2-v, SD3 and Flux columns, which arch's tests cover for uce, esd, ca."""
    spec = erase.get_method(method)
    runs = TINY_MODELS[ARCHITECTURES[column]] in spec.capabilities.architectures
    fast = spec.family == "closed_form" and method != "rece" and column in ("SD1", "SDXL")
    return pytest.param(method, column, marks=() if fast or not runs else pytest.mark.slow, id=f"{method}-{column}")


#: esd on SDXL is test_text_encoder_adapters_cell: the same cell, with adapters on both text encoders too
CELLS = [_cell(m, c) for m in erase.available_methods() for c in ARCHITECTURES if (m, c) != ("esd", "SDXL")]


@pytest.fixture(scope="module")
def wrappers():
    """Per column, the pipeline erased from, and (key ``(column, "draws")``) the plain base pipeline's draws."""
    return {}


def _wrapper(wrappers, column):
    if column not in wrappers:
        wrappers[column] = load_pipeline(ARCHITECTURES[column])
    return wrappers[column]


@pytest.fixture(scope="module")
def sae_stores(tmp_path_factory):
    """Per column, SAEs for the runtime methods' hook points, trained in seconds (on first use)."""
    return {"root": tmp_path_factory.mktemp("saes")}


def _sae_store(sae_stores, wrapper, column):
    if column not in sae_stores:
        store = sae_stores["root"] / column
        rng = np.random.default_rng(0)
        prompts = [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 6)))) for _ in range(48)]
        config = SAETrainConfig(expansion=4, k=8, batch_size=512, epochs=3, dead_tokens=5000)
        hooks = TRANSFORMER_SAE_HOOKS.get(column, SAE_HOOKS)
        build_sae(wrapper, hooks["text"], prompts, store / "text", config)
        build_sae(wrapper, hooks["unet"], prompts[:16], store / "unet", config, steps=4)
        sae_stores[column] = store
    return sae_stores[column]


def _config(method: str, store, column: str = "SD1"):
    spec = erase.get_method(method)
    if spec.runtime:
        hooks = TRANSFORMER_SAE_HOOKS.get(column, SAE_HOOKS)
        settings = {"sae_stores": (str(store),), "hook_point": hooks["text"], "top_features": 8}
        if method == "saeuron":
            settings = {"sae_stores": (str(store),), "hook_point": hooks["unet"], "percentile": 95.0,
                        "multiplier": -5.0, "images_per_prompt": 1, "other_prompts": 6, "steps": 4}  # fmt: skip
        return spec.config_class(**settings)
    config = spec.quick_config()
    if spec.capabilities.training:
        config = dataclasses.replace(config, steps=2, pool_images=1, pool_steps=2)
    return config


def _relative_error(plain, wrapper, deltas) -> float:
    worst = 0.0
    for name, delta in deltas.items():
        component, _, path = name.partition(".")
        change = getattr(plain, component).get_submodule(path).weight.detach() - wrapper.module(name).weight.detach()
        worst = max(worst, float((change - delta).norm() / delta.norm()))
    return worst


PROMPT = "painting by van gogh"  # the runtime methods' SAE gate fires on it


def _draws(pipe) -> np.ndarray:
    out = pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               output_type="np").images  # fmt: skip
    assert np.isfinite(out).all()
    return out


@pytest.mark.parametrize(("method", "column"), CELLS)
def test_cell(method, column, wrappers, sae_stores, tmp_path):
    wrapper = _wrapper(wrappers, column)
    spec = erase.get_method(method)
    if wrapper.architecture not in spec.capabilities.architectures:  # refused in one line, before any work
        with pytest.raises(ValueError, match=f"method '{method}' does not run on {wrapper.architecture}") as refused:
            erase_concepts(wrapper, ConceptSpec(("van gogh",)), method, spec.config_class())
        assert "\n" not in str(refused.value) and spec.capabilities.unported in str(refused.value)
        return
    store = _sae_store(sae_stores, wrapper, column) if erase.get_method(method).runtime else None
    _check_cell(method, column, _config(method, store, column), wrappers, tmp_path)


#: The LoRA trainer's text-encoder adapters beside the UNet's: every text encoder of the pipeline (SDXL's second).
#: Output projections: diffusers' loader tells a text encoder LoRA's format by its attention keys, and a converted
#: kohya one's by ``out_proj`` (a LoRA on q/k/v or the MLP alone loads in the UIs but not in diffusers).
TEXT_ENCODER_LAYERS = ("*attn2.to_k", "text_encoder.*self_attn.out_proj", "text_encoder_2.*self_attn.out_proj")


@pytest.mark.slow
def test_text_encoder_adapters_cell(wrappers, tmp_path):
    """The esd x SDXL cell, with adapters on both SDXL text encoders (``text_encoder_2.*``: the pooled vector changes
    too) beside the UNet's: plain diffusers and the kohya file (``lora_te2_`` keys) load it like any other cell."""
    config = dataclasses.replace(_config("esd", None), layers=TEXT_ENCODER_LAYERS)
    artifact = _check_cell("esd", "SDXL", config, wrappers, tmp_path)
    components = {name.partition(".")[0] for name in artifact.deltas}
    assert components == {"unet", "text_encoder", "text_encoder_2"}
    wrapper = _wrapper(wrappers, "SDXL")
    with wrapper.weight_deltas(artifact.deltas):
        edited = wrapper.encode_prompts([PROMPT])
    plain = wrapper.encode_prompts([PROMPT])
    assert (edited.pooled - plain.pooled).abs().max() > 0  # the second encoder's adapters reach the pooled vector
    kohya = kohya_bytes(artifact, wrapper)
    assert b"lora_te2_text_model_encoder_layers_0_self_attn_out_proj.lora_down.weight" in kohya


def _check_cell(method, column, config, wrappers, tmp_path):
    """Erase with ``config``, save, load the artifact into a plain pipeline, generate, compare; the artifact."""
    wrapper = _wrapper(wrappers, column)
    spec = erase.get_method(method)
    build = functools.partial(tiny_pipeline, ARCHITECTURES[column])
    artifact = erase_concepts(wrapper, ConceptSpec(("van gogh",)), method, config)
    folder = erase.save_artifact(artifact, tmp_path / method, wrapper)
    if (column, "draws") not in wrappers:
        wrappers[column, "draws"] = _draws(build(0))
    base = wrappers[column, "draws"]
    if artifact.deltas:  # a weight change: plain diffusers loads it
        meta = json.loads((folder / "erasure.json").read_text())
        exact = artifact.payload("weights").factors is not None  # the adapters themselves (not mace's fused change)
        if spec.capabilities.training and exact and (folder / LORA_FILE).is_file():  # their own rank, saved exactly
            assert set(meta["payloads"]["weights"]["lora_ranks"].values()) == {meta["config"]["rank"]}
        plain = build(0)
        components = sorted({name.partition(".")[0] for name in artifact.deltas})  # the denoiser, text encoders
        if (folder / LORA_FILE).is_file():
            plain.load_lora_weights(str(folder))
            plain.fuse_lora(components=components)
            assert _relative_error(plain, wrapper, artifact.deltas) < 1e-3
            plain.unfuse_lora(components=components)
            plain.unload_lora_weights()
        else:  # full rank on the tiny pipeline's narrow layers: the exported pipeline
            exported = type(plain).from_pretrained(str(folder / PIPELINE_FOLDER))
            assert _relative_error(exported, wrapper, artifact.deltas) < 1e-3
        if wrapper.architecture in KOHYA_ARCHITECTURES:  # the same change for the UIs, in kohya's layout
            (folder / KOHYA_FILE).write_bytes(kohya_bytes(artifact, wrapper))
            plain.load_lora_weights(str(folder), weight_name=KOHYA_FILE)
        else:
            with pytest.raises(ValueError, match="kohya"):
                kohya_bytes(artifact, wrapper)
            plain.load_lora_weights(str(folder))
        plain.fuse_lora(components=components)
        assert _relative_error(plain, wrapper, artifact.deltas) < 1e-3
        assert np.abs(_draws(plain) - base).max() > 0
        return artifact
    # a runtime intervention: erase.load's own loader, on the plain pipeline, acts as the in-memory one
    plain = wrap_pipeline(build(0))
    latents, t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    with torch.no_grad():
        before = wrapper.noise_prediction(latents, t, wrapper.encode_prompts([PROMPT]))
        with artifact.applied(wrapper):
            in_memory = wrapper.noise_prediction(latents, t, wrapper.encode_prompts([PROMPT]))
        with erase.load(plain.pipe, folder):
            loaded = plain.noise_prediction(latents, t, plain.encode_prompts([PROMPT]))
            _draws(plain.pipe)
    assert (loaded - in_memory).abs().max() < 1e-3
    assert (in_memory - before).abs().max() > 0
    return artifact


def test_sdxl_reads_an_output_edit_of_a_text_encoder_layer(tiny_sdxl):
    """SDXL conditions on the encoders' penultimate hidden states, which transformers records with hooks of its own,
    installed at the first encoding: an edit installed later still reaches them."""
    before = tiny_sdxl.encode_prompts([PROMPT]).embeddings
    with tiny_sdxl.intervene({"text_encoder.encoder.layers.0": lambda x: x + 1.0}):
        after = tiny_sdxl.encode_prompts([PROMPT]).embeddings
    assert (after[..., :32] - before[..., :32]).abs().max() > 0.1  # the first encoder's half
    assert torch.equal(after[..., 32:], before[..., 32:])
