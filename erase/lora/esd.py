"""Erased Stable Diffusion (Gandikota et al., 2023): a LoRA trained so the concept's prediction is negatively guided.

Loss, per step, on (x_t, t) drawn from frozen-model trajectories of the concept prompt c (``erase.lora.trainer``)::

    L = || eps_theta(x_t, c, t) - [eps*(x_t, "", t) - eta (eps*(x_t, c, t) - eps*(x_t, "", t))] ||^2
        + anchor_weight * || eps_theta(x_t, a, t) - eps*(x_t, a, t) ||^2        (a: an anchor prompt, if any)

eps_theta is the UNet with the LoRA adapters, eps* the same UNet with them off (the frozen model), "" the empty
prompt and eta the negative guidance. The first term is the paper's: the trained model's prediction on the concept
becomes the frozen model's prediction guided AWAY from the concept. The second, anchor regularization, keeps the
predictions on anchor prompts (``--preserve``, or ``anchor_prompts``; none by default) where the frozen model has
them. Several concepts at once: each step's examples come from the pool of all concepts' trajectories, each paired
with its own concept. The guide of ``ConceptSpec`` plays no part: ESD erases towards the unconditional prediction.

Variants (``train``): ``xattn`` (ESD-x: every cross-attention projection, q/k/v/out; the paper's choice for styles,
the default), ``noxattn`` (ESD-u: every other transformer-block Linear; the official ESD-u also fine-tunes
convolutions and resnets, which a Linear LoRA does not reach), ``kv`` (cross-attention keys and values only, the
official ``esd-x-strict``). ``layers`` overrides the variant's patterns.

Reference settings (github.com/rohitgandikota/erasing). The two official scripts define the guidance differently:

* ``train-scripts/train-esd.py`` (the paper's code): target ``e_0 - ng (e_p - e_0)``, ``--negative_guidance 1``,
  lr 1e-5, 1000 iterations, start guidance 3, 50 DDIM steps; x_t sampled with the model being trained.
* ``esd_sd.py`` (diffusers, newer): target ``e_p - ng (e_p - e_0)``, ``--negative_guidance 2``, lr 5e-5, 200
  iterations, guidance 3, 50 steps; x_t sampled with the frozen base UNet. Its ng equals the paper's eta + 1, so its
  default 2 is the paper's 1.

Our defaults are ``esd_sd.py``'s, written in the paper's form: eta 1, lr 5e-5, 200 steps, trajectories at guidance 3
with 50 sampler steps. Where we differ: the change is a rank-4 LoRA (alpha 4) rather than a full fine-tune of the
modules (so the reference's learning rate moves the model less), and x_t comes from a pool of frozen-model
trajectories sampled once instead of a partial denoising run per step.

Measured on the micro world (``scripts/measure_erasure.py --concept "van gogh" --method esd --images 100``, CLIP /
judge, before -> after): the defaults leave van gogh at 100% (as the issue reports for the official script at its
default rate). ``--set lr=1e-3`` (200 steps, the rest default): van gogh 100 -> 1 / 100 -> 1%, "vincent van gogh"
100 -> 6 / 6%, "starry night style" 100 -> 5 / 5% (read as "plain" and warhol); the five other styles 98-100% after
(picasso 100 -> 98); objects 87.5 -> 84.4% (judge 91.7 -> 83.3%, 96 images), colours 94.8 -> 95.8% (judge 97.9 ->
95.8%). Objects lose more than the 3 points the issue allows. With the anchor term on the 21 other micro-world
concepts (``--preserve-set world``, weight 1, same 200 steps) objects hold (87.5 -> 88.5%, judge 91.7 -> 92.7%;
colours 94.8 -> 95.8%, judge 97.9 -> 96.9%) but van gogh is only erased to 20% ("vincent van gogh" 38%, "starry
night style" 27%): the anchors buy preservation with efficacy at equal steps. With the anchors and twice the steps
(``--preserve-set world --set lr=1e-3 --set steps=400``) every bar is met: van gogh 100 -> 0 / 0%, "vincent van
gogh" 0 / 0%, "starry night style" 2 / 2%, the five other styles 100% after, objects 87.5 -> 91.7% (judge 91.7 ->
92.7%), colours 94.8 -> 94.8% (judge 97.9 -> 94.8%, 3 images of 96). The edit took 16.5 s wall (26.7 s with the
anchors at 200 steps; the 400-step run shared the machine).

Several concepts share the steps. Five styles at once (van gogh, mondrian, seurat, picasso, monet; ``--set lr=1e-3``,
100 images a group): at 200 steps nothing is erased (97-100% on every name and synonym) while objects fall 87.5 ->
80.2% (judge 91.7 -> 81.2%) and colours 94.8 -> 85.4%; at ``--set steps=1000`` every style and synonym is at 0-13%
(van gogh 6%, picasso 11%, "cubism" and "starry night style" 13%; each erased style reads as another erased one)
and warhol stays at 98%, but objects fall to 45.8% (judge 50.0%) and colours to 45.8% (judge 45.8%): five styles
erased through cross-attention at this rate break what was to be kept. The anchor term on the world's other
concepts fixes that (``--preserve-set world``, 17 anchor prompts, 1000 steps, 157 s): objects 87.5 -> 89.6% (judge
91.7 -> 92.7%), colours 94.8 -> 97.9% (judge 97.9 -> 99.0%), warhol 100%; mondrian, seurat, picasso and monet and
their synonyms at 0-7%, but van gogh keeps 24% ("vincent van gogh" 36%, "starry night style" 27%; each erased style
reads mostly as picasso or van gogh, the other erased ones). At ``--set steps=2000`` (179 s) all five and every
synonym are at 0-3% (van gogh now reads as "plain"), warhol 100%, objects 87.5 -> 85.4% (judge 91.7 -> 88.5%),
colours 94.8 -> 94.8% (judge 97.9 -> 95.8%)::

    scripts/measure_erasure.py --concept "van gogh" --concept mondrian --concept seurat --concept picasso \
        --concept monet --method esd --set lr=1e-3 --set steps=2000 --preserve-set world --images 100
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import ClassVar

import torch

from pipelines import PipelineWrapper, PromptEncoding

from ..core.registry import ConceptSpec, WeightEdit, register_method
from .trainer import (
    TRAINED,
    Batch,
    LoraTrainConfig,
    Predictions,
    config_key,
    predict_anchored,
    train_lora,
)

__all__ = ["ESDConfig", "ESDLoss", "erase_esd", "esd_loss", "esd_target"]

logger = logging.getLogger(__name__)


@dataclass
class ESDConfig(LoraTrainConfig):
    """Settings of an ESD erasure; the training fields are ``LoraTrainConfig``'s.

    Attributes:
        negative_guidance: eta in the paper's form (1 = the official scripts' defaults; ``esd_sd.py`` writes it 2).
        train: ``xattn`` (ESD-x, default), ``noxattn`` (ESD-u) or ``kv`` (keys and values only).
        (``anchor_weight`` and ``anchor_prompts``: the family's anchor term, ``LoraTrainConfig``'s.)
    """

    VARIANTS: ClassVar[tuple[str, ...]] = ("xattn", "noxattn", "kv")

    negative_guidance: float = 1.0
    train: str = "xattn"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.negative_guidance > 0:
            raise ValueError(f"negative_guidance must be > 0, got {self.negative_guidance}")


def esd_target(frozen_concept: torch.Tensor, frozen_uncond: torch.Tensor, eta: float) -> torch.Tensor:
    """The paper's target eps*(x, "") - eta (eps*(x, c) - eps*(x, ""))."""
    return frozen_uncond - eta * (frozen_concept - frozen_uncond)


