"""The attacks on SD3 and Flux. A token of the attacks that write or learn tokens is one that every text encoder reads
as one (CLIP's and T5's), its slot vector the token's input embeddings in every encoder side by side (SD3: CLIP-L,
CLIP-G, T5; Flux: CLIP, T5), entering each encoder through a hook on its token embedding while the pipeline's own
``encode_prompt`` runs (the attacks themselves: tests/test_attacks_sdxl.py). noise_probe re-samples the flow path
with DDIM's eta. Tiny SD3 and Flux pipelines, tiny budgets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import erase
from evals.attacks import AttackTarget, attack_probes, run_attack
from pipelines import load_pipeline
from pipelines.text import _input_embedding, _token_readers


@pytest.fixture(scope="module")
def models():
    return {name: load_pipeline(f"tiny-{name}") for name in ("sd3", "flux")}


def _position_tokenizer(wrapper):
    return wrapper.pipe.tokenizer_2 if wrapper.architecture == "flux" else wrapper.pipe.tokenizer


def _ids(wrapper, text):
    return _position_tokenizer(wrapper)(text, add_special_tokens=False)["input_ids"]


def _widths(wrapper):
    return [_input_embedding(encoder).embedding_dim for _, _, encoder in _token_readers(wrapper.pipe)]


@pytest.mark.parametrize("model", ["sd3", "flux"])
def test_a_slot_holding_a_real_token_encodes_as_the_text_does_in_every_encoder(models, model):
    wrapper = models[model]
    rows = wrapper.token_rows(_ids(wrapper, "van gogh"))
    widths = _widths(wrapper)
    assert rows.shape == (2, sum(widths)) and len(widths) == (3 if model == "sd3" else 2)
    templates = ["a red star in the style of {}", "{} painting, bright"]
    with torch.no_grad():
        free = wrapper.encode_with_vectors(templates, rows)
        text = wrapper.encode_prompts(["a red star in the style of van gogh", "van gogh painting, bright"])
    assert torch.equal(free.embeddings, text.embeddings) and torch.equal(free.pooled, text.pooled)
    assert torch.equal(free.lengths, text.lengths)
    assert free.prompts[1] == "<v0> <v1> painting, bright"
    assert not any(_input_embedding(e)._forward_hooks for _, _, e in _token_readers(wrapper.pipe))
    # gradients reach every encoder's part of a vector; Flux's CLIP part through the pooled vector only
    vectors = (0.01 * torch.randn(1, sum(widths))).requires_grad_(True)
    encoding = wrapper.encode_with_vectors(["a red star, {}"], vectors)
    loss = wrapper.noise_prediction(torch.randn(1, 4, 16, 16), torch.tensor([0.5]), encoding).pow(2).mean()
    (grad,) = torch.autograd.grad(loss, [vectors], retain_graph=True)
    assert all(part.abs().sum() > 0 for part in torch.split(grad, widths, dim=1))
    (grad,) = torch.autograd.grad(encoding.embeddings.pow(2).sum(), [vectors])
    clip_part = grad[:, : widths[0]].abs().sum()
    assert clip_part == 0 if model == "flux" else clip_part > 0  # Flux conditions its tokens on T5 alone


@pytest.mark.parametrize("model", ["sd3", "flux"])
def test_a_token_some_encoder_reads_as_several_is_refused(models, model):
    wrapper = models[model]
    piece = "rt" if model == "flux" else "art"  # a T5 continuation piece; CLIP's "art" without its end of word
    token = _position_tokenizer(wrapper).convert_tokens_to_ids(piece)
    with pytest.raises(ValueError, match=f"^token {token} .* is not one token in every text encoder"):
        wrapper.token_rows([token])
    width = sum(_widths(wrapper))
    for template in ("no slot here", "{} and {}"):
        with pytest.raises(ValueError, match="exactly once"):
            wrapper.encode_with_vectors([template], torch.zeros(1, width))
    with pytest.raises(ValueError, match="text encoder reads"):
        wrapper.encode_with_vectors(["star " * 74 + "{}"], torch.zeros(6, width))
    with pytest.raises(ValueError, match=rf"vectors must be \(k, {width}\)"):
        wrapper.encode_with_vectors(["{}"], torch.zeros(1, 3))


def _pixels(images):
    return np.stack([np.asarray(i, dtype=np.int16) for i in images])


@pytest.mark.parametrize("model", ["flux", pytest.param("sd3", marks=pytest.mark.slow)])
def test_flow_ddim_at_eta_0_is_the_pipelines_sampler_and_at_eta_1_renews_noise_per_image(models, model):
    """``eta`` on SD3/Flux (``FlowDDIMScheduler``): 0 draws the pipeline's own images, 1 others; each image's step
    noise is its seed's alone (the same image alone or in a batch), and the pipeline's scheduler is put back."""
    wrapper = models[model]
    scheduler = wrapper.pipe.scheduler
    prompts, seeds = ["van gogh", "a red star"], [1, 2]
    own = _pixels(wrapper.generate(prompts, seeds, steps=3, progress=False))
    assert np.array_equal(_pixels(wrapper.generate(prompts, seeds, steps=3, progress=False, eta=0.0)), own)
    noisy = _pixels(wrapper.generate(prompts, seeds, steps=3, progress=False, eta=1.0))
    assert (np.abs(noisy - own).max(axis=(1, 2, 3)) > 0).all()
    assert np.array_equal(_pixels(wrapper.generate(prompts[1:], seeds[1:], steps=3, progress=False, eta=1.0)),
                          noisy[1:])  # fmt: skip
    assert wrapper.pipe.scheduler is scheduler


@pytest.mark.slow
@pytest.mark.parametrize("model", ["flux"])  # SD3's flow re-sampling: the test above
def test_noise_probe_keeps_the_flow_candidate_the_scorer_likes_best(models, model, scorer):
    from evals.attacks.noise_probe import NoiseProbeConfig
    from evals.probes import GENERIC_TEMPLATES
    from evals.scorer import TEMPLATES

    wrapper = models[model]
    uce = erase.erase_concepts(wrapper, erase.ConceptSpec(("van gogh",)), "uce")
    probes = attack_probes("van gogh", 2, 1)
    target = AttackTarget(wrapper, uce.applied, "van gogh", probes, scorer=scorer, steps=2, progress=False)
    result = run_attack("noise_probe", target, NoiseProbeConfig(candidates=3), seed=5)
    assert result.info["candidates_drawn"] == 6 and len(result.images) == 2
    labels = list(target.labels[probes[0].category])
    with target.erased_model():
        seeds = [(p.seed * 7 + 5 * 1_000_003 + j) % 2**63 for p in probes for j in range(3)]
        again = target.generate([p.prompt for p in probes for _ in range(3)], seeds, eta=1.0)
    probs = scorer.zero_shot(again, labels, TEMPLATES.get(probes[0].category, GENERIC_TEMPLATES)).probs
    best = probs[:, labels.index(probes[0].concept)].reshape(2, 3).argmax(dim=1).tolist()
    assert result.info["picked"] == best
    assert np.array_equal(_pixels(result.images), _pixels([again[i * 3 + j] for i, j in enumerate(best)]))
