"""SPM (erase/spm.py) on the tiny random pipeline: settings, latent anchors, the anchoring term, variants."""

import json

import numpy as np
import pytest
import torch

import erase
from erase import ConceptSpec, erase_concepts
from erase.lora.spm import SPMConfig, latent_anchor_embeddings
from erase.lora.transport import FacilitatedTransport
from pipelines.files import file_sha256

FAST = dict(steps=8, lr=1e-2, pool_images=2, pool_steps=4)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"latent_anchors": -1}, "latent_anchors"),
        ({"latent_anchors": 1.5}, "latent_anchors"),
        ({"latent_anchor_weight": -1.0}, "latent_anchor_weight"),
        ({"train": "everything"}, "train"),
        ({"negative_guidance": 0.0}, "negative_guidance"),
        ({"facilitated_transport": "yes"}, "facilitated_transport"),
        ({"transport_metric": "cosine"}, "transport_metric"),
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


@pytest.mark.slow
def test_default_adapter_is_rank_one_on_every_transformer_block_linear(tiny):
    artifact = erase_concepts(tiny, ConceptSpec(("van gogh",)), "spm", SPMConfig(**FAST))
    ends = ("attn1.to_q", "attn2.to_k", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
    for end in ends:
        assert any(name.endswith(end) for name in artifact.deltas), end
    assert all(torch.linalg.matrix_rank(d, rtol=1e-5) == 1 for d in artifact.deltas.values())
    assert artifact.info["variant"] == "transformer" and artifact.info["facilitated_transport"] == "clipcos_tokenuni"


@pytest.mark.slow
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
    """On SDXL each latent anchor carries its own pooled text embedding, drawn around the concept's like the token
    embeddings: the UNet's added conditioning (``text_embeds``) receives, besides the concept's and the empty
    prompt's pooled embeddings, ``latent_anchors`` new ones a step, each at 0.8-1.2 times the concept's norm, none
    parallel to it, each seen twice (the frozen and the trained prediction) beside anchor token embeddings."""
    steps, m = 2, 4
    reference = tiny_sdxl.encode_prompts(["van gogh", ""])
    calls = []

    def record(module, args, kwargs):  # noqa: ANN001, ARG001 - a forward pre-hook's signature
        pooled = kwargs["added_cond_kwargs"]["text_embeds"].detach().float().clone()
        calls.append((kwargs["encoder_hidden_states"].detach().float().clone(), pooled))

    handle = tiny_sdxl.pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        config = SPMConfig(latent_anchors=m, **{**FAST, "steps": steps})
        artifact = erase_concepts(tiny_sdxl, ConceptSpec(("van gogh",)), "spm", config)
    finally:
        handle.remove()
    assert artifact.deltas and artifact.info["steps"] == steps
    known = reference.pooled.float()
    anchors = []
    for tokens, pooled in calls:
        for row_tokens, row in zip(tokens, pooled, strict=True):
            if not any(torch.allclose(row, k, atol=1e-5) for k in known):
                anchors.append(row)
                # an anchor's token embeddings are drawn too: neither the concept's nor the empty prompt's
                assert not any(torch.allclose(row_tokens, e, atol=1e-5) for e in reference.embeddings.float())
    assert len(anchors) == 2 * steps * m, len(anchors)
    distinct = torch.unique(torch.stack(anchors), dim=0)
    assert distinct.shape[0] == steps * m
    concept = known[0]
    ratio = distinct.norm(dim=1) / concept.norm()
    assert ratio.min() >= 0.8 - 1e-4 and ratio.max() <= 1.2 + 1e-4
    assert torch.nn.functional.cosine_similarity(distinct, concept[None], dim=1).abs().max() < 0.9


# ------------------------------------------------------------------------------------------ facilitated transport
def _pixels(images):
    return np.stack([np.asarray(i, dtype=np.float32) for i in images])


def test_prompt_scaled_lora_scales_each_prompt_of_a_guided_batch(tiny):
    """Strength 1 for one prompt and 0 for its batch neighbour: the first draws what the merged change draws, the
    second exactly what the base draws (so the unconditional half took its own prompt's strength, not a neighbour's);
    the strength rule sees each prompt's token ids when the text encoder made it, and None for an embedding passed in.
    """
    names = [f"unet.{name}" for name in tiny.lora_modules(["*attn2.to_v", "*ff.net.2"])]
    gen = torch.Generator().manual_seed(0)
    factors = {}
    for name in names:
        module = tiny.module(name)
        factors[name] = (
            torch.randn(1, module.in_features, generator=gen),
            torch.randn(module.out_features, 1, generator=gen),
        )
    deltas = {name: b @ a for name, (a, b) in factors.items()}
    seen = []

    def strengths(embeddings, token_ids):
        seen.append([ids is not None for ids in token_ids])
        return torch.tensor([1.0, 0.0])[: embeddings.shape[0]]

    prompts, seeds = ["a painting by van gogh", "a cat"], [0, 1]
    base = _pixels(tiny.generate(prompts, seeds, steps=3, progress=False))
    with tiny.weight_deltas(deltas):
        full = _pixels(tiny.generate(prompts, seeds, steps=3, progress=False))
    with tiny.add_prompt_scaled_lora(factors, strengths):
        scaled = _pixels(tiny.generate(prompts, seeds, steps=3, progress=False))
        assert all(all(row) for row in seen)
        encoding = tiny.encode_prompts(prompts)
        seen.clear()
        shifted = type(encoding)(encoding.prompts, encoding.input_ids, encoding.embeddings + 0.01, encoding.lengths)
        tiny.generate(shifted, seeds, steps=2, progress=False)
        assert seen and not any(any(row) for row in seen)
        x = torch.randn(2, 4, 16, 16, generator=gen)
        t = torch.tensor([500, 500])
        direct = tiny.noise_prediction(x, t, encoding)  # no guidance halves: one strength per row
    assert np.abs(scaled[0] - full[0]).max() <= 1.0 and np.abs(full[0] - base[0]).max() > 1.0
    assert np.array_equal(scaled[1], base[1])
    assert torch.equal(direct[1], tiny.noise_prediction(x, t, encoding)[1])
    assert np.array_equal(_pixels(tiny.generate(prompts, seeds, steps=3, progress=False)), base)  # hooks removed


def test_transport_strength_is_the_references_clipcos_tokenuni():
    """max over concepts of max(cosine of the flattened embeddings, share of the concept's tokens in the prompt);
    without token ids the cosine alone, never below 0."""
    concept = torch.zeros(1, 3, 2)
    concept[0, 0, 0] = 1.0
    transport = FacilitatedTransport(["van gogh"], concept, [[7, 8]], [0, 9])
    same, opposite = concept.clone(), -concept
    orthogonal = torch.zeros(1, 3, 2)
    orthogonal[0, 1, 1] = 1.0
    rows = torch.cat([same, opposite, orthogonal, opposite])
    ids = [torch.tensor([0, 5, 9]), torch.tensor([0, 7, 8, 9]), torch.tensor([0, 7, 9]), None]
    assert torch.allclose(transport.strengths(rows, ids)[:, 0], torch.tensor([1.0, 1.0, 0.5, 0.0]))
    cos_only = FacilitatedTransport(["van gogh"], concept, [[7, 8]], [0, 9], metric="clipcos")
    assert torch.allclose(cos_only.strengths(rows, ids)[:, 0], torch.tensor([1.0, -1.0, 0.0, 0.0]))
    two = FacilitatedTransport(["van gogh", "monet"], torch.cat([concept, orthogonal]), [[7, 8], [5]], [0, 9],
                               groups=[0, 1])  # fmt: skip
    assert torch.allclose(two.strengths(rows, ids), torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.5, 1.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="groups"):
        FacilitatedTransport(
            ["van gogh", "monet"], torch.cat([concept, orthogonal]), [[7, 8], [5]], [0], groups=[0, 2]
        )


@pytest.mark.slow
def test_spm_artifact_with_transport_round_trips_attaches_once_and_restores(tiny, tmp_path):
    artifact = erase_concepts(tiny, ConceptSpec(("van gogh",)), "spm", SPMConfig(**FAST))
    folder = erase.save_artifact(artifact, tmp_path / "spm", tiny)
    assert {"transport.json", "transport.safetensors", "pytorch_lora_weights.safetensors"} <= {
        p.name for p in folder.iterdir()
    }
    prompts, seeds = ["a painting by van gogh", "a cat"], [0, 1]
    base = _pixels(tiny.generate(prompts, seeds, steps=3, progress=False))
    with artifact.applied(tiny):
        in_memory = _pixels(tiny.generate(prompts, seeds, steps=3, progress=False))
    handle = erase.load(tiny.pipe, folder)
    with pytest.raises(ValueError, match="already attached"):
        erase.load(tiny.pipe, folder)
    attached = _pixels(tiny.generate(prompts, seeds, steps=3, progress=False))
    handle.remove()
    assert np.abs(attached - in_memory).max() <= 1.0 and np.abs(attached - base).max() > 1.0
    assert np.array_equal(_pixels(tiny.generate(prompts, seeds, steps=3, progress=False)), base)
    tensors = folder / "transport.safetensors"
    saved = tensors.read_bytes()
    tensors.write_bytes(saved[:-4] + bytes(4))
    with pytest.raises(erase.ArtifactError, match="was changed"):
        erase.load_artifact(folder)
    tensors.write_bytes(saved)
    (folder / "transport.json").write_text(json.dumps({"metric": "clipcos", "prompts": ["van gogh"]}))
    with pytest.raises(erase.ArtifactError, match="transport.json does not match the sha256"):
        erase.load_artifact(folder)
    meta = json.loads((folder / "erasure.json").read_text())  # the same file with its checksum recorded
    meta["checksums"]["transport.json"] = file_sha256(folder / "transport.json")
    (folder / "erasure.json").write_text(json.dumps(meta))
    with pytest.raises(erase.ArtifactError, match="token_sets"):
        erase.load_artifact(folder)
    off = erase_concepts(tiny, ConceptSpec(("van gogh",)), "spm", SPMConfig(facilitated_transport=False, **FAST))
    assert off.payload("transport") is None and off.info["facilitated_transport"] is False


@pytest.mark.slow
def test_several_concepts_get_one_adapter_each_scaled_apart(tiny):
    """Two concepts: two rank-1 adapters side by side (the first is exactly the one-concept adapter, same seed), and
    a prompt at strengths (1, 0) draws what the first adapter alone draws."""
    both = erase_concepts(tiny, ConceptSpec(("van gogh", "monet")), "spm", SPMConfig(**FAST))
    one = erase_concepts(tiny, ConceptSpec(("van gogh",)), "spm", SPMConfig(**FAST))
    assert both.payload("transport").groups == [0, 1] and both.info["adapters"] == 2
    for name, (a, b) in both.payload("weights").factors.items():
        assert (
            a.shape[0] == 2
            and torch.equal(a[:1], one.payload("weights").factors[name][0])
            and torch.equal(b[:, :1], one.payload("weights").factors[name][1])
        )
    prompts, seeds = ["a painting by van gogh", "a cat"], [0, 1]
    with tiny.weight_deltas(one.deltas):
        first_only = _pixels(tiny.generate(prompts, seeds, steps=3, progress=False))
    with tiny.add_prompt_scaled_lora(
        both.payload("weights").factors, lambda e, _ids: torch.tensor([[1.0, 0.0]]).repeat(e.shape[0], 1)
    ):
        scaled = _pixels(tiny.generate(prompts, seeds, steps=3, progress=False))
    assert np.abs(scaled - first_only).max() <= 1.0
    shared = erase_concepts(tiny, ConceptSpec(("van gogh", "monet")), "spm",
                            SPMConfig(adapter_per_concept=False, **FAST))  # fmt: skip
    assert (
        shared.payload("transport").groups is None
        and next(iter(shared.payload("weights").factors.values()))[0].shape[0] == 1
    )


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux"])
def test_transport_on_sd3_and_flux_reads_the_transformers_text_tokens(model, tmp_path):
    """The joint attention's text input (the transformer's ``encoder_hidden_states``) takes the UNet cross-attention
    input's part: the strength rule gets each prompt's T5 token ids (T5's rows reach the transformer as T5 made them),
    the concept's token set is T5's, and the artifact loaded into a plain pipeline acts as the in-memory one, in a
    noise prediction and in the pipeline's own call."""
    from pipelines import load_pipeline, wrap_pipeline
    from pipelines.tiny import tiny_pipeline

    wrapper = load_pipeline(model)
    config = SPMConfig(**{**FAST, "steps": 2, "pool_images": 1, "pool_steps": 2})
    artifact = erase_concepts(wrapper, ConceptSpec(("van gogh",)), "spm", config)
    transport = artifact.payload("transport")
    t5 = wrapper.pipe.tokenizer_2 if model == "tiny-flux" else wrapper.pipe.tokenizer_3
    special = set(t5.all_special_ids)
    assert transport.token_sets == [sorted(set(t5("van gogh")["input_ids"]) - special)]
    assert transport.token_sets != [sorted(set(wrapper.pipe.tokenizer("van gogh")["input_ids"]) - special)]
    prompts = ["a painting by van gogh", "a cat"]
    x = torch.randn(2, *wrapper.initial_latents(0).shape[1:], generator=torch.Generator().manual_seed(0))
    t = torch.tensor([600.0, 600.0])
    seen = []

    def strengths(embeddings, token_ids):
        seen.append(token_ids)
        return transport.strengths(embeddings, token_ids)

    with wrapper.add_prompt_scaled_lora(artifact.payload("weights").lora_factors(), strengths):
        encoding = wrapper.encode_prompts(prompts)  # the hook sees T5 make it
        wrapper.noise_prediction(x, t, encoding)
        shifted = type(encoding)(encoding.prompts, encoding.input_ids, encoding.embeddings + 0.01, encoding.lengths,
                                 encoding.pooled)  # fmt: skip
        wrapper.noise_prediction(x, t, shifted)
    expected, _ = wrapper.verbatim_token_sets(prompts)
    assert [set(ids.tolist()) - special for ids in seen[0]] == [set(s) for s in expected]
    assert seen[1] == [None, None]  # an embedding the encoder did not make: the cosine term alone
    assert float(transport.strengths(encoding.embeddings.float(), seen[0])[0, 0]) == 1.0  # names every concept token
    folder = erase.save_artifact(artifact, tmp_path / "spm", wrapper)
    plain = wrap_pipeline(tiny_pipeline(model, 0))
    call = dict(num_inference_steps=2, output_type="np")
    with torch.no_grad():
        base = wrapper.noise_prediction(x, t, encoding)
        with artifact.applied(wrapper):  # encoded inside, so the token term applies as it does in a pipeline call
            in_memory = wrapper.noise_prediction(x, t, wrapper.encode_prompts(prompts))
            drawn = wrapper.pipe(prompts, generator=torch.Generator().manual_seed(0), **call).images
        with erase.load(plain.pipe, folder):
            loaded = plain.noise_prediction(x, t, plain.encode_prompts(prompts))
            plain_drawn = plain.pipe(prompts, generator=torch.Generator().manual_seed(0), **call).images
    assert (loaded - in_memory).abs().max() <= 1e-5 and (in_memory - base).abs().max() > 0
    assert np.abs(plain_drawn - drawn).max() <= 1e-4
