"""time, rece and speed on SD3 and Flux (tiny pipelines): the text-side input projections uce edits there, each
solved with the embeddings it reads, checked by what each closed form promises of those layers."""

from __future__ import annotations

import pytest
import torch

import erase
from erase.closed_form.speed import SPEEDConfig
from erase.closed_form.time import TIMEConfig
from erase.core.registry import ConceptSpec
from evals.attacks.rece_embedding import adversarial_map, restored_share
from pipelines import load_pipeline

POOLED = "time_text_embed.text_embedder.linear_1"


@pytest.fixture(scope="module", params=["tiny-sd3", "tiny-flux"])
def transformer(request):
    return load_pipeline(request.param)


def _last_token_rows(wrapper, text):
    """What the reference UCE scripts read of ``text`` per layer: the row at ``attention_mask.sum() - 2`` of every
    text stream (SD3: CLIP's and T5's; Flux: T5's) for ``context_embedder``, the pooled vector for ``linear_1``."""
    encoding = wrapper.encode_prompts([text])
    streams = range(len(wrapper.token_streams()))
    rows = [encoding.embeddings[0, wrapper.last_token_position(text, s)].double() for s in streams]
    return {"context_embedder": torch.stack(rows), POOLED: encoding.pooled.double()}


def _weights(wrapper):
    return {
        name: wrapper.module(f"transformer.{name}").weight.detach().double() for name in ("context_embedder", POOLED)
    }


def test_time_sends_the_source_where_the_destination_goes(transformer):
    """With a small ridge, each edited projection gives the source's rows what it gave the destination's (its bias
    included, which TIME's targets W c_dest leave to the layer); the change has exact factors of one rank per row."""
    source, dest = "van gogh", "a cat"
    edit = erase.erase_concepts(transformer, ConceptSpec((source,), (dest,)), "time", TIMEConfig(lamb=1e-3))
    rows_s, rows_d, weights = (
        _last_token_rows(transformer, source),
        _last_token_rows(transformer, dest),
        _weights(transformer),
    )
    assert set(edit.deltas) == {f"transformer.{name}" for name in weights}
    for name, w in weights.items():
        moved = (w + edit.deltas[f"transformer.{name}"].double()) @ rows_s[name].T
        gap = (moved - w @ rows_d[name].T).norm() / (w @ (rows_s[name] - rows_d[name]).T).norm()
        assert gap < 1e-3, (name, float(gap))
    ranks = {
        name.rpartition("transformer.")[2]: a.shape[0]
        for name, (a, _) in edit.payload("weights").lora_factors().items()
    }
    assert ranks == {"context_embedder": len(transformer.token_streams()), POOLED: 1}


def test_rece_erases_the_embedding_that_restores_uce(transformer):
    """RECE's round removes the closed-form embedding c* that undoes uce's change: against uce's weights c* restores
    nearly all of it, against rece's little, on both projections (each with its own map: token rows, pooled)."""
    spec = ConceptSpec(("van gogh",))
    uce, rece = (erase.erase_concepts(transformer, spec, method) for method in ("uce", "rece"))
    assert len(rece.info["adversarial_restored_share"]) == len(rece.info["adversarial_restored_share_pooled"]) == 1
    encoding = transformer.encode_prompts(["van gogh"])
    for name, w in _weights(transformer).items():
        c = encoding.pooled.double() if name == POOLED else encoding.embeddings[0].double()
        original = {name: w}
        after_uce = {name: w + uce.deltas[f"transformer.{name}"].double()}
        after_rece = {name: w + rece.deltas[f"transformer.{name}"].double()}
        c_star = c @ adversarial_map(original, after_uce, 1e-3).T  # rece's default regularisation
        assert restored_share(original, after_uce, c, c_star) > 0.95, name
        assert restored_share(original, after_rece, c, c_star) < 0.2, name


def test_speed_keeps_the_empty_anchor_rows_and_moves_the_target(transformer):
    """Reference defaults (lambda 0, refinement on): the empty prompt's row where ``""`` anchors a concept (CLIP's BOS,
    T5's last padding row) and its pooled vector keep their outputs exactly; the target's rows move towards the
    anchor's output; the change's rank is the target's rows per projection."""
    spec = ConceptSpec(("van gogh",), preserve=("a cat", "a red star"))
    edit = erase.erase_concepts(transformer, spec, "speed")
    assert edit.info["retain_embeddings"] == 2 * len(transformer.token_streams())
    empty, target = _last_token_rows(transformer, ""), _last_token_rows(transformer, "van gogh")
    for name, w in _weights(transformer).items():
        delta = edit.deltas[f"transformer.{name}"].double()
        assert (delta @ empty[name].T).norm() <= 1e-5 * (w @ empty[name].T).norm(), name
        before = (w @ (target[name] - empty[name]).T).norm()
        assert ((w + delta) @ target[name].T - w @ empty[name].T).norm() < 0.9 * before, name
        assert torch.linalg.matrix_rank(delta, rtol=1e-6) == len(target[name]), name
    if transformer.architecture == "flux":  # T5 has no BOS: the empty anchor is the last padding row
        assert transformer.last_token_position("") == transformer.text_length - 1
    plain = erase.erase_concepts(transformer, spec, "speed", SPEEDConfig(augment=0))
    assert all((plain.deltas[n] - edit.deltas[n]).norm() > 1e-4 * plain.deltas[n].norm() for n in plain.deltas)
