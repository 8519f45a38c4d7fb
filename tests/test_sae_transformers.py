"""The SAE family (itd, saeuron) on SD3 and Flux: T5 blocks and transformer blocks as hook points, the default hook
points, and ItD on Flux's T5 (no start token: the first word's row is edited too). The method x architecture cells
(tests/test_matrix.py) save, load and apply both methods there."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import erase
from erase import ConceptSpec, erase_concepts
from erase.sae.itd import default_text_hook
from erase.sae.sae import SAETrainConfig, build_sae
from erase.sae.saeuron import default_denoiser_hook
from pipelines import load_pipeline

WORDS = "red blue green cat dog house tree car city night sun moon river boat bird star".split()


@pytest.fixture(scope="module")
def models():
    return {name: load_pipeline(f"tiny-{name}") for name in ("sd3", "flux")}


def _prompts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 6)))) for _ in range(n)]


@pytest.mark.parametrize("model, t5", [("sd3", "text_encoder_3"), ("flux", "text_encoder_2")])
def test_t5_blocks_are_hook_points_and_the_defaults_read_the_token_rows(models, model, t5):
    wrapper = models[model]
    assert wrapper.token_encoder == t5 and wrapper.start_tokens(t5) == 0 and wrapper.start_tokens("text_encoder") == 1
    blocks = [p for p in wrapper.hook_points() if p.startswith(f"{t5}.")]
    assert blocks == [f"{t5}.encoder.block.0", f"{t5}.encoder.block.1"]  # the tiny T5's two blocks
    assert default_text_hook(wrapper) == blocks[1]  # two thirds of the way up
    width = getattr(wrapper.pipe, t5).config.d_model
    assert wrapper.hook_width(blocks[0]) == width
    acts = wrapper.text_activations(blocks[0], ["van gogh", "a red star"])
    assert acts.shape == (2, wrapper.token_streams()[-1].length, width)
    transformer = [p for p in wrapper.hook_points() if p.startswith("transformer.")]
    assert default_denoiser_hook(wrapper) == transformer[len(transformer) // 2]
    config = erase.get_method("saeuron").config_class(hook_point="text_encoder.encoder.layers.0")
    with pytest.raises(ValueError, match="saeuron edits the denoiser: 'text_encoder.encoder.layers.0' is not a "):
        erase_concepts(wrapper, ConceptSpec(("van gogh",)), "saeuron", config)


@pytest.mark.slow
def test_itd_on_flux_edits_t5_rows_from_the_first_word_and_leaves_other_prompts_bit_identical(models, tmp_path):
    wrapper = models["flux"]
    hook = default_text_hook(wrapper)
    config = SAETrainConfig(expansion=4, k=8, batch_size=512, epochs=3, dead_tokens=5000)
    build_sae(wrapper, hook, _prompts(48), tmp_path / "t5", config)
    itd = erase.get_method("itd").config_class(sae_stores=(str(tmp_path),), top_features=8)
    artifact = erase_concepts(wrapper, ConceptSpec(("van gogh",)), "itd", itd)
    intervention = artifact.payload("intervention")
    assert intervention.hook_point == hook and intervention.settings["start_tokens"] == 0
    prompts = ["painting by van gogh", "van gogh", *[p for p in _prompts(32, seed=5) if "van" not in p]]
    before = wrapper.encode_prompts(prompts)
    with artifact.applied(wrapper):
        after = wrapper.encode_prompts(prompts)
    changed = [not torch.equal(b, a) for b, a in zip(before.embeddings, after.embeddings, strict=True)]
    assert changed[:2] == [True, True] and not all(changed[2:])  # the gate lets some prompts through untouched
    assert (after.embeddings[1, 0] - before.embeddings[1, 0]).abs().max() > 0  # the first word's row: no start token
    assert torch.equal(after.pooled, before.pooled)  # Flux's CLIP, which gives the pooled vector, is not edited
