"""Adversarial training in the LoRA trainer and text-encoder adapters, on the tiny random pipeline."""

import runpy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from erase.core.registry import ConceptSpec
from erase.lora.ca import CAConfig
from erase.lora.esd import ESDConfig, erase_esd
from erase.lora.trainer import LoraTrainConfig, Predictions, config_key
from evals.attacks.adversaries import AdversaryBudget, AdversaryProblem, get_adversary, pgd_perturbation
from evals.attacks.rece_embedding import ReceEmbeddingConfig, adversarial_map, projection_weights, restored_share
from pipelines import CROSS_ATTENTION_PATTERNS, LORA_TARGETS

FAST = dict(steps=6, lr=1e-2, pool_images=2, pool_steps=4, adversarial_steps=2)
TEXT_LAYERS = ("text_encoder.*self_attn.q_proj", "text_encoder.*self_attn.v_proj", "text_encoder.*mlp.fc1")
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "erase.py"


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"adversarial": "no_such_attack"}, "unknown adversary 'no_such_attack'"),
        ({"adversarial": "unlearn_diff_atk"}, "is a prompt attack"),
        ({"adversarial": "noise_probe"}, "is a sampling attack"),
        ({"adversarial": "concept_inversion"}, "has no training-time adversary"),
        ({"adversarial": " "}, "names no attack"),
        ({"adversarial_objective": "loudest"}, "adversarial_objective"),
        ({"adversarial_every": 0}, "adversarial_every"),
        ({"adversarial_epsilon": 0.0}, "adversarial_epsilon"),
        ({"adversarial_steps": 0}, "adversarial_steps"),
    ],
)
def test_an_adversarial_setting_that_names_no_adversary_is_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        LoraTrainConfig(**bad)


def test_clean_runs_keep_their_run_key_and_ca_defaults_to_the_frozen_objective():
    assert not any(k.startswith("adversarial") for k in config_key(ESDConfig()))
    assert config_key(ESDConfig(adversarial="race_pgd"))["adversarial"] == "race_pgd"
    assert CAConfig().adversarial_objective == "frozen" and ESDConfig().adversarial_objective == "noise"


