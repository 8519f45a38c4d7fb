"""RECE, Reliable and Efficient Concept Erasure (Gong et al., 2024): UCE, then erase the embeddings that undo it.

A closed-form edit of the cross-attention keys and values leaves a way back: some embedding c* that the edited
projections W'_l send where the original W_l sent the concept's embedding c. RECE finds it in closed form,

    c* = (sum_l W'_l^T W'_l + lambda I)^-1 sum_l W'_l^T W_l c          (evals.attacks.rece_embedding)

and erases it too, with UCE's solve applied to the *current* weights, every token of c* sent to the guide's token
at the same position, and the preserve terms (the empty prompt and the preserved concepts, all tokens) holding
their outputs:

    W_new = (s_e sum_i W g_i c*_i^T + s_p sum_j W p_j p_j^T + lambda W)(s_e sum_i c*_i c*_i^T + s_p sum_j p_j p_j^T
             + lambda I)^-1

A fixed number of rounds (``rounds``), each solving for the adversarial embedding of the model as the previous round
left it. No detector decides when to stop.

Defaults are the reference's for artistic styles (CharlesGong12/RECE, ``train_artists.py`` and its README): the
start is a UCE edit with UCE's own defaults, then 1 round with lambda_reg = 1e-3 for the embedding, erase scale 1,
preserve scale 0.1, lambda 0.1, the preserve set plus the empty prompt. Where we differ: the solves are float64, and
the rounds start from our UCE edit in memory instead of a UCE checkpoint on disk.

Each round's change has rank up to 77 per concept (every token row): on SD's 768-wide text embeddings the artifact is
still a LoRA, on narrow models (the micro model's 128, the tiny test model's 32) it is saved as full weights with an
exported pipeline (``StableDiffusionPipeline.from_pretrained(folder / "pipeline")``).

SD3 and Flux (the reference is SD 1.x only): the layers are uce's there, the transformer's text-side input
projections. ``context_embedder`` reads the token rows (every row of every text stream) and
``time_text_embed.text_embedder.linear_1`` the pooled vector, so each kind of input has its own adversarial map and
its own round edit, as the attack (``evals.attacks.rece_embedding``) solves them. The round's targets are the
current layer's W g without its bias b, which the edited layer adds back (W' c* + b = W g + b).

Every edit of this family is W -> W A with one A shared by all layers, so the attack's c* = A^-1 c exists whenever
A is invertible: one round removes the embedding that undid UCE (``tests/test_attacks.py``) but the attack,
re-solved against the edited model, finds the next one. Micro setting: ``--preserve-set world --set rounds=20`` (the
preserve set is the analogue of the reference's "every other artist"; without it the round costs preserved
accuracy); figures in ``docs/methods.md`` and the micro model's card::

    python scripts/attack_table.py --method rece --set rounds=20 --preserve-set world --out attacks/rece20
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from evals.attacks.rece_embedding import adversarial_map, projection_weights, restored_share
from pipelines import CrossAttentionLayer, PipelineWrapper

from ..core.registry import Capabilities, ConceptSpec, WeightEdit, register_method
from .uce import UCEConfig, erase_uce, layer_edits, uce_update

__all__ = ["RECEConfig", "erase_rece"]

logger = logging.getLogger(__name__)


@dataclass
class RECEConfig(UCEConfig):
    """Settings of RECE: UCE's fields set the starting edit; these set the adversarial rounds.

    Attributes:
        rounds: adversarial rounds after the UCE edit (the reference's ``epochs``: 1 for styles, 2-3 for nudity).
        regularization: lambda of the adversarial embedding's solve (``regular_scale``: 1e-3 for styles and
            objects, 1e-1 for nudity).
        round_erase_scale, round_preserve_scale, round_lamb: the scales of each round's edit (reference: 1, 0.1,
            0.1).
    """

    NUMBER_RANGES: ClassVar[dict[str, str]] = {
        **UCEConfig.NUMBER_RANGES, "rounds": ">= 0", "regularization": "> 0", "round_erase_scale": "> 0",
        "round_preserve_scale": ">= 0", "round_lamb": "> 0",
    }  # fmt: skip

    rounds: int = 1
    regularization: float = 1e-3
    round_erase_scale: float = 1.0
    round_preserve_scale: float = 0.1
    round_lamb: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()  # UCEConfig's checks every number of this class against its NUMBER_RANGES


def _input_rows(wrapper: PipelineWrapper, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """What the edited layers read of each prompt, float64 rows by kind: ``"tokens"``, every token embedding (BOS,
    words, EOS and padding; ``(len * tokens, width)``), and where the model has one, the pooled vector (a row each).
    """
    encoding = wrapper.encode_prompts(list(prompts))
    embeddings = encoding.embeddings.double().cpu()
    rows = {"tokens": embeddings.reshape(-1, embeddings.shape[-1])}
    if encoding.pooled is not None:
        rows["pooled"] = encoding.pooled.double().cpu()
    return rows


@register_method(
    "rece",
    RECEConfig,
    family="closed_form",
    summary="RECE: UCE plus erasing its adversarial embeddings",
    capabilities=Capabilities(preserve=True, templates="templates", architectures=("sd", "sdxl", "sd3", "flux")),
)
def erase_rece(wrapper: PipelineWrapper, concepts: ConceptSpec, config: RECEConfig) -> WeightEdit:
    """UCE's edit, then ``config.rounds`` rounds of erasing the closed-form embeddings that restore the concepts; each
    kind of input the edited layers read (token rows; SD3/Flux's pooled vector too) has its own adversarial map and
    solve, as the attack and uce have."""
    uce_fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(UCEConfig)}
    edit = erase_uce(wrapper, concepts, UCEConfig(**uce_fields))
    deltas = {k: v.detach().float().cpu() for k, v in edit.deltas.items()}
    targets = list(concepts.targets)
    guides = [concepts.guide_for(i) for i in range(len(targets))]
    groups: dict[str, list[CrossAttentionLayer]] = {}
    for layer in wrapper.cross_attention_layers(config.layers):
        groups.setdefault(layer.reads, []).append(layer)
    c_target, c_guide = _input_rows(wrapper, targets), _input_rows(wrapper, guides)
    c_preserve = _input_rows(wrapper, ["", *concepts.preserve])
    original = projection_weights(wrapper, config.layers)
    restored: dict[str, list[float | None]] = {reads: [] for reads in groups}
    for _ in range(config.rounds):
        steps = {}
        with wrapper.weight_deltas(deltas):
            edited = projection_weights(wrapper, config.layers)
            for reads, layers in groups.items():
                before, after = ({layer.name: w[layer.name] for layer in layers} for w in (original, edited))
                m = adversarial_map(before, after, config.regularization)
                c_adv = c_target[reads] @ m.T
                u, v = uce_update(c_adv, c_guide[reads], c_preserve[reads], config.round_erase_scale,
                                  config.round_preserve_scale, config.round_lamb)  # fmt: skip
                steps.update(layer_edits(wrapper, layers, u, v)[0])
                restored[reads].append(restored_share(before, after, c_target[reads], c_adv))
        deltas = {k: deltas[k] + steps[k].float().cpu() for k in deltas}
    shares = restored.get("tokens", [])
    logger.info("rece: %d rounds after UCE; the adversarial embeddings restored %s of the keys/values", config.rounds,
                ", ".join("n/a" if r is None else f"{r:.1%}" for r in shares) or "-")  # fmt: skip
    info = {**edit.info, "rounds": config.rounds, "adversarial_restored_share": shares}
    if "pooled" in restored:
        info["adversarial_restored_share_pooled"] = restored["pooled"]
    return WeightEdit(deltas, info)
