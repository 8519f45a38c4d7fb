"""SPM (erase/spm.py) on the tiny random pipeline: settings, latent anchors, the anchoring term, variants."""

import pytest
import torch

from erase import ConceptSpec, erase_concepts
from erase.spm import SPMConfig, latent_anchor_embeddings

FAST = dict(steps=8, lr=1e-2, pool_images=2, pool_steps=4)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"latent_anchors": -1}, "latent_anchors"),
        ({"latent_anchors": 1.5}, "latent_anchors"),
        ({"latent_anchor_weight": -1.0}, "latent_anchor_weight"),
        ({"train": "everything"}, "train"),
        ({"negative_guidance": 0.0}, "negative_guidance"),
    ],
)
def test_config_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        SPMConfig(**bad)


def test_defaults_are_the_reference_config():
    config = SPMConfig()
    assert (config.rank, config.alpha, config.lr, config.steps, config.batch_size) == (1, 1.0, 1e-4, 3000, 1)
    assert (config.pool_steps, config.pool_guidance, config.negative_guidance) == (30, 3.0, 1.0)
    assert (config.latent_anchors, config.latent_anchor_weight, config.train) == (4, 1000.0, "transformer")


def test_latent_anchors_have_the_concepts_norm_and_shape_and_are_reproducible():
    concept = torch.randn(7, 16, generator=torch.Generator().manual_seed(0))
    anchors = latent_anchor_embeddings(concept, 50, torch.Generator().manual_seed(1))
    assert anchors.shape == (50, 7, 16)
    ratio = anchors.reshape(50, -1).norm(dim=1) / concept.norm()
    assert ratio.min() >= 0.8 - 1e-6 and ratio.max() <= 1.2 + 1e-6 and ratio.std() > 0.05
    again = latent_anchor_embeddings(concept, 50, torch.Generator().manual_seed(1))
    assert torch.equal(anchors, again)


def test_latent_anchors_reject_directions_by_their_similarity_to_the_concept():
    """In one dimension a direction is +c (similarity 1, always rejected) or -c (similarity -1, always kept)."""
    concept = torch.tensor([3.0])
    anchors = latent_anchor_embeddings(concept, 200, torch.Generator().manual_seed(0))
    assert (anchors < 0).all()
    # In many dimensions most directions are near-orthogonal: their mean similarity to the concept is about 0.
    concept = torch.randn(512, generator=torch.Generator().manual_seed(2))
    anchors = latent_anchor_embeddings(concept, 200, torch.Generator().manual_seed(3))
    cos = torch.nn.functional.cosine_similarity(anchors, concept[None], dim=1)
    assert cos.abs().mean() < 0.1


def test_default_adapter_is_rank_one_on_every_transformer_block_linear(tiny):
    artifact = erase_concepts(tiny, ConceptSpec(("van gogh",)), "spm", SPMConfig(**FAST))
    ends = ("attn1.to_q", "attn2.to_k", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
    for end in ends:
        assert any(name.endswith(end) for name in artifact.deltas), end
    assert all(torch.linalg.matrix_rank(d, rtol=1e-5) == 1 for d in artifact.deltas.values())
    assert artifact.info["variant"] == "transformer" and artifact.info["facilitated_transport"] is False


def test_latent_anchoring_keeps_other_embeddings_predictions_closer(tiny):
    """The same steps with and without latent anchoring: an unrelated prompt's prediction moves less with it."""
    x = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([100, 300, 600, 900])
    other = tiny.encode_prompts(["a photo of a cat"] * 4)
    original = tiny.noise_prediction(x, t, other).detach()
    moved = {}
    for weight in (0.0, 1000.0):
        config = SPMConfig(latent_anchor_weight=weight, **{**FAST, "steps": 20, "lr": 3e-3})
        artifact = erase_concepts(tiny, ConceptSpec(("van gogh",)), "spm", config)
        with torch.no_grad(), tiny.weight_deltas(artifact.deltas):
            moved[weight] = float((tiny.noise_prediction(x, t, other) - original).norm())
    assert moved[1000.0] < moved[0.0], moved


def test_spm_on_sdxl_draws_pooled_anchors(tiny_sdxl):
    artifact = erase_concepts(tiny_sdxl, ConceptSpec(("van gogh",)), "spm", SPMConfig(**{**FAST, "steps": 2}))
    assert artifact.deltas and artifact.info["steps"] == 2