def test_erase_script_refuses_a_prompt_attack_in_one_line_before_training(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--model", "tiny", "--concept", "van gogh", "--method", "esd", "--no-check", "--out", str(out)]
    code = runpy.run_path(str(SCRIPT))["main"]([*args, "--set", "adversarial=unlearn_diff_atk"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "prompt attack" in errors[0], err
    assert not out.exists()


def _problem(embeddings, loss, budget, weights=None, generator=None):
    return AdversaryProblem(
        wrapper=None, prompts=["van gogh"] * embeddings.shape[0], embeddings=embeddings, loss=loss,
        weights=weights or (lambda patterns: {}), original=None, budget=budget,
        generator=generator or torch.Generator().manual_seed(0),
    )  # fmt: skip


def test_race_pgd_stays_in_its_ball_and_range_and_lowers_the_objective():
    clean = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    goal = clean + 0.3  # outside the ball: the best the attack can do is +epsilon where the range allows

    def loss(x):
        return ((x - goal) ** 2).mean()

    budget = AdversaryBudget(steps=20, step_size=0.025, epsilon=0.1)
    delta = pgd_perturbation(_problem(clean, loss, budget))
    assert delta.shape == clean.shape and delta.abs().max() <= 0.1 + 1e-6
    adv = clean + delta
    for i in range(2):  # RACE clamps to each prompt's own [min, max]
        assert adv[i].min() >= clean[i].min() - 1e-6 and adv[i].max() <= clean[i].max() + 1e-6
    assert loss(adv) < loss(clean) - 0.01
    again = pgd_perturbation(_problem(clean, loss, budget))
    assert torch.equal(delta, again)  # a function of the generator


def test_rece_adversary_is_the_attacks_map_against_the_current_adapted_keys_and_values(tiny):
    encoding = tiny.encode_prompts(["van gogh"])
    with tiny.lora_adapters(LORA_TARGETS["kv"], 2, 2.0, generator=torch.Generator().manual_seed(0)) as lora:
        with torch.no_grad():
            for p in lora.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        budget = AdversaryBudget(1, 0.1, 0.1)
        delta = get_adversary("rece_embedding")(_problem(encoding.embeddings, None, budget, lora.adapted_weights))
        none = get_adversary("rece_embedding")(_problem(encoding.embeddings, None, budget, lambda patterns: {}))
        factors = lora.factors()
    # The same change as plain weights, and the evaluation attack's own map on it.
    original = projection_weights(tiny, CROSS_ATTENTION_PATTERNS)
    with tiny.weight_deltas({k: b @ a for k, (a, b) in factors.items()}):
        edited = projection_weights(tiny, CROSS_ATTENTION_PATTERNS)
    c = encoding.embeddings[0].double()
    expected = c @ adversarial_map(original, edited, ReceEmbeddingConfig().regularization).T - c
    torch.testing.assert_close(delta[0].double(), expected, atol=1e-5, rtol=1e-4)
    share = restored_share(original, edited, c, c + delta[0].double())
    assert share > restored_share(original, edited, c, c + 0.5 * delta[0].double()) > 0  # the least-squares optimum
    assert torch.equal(none, torch.zeros_like(none))  # nothing adapted on the keys/values: the clean prompt


@pytest.mark.slow
def test_predictions_perturb_and_reencode_only_the_trained_side_and_text_rows(tiny):
    encoding = tiny.encode_prompts(["van gogh", "monet"])
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    t = torch.full((2,), 500)
    original = tiny.noise_prediction(x, t, encoding).detach()
    with tiny.lora_adapters(TEXT_LAYERS, 2, 2.0, generator=torch.Generator().manual_seed(0)) as lora:
        assert lora.adapts_text_encoder and all(n.startswith("text_encoder.") for n in lora.names)
        predict = Predictions(tiny, lora)
        with torch.no_grad():
            for p in lora.parameters():
                p.add_(0.05)
        trained = predict.trained(x, t, encoding)
        assert not torch.allclose(trained, original)  # read through the adapted text encoder
        torch.testing.assert_close(predict.frozen(x, t, encoding), original, atol=0, rtol=0)
        loss = trained.pow(2).mean()
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.parameters())  # gradients reach it
        # A row a loss made itself (its prompt does not tokenise to its ids) goes to the UNet as it is.
        made = type(encoding)(["<made>", "monet"], encoding.input_ids, encoding.embeddings, encoding.lengths)
        assert torch.equal(predict.trained_encoding(made).embeddings[0], encoding.embeddings[0])
        shift = torch.full(encoding.embeddings.shape[1:], 0.5)
        predict.perturbations = {"van gogh": shift}
        shifted = predict.trained_encoding(encoding).embeddings.detach()
        plain = tiny.encode_prompts(["van gogh", "monet"]).embeddings  # adapters on: the trained encoder's
        torch.testing.assert_close(shifted[0], plain[0] + 0.5)
        torch.testing.assert_close(shifted[1], plain[1])


def test_ring_a_bell_adversary_is_the_original_models_direction_kept_in_its_state(tiny):
    from evals.attacks.ring_a_bell import RingABellConfig, concept_direction

    config = RingABellConfig()
    expected = config.eta * concept_direction(tiny, "van gogh", config.pairs, 7919)
    encoding = tiny.encode_prompts(["van gogh"])
    with tiny.lora_adapters(TEXT_LAYERS, 2, 2.0, generator=torch.Generator().manual_seed(0)) as lora:
        with torch.no_grad():
            for p in lora.parameters():
                p.add_(0.05)  # the text encoder moved: the direction is still the original model's
        problem = _problem(encoding.embeddings, None, AdversaryBudget(1, 0.1, 0.1))
        problem.wrapper, problem.original = tiny, lora.disabled
        delta = get_adversary("ring_a_bell")(problem)
    torch.testing.assert_close(delta[0], expected)
    assert set(problem.state) == {"direction"}
    problem.wrapper = None  # a later renewal reads the state and needs no model
    assert torch.equal(get_adversary("ring_a_bell")(problem), delta)


@pytest.mark.slow
def test_an_adversarial_run_killed_and_resumed_equals_the_uninterrupted_one(tiny, tmp_path):
    concepts = ConceptSpec(("van gogh",), ("",), ())
    settings = dict(FAST, adversarial="race_pgd", adversarial_every=3, adversarial_warmup=1)
    whole = erase_esd(tiny, concepts, ESDConfig(**settings))
    clean = erase_esd(tiny, concepts, ESDConfig(**FAST))
    assert whole.info["adversarial"]["renewals_this_run"] == 2  # steps 1 and 4
    assert any(not torch.equal(b, clean.factors[k][1]) for k, (_, b) in whole.factors.items())
    folder = tmp_path / "ckpt"
    # Steps 0-2 (a checkpoint at 2, the perturbation renewed at step 1 still in force), then the rest from it.
    first = erase_esd(tiny, concepts, ESDConfig(**{**settings, "steps": 2, "checkpoint_dir": str(folder)}))
    assert first.info["adversarial"]["renewals_this_run"] == 1
    saved = load_file(str(folder / "step-00000002" / "optimizer.safetensors"))
    assert set(saved) >= {"adversary.delta"} and saved["adversary.delta"].abs().max() > 0
    resumed = erase_esd(tiny, concepts, ESDConfig(**{**settings, "checkpoint_dir": str(folder)}))
    assert resumed.info["resumed_from_step"] == 2 and resumed.info["adversarial"]["renewals_this_run"] == 1
    for name, (a, b) in whole.factors.items():
        assert torch.equal(resumed.factors[name][0], a) and torch.equal(resumed.factors[name][1], b), name


@pytest.mark.slow
def test_esd_on_the_text_encoder_saves_a_lora_that_plain_diffusers_loads(tiny, tmp_path):
    from diffusers import StableDiffusionPipeline

    concepts = ConceptSpec(("van gogh",), ("",), ())
    settings = {**FAST, "steps": 3, "pool_images": 1}
    edit = erase_esd(tiny, concepts, ESDConfig(**settings, layers=TEXT_LAYERS, adversarial="race_pgd"))
    assert edit.factors and all(k.startswith("text_encoder.") for k in edit.factors)
    base = tmp_path / "base"
    tiny.pipe.save_pretrained(str(base))
    tiny.save_lora_weights(tmp_path / "lora", edit.factors)
    with tiny.weight_deltas(edit.deltas):
        expected = tiny.encode_prompts(["van gogh", "a red star"]).embeddings
    plain = StableDiffusionPipeline.from_pretrained(str(base), safety_checker=None)
    plain.load_lora_weights(str(tmp_path / "lora"))
    got, _ = plain.encode_prompt(["van gogh", "a red star"], "cpu", 1, False)
    assert (got - expected).abs().max() < 1e-3
    assert (expected - tiny.encode_prompts(["van gogh", "a red star"]).embeddings).abs().max() > 1e-4
