"""ItD, Interpret-then-Deactivate (Tian et al., 2025): switch off a concept's SAE features in the text encoder, only
in prompts the SAE itself says hold the concept.

A TopK SAE reads the text encoder's residual stream at one layer. For each prompt p and feature f let
a_f(p) = max over p's tokens (start token excluded) of f's activation, and top_n(p) the n features with the largest
a_f(p). The concept's features are those among the top-n of its prompts and among the top-n of no retain prompt::

    F = U_{p in concept prompts} top_n(p)  -  U_{q in retain prompts} top_n(q)

At generation the SAE encodes the prompt, z' = z with z_F scaled by ``scale`` (negative: pushed the other way; 0:
switched off) on every token but the start token, and the gate decides per prompt::

    mse(p) = mean over tokens and width of (W_dec z' + b_dec - x)^2
    x'     = W_dec z' + b_dec   if mse(p) >= threshold,   else x (untouched)

with ``threshold = 0.99 * min over the concept prompts of mse`` (the SAE as a zero-shot classifier of the concept).
A prompt the gate passes is bit-identical to the original model's.

Reference: ``NANSirun/Interpret-then-deactivate`` (``generate_images.py``): SAE on layer 8 of SD 1.4's 12-layer CLIP
text encoder, top 256 features per prompt (style; 128 for celebrities), scale -8, the threshold as above. Where we
differ, knowingly: the threshold is calibrated at the same ``scale`` the edit uses (the reference calibrates style at
-6 and edits at -8); the concept prompts are the concept in ``templates`` (the reference reads 5 prompts per
concept from its dataset); the retain prompts are the preserved concepts in the same templates plus prompts the SAE
was trained on that name no erased concept (the reference: 500 prompts of other styles); prompts are padded to the
encoder's full length as diffusers encodes them (the reference pads to the longest prompt of a batch).
``keep_error`` adds the SAE's reconstruction error back (x + W_dec (z' - z)), an option, not the reference.

Two defaults are ours, because the reference's do not carry over to an SAE of another size: ``top_features`` is the
SAE's k (the reference's 256 is 0.05% of its 524,288 features; of our micro SAE's 2048 it is every feature a prompt
touches, and 500 retain prompts leave no feature); and the gate thresholds the per-token error's maximum, not its
mean (on micro the mean let most of the concept's prompts through the gate; the maximum catches all of them and
none of the prompts naming no erased concept).

On SD3 and Flux the default hook point is a T5 block (the encoder of most token rows on SD3, of all of them on Flux,
whose CLIP gives the pooled vector alone), with no start token to leave out; the other encoders still read the
prompt unedited, as SDXL's second encoder does. A CLIP layer of SD3 (``hook_point``) is edited the same way.

Micro setting: ``--preserve-set world --set scale=-1`` (the reference's -8 on 40 features also breaks the rest of a
prompt that names the concept); figures in ``docs/methods.md``.
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

__all__ = ["ItDConfig", "erase_itd", "itd_edit"]

logger = logging.getLogger(__name__)

#: the per-prompt statistics of the reconstruction error the gate can threshold
GATE_STATISTICS = ("mean", "max")
#: the settings an itd intervention holds
ITD_SETTINGS = ("scale", "threshold", "keep_error", "gate_statistic", "start_tokens", "calibration_error")


@dataclass
class ItDConfig:
    """Settings of ItD. Defaults: the reference's style settings.

    Attributes:
        hook_point: the text-encoder layer the SAE reads (``None``: the layer two thirds of the way up, which for
            SD 1.x's 12-layer encoder is layer 8, the reference's; T5's on SD3/Flux: :func:`default_text_hook`).
        sae: an SAE folder (``scripts/train_sae.py``); ``None`` looks one up for this model's text encoder in
            ``sae_stores`` and the SAEs shipped with the package.
        sae_stores: folders of SAE folders to search.
        top_features: n, the features kept per prompt (reference: 256 for styles, 128 for celebrities).
        scale: what the concept's features are multiplied by where the gate lets the edit through.
        templates: the concept prompts, ``{}`` standing for the concept.
        retain_prompts: how many of the SAE's training prompts (those naming no erased concept) join the retain set.
        gate: calibrate the gate (``False``: edit every prompt, the gate threshold 0).
        gate_statistic: the per-prompt error the gate thresholds: the squared error's ``"mean"`` over tokens (the
            reference's edit) or its ``"max"`` over tokens (the reference's celebrity calibration).
        keep_error: keep the SAE's reconstruction error (x + W_dec (z' - z)) instead of replacing x by the decode.
    """

    NUMBER_RANGES: ClassVar[dict[str, str]] = {"top_features": ">= 1", "scale": "<= 0", "retain_prompts": ">= 0"}

    hook_point: str | None = None
    sae: str | None = None
    sae_stores: tuple[str, ...] = ()
    top_features: int | None = None
    scale: float = -8.0
    templates: tuple[str, ...] = ("{}", "painting by {}", "art by {}", "artwork by {}", "picture by {}", "style of {}")
    retain_prompts: int = 0
    gate: bool = True
    gate_statistic: str = "max"
    keep_error: bool = False

    def __post_init__(self) -> None:
        check_number_fields(self)  # scale <= 0: a negative factor, or 0 to switch features off
        if self.gate_statistic not in GATE_STATISTICS:
            raise ValueError(f"gate_statistic must be 'mean' or 'max', got {self.gate_statistic!r}")
        self.templates = check_templates(self.templates)
        self.sae_stores = tuple(self.sae_stores)


def default_text_hook(wrapper: PipelineWrapper) -> str:
    """The layer two thirds of the way up the text encoder that gives most of the denoiser's token rows
    (``PipelineWrapper.token_encoder``): CLIP's on SD 1.x/2.x (layer 8 of 12, ItD's) and SDXL (the first encoder),
    T5's on SD3 and Flux."""
    component = wrapper.token_encoder
    layers = [p for p in wrapper.hook_points() if p.startswith(component + ".")]
    if not layers:
        raise ValueError(f"this pipeline has no hook point in its text encoder {component}")
    return layers[(2 * len(layers)) // 3]


def _prompt_features(z: torch.Tensor, n: int) -> torch.Tensor:
    """Each prompt's n strongest features (max over its tokens): a (prompts, latents) boolean mask."""
    strongest = z.amax(dim=1)
    top = strongest.topk(min(n, strongest.shape[-1]), dim=-1)
    mask = torch.zeros_like(strongest, dtype=torch.bool).scatter_(-1, top.indices, top.values > 0)
    return mask


def _start(intervention: SAEIntervention) -> int:
    """Tokens before the prompt's first word at the hook point's encoder, which the edit leaves alone: CLIP's start
    token (1; an intervention without the setting is CLIP's) or none (T5)."""
    return int(intervention.settings.get("start_tokens", 1))


def _gate_error(intervention: SAEIntervention, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(mse per prompt, the edited decode, the plain decode) of the tokens after the start token (if any)."""
    sae, features = intervention.sae, intervention.tables["features"]
    x = tokens[:, _start(intervention) :]
    z = sae.encode(x)
    z_edited = torch.where(features, z * intervention.settings["scale"], z)
    edited, plain = sae.decode(z_edited), sae.decode(z)
    per_token = (edited - x).pow(2).mean(dim=2)
    statistic = per_token.amax(dim=1) if intervention.settings.get("gate_statistic") == "max" else per_token.mean(1)
    return statistic, edited, plain


def itd_edit(
    intervention: SAEIntervention, tokens: torch.Tensor, _timestep: Any, _guided: bool = False
) -> torch.Tensor | None:
    """The gated deactivation on a batch of prompts' tokens; ``None`` (leave them) when no prompt passes the gate."""
    mse, edited, plain = _gate_error(intervention, tokens)
    fired = mse >= intervention.settings["threshold"]
    if not fired.any():
        return None
    out, first = tokens.clone(), _start(intervention)
    if intervention.settings.get("keep_error"):
        out[fired, first:] = tokens[fired, first:] + (edited - plain)[fired]
    else:
        out[fired, first:] = edited[fired]
    return out


def check_itd(intervention: SAEIntervention) -> None:
    features = intervention.tables.get("features")
    if features is None or features.dtype != torch.bool or tuple(features.shape) != (intervention.sae.latents,):
        raise ValueError(f"an itd intervention needs a boolean 'features' table of {intervention.sae.latents} latents")
    check_intervention_keys(intervention, ITD_SETTINGS, ("features",), "an itd intervention")
    if not features.any():
        raise ValueError("an itd intervention that deactivates no feature changes nothing")
    if not intervention.hook_point.startswith("text_encoder"):
        raise ValueError(f"itd edits the text encoder: {intervention.hook_point!r} is not a text-encoder hook point")
    settings = intervention.settings
    check_number_values(settings, {"scale": "<= 0", "threshold": ">= 0"}, "an itd intervention")
    if "calibration_error" in settings:
        check_number_values(settings, {"calibration_error": ">= 0"}, "an itd intervention")
        if settings["threshold"] > settings["calibration_error"]:
            raise ValueError(
                f"an itd intervention's gate threshold {settings['threshold']:.6g} is above the smallest gate error "
                f"of the concept prompts it was calibrated on ({settings['calibration_error']:.6g}): the gate would "
                "leave concept prompts unedited (calibration puts it at 0.99 times that error)"
            )
    elif settings["threshold"] > 0:
        logger.warning("this itd intervention records no calibration error: its gate threshold %.6g cannot be "
                       "checked against its concept prompts; erase the concept again to record it",
                       settings["threshold"])  # fmt: skip
    if settings.get("gate_statistic", "mean") not in GATE_STATISTICS:
        raise ValueError(f"an itd intervention's gate_statistic must be one of {', '.join(GATE_STATISTICS)}, got "
                         f"{settings['gate_statistic']!r}")  # fmt: skip
    if settings.get("start_tokens", 1) not in (0, 1) or isinstance(settings.get("start_tokens"), bool):
        raise ValueError(f"an itd intervention's start_tokens must be 0 or 1, got {settings['start_tokens']!r}")
    if not isinstance(settings.get("keep_error", False), bool):
        raise ValueError(f"an itd intervention's keep_error must be true or false, got {settings['keep_error']!r}")


def _pin_sae(wrapper: PipelineWrapper, config: Any) -> Any:
    return pinned_sae(wrapper, config, default_text_hook)


@register_method(
    "itd",
    ItDConfig,
    family="runtime",
    summary="Interpret-then-Deactivate: gated SAE feature deactivation in the text encoder",
    capabilities=Capabilities(
        guides=False,
        preserve=True,
        templates="templates",
        quick=None,
        architectures=("sd", "sdxl", "sd3", "flux"),
        base_lookup=_pin_sae,
    ),
    runtime_edit=itd_edit,
    check_intervention=check_itd,
)
def erase_itd(wrapper: PipelineWrapper, concepts: ConceptSpec, config: ItDConfig) -> WeightEdit:
    """Select each concept's SAE features against the retain prompts and calibrate the gate on the concept prompts."""
    hook = config.hook_point or default_text_hook(wrapper)
    if not hook.startswith("text_encoder"):
        raise ValueError(f"itd edits the text encoder: {hook!r} is not a text-encoder hook point")
    sae, sae_meta, trained_on = resolve_sae(wrapper, hook, config.sae, config.sae_stores)
    erased = [concept_key(t) for t in concepts.targets]
    concept_prompts = [t.format(c) for c in concepts.targets for t in config.templates]
    retain = [t.format(p) for p in concepts.preserve for t in config.templates]
    unrelated = [p for p in trained_on if not any(e in concept_key(p) for e in erased)]
    retain += unrelated[: config.retain_prompts]
    with torch.no_grad():
        first = wrapper.start_tokens(hook.partition(".")[0])
        z_concept = sae.encode(wrapper.text_activations(hook, concept_prompts)[:, first:])
        top = config.top_features or sae.k
        selected = _prompt_features(z_concept, top).any(0)
        if retain:
            z_retain = sae.encode(wrapper.text_activations(hook, retain)[:, first:])
            selected &= ~_prompt_features(z_retain, top).any(0)
    if not selected.any():
        raise ValueError(
            f"no SAE feature is specific to {list(concepts.targets)}: every feature of the concept prompts is also "
            f"among the top {config.top_features or sae.k} of a retain prompt; lower top_features or narrow the "
            "retain set"
        )
    settings: dict[str, Any] = {"scale": float(config.scale), "threshold": 0.0, "keep_error": config.keep_error,
                                "gate_statistic": config.gate_statistic, "start_tokens": first}  # fmt: skip
    intervention = SAEIntervention("itd", hook, sae, settings, {"features": selected}, sae_meta)
    with torch.no_grad():
        mse, _, _ = _gate_error(intervention, wrapper.text_activations(hook, concept_prompts))
    # the concept prompts' smallest gate error: a threshold above it leaves some of them unedited (refused at load)
    settings["calibration_error"] = float(mse.min())
    if config.gate:
        settings["threshold"] = 0.99 * settings["calibration_error"]
    info = {"hook_point": hook, "features": int(selected.sum()), "latents": sae.latents,
            "gate_threshold": settings["threshold"], "concept_prompts": len(concept_prompts),
            "retain_prompts": len(retain)}  # fmt: skip
    logger.info("itd: %d of %d features selected at %s, gate threshold %.4g", int(selected.sum()), sae.latents, hook,
                settings["threshold"])  # fmt: skip
    return WeightEdit(deltas={}, info=info, payloads=[intervention])
