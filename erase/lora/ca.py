"""Ablating Concepts (Kumari et al., 2023), model-based variant: the concept's prediction becomes the anchor's.

Loss, per step, on (x_t, t) drawn from frozen-model trajectories of the ANCHOR prompt c* (``erase.lora.trainer``;
the anchor of a concept is its guide in ``ConceptSpec``, so ``--guide painting`` sets it)::

    L = || eps_theta(x_t, c, t) - eps*(x_t, c*, t) ||^2
        + anchor_weight * || eps_theta(x_t, a, t) - eps*(x_t, a, t) ||^2        (a: an anchor prompt, if any)

eps_theta is the UNet with the LoRA adapters, eps* the same UNet with them off (the frozen model), c the concept
("van gogh") and c* its anchor ("painting"). The first term is the paper's model-based objective: on images of the
anchor, the model given the concept predicts what the original model predicts given the anchor, so the concept's
distribution is moved onto the anchor's. The second is the family's anchor regularization, as in ``erase.lora.esd``
(``--preserve`` or ``anchor_prompts``; none by default); the paper's own optional prior-preservation term
(``--with_prior_preservation``, the noise-prediction loss on anchor images) is not reproduced. Several concepts at
once: the pool holds each distinct anchor's trajectories and each example is paired with a concept of that anchor,
drawn with the trainer's generator.

Reference (github.com/nupurkmr9/concept-ablation, ``diffusers/train.py`` and ``compvis/``): the style command
(``--caption_target "van gogh" --class_prompt painting``) trains the cross-attention keys and values
(``--parameter_group cross-attn``, ``freeze_model: crossattn-kv``; ``attn`` for every attention projection) with
Adam at 2e-6 scaled by batch and GPUs (``--scale_lr``, batch 4 on 2 GPUs: 1.6e-5) for 100 steps (110 in the CompVis
config), on 1000 images the frozen model draws for LLM-written captions of the anchor (25 steps, guidance 6),
noised at a uniform timestep; the concept prompt is the anchor caption with the style appended ("..., in the style
of van gogh"). Its target is the model being trained, under stop-gradient (``unet(...)`` in ``no_grad``).

Our defaults follow it: keys and values (``train="kv"``; ``"xattn"`` adds queries and outputs), lr 1.6e-5 (the
command's effective rate), 100 steps, batch 8 (its 4 x 2 GPUs), trajectories at 25 steps and guidance 6. Where we
differ: the change is a rank-4 LoRA (alpha 4), not a full fine-tune of K/V (so the reference's rate moves the model
less); the target is the frozen model's anchor prediction, not the trained model's under stop-gradient (with K/V
trained both move with the adapters; the frozen one is a fixed target); x_t are the states of 8 frozen-model
sampling trajectories per anchor (the sampler's timesteps) rather than freshly noised final images at any of 1000
timesteps; and the prompts are the bare concept and anchor, not captions. The command line's default guide for art
is "art", not the reference's "painting": pass ``--guide painting`` for the reference's anchor.

Micro setting: ``--lr 3e-3`` with the guide "art" (the reference's rate erases nothing on this model, and its
anchor "painting" barely erases: the micro model draws "painting" partly as van gogh); five styles at once ``--lr
3e-3 --steps 1500 --preserve-set world``. Figures in ``docs/methods.md``.
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

__all__ = ["CAConfig", "CALoss", "ca_loss", "erase_ca"]

logger = logging.getLogger(__name__)


@dataclass
class CAConfig(LoraTrainConfig):
    """Settings of a concept-ablation erasure; the training fields are ``LoraTrainConfig``'s, with the reference's
    defaults (see the module docstring).

    Attributes:
        train: ``kv`` (cross-attention keys and values, the reference's default) or ``xattn`` (all four projections).
        adversarial_objective: ``"frozen"`` for adversarial training (``adversarial``): the adversary restores the
            original model's prediction on the concept; RACE's ``"noise"`` would restore the pool's images, which are
            the anchor's here.
        (``anchor_weight`` and ``anchor_prompts``: the family's anchor term, ``LoraTrainConfig``'s.)
    """

    VARIANTS: ClassVar[tuple[str, ...]] = ("kv", "xattn")

    lr: float = 1.6e-5
    steps: int = 100
    batch_size: int = 8
    pool_steps: int = 25
    pool_guidance: float = 6.0
    train: str = "kv"
    adversarial_objective: str = "frozen"  # the pool is the anchor's: RACE's x_T would restore the anchor's image


@dataclass
class CALoss:
    """The concept-ablation loss of one erasure, and the prompts whose trajectories it trains on.

    ``pool_prompts`` are the distinct guides (the concepts' anchors); a pool example of guide j is paired with one
    of ``concepts_of[j]`` (indices into the concepts). Built by ``ca_loss``; a callable the trainer takes.
    """

    pool_prompts: list[str]
    concepts_of: list[list[int]]
    anchors: list[str]
    encoding: PromptEncoding
    anchor_weight: float

    def __call__(self, batch: Batch, predict: Predictions) -> torch.Tensor:
        owners = batch.prompts
        n_concepts = sum(len(c) for c in self.concepts_of)
        # Encoding rows: the concepts, then the pool's anchors (guides), then the regularization anchors.
        concept_rows = torch.tensor([self._concept(int(j), batch.generator) for j in owners], dtype=torch.long)
        first_anchor = n_concepts + len(self.pool_prompts)
        frozen, trained, anchored = predict_anchored(
            predict, batch, self.encoding, [n_concepts + owners.long()], [concept_rows],
            range(first_anchor, first_anchor + len(self.anchors)), self.anchor_weight,
        )  # fmt: skip
        return torch.nn.functional.mse_loss(trained[0], frozen[0]) + anchored

    def _concept(self, guide: int, generator: torch.Generator) -> int:
        choices = self.concepts_of[guide]
        if len(choices) == 1:
            return choices[0]
        return choices[int(torch.randint(0, len(choices), (1,), generator=generator))]


def ca_loss(wrapper: PipelineWrapper, concepts: ConceptSpec, config: CAConfig) -> CALoss:
    """The loss for ``concepts`` (each target's anchor is its guide) and the anchors of ``config``/preserve."""
    targets = list(concepts.targets)
    guides = [concepts.guide_for(i) for i in range(len(targets))]
    pool_prompts = list(dict.fromkeys(guides))
    concepts_of = [[i for i, g in enumerate(guides) if g == p] for p in pool_prompts]
    anchors = list(dict.fromkeys([*config.anchor_prompts, *concepts.preserve]))
    for anchor in anchors:
        wrapper.check_prompt(anchor, "anchor prompt")
    encoding = wrapper.encode_prompts([*targets, *pool_prompts, *anchors])
    return CALoss(pool_prompts, concepts_of, anchors, encoding, float(config.anchor_weight))


@register_method("ca", CAConfig, "lora", "Ablating Concepts (Kumari et al., 2023), model-based: LoRA trained so the "
                 "concept's prediction is the frozen model's for its anchor (the guide), optional anchor "
                 "regularization", capabilities=dataclasses.replace(TRAINED, architectures=ARCHITECTURES))  # fmt: skip
def erase_ca(wrapper: PipelineWrapper, concepts: ConceptSpec, config: CAConfig) -> WeightEdit:
    """Train the concept-ablation LoRA for every target of ``concepts`` on trajectories of their anchors."""
    loss = ca_loss(wrapper, concepts, config)
    targets = list(concepts.targets)
    edit = train_lora(
        wrapper,
        pool_prompts=loss.pool_prompts,
        loss_fn=loss,
        config=config,
        layers=config.patterns,
        run_key={
            "method": "ca",
            "targets": targets,
            "guides": [concepts.guide_for(i) for i in range(len(targets))],
            "anchors": loss.anchors,
            "config": config_key(config),
        },
        description=f"ca {', '.join(targets)}",
        attacked=[[targets[i] for i in group] for group in loss.concepts_of],
    )
    edit.info.update(
        {
            "pool_prompts": loss.pool_prompts,
            "anchors": loss.anchors,
            "variant": config.train,
            "patterns": list(config.patterns),
        }
    )
    return edit
