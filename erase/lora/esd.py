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

Other prediction types (``PipelineWrapper.prediction_type``): the loss is taken on the denoiser's raw predictions,
v for SD 2.x and the flow velocity for SD3 and Flux, unchanged. At one x_t the noise is affine in the prediction with
coefficients shared by every prompt (flow: eps = x_t + (1 - sigma) v; v-prediction: eps = alpha v + sigma x_t), and the
target's coefficients sum to 1, so the velocity-form target is exactly the noise-form target expressed as a velocity;
the loss differs from the noise-form one by the per-timestep weight (1 - sigma)^2 (alpha^2), which EraseAnything's
Flux ESD leaves out as we do (plain MSE on raw transformer outputs). On SD3/Flux the ``xattn`` LoRA sits on the joint
attention's text side (``add_q/k/v_proj``, ``to_add_out``; EraseAnything trains ``add_q_proj`` and ``add_k_proj``).

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

Micro setting: ``--lr 1e-3`` (the reference's rate moves the rank-4 LoRA too little to erase on this model);
``--preserve-set world --set steps=400`` to keep objects too; five styles at once ``--lr 1e-3 --steps 2000
--preserve-set world``. Figures in ``docs/methods.md``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import ClassVar

import torch

from pipelines import ARCHITECTURES, PipelineWrapper, PromptEncoding

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

    NUMBER_RANGES: ClassVar[dict[str, str]] = {**LoraTrainConfig.NUMBER_RANGES, "negative_guidance": "> 0"}

    negative_guidance: float = 1.0
    train: str = "xattn"

    def __post_init__(self) -> None:
        super().__post_init__()  # checks negative_guidance too: NUMBER_RANGES


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
    capabilities=dataclasses.replace(TRAINED, guides=False, architectures=ARCHITECTURES),
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
