"""SPEED: the reference formula written out in float64, its invariance, and its prior-knowledge refinement."""

import pytest
import torch

from erase import ConceptSpec, erase_concepts
from erase.closed_form.speed import (
    SPEEDConfig,
    kmeans_centres,
    null_space_projection,
    refined_retain,
    weakest_direction,
)


def _last_subject_embedding(pipe, text):
    """The reference's embedding of a concept: ``last_hidden_state`` at ``attention_mask.sum() - 2``."""
    tok = pipe.tokenizer(text, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt")  # fmt: skip
    hidden = pipe.text_encoder(tok.input_ids).last_hidden_state[0].double()
    return hidden[int(tok.attention_mask[0].sum()) - 2]


@torch.no_grad()
def _reference_speed_weights(pipe, targets, anchors, retain_texts, config):
    """``train_erase_null.py``'s ``edit_model`` without augmentation (``--aug_num 0``), in float64, with the same
    k-means centres (their random start is the method's generator's first draw)."""
    eye = torch.eye(pipe.text_encoder.config.hidden_size, dtype=torch.float64)
    null_tok = pipe.tokenizer("", padding="max_length", max_length=77, return_tensors="pt")
    null_hidden = pipe.text_encoder(null_tok.input_ids).last_hidden_state[0].double()
    centres = kmeans_centres(null_hidden[1:], config.null_clusters, torch.Generator().manual_seed(config.seed))
    k2 = torch.cat([null_hidden[[0], :], centres]).T
    i2 = torch.eye(k2.shape[1], dtype=torch.float64)
    sum_tt, sum_at = [], []
    for target, anchor in zip(targets, anchors, strict=True):
        t, a = _last_subject_embedding(pipe, target)[None], _last_subject_embedding(pipe, anchor)[None]
        sum_tt.append(t.T @ t)
        sum_at.append(a.T @ t)
    sum_tt, sum_at = torch.stack(sum_tt).mean(0), torch.stack(sum_at).mean(0)
    if retain_texts:
        ret = torch.stack([_last_subject_embedding(pipe, r) for r in retain_texts])
    else:
        ret = null_hidden[1:]
    sum_rr = ret.T @ ret / len(ret)
    u, s, _ = torch.svd(sum_rr)
    p = u[:, s < config.threshold] @ u[:, s < config.threshold].T
    m = (sum_tt @ p + config.retain_scale * eye).inverse()
    weights = {}
    for name, module in pipe.unet.named_modules():
        if name.endswith("attn2.to_v"):
            w = module.weight.detach().double()
            inner = (k2.T @ p @ m @ k2 + config.lamb * i2).inverse()
            delta = w @ (sum_at - sum_tt) @ p @ (eye - m @ k2 @ inner @ k2.T @ p) @ m
            weights[f"unet.{name}"] = (w, delta)
    return weights


@pytest.mark.parametrize(
    "targets, anchors, preserve, settings",
    [
        (("van gogh",), ("art",), ("claude monet", "picasso", "a red star"), {}),
        (("van gogh", "picasso", "snoopy"), ("",), (), {"lamb": 0.5}),
        (("van gogh", "picasso"), ("art", "person"), ("claude monet",), {"retain_scale": 0.05, "threshold": 1e-3}),
    ],
)
def test_speed_is_the_reference_formula(tiny, targets, anchors, preserve, settings):
    """Without the random refinement (augment 0) our change is the reference's formula within float32 storage."""
    config = SPEEDConfig(augment=0, **settings)
    artifact = erase_concepts(tiny, ConceptSpec(targets, guides=anchors, preserve=preserve), "speed", config)
    anchors = anchors * len(targets) if len(anchors) == 1 else anchors
    reference = _reference_speed_weights(tiny.pipe, targets, anchors, list(preserve), config)
    assert set(reference) == set(artifact.deltas)
    for name, (weight, delta) in reference.items():
        assert delta.norm() > 1e-3 * weight.norm(), name  # a real change, compared below
        assert (artifact.deltas[name].double() - delta).norm() / delta.norm() <= 1e-5, name
    assert artifact.payload("weights").factors is not None  # rank <= #targets: exact LoRA factors


def test_speed_keeps_the_empty_prompt_exactly_and_refines_with_reference_defaults(tiny):
    """Reference defaults (IPF + DPA on): W K unchanged for the empty prompt's BOS (lambda 0), the change low rank,
    the same seed the same edit, and the refinement changes the edit (the weakest direction of W joins the retained
    span)."""
    spec = ConceptSpec(("van gogh", "picasso"), guides=("art",), preserve=("claude monet", "a red star", "a cat"))
    first = erase_concepts(tiny, spec, "speed")
    assert first.info["retain_embeddings"] == 3
    bos = tiny.encode_prompts([""]).embeddings[0, 0].double()
    for name, delta in first.deltas.items():
        w = tiny.module(name).weight.detach().double()
        assert (delta.double() @ bos).norm() <= 1e-5 * (w @ bos).norm(), name
        assert torch.linalg.matrix_rank(delta.double(), rtol=1e-6) <= 2
    again = erase_concepts(tiny, spec, "speed")
    plain = erase_concepts(tiny, spec, "speed", SPEEDConfig(augment=0))
    for name in first.deltas:
        assert torch.equal(first.deltas[name], again.deltas[name])
        assert (first.deltas[name] - plain.deltas[name]).norm() > 1e-3 * plain.deltas[name].norm()


def test_refinement_filters_by_influence_and_augments_along_the_weakest_direction():
    gen = torch.Generator().manual_seed(0)
    retain = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    erase_input = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    weight = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    erase_map = weight @ erase_input
    weakest = weakest_direction(weight)
    reference = torch.svd(weight).V[:, -1]  # the reference's torch.svd(W): reduced, V's last column
    assert min(float((weakest - reference).norm()), float((weakest + reference).norm())) < 1e-10
    tall = torch.randn(9, 6, generator=gen, dtype=torch.float64)
    assert float((tall @ weakest_direction(tall)).norm()) == pytest.approx(float(torch.svd(tall).S[-1]), rel=1e-9)
    config = SPEEDConfig(augment=3, chunk_size=16)
    rows = refined_retain(retain, weight, erase_input, weakest, config, torch.Generator().manual_seed(1))
    influence = (retain @ erase_map.T).norm(dim=1)
    strong = retain[influence > influence.mean()]
    assert 0 < len(strong) < len(retain) and torch.equal(rows[: min(16, len(strong))], strong[:16])
    originals = {tuple(r.tolist()) for r in strong}
    augmented = [r for r in rows if tuple(r.tolist()) not in originals]
    assert len(rows) == len(strong) + len(augmented) and 0 < len(augmented) < 3 * len(strong)
    for row in augmented:  # an original moved along the weakest right singular vector of W only
        offsets = strong - row
        along = offsets @ weakest
        assert float((offsets - along[:, None] * weakest).norm(dim=1).min()) < 1e-9
    # a draw's influence is E r + s E v: the kept draws are those above their chunk's mean, recomputed directly
    drawn = torch.stack(augmented)
    assert float((drawn @ erase_map.T).norm(dim=1).min()) > 0
    plain = refined_retain(retain, weight, erase_input, weakest, SPEEDConfig(augment=0), torch.Generator())
    assert torch.equal(plain, retain)
    unfiltered = SPEEDConfig(augment=1, influence_filter=False)
    unfiltered = refined_retain(retain, weight, erase_input, weakest, unfiltered, gen)
    assert torch.equal(unfiltered[: len(retain)], retain)


def test_null_space_projection_in_a_span_basis_is_the_reference_projection():
    """The reference's P = U[:, S < t] U[:, S < t]^T from the SVD of R, whether found in the whole space or in a
    basis of the rows' span."""
    gen = torch.Generator().manual_seed(3)
    originals = torch.randn(7, 20, generator=gen, dtype=torch.float64)
    direction = torch.randn(20, generator=gen, dtype=torch.float64)
    rows = torch.cat([originals, originals[:3] + 0.5 * direction, originals[2:5] - 2.0 * direction])
    covariance = rows.T @ rows / len(rows)
    u, s, _ = torch.svd(covariance)
    for threshold in (0.1, 1.0):
        expected = u[:, s < threshold] @ u[:, s < threshold].T
        torch.testing.assert_close(null_space_projection(rows, threshold), expected)
        spanned = null_space_projection(rows, threshold, torch.cat([originals, direction[None]]))
        torch.testing.assert_close(spanned, expected)


def test_kmeans_centres_are_a_fixed_point_of_lloyd():
    gen = torch.Generator().manual_seed(0)
    blobs = torch.cat([torch.randn(20, 3, generator=gen, dtype=torch.float64) + 10 * k for k in range(3)])
    centres = kmeans_centres(blobs, 3, torch.Generator().manual_seed(2))
    nearest = torch.cdist(blobs, centres).argmin(dim=1)
    for k in range(3):
        torch.testing.assert_close(centres[k], blobs[nearest == k].mean(dim=0))
    assert sorted(torch.bincount(nearest).tolist()) == [20, 20, 20]
    with pytest.raises(ValueError, match="clusters"):
        kmeans_centres(blobs, 61, gen)


def test_speed_drops_preserved_texts_naming_a_target_and_checks_its_config(tiny):
    artifact = erase_concepts(tiny, ConceptSpec(("picasso",), preserve=("a cat", "a picasso painting")), "speed")
    assert artifact.info["retain_dropped"] == ["a picasso painting"] and artifact.info["retain_embeddings"] == 1
    for bad in ({"retain_scale": 0}, {"threshold": -1}, {"augment": -1}, {"null_clusters": 0}, {"layers": ()}):
        with pytest.raises(ValueError):
            SPEEDConfig(**bad)
