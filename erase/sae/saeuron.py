"""SAeUron (Cywinski and Deja, 2025): damp a concept's SAE features in a UNet transformer block, timestep by timestep.

A TopK SAE reads one transformer block's output, each spatial position a token. For every sampling timestep t and
feature f, with mu_c(t, f) the feature's activation averaged over the positions of an image and over the concept's
images, and mu_o(t, f) the same over other prompts' images, the score is the difference of the normalized means::

    score(t, f) = mu_c(t, f) / sum_f mu_c(t, f)  -  mu_o(t, f) / sum_f mu_o(t, f)

and the features above the ``percentile``-th percentile of score(t, .) are the concept's at t. While sampling, where
such a feature fires above its mean over all stats images, m(t, f), it is scaled::

    z'_f = z_f * mu_c(t, f) * multiplier        (multiplier < 0)
    x'   = x + (W_dec z' + b_dec) - (W_dec z + b_dec)  =  x + W_dec (z' - z)

The edit keeps the SAE's reconstruction error: x' = x exactly where nothing is scaled. The official code
(``cywinski/SAeUron``, ``utils/hooks.py``) adds the error with the wrong sign, x_hat' + (x_hat - x), which with no
feature scaled gives 2 x_hat - x instead of x; we do not copy that slip.

Reference settings (``scripts/sample_unlearning_distr.py``, README): style unlearning on
``up_blocks.1.attentions.2`` of SD 1.4, percentile 99.999, multiplier -1, 100 DDIM steps at guidance 9, 20 prompts a
concept, both halves of classifier-free guidance edited. Where we differ, knowingly: stats images are drawn with the
pipeline's own sampler at ``steps``/``guidance`` and the tables are looked up by nearest timestep, so generation at
other step counts still finds its row; the "other concepts" are the preserved concepts, prompts the SAE was
trained on that name no erased concept and, erasing several, the other erased concepts' images (the reference: the
benchmark's other 49 styles, erased ones among them); ungated, where two concepts chose the same feature the
stronger scaling applies.

The ``gate`` option (ours, off by default; the reference edits every image) edits an image only once its concept
is present: the concept's chosen features, their codes averaged over the image's positions and summed, reach
``gate`` times their mean on the concept's stats images and more than on any other stats image, at ``gate_steps``
UNet calls of the generation; from then on the image stays edited (the edit removes what the gate reads). Why the
bound by the other images: in the first calls the noise decides this block's features as much as the prompt, so
the concept's mean alone lets other styles' images through. The scores' stats images share one noise (a cleaner
contrast), the gate's each have their own; in a guided batch the conditional half decides for both halves (an edit
in one half alone is amplified by the guidance). Erasing several concepts, an image is edited for the one concept
most present in it relative to its gate, and latches to it (the edit raises other concepts' features, so edits
open to every concept stack). Images that never pass are bit-identical to the original model's.

On SD3 and Flux the SAE reads a transformer block's image tokens (a joint block's image stream, a single-stream
block's image part; Flux's tokens are 2x2 latent patches) and the tables are per flow timestep as the transformer
receives it. SD3 guides with [unconditional; conditional] halves as a UNet does; Flux embeds its guidance and runs one
batch, each image its own. The default block is ours (the reference is SD 1.4's UNet).

Micro setting (the shipped SAE on ``up_blocks.0.attentions.1``, where the reference's settings change nothing):
``--set steps=20 --set percentile=99 --set multiplier=-20 --set gate=0.3``; figures, other settings and the
five-style limits in ``docs/methods.md``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from pipelines import PipelineWrapper

from ..core.inputs import check_number_fields, check_number_values, check_templates, concept_key
from ..core.registry import Capabilities, ConceptSpec, WeightEdit, register_method
from .intervention import SAEIntervention, check_intervention_keys
from .sae import pinned_sae, resolve_sae

__all__ = ["SAeUronConfig", "erase_saeuron", "saeuron_edit"]

logger = logging.getLogger(__name__)

#: the tables a saeuron intervention holds ("gate" only with a gate)
SAEURON_TABLES = ("timesteps", "selected", "threshold", "factor", "gate")


@dataclass
class SAeUronConfig:
    """Settings of SAeUron. Defaults: the reference's style unlearning.

    Attributes:
        hook_point: the denoiser's transformer block the SAE reads (``None``: on a UNet the last block of the first
            up block with attention, SD 1.x's ``up_blocks.1.attentions.2``, the reference's style block; on SD3/Flux
            the block halfway through the transformer).
        sae, sae_stores: an SAE folder, or where to look for one (then the shipped SAEs).
        percentile: features scoring above this percentile (of all features, per timestep) are the concept's.
        multiplier: scales the concept's mean activation that replaces a firing feature's factor (negative).
        templates: the concept's prompts, ``{}`` standing for the concept.
        images_per_prompt: stats images per prompt (seeds ``seed``, ``seed + 1``, ...; the reference draws one).
        other_prompts: how many of the SAE's training prompts (naming no erased concept) make the "other" stats.
        steps, guidance: the sampler's settings for the stats images (reference: 100 DDIM steps, guidance 9).
        seed: first seed of the stats images.
        gate: edit an image only once the concept is present in it: the concept's chosen features, averaged over
            the image's positions and summed, reach ``gate`` times their mean on the concept's stats images and
            more than on any other stats image; erasing several, only the concept most present in the image
            (``None``: every image, the reference). Ours, not the reference's; micro: 0.3 (module docstring).
        gate_steps: how many UNet calls of one generation the gate must pass before the image is edited; from then on
            it is edited to the end of the generation.
    """

    NUMBER_RANGES: ClassVar[dict[str, str]] = {
        "percentile": "(0, 100)", "multiplier": "< 0", "images_per_prompt": ">= 1", "other_prompts": ">= 1",
        "steps": ">= 1", "guidance": ">= 0", "seed": ">= 0", "gate": "(0, 1]", "gate_steps": ">= 1",
    }  # fmt: skip

    hook_point: str | None = None
    sae: str | None = None
    sae_stores: tuple[str, ...] = ()
    percentile: float = 99.999
    multiplier: float = -1.0
    templates: tuple[str, ...] = ("{}", "painting by {}", "art by {}", "artwork by {}", "picture by {}", "style of {}")
    images_per_prompt: int = 1
    other_prompts: int = 100
    steps: int = 100
    guidance: float = 9.0
    seed: int = 188
    gate: float | None = None
    gate_steps: int = 1

    def __post_init__(self) -> None:
        check_number_fields(self)
        self.templates = check_templates(self.templates)
        self.sae_stores = tuple(self.sae_stores)


def default_denoiser_hook(wrapper: PipelineWrapper) -> str:
    """On a UNet the reference's style block: the last transformer block of the first up block that has any (SD 1.x:
    ``unet.up_blocks.1.attentions.2``). On SD3/Flux, which have no up blocks, the block halfway through the
    transformer (its joint blocks, then Flux's single-stream blocks), ours."""
    if wrapper.denoiser_name == "transformer":
        blocks = [p for p in wrapper.hook_points() if p.startswith("transformer.")]
        return blocks[len(blocks) // 2]
    ups = [p for p in wrapper.hook_points() if p.startswith("unet.up_blocks.")]
    if not ups:
        raise ValueError("this pipeline's UNet has no transformer block in an up block")
    first = ups[0].rsplit(".attentions.", 1)[0]
    return [p for p in ups if p.startswith(first + ".attentions.")][-1]


def _presence(mean_codes: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """How present a concept is in an image: its chosen features' codes, averaged over the image's positions
    (``mean_codes``), summed; the shapes broadcast, e.g. ``(images, 1, latents)`` x ``(concepts, latents)`` at
    one timestep gives ``(images, concepts)``, ``(images, timesteps, latents)`` x ``(timesteps, latents)``
    gives ``(images, timesteps)``."""
    return (mean_codes * selected).sum(-1)


def saeuron_edit(
    intervention: SAEIntervention, tokens: torch.Tensor, timestep: Any, guided: bool = False
) -> torch.Tensor | None:
    """Scale the present concepts' firing features at the nearest tabled timestep; x' = x + W_dec (z' - z).

    Tables hold one row per erased concept; where two concepts present in one image chose the same feature, the
    stronger scaling applies. Images where no concept passes its gate are returned untouched (bit-identical). In a
    ``guided`` batch ([unconditional; conditional]) an image's conditional half decides for both halves, so the
    image is edited in both as the ungated edit is: editing one half alone would be amplified by the guidance scale.
    """
    if timestep is None:
        return None
    tables = intervention.tables
    row = int((tables["timesteps"] - float(timestep)).abs().argmin())
    selected = _per_concept(tables["selected"])[:, row]  # (concepts, latents)
    if not selected.any():
        return None
    sae = intervention.sae
    z = sae.encode(tokens)
    gate = tables.get("gate")
    present = torch.ones(len(z), len(selected), dtype=torch.bool, device=z.device)
    if gate is not None:
        strength = _presence(z.mean(dim=1, keepdim=True), selected) / gate[:, row].clamp_min(1e-12)
        passes = (strength >= 1) & (strength == strength.amax(1, keepdim=True))  # the strongest concept only
        if guided and len(passes) % 2 == 0:
            passes = passes[len(passes) // 2 :].repeat(2, 1)
        present = _latched(intervention.memory, passes, float(timestep), int(intervention.settings["gate_steps"]))
    chosen = present[:, :, None] & selected  # (images, concepts, latents)
    edited = chosen.any(dim=(1, 2))
    if not edited.any():
        return None
    factors = torch.where(chosen, _per_concept(tables["factor"])[:, row], 0.0)
    strongest = factors.abs().argmax(dim=1, keepdim=True)
    factor = torch.where(chosen.any(1), factors.gather(1, strongest).squeeze(1), 1.0)  # (images, latents)
    z, x = z[edited], tokens[edited]
    scale = torch.where(z > tables["threshold"][row], factor[edited, None, :], 1.0)
    out = tokens.clone()
    out[edited] = x + (z * scale - z) @ sae.W_dec
    return out


def _latched(memory: dict[str, Any], passes: torch.Tensor, timestep: float, needed: int) -> torch.Tensor:
    """Whether each (image, concept) has passed the gate at ``needed`` UNet calls of this generation so far.

    The edit removes what the gate measures, so a gate read afresh at every call lets the concept back in a few
    steps after the edit begins; once passed, it holds to the end. An image is edited for the first concept it
    latches and no other: the edit itself raises other concepts' features (damped van gogh reads as picasso), and
    counting on would add their edits one after another. ``passes`` holds at most one concept per image (the most
    present), so no two concepts latch at the same call. A generation is told from the next by its timesteps, which
    only fall within one: a call at a later timestep, or with another batch size, starts afresh.
    """
    count = memory.get("gate_passes")
    last = memory.get("timestep")
    if count is None or count.shape != passes.shape or count.device != passes.device or timestep > last:
        count = torch.zeros(passes.shape, dtype=torch.int32, device=passes.device)
    count = count + (passes & ~(count >= needed).any(1, keepdim=True)).int()
    memory.update(gate_passes=count, timestep=timestep)
    return count >= needed


def _per_concept(table: torch.Tensor) -> torch.Tensor:
    """A ``(concepts, timesteps, latents)`` table; artifacts written before per-concept tables hold one merged
    ``(timesteps, latents)`` table, read as one concept."""
    return table if table.dim() == 3 else table[None]


def check_saeuron(intervention: SAEIntervention) -> None:
    tables, latents = intervention.tables, intervention.sae.latents
    times = tables.get("timesteps")
    if times is None or times.dim() != 1 or times.numel() == 0:
        raise ValueError("a saeuron intervention needs a 1-d 'timesteps' table")
    steps = times.numel()
    threshold = tables.get("threshold")
    if threshold is None or tuple(threshold.shape) != (steps, latents):
        raise ValueError(f"a saeuron intervention needs a 'threshold' table of shape ({steps}, {latents})")
    selected = tables.get("selected")
    if selected is None or selected.dim() not in (2, 3) or tuple(selected.shape[-2:]) != (steps, latents):
        raise ValueError(f"a saeuron intervention needs a 'selected' table of shape (concepts, {steps}, {latents})")
    if selected.dtype != torch.bool:
        raise ValueError("a saeuron intervention's 'selected' table must be boolean")
    for name in ("timesteps", "threshold", "factor", "gate"):
        if name in tables and not tables[name].is_floating_point():
            raise ValueError(f"a saeuron intervention's {name!r} table must hold floats, not {tables[name].dtype}")
    if tables.get("factor") is None or tables["factor"].shape != selected.shape:
        raise ValueError(f"a saeuron intervention needs a 'factor' table of the selected table's shape "
                         f"{tuple(selected.shape)}")  # fmt: skip
    gate = tables.get("gate")
    if gate is not None and tuple(gate.shape) != (_per_concept(selected).shape[0], steps):
        raise ValueError(f"a saeuron intervention's 'gate' table must have shape (concepts, {steps})")
    ranges = {"percentile": "(0, 100)", "multiplier": "< 0", "gate": "(0, 1] | null", "gate_steps": "int >= 1"}
    check_number_values(intervention.settings, ranges, "a saeuron intervention")
    check_intervention_keys(intervention, ranges, SAEURON_TABLES, "a saeuron intervention")
    for name in ("timesteps", "threshold", "factor", "gate"):
        if name in tables and not torch.isfinite(tables[name]).all():
            raise ValueError(f"a saeuron intervention's {name!r} table holds NaN or infinite values")
    if not selected.any():
        raise ValueError("a saeuron intervention that selects no feature at any timestep changes nothing")
    if (tables["factor"][selected] > 0).any():
        raise ValueError("a saeuron intervention's 'factor' must be <= 0 where a feature is selected (it damps them)")
    if (intervention.settings["gate"] is None) != (gate is None):
        raise ValueError("a saeuron intervention has a 'gate' table exactly when its gate setting is not null")
    if gate is not None and (gate < 0).any():
        raise ValueError("a saeuron intervention's 'gate' table must be >= 0 (a presence its images reach)")


def _gate(ratio: float, own: torch.Tensor, rivals: torch.Tensor) -> torch.Tensor:
    """The presence an image must reach, per timestep: ``ratio`` times the mean on the concept's own stats images,
    and above every other stats image at that timestep (``own``, ``rivals``: ``(images, timesteps)``).

    Early in sampling the noise decides a block's features as much as the prompt: at the first calls some styles'
    features read as high in other styles' images as in their own, and a gate at a fraction of the concept's mean
    alone would let those images through. Rival images that end with the concept present (a prompt that names no
    style drawn in the concept's style anyway) are instances of it, not rivals, and are left out.
    """
    floor = ratio * own.mean(0)
    rivals = rivals[rivals[:, -1] < floor[-1]]
    return floor if rivals.numel() == 0 else torch.maximum(floor, rivals.max(0).values)


def _rivals(i: int, others: torch.Tensor, concepts: list[torch.Tensor]) -> torch.Tensor:
    """Every stats image but the ``i``-th concept's own: the other prompts' and the other erased concepts'."""
    return torch.cat([others, *(c for j, c in enumerate(concepts) if j != i)])


def _normalized(mean: torch.Tensor) -> torch.Tensor:
    """Mean activations as a distribution over features, per timestep."""
    return mean / mean.sum(-1, keepdim=True).clamp_min(1e-12)


def _mean_codes(wrapper: PipelineWrapper, sae, hook: str, prompts: list[str], config: SAeUronConfig,  # noqa: ANN001
                own_noise: bool = False):  # fmt: skip
    """Per image, per timestep: the SAE code averaged over spatial positions, ``(images, K, latents)``.

    Every prompt is drawn at the seeds ``seed, seed + 1, ...``, so the scores contrast prompts on the same noise;
    with ``own_noise`` each image has its own seed instead, as the gate's calibration needs (early in sampling the
    noise decides a block's features as much as the prompt does)."""
    n = config.images_per_prompt
    pairs = [(p, config.seed + (j * n if own_noise else 0) + i) for j, p in enumerate(prompts) for i in range(n)]
    acts, timesteps = wrapper.unet_activations(
        hook, [p for p, _ in pairs], [s for _, s in pairs], steps=config.steps, guidance=config.guidance
    )
    with torch.no_grad():
        codes = torch.stack([sae.encode(acts[:, k]).mean(dim=1) for k in range(acts.shape[1])], dim=1)
    return codes, timesteps


def _pin_sae(wrapper: PipelineWrapper, config: Any) -> Any:
    return pinned_sae(wrapper, config, default_denoiser_hook)


@register_method(
    "saeuron",
    SAeUronConfig,
    family="runtime",
    summary="SAeUron: per-timestep SAE feature damping in a denoiser transformer block",
    capabilities=Capabilities(
        guides=False,
        preserve=True,
        templates="templates",
        quick=None,
        architectures=("sd", "sdxl", "sd3", "flux"),
        base_lookup=_pin_sae,
    ),
    runtime_edit=saeuron_edit,
    check_intervention=check_saeuron,
)
def erase_saeuron(wrapper: PipelineWrapper, concepts: ConceptSpec, config: SAeUronConfig) -> WeightEdit:
    """Score every feature at every timestep on the concept's images against other images; tabulate the edit."""
    hook = config.hook_point or default_denoiser_hook(wrapper)
    if not hook.startswith(f"{wrapper.denoiser_name}."):
        raise ValueError(f"saeuron edits the denoiser: {hook!r} is not a {wrapper.denoiser_name} hook point")
    wrapper.check_sampler_steps(config.steps)
    sae, sae_meta, trained_on = resolve_sae(wrapper, hook, config.sae, config.sae_stores)
    erased = [concept_key(t) for t in concepts.targets]
    others = [t.format(p) for p in concepts.preserve for t in config.templates]
    others += [p for p in trained_on if not any(e in concept_key(p) for e in erased)][: config.other_prompts]
    if not others:
        raise ValueError("saeuron needs other prompts to score against: preserve some concepts, or use an SAE that "
                         "records its training prompts")  # fmt: skip
    other_codes, timesteps = _mean_codes(wrapper, sae, hook, others, config)
    concept_prompts = [[t.format(c) for t in config.templates] for c in concepts.targets]
    concept_codes = [_mean_codes(wrapper, sae, hook, prompts, config)[0] for prompts in concept_prompts]
    threshold = torch.cat([other_codes, *concept_codes]).mean(0)  # m(t, f): the mean over all stats images
    if config.gate is not None:  # the same prompts again, each image on its own noise
        noisy_others = _mean_codes(wrapper, sae, hook, others, config, own_noise=True)[0]
        noisy_concepts = [_mean_codes(wrapper, sae, hook, prompts, config, own_noise=True)[0]
                          for prompts in concept_prompts]  # fmt: skip
    selected, factor, gate = [], [], []
    for i, codes in enumerate(concept_codes):
        mu_c = codes.mean(0)
        score = _normalized(mu_c) - _normalized(_rivals(i, other_codes, concept_codes).mean(0))  # mu_o: (K, latents)
        cut = torch.quantile(score.double(), config.percentile / 100, dim=-1, keepdim=True).float()
        chosen = score > cut
        selected.append(chosen)
        factor.append(torch.where(chosen, mu_c * config.multiplier, 1.0))
        if config.gate is not None:
            rivals = _rivals(i, noisy_others, noisy_concepts)
            gate.append(_gate(config.gate, _presence(noisy_concepts[i], chosen), _presence(rivals, chosen)))
    tables = {"timesteps": timesteps.float(), "selected": torch.stack(selected), "threshold": threshold,
              "factor": torch.stack(factor)}  # fmt: skip
    if gate:
        tables["gate"] = torch.stack(gate)
    counts = [float(c.sum(-1).float().mean()) for c in selected]
    settings = {"percentile": float(config.percentile), "multiplier": float(config.multiplier), "gate": config.gate,
                "gate_steps": config.gate_steps}  # fmt: skip
    intervention = SAEIntervention("saeuron", hook, sae, settings, tables, sae_meta)
    info = {"hook_point": hook, "latents": sae.latents, "timesteps": int(timesteps.numel()),
            "features_per_timestep": counts, "other_prompts": len(others)}  # fmt: skip
    logger.info("saeuron: %s features a timestep at %s", counts, hook)
    return WeightEdit(deltas={}, info=info, payloads=[intervention])
