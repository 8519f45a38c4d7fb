"""The optimisation attacks (UnlearnDiffAtk, concept inversion) and the wrapper's free token vectors they use."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import erase
from evals.attacks import AttackTarget, attack_probes, available_attacks, run_attack
from evals.attacks.concept_inversion import ConceptInversionConfig, concept_template
from evals.attacks.unlearn_diff_atk import UnlearnDiffAtkConfig

TEMPLATES = ("a red star in the style of {}", "{} gogh", "a blue {} circle, drawn")
WORDS = ("van", "painting", "bright")


def _pixels(images):
    return np.stack([np.asarray(i, dtype=np.int16) for i in images])


def _token(wrapper, word):
    encoding = wrapper.encode_prompts([word])
    assert int(encoding.lengths[0]) == 3, f"{word!r} is not one token"
    return int(encoding.input_ids[0, 1])


@pytest.fixture(scope="module")
def uce(wrapper):
    return erase.erase_concepts(wrapper, erase.ConceptSpec(("van gogh",)), "uce")


def _target(wrapper, artifact, n=3):
    return AttackTarget(wrapper, artifact.applied, "van gogh", attack_probes("van gogh", n, 1), steps=2,
                        progress=False)  # fmt: skip


def test_a_slot_holding_a_real_token_encodes_as_the_text_does(wrapper):
    matrix = wrapper.token_embedding_matrix()
    assert matrix.shape == (49408, wrapper.pipe.text_encoder.config.hidden_size)
    ids = [_token(wrapper, w) for w in WORDS]
    free = wrapper.encode_with_vectors(TEMPLATES, matrix[ids].unsqueeze(1))  # one vector per template
    text = wrapper.encode_prompts([t.format(w) for t, w in zip(TEMPLATES, WORDS, strict=True)])
    assert torch.equal(free.embeddings, text.embeddings)
    assert torch.equal(free.lengths, text.lengths)
    assert torch.equal(free.input_ids[0, :7], text.input_ids[0, :7])
    # k shared vectors, several tokens long
    two = [_token(wrapper, "van"), _token(wrapper, "gogh")]
    shared = wrapper.encode_with_vectors(["a red star in the style of {}", "{}"], matrix[two])
    plain = wrapper.encode_prompts(["a red star in the style of van gogh", "van gogh"])
    assert torch.equal(shared.embeddings, plain.embeddings)
    assert not wrapper.pipe.text_encoder.get_input_embeddings()._forward_hooks
    assert wrapper.decode_tokens(two) == "van gogh"


def test_gradients_reach_the_vectors(wrapper):
    vectors = (0.01 * torch.randn(2, wrapper.token_embedding_matrix().shape[1])).requires_grad_(True)
    encoding = wrapper.encode_with_vectors(["a red star, {}", "{} in the style of monet"], vectors)
    latents = torch.randn(2, 4, 16, 16)
    loss = wrapper.noise_prediction(latents, torch.tensor([500, 100]), encoding).pow(2).mean()
    (grad,) = torch.autograd.grad(loss, [vectors])
    assert torch.isfinite(grad).all() and (grad.abs().sum(dim=1) > 0).all()


def test_bad_templates_and_models_are_refused(wrapper, tiny_sdxl):
    vector = torch.zeros(1, wrapper.token_embedding_matrix().shape[1])
    for template in ("no slot here", "{} and {}"):
        with pytest.raises(ValueError, match="exactly once"):
            wrapper.encode_with_vectors([template], vector)
    with pytest.raises(ValueError, match="text encoder reads"):
        wrapper.encode_with_vectors(["star " * 70 + "{}"], torch.zeros(6, vector.shape[1]))
    with pytest.raises(ValueError, match="vectors must be"):
        wrapper.encode_with_vectors(["{}"], torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"vectors must be \(k, 64\)"):  # SDXL: both encoders' widths, 32 + 32
        tiny_sdxl.encode_with_vectors(["{}"], torch.zeros(1, 32))


def test_configs_and_templates_check_their_input():
    with pytest.raises(ValueError, match="tokens"):
        UnlearnDiffAtkConfig(tokens=0)
    with pytest.raises(ValueError, match="vocabulary"):
        UnlearnDiffAtkConfig(vocabulary="emoji")
    with pytest.raises(ValueError, match="lr"):
        ConceptInversionConfig(lr=0)
    with pytest.raises(ValueError, match="init_word"):
        ConceptInversionConfig(init_word=" ")
    assert (
        concept_template("a Van Gogh star in the style of van gogh", "van gogh")
        == "a Van Gogh star in the style of {}"
    )
    with pytest.raises(ValueError, match="does not name"):
        concept_template("a red star", "van gogh")
    assert {"unlearn_diff_atk", "concept_inversion"} <= set(available_attacks())


@pytest.mark.slow
def test_unlearn_diff_atk_writes_a_prefix_that_lowers_the_loss(wrapper, uce):
    config = UnlearnDiffAtkConfig(tokens=2, iterations=6, lr=0.05, batch=2, optimisation_probes=2, eval_pairs=4,
                                  checks=3)  # fmt: skip
    target = _target(wrapper, uce)
    result = run_attack("unlearn_diff_atk", target, config, seed=1)
    info = result.info
    assert len(result.images) == len(target.probes) == len(result.prompts)
    assert all(
        p.endswith(q.prompt) and p.startswith(info["prefix"] + " ")
        for p, q in zip(result.prompts, target.probes, strict=True)
    )
    assert len(info["prefix_ids"]) == 2 and info["retokenized_same"] == 1.0 and len(info["loss_curve"]) == 6
    assert info["loss_final"] < info["loss_initial"]
    again = run_attack("unlearn_diff_atk", target, config, seed=1)
    assert again.prompts == result.prompts and np.array_equal(_pixels(again.images), _pixels(result.images))
    assert again.info["loss_curve"] == info["loss_curve"]
    # the images are the erased model's for the attacked text
    with target.erased_model():
        drawn = target.generate(result.prompts, [p.seed for p in target.probes])
    assert np.array_equal(_pixels(drawn), _pixels(result.images))


@pytest.mark.slow
def test_concept_inversion_learns_a_token_that_lowers_the_loss(wrapper, uce):
    config = ConceptInversionConfig(steps=6, lr=0.05, batch=2, train_prompts=2, eval_pairs=4)
    target = _target(wrapper, uce)
    result = run_attack("concept_inversion", target, config, seed=0)
    info = result.info
    assert len(result.images) == len(target.probes) and result.embeddings.shape[0] == len(target.probes)
    assert info["loss_final"] < info["loss_initial"] and len(info["loss_curve"]) == 6
    assert info["templates"][0].count("{}") == 1 and "van gogh" not in info["templates"][0]
    again = run_attack("concept_inversion", target, config, seed=0)
    assert np.array_equal(_pixels(again.images), _pixels(result.images))
    assert torch.equal(again.embeddings, result.embeddings)
    # the probes are drawn from the learnt token in the concept's place, by the erased model
    vector = torch.tensor(info["token_embedding"]).unsqueeze(0)
    with target.erased_model():
        encoding = wrapper.encode_with_vectors(info["templates"], vector)
        assert torch.allclose(encoding.embeddings.float(), result.embeddings, atol=1e-6)
        drawn = target.generate(encoding, [p.seed for p in target.probes])
    assert np.array_equal(_pixels(drawn), _pixels(result.images))
    with pytest.raises(ValueError, match="one-token word"):
        run_attack("concept_inversion", target, ConceptInversionConfig(steps=1, init_word="starry night"), seed=0)
