"""The attacks that write or learn tokens, on SDXL: a token is its input embeddings in both text encoders side by
side, read as ``StableDiffusionXLPipeline.encode_prompt`` reads text (penultimate layers, the second encoder's pooled
embedding); and on SD3 and Flux (tests/test_attacks_sd3_flux.py has their slots), whose tokens are those every text
encoder (CLIP's, T5's) reads as one. Tiny pipelines, tiny budgets."""

from __future__ import annotations

import pytest
import torch

import erase
from evals.attacks import AttackTarget, attack_probes, run_attack
from evals.attacks.concept_inversion import ConceptInversionConfig
from evals.attacks.rece_embedding import ReceEmbeddingConfig
from evals.attacks.ring_a_bell import RingABellPromptConfig, concept_direction
from evals.attacks.unlearn_diff_atk import UnlearnDiffAtkConfig
from pipelines import load_pipeline


@pytest.fixture(scope="module")
def sdxl():
    return load_pipeline("tiny-sdxl")


@pytest.fixture(scope="module")
def uce(sdxl):
    return erase.erase_concepts(sdxl, erase.ConceptSpec(("van gogh",)), "uce")


def _ids(wrapper, text):
    encoding = wrapper.encode_prompts([text])
    return encoding.input_ids[0, 1 : int(encoding.lengths[0]) - 1].tolist()


def test_a_slot_holding_a_real_token_encodes_as_the_text_does_in_both_encoders(sdxl):
    matrix = sdxl.token_embedding_matrix()
    widths = [sdxl.pipe.text_encoder.config.hidden_size, sdxl.pipe.text_encoder_2.config.hidden_size]
    assert matrix.shape == (49408, sum(widths))
    assert torch.equal(matrix[:, widths[0] :], sdxl.pipe.text_encoder_2.get_input_embeddings().weight)
    templates = ["a red star in the style of {}", "{} painting, bright"]
    free = sdxl.encode_with_vectors(templates, matrix[_ids(sdxl, "van gogh")])
    text = sdxl.encode_prompts(["a red star in the style of van gogh", "van gogh painting, bright"])
    assert torch.allclose(free.embeddings, text.embeddings, atol=1e-6)
    assert torch.allclose(free.pooled, text.pooled, atol=1e-6)
    assert torch.equal(free.lengths, text.lengths)
    # gradients reach both encoders' halves of a vector, through the UNet's tokens and its pooled input
    vectors = (0.01 * torch.randn(1, sum(widths))).requires_grad_(True)
    encoding = sdxl.encode_with_vectors(["a red star, {}"], vectors)
    loss = sdxl.noise_prediction(torch.randn(1, 4, 16, 16), torch.tensor([500]), encoding).pow(2).mean()
    (grad,) = torch.autograd.grad(loss, [vectors], retain_graph=True)
    assert grad[:, : widths[0]].abs().sum() > 0 and grad[:, widths[0] :].abs().sum() > 0
    loss = encoding.pooled.pow(2).sum()  # the pooled embedding reads the second encoder's half only
    (grad,) = torch.autograd.grad(loss, [vectors])
    assert grad[:, : widths[0]].abs().sum() == 0 and grad[:, widths[0] :].abs().sum() > 0


BUDGETS = {
    "ring_a_bell_prompt": RingABellPromptConfig(eta=2.0, pairs=4, length=3, population=8, generations=4, searches=1),
    "unlearn_diff_atk": UnlearnDiffAtkConfig(
        tokens=2, iterations=4, lr=0.05, batch=2, optimisation_probes=1, eval_pairs=2, checks=2
    ),
    "concept_inversion": ConceptInversionConfig(steps=4, lr=0.01, batch=2, train_prompts=1, eval_pairs=2),
    "rece_embedding": ReceEmbeddingConfig(),
}


#: the optimising attacks take seconds of CPU each even at these budgets (the SD 1.x tests of them are slow too)
SLOW = ("concept_inversion", "ring_a_bell_prompt", "unlearn_diff_atk")
#: SDXL for every attack; on SD3 (three encoders, CLIP positions) and Flux (T5 positions, no start token) the token
#: attacks, each where its own path differs (rece_embedding there: tests/test_architectures.py)
CASES = [("sdxl", a) for a in sorted(BUDGETS)] + [
    ("sd3", "ring_a_bell_prompt"), ("sd3", "concept_inversion"), ("flux", "concept_inversion"),
    ("flux", "unlearn_diff_atk"),
]  # fmt: skip


@pytest.fixture(scope="module")
def erased(sdxl, uce):
    """Per model name, the tiny pipeline and uce's erasure of van gogh on it (SD3 and Flux built on first use)."""
    return {"sdxl": (sdxl, uce)}


@pytest.mark.parametrize(
    ("model", "attack"), [pytest.param(m, a, marks=pytest.mark.slow) if a in SLOW else (m, a) for m, a in CASES]
)
def test_attack_runs_on_sdxl_sd3_and_flux(erased, model, attack):
    if model not in erased:
        wrapper = load_pipeline(f"tiny-{model}")
        erased[model] = wrapper, erase.erase_concepts(wrapper, erase.ConceptSpec(("van gogh",)), "uce")
    wrapper, artifact = erased[model]
    target = AttackTarget(wrapper, artifact.applied, "van gogh", attack_probes("van gogh", 2, 1), steps=2,
                          progress=False)  # fmt: skip
    result = run_attack(attack, target, BUDGETS[attack], seed=1)
    info = result.info
    assert len(result.images) == 2
    if attack == "ring_a_bell_prompt":  # the written text encodes, in every encoder, as the searched tokens
        assert info["loss_final"][0] <= info["loss_initial"][0]
        direction = concept_direction(wrapper, "van gogh", 4, 1 + 7919)
        searched = wrapper.encode_prompts(info["searched_prompts"]).embeddings + 2.0 * direction
        written = wrapper.encode_prompts(info["prompts_found"]).embeddings
        assert float((written - searched).pow(2).sum()) == pytest.approx(info["loss_final"][0], rel=1e-4)
    elif attack == "unlearn_diff_atk":  # every text encoder reads the prefix as the k optimised words
        assert all(p.startswith(info["prefix"] + " ") for p in result.prompts)
        assert info["retokenized_same"] == 1.0
        for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
            tokenizer = getattr(wrapper.pipe, name, None)
            if tokenizer is not None:
                assert len(tokenizer(info["prefix"], add_special_tokens=False)["input_ids"]) == 2, name
    elif attack == "concept_inversion":  # one vector for every encoder, and it lowers the loss
        assert len(info["token_embedding"]) == wrapper.token_rows(wrapper.slot_token_ids()[:1]).shape[1]
        assert info["loss_final"] < info["loss_initial"]
    else:  # the map acts on both encoders' features of every token
        assert result.embeddings.shape[-1] == 64 and info["restored_share"] > 0.95
