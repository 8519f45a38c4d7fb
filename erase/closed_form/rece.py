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
from pipelines import PipelineWrapper

from ..core.registry import Capabilities, ConceptSpec, WeightEdit, register_method
from .uce import UCEConfig, edit_from_update, erase_uce, uce_update

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


def _sequence_rows(wrapper: PipelineWrapper, prompts: Sequence[str]) -> torch.Tensor:
    """Every token embedding of each prompt (BOS, words, EOS and padding), float64 ``(len * tokens, width)``."""
    embeddings = wrapper.encode_prompts(list(prompts)).embeddings.double().cpu()
    return embeddings.reshape(-1, embeddings.shape[-1])


@register_method(
    "rece",
    RECEConfig,
    family="closed_form",
    summary="RECE: UCE plus erasing its adversarial embeddings",
    capabilities=Capabilities(preserve=True, templates="templates"),
)
def erase_rece(wrapper: PipelineWrapper, concepts: ConceptSpec, config: RECEConfig) -> WeightEdit:
    """UCE's edit, then ``config.rounds`` rounds of erasing the closed-form embeddings that restore the concepts."""
    uce_fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(UCEConfig)}
    edit = erase_uce(wrapper, concepts, UCEConfig(**uce_fields))
    deltas = {k: v.detach().float().cpu() for k, v in edit.deltas.items()}
    targets = list(concepts.targets)
    guides = [concepts.guide_for(i) for i in range(len(targets))]
    c_target = _sequence_rows(wrapper, targets)
    c_guide = _sequence_rows(wrapper, guides)
    c_preserve = _sequence_rows(wrapper, ["", *concepts.preserve])
    original = projection_weights(wrapper, config.layers)
    restored = []
    for _ in range(config.rounds):
        with wrapper.weight_deltas(deltas):
            edited = projection_weights(wrapper, config.layers)
            m = adversarial_map(original, edited, config.regularization)
            c_adv = c_target @ m.T
            u, v = uce_update(c_adv, c_guide, c_preserve, config.round_erase_scale, config.round_preserve_scale,
                              config.round_lamb)  # fmt: skip
            step = edit_from_update(wrapper, config.layers, u, v)
        restored.append(restored_share(original, edited, c_target, c_adv))
        deltas = {k: deltas[k] + step.deltas[k].float().cpu() for k in deltas}
    logger.info("rece: %d rounds after UCE; the adversarial embeddings restored %s of the keys/values", config.rounds,
                ", ".join("n/a" if r is None else f"{r:.1%}" for r in restored) or "-")  # fmt: skip
    info = {**edit.info, "rounds": config.rounds, "adversarial_restored_share": restored}
    return WeightEdit(deltas, info)