@dataclass
class ESDLoss:
    """The ESD loss of one erasure: a callable the trainer takes, built by ``esd_loss``.

    Encoding rows: the targets (also the pool's prompts, so a pool example's owner is its concept's row), then the
    empty prompt, then the anchor prompts.
    """

    targets: list[str]
    anchors: list[str]
    encoding: PromptEncoding
    negative_guidance: float
    anchor_weight: float

    def __call__(self, batch: Batch, predict: Predictions) -> torch.Tensor:
        rows, first_anchor = batch.prompts, len(self.targets) + 1
        frozen_rows = [rows, torch.full_like(rows, len(self.targets))]  # the concept, ""
        frozen, trained, anchored = predict_anchored(
            predict, batch, self.encoding, frozen_rows, [rows],
            range(first_anchor, first_anchor + len(self.anchors)), self.anchor_weight,
        )  # fmt: skip
        loss = torch.nn.functional.mse_loss(trained[0], esd_target(frozen[0], frozen[1], self.negative_guidance))
        return loss + anchored


def esd_loss(wrapper: PipelineWrapper, concepts: ConceptSpec, config: ESDConfig) -> ESDLoss:
    """The loss for ``concepts``' targets, anchored on ``config.anchor_prompts`` and the preserved concepts."""
    targets = list(concepts.targets)
    anchors = list(dict.fromkeys([*config.anchor_prompts, *concepts.preserve]))
    for anchor in anchors:
        wrapper.check_prompt(anchor, "anchor prompt")
    encoding = wrapper.encode_prompts([*targets, "", *anchors])
    return ESDLoss(targets, anchors, encoding, float(config.negative_guidance), float(config.anchor_weight))


@register_method(
    "esd",
    ESDConfig,
    "lora",
    "Erased Stable Diffusion (Gandikota et al., 2023): LoRA trained to negatively guide the concept's prediction, "
    "optional anchor regularization",
    capabilities=dataclasses.replace(TRAINED, guides=False),
)
def erase_esd(wrapper: PipelineWrapper, concepts: ConceptSpec, config: ESDConfig) -> WeightEdit:
    """Train the ESD LoRA for every target of ``concepts`` (anchors: ``config.anchor_prompts`` and the preserved)."""
    loss = esd_loss(wrapper, concepts, config)
    edit = train_lora(
        wrapper,
        pool_prompts=loss.targets,
        loss_fn=loss,
        config=config,
        layers=config.patterns,
        run_key={"method": "esd", "targets": loss.targets, "anchors": loss.anchors, "config": config_key(config)},
        description=f"esd {', '.join(loss.targets)}",
    )
    edit.info.update({"anchors": loss.anchors, "variant": config.train, "patterns": list(config.patterns)})
    return edit
