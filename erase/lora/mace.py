"""MACE (Lu et al., CVPR 2024): closed-form refinement, one attention-suppressing LoRA per concept, closed-form fusion.

Reference: Shilin-LU/MACE (``src/cfr_lora_training.py``, ``src/fuse_lora_close_form.py``, ``src/cfr_utils.py``).
Three stages on the cross-attention keys and values (``attn2.to_k``, ``attn2.to_v``; SD3/Flux: below):

1. Closed-form refinement (CFR). For each concept prompt (the concept in each template) and its guide prompt (the
   guide, the reference's "mapping concept", in the same template), the tokens the two share (common prefix and
   suffix, BOS and EOS included) and every position after the last of them are paired; the prompt's embeddings
   there, c, are sent to what the guide prompt's paired positions give, W c_guide. With the preserved prompts' every
   position p kept at the base's W_0 p (the reference's domain cache), per projection::

       W_cfr = (lamb W_0 + sum W_0 c_guide c^T + s W_0 sum p p^T) (lamb I + sum c c^T + s sum p p^T)^-1,
       s = train_preserve_scale^2 * preserve_weight

   (the reference scales its cache by ``train_preserve_scale`` when building it and again in the solve).
2. One LoRA per concept (rank 1 on keys and values, trained on top of W_cfr) minimising the attention the UNet pays
   to the concept's tokens: the sum over cross-attention layers of the Frobenius norm of the attention probabilities
   at the concept's token positions (``AttnController.loss``), 50 steps of Adam at 1e-4, timesteps weighted by the
   reference's importance function f(t) = sigmoid(0.05 (t - 200)) - sigmoid(0.05 (t - 400)).
3. Closed-form fusion. With W_i = W_cfr + dW_i the projection holding concept i's LoRA and c every position of
   concept i's prompts::

       W* = (lamb W_cfr + sum_i W_i sum_c c c^T + s' W_0 sum p p^T) (lamb I + sum_i sum_c c c^T + s' sum p p^T)^-1,
       s' = fuse_preserve_scale * preserve_weight

The artifact holds W* - W_0 for every key and value projection.

Defaults are the reference's celebrity settings (``configs/celebrity/erase_cele_*.yaml``): rank 1, 50 steps, learning
rate 1e-4, both preserve scales 1e-4, preserve weight 2e5 (its art setting: 8e4), importance sampling on. Where we
differ, and why:

* Segmentation: the reference restricts the attention loss to the concept's region found by Grounded-SAM
  (``use_gsam_mask``), which needs GroundingDINO and SAM weights and cannot run offline. We take the whole image:
  the reference's own ``use_gsam_mask: false`` branch of ``AttnController``, with no second model. The concept
  tokens' own attention map would be the other offline choice, but masking a loss that suppresses that very map
  by the map itself rewards moving the attention outside the mask, not removing it.
* Training images: the reference noises VAE latents of images it generated for the concept at timesteps drawn from
  f(t). We train on the trainer's pool, the frozen model's own sampler trajectories for the concept prompts (the
  same images' noisy latents, at the sampler's timesteps), and weight each example by f(t) over f's mean on 0..999:
  the gradient's expectation is, up to a constant, that of drawing t in proportion to f among the pool's timesteps.
* Prior preservation: the reference adds a cache of the base's keys and values over all MS-COCO captions, which
  also makes its lamb = 0 solves well-posed. There is none offline; the preserved concepts (``--preserve``, in the
  templates) are the domain cache, and ``lamb`` defaults to 0.5 (UCE's) so that directions no prompt reaches keep W.
* Templates: the reference augments each concept with 30 prompts of its own per concept type; ours are a short
  neutral set, an option (``templates``).
* SD3 and Flux (the reference is SD 1.x only). A transformer projects the text once for keys and values alike, so
  all three stages act on uce's layers there, the text-side input projections: ``context_embedder`` with every
  token row (stage 1 pairs the rows of each text stream, SD3's CLIP rows and T5 rows), and
  ``time_text_embed.text_embedder.linear_1`` with the pooled vector (one row per prompt, paired with the guide
  prompt's). The LoRAs (rank 1) go on those projections, and the attention they suppress is that of the image
  queries over the concept's text keys in every joint and single-stream attention, the image rows and text columns
  of the joint softmax (``PipelineWrapper.attention_probabilities``; the concept's rows in every stream). f(t) reads
  the flow-matching scheduler's timesteps, sigma * 1000, on the same 0..999 scale. The closed forms' targets are
  W c, the layers adding their bias b to W c + dW c as to W c.
* Closed forms in float64 (the reference solves in float32 on the GPU); the trainer's Adam without weight decay and
  gradient clipping (the reference: AdamW, decay 0.01, clip 1).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from pipelines import PipelineWrapper, PromptEncoding

from ..core.registry import ConceptSpec, WeightEdit, register_method
from .trainer import TRAINED, Batch, LoraTrainConfig, Predictions, config_key, train_lora

__all__ = [
    "MACEConfig",
    "erase_mace",
    "fusion_update",
    "importance_weight",
    "matched_positions",
    "refinement_update",
]

logger = logging.getLogger(__name__)

TRAIN_TIMESTEPS = 1000  # SD's training schedule, which f(t) is written for


@dataclass
class MACEConfig(LoraTrainConfig):
    """Settings of a MACE erasure; the training fields are ``LoraTrainConfig``'s (its anchor fields are unused: MACE
    keeps other concepts in its closed forms, through ``--preserve``).

    Attributes:
        lamb: ridge pulling both closed forms towards the weights they start from.
        train_preserve_scale, fuse_preserve_scale: the preserve scales of the refinement and the fusion.
        preserve_weight: weight of the preserved concepts (the reference's domain cache) in both closed forms.
        importance_sampling: weight training timesteps by the reference's f(t) (off: uniform).
        templates: prompts the concept (and its guide) is put in, ``{}`` standing for it.
    """

    VARIANTS: ClassVar[tuple[str, ...]] = ("kv",)
    NUMBER_RANGES: ClassVar[dict[str, str]] = {
        **LoraTrainConfig.NUMBER_RANGES, "lamb": ">= 0", "train_preserve_scale": ">= 0",
        "fuse_preserve_scale": ">= 0", "preserve_weight": ">= 0",
    }  # fmt: skip

    rank: int = 1
    alpha: float = 1.0
    lr: float = 1e-4
    steps: int = 50
    train: str = "kv"
    lamb: float = 0.5
    train_preserve_scale: float = 1e-4
    fuse_preserve_scale: float = 1e-4
    preserve_weight: float = 2e5
    importance_sampling: bool = True
    templates: tuple[str, ...] = ("{}", "a photo of {}", "an image of {}", "a painting of {}", "a picture of {}")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.templates = tuple(self.templates)
        if not self.templates or any(t.count("{}") != 1 for t in self.templates):
            raise ValueError(f"every template must contain '{{}}' once, got {list(self.templates)}")


def importance_weight(t: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """The reference's timestep importance f(t) = sigmoid(T (t - 200)) - sigmoid(T (t - 400))."""
    t = t.double()
    return torch.sigmoid(temperature * (t - 200)) - torch.sigmoid(temperature * (t - 400))


def matched_positions(old: list[int], new: list[int], length: int) -> tuple[list[int], list[int]]:
    """Paired positions of two token sequences (BOS..EOS): their common prefix, their common suffix, and every
    position after the last matched one up to ``length``, the longer prompt's tail cut to the shorter's."""
    prefix = 0
    while prefix < min(len(old), len(new)) and old[prefix] == new[prefix]:
        prefix += 1
    end_old, end_new = len(old) - 1, len(new) - 1
    while end_old >= prefix and end_new >= prefix and old[end_old] == new[end_new]:
        end_old, end_new = end_old - 1, end_new - 1
    old_pos = list(range(prefix)) + list(range(end_old + 1, len(old)))
    new_pos = list(range(prefix)) + list(range(end_new + 1, len(new)))
    tail = length - 1 - max(old_pos[-1], new_pos[-1])
    return old_pos + list(range(old_pos[-1] + 1, old_pos[-1] + 1 + tail)), new_pos + list(
        range(new_pos[-1] + 1, new_pos[-1] + 1 + tail)
    )


def refinement_update(
    weight: torch.Tensor,
    start: torch.Tensor,
    targets: torch.Tensor,
    contexts: torch.Tensor,
    preserve_gram: torch.Tensor,
    preserve_scale: float,
    lamb: float,
) -> torch.Tensor:
    """The closed form both MACE stages solve, float64: rows of ``contexts`` c are sent to the rows of ``targets``
    (the values they should give), preserved inputs keep the base ``weight``'s values, a ridge keeps ``start``::

        W* = (lamb start + targets^T contexts + s weight P) (lamb I + contexts^T contexts + s P)^-1,  P = sum p p^T
    """
    d = weight.shape[1]
    eye = torch.eye(d, dtype=torch.float64)
    lhs = lamb * start + targets.T @ contexts + preserve_scale * weight @ preserve_gram
    gram = lamb * eye + contexts.T @ contexts + preserve_scale * preserve_gram
    return torch.linalg.solve(gram, lhs.T).T  # gram is symmetric: lhs gram^-1 = (gram^-1 lhs^T)^T


def fusion_update(
    weight: torch.Tensor,
    refined: torch.Tensor,
    lora_deltas: list[torch.Tensor],
    concept_grams: list[torch.Tensor],
    preserve_gram: torch.Tensor,
    preserve_scale: float,
    lamb: float,
) -> torch.Tensor:
    """MACE's fusion of one projection, float64: concept i's inputs (Gram ``concept_grams[i]``) keep the values its
    LoRA gives, W_i = refined + lora_deltas[i]; preserved inputs keep the base ``weight``'s (module docstring)."""
    d = weight.shape[1]
    eye = torch.eye(d, dtype=torch.float64)
    lhs = lamb * refined + preserve_scale * weight @ preserve_gram
    gram = lamb * eye + preserve_scale * preserve_gram
    for delta, concept_gram in zip(lora_deltas, concept_grams, strict=True):
        lhs = lhs + (refined + delta) @ concept_gram
        gram = gram + concept_gram
    return torch.linalg.solve(gram, lhs.T).T


@dataclass
class AttentionLoss:
    """Stage 2's loss for one concept: the Frobenius norm of the attention at the concept's tokens, summed over the
    text-attention layers (``PipelineWrapper.text_attention_names``), each example weighted by f(t) over f's mean on
    0..999 (or uniformly)."""

    wrapper: PipelineWrapper
    attention: list[str]
    encoding: PromptEncoding
    positions: list[list[int]]
    importance_mean: float | None  # the mean of f(t) over 0..999; None: uniform

    def __call__(self, batch: Batch, predict: Predictions) -> torch.Tensor:
        rows = batch.prompts.tolist()
        with self.wrapper.attention_probabilities(self.attention) as found:
            predict.trained(batch.latents, batch.timesteps, self.encoding.select(batch.prompts))
        loss = torch.zeros((), device=batch.latents.device)
        for i, row in enumerate(rows):
            weight = 1.0
            if self.importance_mean is not None:
                weight = float(importance_weight(batch.timesteps[i].cpu())) / self.importance_mean
            for name in self.attention:
                for probabilities in found[name]:
                    loss = loss + weight * probabilities[i][..., self.positions[row]].norm()
        return loss


def _paired_rows(wrapper: PipelineWrapper, prompt: str, guide_prompt: str) -> tuple[list[int], list[int]]:
    """Stage 1's paired embedding rows of a concept prompt and its guide prompt: :func:`matched_positions` in every
    text stream (SD3: CLIP's rows, then T5's), each to the stream's length."""
    old, new = [], []
    for s, stream in enumerate(wrapper.token_streams()):
        ids, guide_ids = wrapper.stream_token_ids(prompt, s), wrapper.stream_token_ids(guide_prompt, s)
        rows, guide_rows = matched_positions(ids, guide_ids, stream.length)
        old += [stream.offset + r for r in rows]
        new += [stream.offset + r for r in guide_rows]
    return old, new


def _inputs(encoding: PromptEncoding, reads: str) -> torch.Tensor:
    """What a layer reading ``reads`` takes of each prompt, float64 ``(prompts, rows, width)``: every token row, or
    the pooled vector (one row)."""
    if reads == "pooled":
        return encoding.pooled.double().cpu()[:, None]
    return encoding.embeddings.double().cpu()


def _train_concept_lora(
    wrapper: PipelineWrapper, concept: str, index: int, config: MACEConfig, attention: list[str]
) -> WeightEdit:
    prompts = [t.format(concept) for t in config.templates]
    encoding = wrapper.encode_prompts(prompts)
    streams = range(len(wrapper.token_streams()))
    positions = [[r for s in streams for r in wrapper.phrase_positions(p, concept, s)] for p in prompts]
    weights = None
    if config.importance_sampling:
        weights = importance_weight(torch.arange(TRAIN_TIMESTEPS)).mean()  # f(t) / its mean over 0..999
    loss = AttentionLoss(wrapper, attention, encoding, positions, None if weights is None else float(weights))
    run_config = config
    if config.checkpoint_dir:
        run_config = dataclasses.replace(config, checkpoint_dir=str(Path(config.checkpoint_dir) / f"concept-{index}"))
    return train_lora(
        wrapper,
        pool_prompts=prompts,
        loss_fn=loss,
        config=run_config,
        layers=wrapper.closed_form_patterns(),
        run_key={"method": "mace", "concept": concept, "config": config_key(config)},
        description=f"mace {concept}",
    )


@register_method(
    "mace",
    MACEConfig,
    "lora",
    "MACE (Lu et al., 2024): closed-form refinement, one attention-suppressing LoRA per concept, closed-form fusion",
    capabilities=dataclasses.replace(
        TRAINED,
        preserve_setting=None,  # the preserve set is read by the closed forms
        templates="templates",
        quick={"steps": 4, "lr": 1e-2, "pool_images": 1, "pool_steps": 4, "templates": ("{}", "a painting of {}")},
        architectures=("sd", "sdxl", "sd3", "flux"),
    ),
)
def erase_mace(wrapper: PipelineWrapper, concepts: ConceptSpec, config: MACEConfig) -> WeightEdit:
    """Erase every target of ``concepts`` into its guide, keeping ``concepts.preserve``."""
    targets = list(concepts.targets)
    layers = wrapper.cross_attention_layers()
    attention = wrapper.text_attention_names()
    kinds = sorted({layer.reads for layer in layers}, reverse=True)  # "tokens" first
    reads = {f"{wrapper.denoiser_name}.{layer.name}": layer.reads for layer in layers}
    preserve_grams = {}
    for kind in kinds:
        width = next(layer.in_features for layer in layers if layer.reads == kind)
        preserve_grams[kind] = torch.zeros(width, width, dtype=torch.float64)
    if concepts.preserve:
        kept = wrapper.encode_prompts([t.format(p) for t in config.templates for p in concepts.preserve])
        for kind in kinds:
            rows = _inputs(kept, kind).reshape(-1, preserve_grams[kind].shape[0])
            preserve_grams[kind] = rows.T @ rows
    # stage 1: pairs (c, c_guide) of every concept prompt with its guide prompt, per kind of input
    contexts = {kind: [] for kind in kinds}
    guide_contexts = {kind: [] for kind in kinds}
    concept_grams = {kind: [] for kind in kinds}
    for i, target in enumerate(targets):
        guide = concepts.guide_for(i)
        prompts = [t.format(target) for t in config.templates]
        guide_prompts = [t.format(guide).strip() for t in config.templates]
        encoding = wrapper.encode_prompts(prompts + guide_prompts)
        n = len(prompts)
        for kind in kinds:
            rows = _inputs(encoding, kind)
            for j in range(n):
                old, new = _paired_rows(wrapper, prompts[j], guide_prompts[j]) if kind == "tokens" else ([0], [0])
                contexts[kind].append(rows[j, old])
                guide_contexts[kind].append(rows[n + j, new])
            concept_grams[kind].append(sum(rows[j].T @ rows[j] for j in range(n)))
    contexts = {kind: torch.cat(rows) for kind, rows in contexts.items()}
    guide_contexts = {kind: torch.cat(rows) for kind, rows in guide_contexts.items()}
    base = {name: wrapper.module(name).weight.detach().double().cpu() for name in reads}
    train_scale = config.train_preserve_scale**2 * config.preserve_weight
    refined = {
        name: refinement_update(w, w, guide_contexts[reads[name]] @ w.T, contexts[reads[name]],
                                preserve_grams[reads[name]], train_scale, config.lamb)
        for name, w in base.items()
    }  # fmt: skip
    refinement = {name: (refined[name] - w).float() for name, w in base.items()}
    # stage 2: one LoRA per concept on the refined weights
    lora_deltas: dict[str, list[torch.Tensor]] = {name: [] for name in base}
    losses = []
    with wrapper.weight_deltas(refinement):
        for i, target in enumerate(targets):
            edit = _train_concept_lora(wrapper, target, i, config, attention)
            losses.append(edit.info.get("final_loss"))
            for name in base:
                lora_deltas[name].append(edit.deltas[name].double().cpu())
    # stage 3: fuse them in closed form
    fuse_scale = config.fuse_preserve_scale * config.preserve_weight
    deltas = {}
    for name, w in base.items():
        kind = reads[name]
        fused = fusion_update(w, refined[name], lora_deltas[name], concept_grams[kind], preserve_grams[kind],
                              fuse_scale, config.lamb)  # fmt: skip
        deltas[name] = (fused - w).float()
    refinement_share = {
        name: float(refinement[name].double().norm() / max(float(deltas[name].double().norm()), 1e-30))
        for name in sorted(base)
    }
    info = {
        "layers_matched": len(layers),
        "attention_layers": len(attention),
        "refinement_pairs": int(len(contexts["tokens"])),
        "lora_final_losses": losses,
        "refinement_over_total_median": sorted(refinement_share.values())[len(refinement_share) // 2],
    }
    if any(not math.isfinite(float(d.norm())) for d in deltas.values()):
        raise ValueError("the MACE fusion is not finite: raise lamb")
    return WeightEdit(deltas, info)
