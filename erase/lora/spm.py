"""SPM-style one-dimensional adapter (Lyu et al., 2024): a rank-1 LoRA trained with ESD's loss plus latent anchoring.

Loss, per step, on (x_t, t) drawn from frozen-model trajectories of the concept prompt c (``erase.lora.trainer``)::

    L = || eps_theta(x_t, c, t) - [eps*(x_t, "", t) - eta (eps*(x_t, c, t) - eps*(x_t, "", t))] ||^2
        + latent_anchor_weight * mean_j || eps_theta(x_t, e_j, t) - eps*(x_t, e_j, t) ||^2
        + anchor_weight * || eps_theta(x_t, a, t) - eps*(x_t, a, t) ||^2        (a: an anchor prompt, if any)

The first term is ESD's (``erase.lora.esd``; SPM's "erase" action with guidance 1 is exactly it). The second is SPM's
latent anchoring: each step draws ``latent_anchors`` random text embeddings e_j per example, each a Gaussian
direction over the whole token sequence, accepted with probability ``1 - cos(e_j, c)`` (so directions near the
concept are rejected), and scaled to ``U(0.8, 1.2)`` times the concept embedding's norm; the adapted model must
predict on them what the frozen model predicts. Random points around the concept's norm stand in for "everything
else", without a list of prompts to keep. The third is the family's anchor regularization on named prompts
(``--preserve``), as in ESD; none by default.

The adapter is rank 1 (the paper's "one-dimensional" membrane) on every Linear of the transformer blocks
(``train="transformer"``, SPM's ``Transformer2DModel`` modules; SD 1.x's Conv2d ``proj_in``/``proj_out`` are not
reached by a Linear LoRA). On SD3 and Flux (beyond the reference, which is SD 1.x/2.x) the same set
(``pipelines.LORA_TARGETS``) names the joint attention's image- and text-side projections, the image feed-forwards
and every ``proj_out`` (Flux's single blocks', the transformer's last), not the text feed-forwards (``ff_context``) nor
Flux's ``proj_mlp``; the loss is taken on the velocity as ESD's is, and transport reads the transformer's text tokens
(``erase.lora.transport``).

Reference (github.com/Con6924/SPM, ``train_spm.py`` and ``configs/*/config.yaml``): rank 1, alpha 1, lr 1e-4 (AdamW
8-bit, cosine schedule with 3 restarts and 500 warm-up steps), 3000 iterations, batch 1, guidance 1 for the erase
target, x_t from a DDIM run of 30 steps at guidance 3 stopped at a random step, 4 latent anchors a step, weight 1000.
Our defaults are these numbers. Where we differ: plain Adam at a constant rate (no 8-bit optimizer or schedule);
x_t comes from a pool of FROZEN-model trajectories sampled once (``erase.lora.trainer``), where the reference runs
the adapted model (``with network:``) for every iteration; the adapter is saved as a standard LoRA.

Micro setting: ``--lr 1e-3 --steps 600 --set latent_anchor_weight=10`` (the reference's anchor weight 1000 holds
the rank-1 adapter in place on this model; weight 0 is ESD's loss alone). A step costs about 4.4 UNet
forward+backward passes (the four latent anchors add four frozen and four trained predictions). Several concepts
get one adapter each, as the reference; one shared rank-1 adapter holds none of five styles on micro.

Facilitated transport (``facilitated_transport``, on by default as in the reference's inference): the artifact is
the LoRA plus the erased concepts as ``erase.lora.transport`` reads them, and wherever it is applied through ``erase``
(``erase.load(pipe, folder)``, audits, attacks) the adapter's strength for each prompt is the
prompt's likeness to the erased concepts, so prompts far from them meet the base model. ``pipe.load_lora_weights``
still loads the same folder as a plain LoRA at full strength for every prompt.

Transport trades a synonym that shares no token with the concept for the rest of the world, and an embedding fed to
the UNet meets the cosine term alone. ``--set facilitated_transport=false`` gives the plain adapter. Figures,
transport on and off, in ``docs/methods.md``; the attacks in the micro model's card.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import ClassVar

import torch

from pipelines import ARCHITECTURES, PipelineWrapper, PromptEncoding

from ..core.registry import ConceptSpec, WeightEdit, register_method
from ..core.weights import factor_products
from .esd import ESDConfig, ESDLoss, esd_loss
from .trainer import TRAINED, Batch, Predictions, config_key, train_lora
from .transport import METRICS as TRANSPORT_METRICS
from .transport import FacilitatedTransport

__all__ = ["SPMConfig", "SPMLoss", "erase_spm", "latent_anchor_embeddings"]

logger = logging.getLogger(__name__)


@dataclass
class SPMConfig(ESDConfig):
    """Settings of an SPM erasure: ESD's (``negative_guidance`` and the training fields) with SPM's defaults.

    Attributes:
        latent_anchors: random anchor embeddings drawn per example and step (the reference's sampling batch, 4).
        latent_anchor_weight: weight of the latent-anchoring term (the reference's ``la_strength``, 1000).
        train: ``transformer`` (every transformer-block Linear, the reference's), or ESD's variants.
        facilitated_transport: scale the adapter per prompt by its likeness to the erased concepts when it is
            applied (``erase.lora.transport``; the reference's inference default); off, it applies at full strength.
        transport_metric: the likeness: ``clipcos_tokenuni`` (the reference's default), ``clipcos`` or ``tokenuni``.
        adapter_per_concept: with several concepts, one adapter each (the reference's way: ``steps`` each), saved
            as one LoRA whose rank blocks transport scales apart; off, one adapter shares the steps of all.
    """

    VARIANTS: ClassVar[tuple[str, ...]] = ("transformer", "xattn", "noxattn", "kv")
    NUMBER_RANGES: ClassVar[dict[str, str]] = {
        **ESDConfig.NUMBER_RANGES,
        "latent_anchors": ">= 0",
        "latent_anchor_weight": ">= 0",
    }

    rank: int = 1
    alpha: float = 1.0
    lr: float = 1e-4
    steps: int = 3000
    pool_steps: int = 30
    pool_guidance: float = 3.0
    train: str = "transformer"
    latent_anchors: int = 4
    latent_anchor_weight: float = 1000.0
    facilitated_transport: bool = True
    transport_metric: str = "clipcos_tokenuni"
    adapter_per_concept: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()  # every number and bool, against NUMBER_RANGES
        if self.transport_metric not in TRANSPORT_METRICS:
            raise ValueError(
                f"transport_metric must be one of {', '.join(TRANSPORT_METRICS)}, got {self.transport_metric!r}"
            )


def latent_anchor_embeddings(concept: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random embeddings shaped like ``concept`` (any shape), rejected by their similarity to it.

    Each is a Gaussian direction d / |d| over all of ``concept``'s entries, kept with probability ``1 - cos(d, c)``
    and scaled by ``s |c|`` with ``s ~ U(0.8, 1.2)``; computed in float32 on the CPU (the generator's device).
    """
    flat = concept.detach().float().cpu().reshape(-1)
    norm = flat.norm()
    samples = []
    while len(samples) < count:
        direction = torch.randn(flat.shape, generator=generator)
        direction = direction / direction.norm()
        similarity = torch.dot(direction, flat) / norm
        if float(torch.rand((), generator=generator)) < 1 - float(similarity):
            scale = 0.8 + 0.4 * float(torch.rand((), generator=generator))
            samples.append(scale * norm * direction)
    return torch.stack(samples).reshape(count, *concept.shape)


@dataclass
class SPMLoss:
    """ESD's loss plus latent anchoring; a callable the trainer takes (built in ``erase_spm``)."""

    erase: ESDLoss
    latent_anchors: int
    latent_anchor_weight: float

    def __call__(self, batch: Batch, predict: Predictions) -> torch.Tensor:
        loss = self.erase(batch, predict)
        if self.latent_anchors and self.latent_anchor_weight > 0:
            loss = loss + self.latent_anchor_weight * self.anchoring(batch, predict)
        return loss

    def anchoring(self, batch: Batch, predict: Predictions) -> torch.Tensor:
        """mean || eps_theta(x, e, t) - eps*(x, e, t) ||^2 over ``latent_anchors`` random e per example."""
        m = self.latent_anchors
        concept = self.erase.encoding.select(batch.prompts)
        embeddings, pooled = [], []
        for i in range(len(batch.prompts)):
            embeddings.append(latent_anchor_embeddings(concept.embeddings[i], m, batch.generator))
            if concept.pooled is not None:  # SDXL: the pooled text embedding is drawn the same way
                pooled.append(latent_anchor_embeddings(concept.pooled[i], m, batch.generator))
        rows = torch.arange(len(batch.prompts)).repeat_interleave(m)
        encoding = concept.select(rows)
        dtype, device = concept.embeddings.dtype, concept.embeddings.device
        anchors = PromptEncoding(
            ["<latent anchor>"] * len(rows),
            encoding.input_ids,
            torch.cat(embeddings).to(device, dtype),
            encoding.lengths,
            torch.cat(pooled).to(device, dtype) if pooled else None,
        )
        x, t = batch.latents.repeat_interleave(m, dim=0), batch.timesteps.repeat_interleave(m)
        frozen = predict.frozen(x, t, anchors).float()
        trained = predict.trained(x, t, anchors).float()
        return torch.nn.functional.mse_loss(trained, frozen)


@register_method(
    "spm",
    SPMConfig,
    "lora",
    "SPM-style one-dimensional adapter (Lyu et al., 2024): rank-1 LoRA with ESD's loss and latent anchoring, "
    "facilitated transport at inference",
    capabilities=dataclasses.replace(TRAINED, guides=False, architectures=ARCHITECTURES),
)
def erase_spm(wrapper: PipelineWrapper, concepts: ConceptSpec, config: SPMConfig) -> WeightEdit:
    """Train the SPM adapter for ``concepts``' targets (prompt anchors: ``anchor_prompts`` and the preserved).

    Several targets get one adapter each (``adapter_per_concept``, the reference's way), trained one after another
    with the same settings and saved as one LoRA of rank ``rank x targets``; transport then scales each concept's
    block by the prompt's likeness to that concept.
    """
    targets = list(concepts.targets)
    if len(targets) == 1 or not config.adapter_per_concept:
        edit, anchors = _train_adapter(wrapper, concepts, config)
        groups = None
    else:
        edits = []
        for i, target in enumerate(targets):
            one = ConceptSpec((target,), ("",), concepts.preserve)
            checkpoints = os.path.join(config.checkpoint_dir, f"concept-{i}") if config.checkpoint_dir else None
            adapter, anchors = _train_adapter(wrapper, one, dataclasses.replace(config, checkpoint_dir=checkpoints))
            edits.append(adapter)
        edit = _stack_adapters(edits)
        groups = list(range(len(targets)))
    if config.facilitated_transport:
        edit.payloads.append(FacilitatedTransport.of_concepts(wrapper, targets, config.transport_metric, groups))
    edit.info.update(
        {
            "anchors": anchors,
            "variant": config.train,
            "patterns": list(config.patterns),
            "adapters": 1 if groups is None else len(groups),
            "facilitated_transport": config.transport_metric if config.facilitated_transport else False,
        }
    )
    return edit


def _train_adapter(wrapper: PipelineWrapper, concepts: ConceptSpec, config: SPMConfig) -> tuple[WeightEdit, list[str]]:
    """One adapter trained on all of ``concepts``' targets; returns it and its anchor prompts."""
    loss = SPMLoss(esd_loss(wrapper, concepts, config), config.latent_anchors, float(config.latent_anchor_weight))
    targets = loss.erase.targets
    edit = train_lora(
        wrapper,
        pool_prompts=targets,
        loss_fn=loss,
        config=config,
        layers=config.patterns,
        run_key={"method": "spm", "targets": targets, "anchors": loss.erase.anchors, "config": config_key(config)},
        description=f"spm {', '.join(targets)}",
    )
    return edit, loss.erase.anchors


def _stack_adapters(edits: list[WeightEdit]) -> WeightEdit:
    """Adapters side by side as one LoRA: A's rows and B's columns concatenated in order, so dW = sum_i B_i A_i and
    block i of the rank is adapter i; ``info`` keeps each adapter's training record."""
    names = list(edits[0].factors)
    factors = {
        name: (torch.cat([e.factors[name][0] for e in edits]), torch.cat([e.factors[name][1] for e in edits], dim=1))
        for name in names
    }
    deltas = factor_products(factors)
    per_adapter = [e.info for e in edits]
    info = {"steps": sum(i.get("steps", 0) for i in per_adapter), "per_adapter": per_adapter}
    return WeightEdit(deltas=deltas, info=info, factors=factors)
