"""AdvUnlearn: reference defaults, the loss against the reference's formula, resuming, and the artifact in plain
diffusers (text encoder included), on the tiny random pipeline."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import erase
from erase import ConceptSpec, erase_concepts
from erase.lora.advunlearn import (
    COCO_OBJECTS,
    TEXT_ENCODER_LAYERS,
    AdvUnlearnConfig,
    advunlearn_loss,
    erase_advunlearn,
    retain_prompts,
)
from erase.lora.trainer import Batch, Predictions

RETAIN = ("a photo of a cat",)


def test_defaults_are_the_reference_commands():
    c = AdvUnlearnConfig()
    assert (c.steps, c.lr, c.warmup, c.attack_every, c.attack_steps, c.attack_lr) == (1000, 1e-5, 200, 1, 30, 1e-3)
    assert (c.adv_tokens, c.attack_init, c.attack_method, c.attack_accumulates) == (1, "random", "pgd", True)
    assert (c.retain_weight, c.retain_batch, c.negative_guidance, c.batch_size) == (0.3, 5, 1.0, 1)
    assert (c.pool_steps, c.pool_guidance) == (50, 3.0)
    assert c.patterns == TEXT_ENCODER_LAYERS and all(p.startswith("text_encoder.") for p in c.patterns)
    assert {p.rsplit(".", 1)[-1] for p in c.patterns} == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"adversarial": "race_pgd"}, "its own inner attack"),
        ({"attack_init": "zeros"}, "attack_init"),
        ({"attack_method": "free_at"}, "attack_method"),
        ({"attack_lr": 0.0}, "attack_lr"),
        ({"adv_tokens": 0}, "adv_tokens"),
        ({"retain_prompts": ()}, "retain_prompts"),
        ({"train": "xattn"}, "train"),
    ],
)
def test_config_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        AdvUnlearnConfig(**bad)


def test_retain_prompts_are_photos_of_objects(tiny):
    assert retain_prompts(tiny, AdvUnlearnConfig()) == [f"a photo of {o}" for o in COCO_OBJECTS]
    assert len(COCO_OBJECTS) == 80
    assert retain_prompts(tiny, AdvUnlearnConfig(retain_prompts=RETAIN)) == list(RETAIN)


def _loss_setup(tiny, **settings):
    config = AdvUnlearnConfig(**{"pool_images": 1, "pool_steps": 3, "retain_prompts": RETAIN, "retain_batch": 1,
                                 "retain_weight": 0.3, "warmup": 1, **settings})  # fmt: skip
    return config, advunlearn_loss(tiny, ConceptSpec(("van gogh",)), config)


@pytest.mark.slow
def test_loss_is_the_reference_formula(tiny):
    """L = ||eps(x, tau_phi([v; c])) - (eps(x, tau*("")) - eta (eps(x, tau*(c)) - eps(x, tau*(""))))||^2
    + gamma ||eps(x_r, tau_phi(r)) - eps(x_r, tau*(r))||^2, written out with the UNet and both encoders."""
    config, loss = _loss_setup(tiny, attack_steps=0, negative_guidance=1.5)
    pool = loss.retain_pool
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    t = pool.timesteps[1:2]
    unet = tiny.pipe.unet

    def eps(latents, encoder_states):
        return unet(latents, t, encoder_hidden_states=encoder_states).sample.float()

    original = {p: tiny.encode_prompts([p]).embeddings for p in ["van gogh", "", RETAIN[0]]}
    with tiny.lora_adapters(
        config.patterns, config.rank, config.alpha, generator=torch.Generator().manual_seed(0)
    ) as lora:
        with torch.no_grad():
            for p in lora.parameters():
                p.add_(0.02)  # the text encoder has moved
        predict = Predictions(tiny, lora)
        for step in (0, 1):  # the warm-up's plain prompt, then the attack's
            generator = torch.Generator().manual_seed(5)
            batch = Batch(x, t, torch.tensor([0]), generator, step=step, pool=pool)
            got = loss(batch, predict)
            with torch.no_grad():
                if step == 0:
                    trained_prompt = tiny.encode_prompts(["van gogh"]).embeddings  # tau_phi(c)
                else:
                    v = loss.state["tokens"][0]  # attack_steps=0: the random init, a vocabulary row
                    assert any(torch.equal(v[0], row) for row in tiny.token_embedding_matrix())
                    trained_prompt = tiny.encode_with_vectors(["{} van gogh"], v).embeddings  # tau_phi([v; c])
                e_c, e_0 = eps(x, original["van gogh"]), eps(x, original[""])
                erase_term = F.mse_loss(eps(x, trained_prompt), e_0 - 1.5 * (e_c - e_0))
                x_r = pool.latents[0, 1][None]  # the one retain trajectory, at the example's step
                retain_term = F.mse_loss(
                    eps(x_r, tiny.encode_prompts(RETAIN).embeddings), eps(x_r, original[RETAIN[0]])
                )
                expected = erase_term + 0.3 * retain_term
            assert retain_term > 0 and erase_term > 0
            torch.testing.assert_close(got.detach(), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_inner_attack_accumulates_gradients_as_the_reference(tiny):
    import dataclasses

    config, loss = _loss_setup(tiny, warmup=0)
    pool = loss.retain_pool  # any trajectories of the right shape; owner 0 stands for the target's row

    def attack(**settings):
        loss.config, loss.state = dataclasses.replace(config, **settings), {}
        with tiny.lora_adapters(config.patterns, 2, 2.0, generator=torch.Generator().manual_seed(0)) as lora:
            batch = Batch(pool.latents[:, 1], pool.timesteps[1:2], torch.tensor([0]), torch.Generator().manual_seed(1),
                          step=0, pool=pool)  # fmt: skip
            loss._attack(batch, Predictions(tiny, lora))
        return loss.state["tokens"]

    one, one_plain = attack(attack_steps=1), attack(attack_steps=1, attack_accumulates=False)
    torch.testing.assert_close(one, one_plain)  # one step: the sum is the gradient itself
    summed = attack(attack_steps=3, attack_lr=0.05)
    plain = attack(attack_steps=3, attack_lr=0.05, attack_accumulates=False)
    assert not torch.allclose(summed, plain) and not torch.allclose(one, plain)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from pipelines import load_pipeline

    tiny = load_pipeline("tiny")
    config = erase.get_method("advunlearn").quick_config()
    artifact = erase_concepts(tiny, ConceptSpec(("van gogh",)), "advunlearn", config)
    folder = erase.save_artifact(artifact, tmp_path_factory.mktemp("au") / "vg", tiny)
    return tiny, artifact, folder


@pytest.mark.slow
def test_the_artifact_loads_in_plain_diffusers_text_encoder_included_within_1e_3(trained):
    from pipelines import load_pipeline

    tiny, artifact, folder = trained
    assert artifact.deltas and all(k.startswith("text_encoder.") for k in artifact.deltas)
    prompts = ["van gogh", "a painting by van gogh", "a cat"]
    x = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.full((3,), 400)
    base = tiny.noise_prediction(x, t, tiny.encode_prompts(prompts))
    with tiny.weight_deltas(artifact.deltas):
        encoding = tiny.encode_prompts(prompts)
        in_memory = tiny.noise_prediction(x, t, encoding)
    plain = load_pipeline("tiny").pipe  # the same random weights, loaded afresh
    plain.load_lora_weights(str(folder))
    embeds, _ = plain.encode_prompt(prompts, "cpu", 1, False)
    with torch.no_grad():
        loaded = plain.unet(x, t, encoder_hidden_states=embeds).sample
    assert (embeds - encoding.embeddings).abs().max() <= 1e-3
    assert (loaded - in_memory).abs().max() <= 1e-3
    assert (base - in_memory).abs().max() > 1e-3  # the erasure is visible


@pytest.mark.slow
def test_a_killed_run_resumes_bit_exact_with_its_warm_started_tokens(tiny, tmp_path):
    concepts = ConceptSpec(("van gogh",))
    settings = dict(steps=5, lr=1e-2, pool_images=1, pool_steps=3, warmup=1, attack_steps=2, attack_every=2,
                    attack_init="latest", retain_prompts=RETAIN, retain_batch=1)  # fmt: skip
    whole = erase_advunlearn(tiny, concepts, AdvUnlearnConfig(**settings))
    folder = tmp_path / "ckpt"
    first = erase_advunlearn(tiny, concepts, AdvUnlearnConfig(**{**settings, "steps": 2}, checkpoint_dir=str(folder)))
    assert first.info["attacks_this_run"] == 1
    saved = load_file(str(folder / "step-00000002" / "optimizer.safetensors"))
    assert saved["loss.tokens"].shape == (1, 1, tiny.token_embedding_matrix().shape[1])
    resumed = erase_advunlearn(tiny, concepts, AdvUnlearnConfig(**settings, checkpoint_dir=str(folder)))
    assert resumed.info["resumed_from_step"] == 2 and resumed.info["attacks_this_run"] == 1  # step 3 only
    for name, (a, b) in whole.factors.items():
        assert torch.equal(resumed.factors[name][0], a) and torch.equal(resumed.factors[name][1], b), name


@pytest.mark.parametrize(
    "model, components",
    [
        ("tiny-sdxl", {"text_encoder", "text_encoder_2"}),
        pytest.param("tiny-sd3", {"text_encoder", "text_encoder_2"}, marks=pytest.mark.slow),
        pytest.param("tiny-flux", {"text_encoder"}, marks=pytest.mark.slow),
    ],
)
def test_the_clip_encoders_are_trained_and_a_random_token_is_one_tokens_rows_in_every_encoder(tiny, model, components):
    """Default layers: every CLIP text encoder's (SDXL's and SD3's two, Flux's one; T5 is no LoRA file their loaders
    read). A random init is one token's input rows in every text encoder side by side, T5's included."""
    from erase.lora.advunlearn import text_encoder_layers
    from pipelines import load_pipeline

    wrapper = load_pipeline(model)
    names = wrapper.lora_modules(text_encoder_layers(wrapper))
    assert {m.partition(".")[0] for m in names} == components
    for component in components:
        assert {m.rsplit(".", 1)[-1] for m in names if m.startswith(f"{component}.")} == {
            "q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"
        }  # fmt: skip
    assert text_encoder_layers(tiny) == TEXT_ENCODER_LAYERS
    config, loss = _loss_setup(wrapper, attack_steps=0)
    pool = loss.retain_pool
    batch = Batch(pool.latents[:, 1], pool.timesteps[1:2], torch.tensor([0]), torch.Generator().manual_seed(1),
                  step=0, pool=pool)  # fmt: skip
    with wrapper.lora_adapters(config.patterns, 2, 2.0, generator=torch.Generator().manual_seed(0)) as lora:
        loss._attack(batch, Predictions(wrapper, lora))
    token = loss.state["tokens"][0]
    rows = wrapper.token_rows(wrapper.slot_token_ids())
    assert token.shape == (1, rows.shape[1]) and (rows == token.to(rows.dtype)).all(dim=1).sum() >= 1
