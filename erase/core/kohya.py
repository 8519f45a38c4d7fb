"""An artifact's weight change as a LoRA file in the key layout Automatic1111, ComfyUI and kohya-ss read.

The layout is kohya-ss's (sd-scripts ``networks/lora.py``): per changed Linear three tensors,

    <name>.lora_down.weight   (r, in)
    <name>.lora_up.weight     (out, r)
    <name>.alpha              0-d; the change is (alpha / r) * up @ down (times the UI's LoRA weight)

with ``<name>`` a prefix and the module's path, every ``.`` written ``_``:

    SD 1.x / 2.x   lora_unet_<diffusers UNet path>            lora_te_<text encoder path>
    SDXL           lora_unet_<original (SGM) UNet path>       lora_te1_ / lora_te2_<first / second encoder path>

e.g. ``lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k`` (SD 1.x) and
``lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k`` (SDXL, ``PipelineWrapper.original_unet_path``), as
kohya-ss itself writes them; ``lora_te_text_model_encoder_layers_0_self_attn_q_proj``. Where we differ from
diffusers' ``convert_state_dict_to_kohya``: SD 1.x text-encoder keys are ``lora_te_`` (Automatic1111 reads no
``lora_te1_`` there), SDXL UNet keys are in the original layout, and ``alpha / r`` is the change's own scale (the
trained adapters' alpha over rank; 1 for a factorised closed form) instead of always 1.

A closed-form edit (UCE, TIME, RECE) is full rank; it is written exactly, as the SVD at its numerical rank
(``WeightChange.lora_factors``), because every reader of the layout, diffusers' ``load_lora_weights`` included,
takes low-rank factors, while the ``.diff`` full-weight form is read by ComfyUI and Automatic1111 only. The text
encoders' modules the UIs map are those of the encoder layers (attention projections and MLP); any other is refused.
A runtime payload (an SAE intervention) changes no weight and has no LoRA form; facilitated transport (``spm``) is
the LoRA at full strength on every prompt there, as with ``load_lora_weights``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import save

from pipelines import PipelineWrapper
from pipelines.files import atomic_write_bytes

from .artifact import ErasureArtifact
from .weights import WEIGHTS_KIND, WeightChange

__all__ = [
    "KOHYA_ARCHITECTURES",
    "LORA_FORMATS",
    "check_kohya_architecture",
    "kohya_bytes",
    "kohya_name",
    "kohya_state_dict",
    "lora_scale",
    "save_kohya_lora",
]

#: the LoRA layouts an artifact can be written in: diffusers' (the artifact's own file) and kohya-ss's
LORA_FORMATS = ("diffusers", "kohya")

#: CLIP text-encoder modules the UIs map, ``text_model.`` optional (transformers 5 flattens ``CLIPTextModel``; the
#: keys keep it, as kohya-ss writes them and diffusers strips it again for a flattened encoder)
#: the architectures whose LoRAs the layout names (``PipelineWrapper.architecture``): SD 1.x/2.x and SDXL's UNets
KOHYA_ARCHITECTURES = ("sd", "sdxl")

_TEXT_ENCODER_MODULE = re.compile(r"(text_model\.)?encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])")


def check_kohya_architecture(wrapper: PipelineWrapper) -> None:
    """``ValueError`` in one line for a pipeline whose LoRAs the kohya layout does not name (SD3, Flux)."""
    if wrapper.architecture not in KOHYA_ARCHITECTURES:
        raise ValueError(f"the kohya LoRA layout written here is SD 1.x/2.x and SDXL's, not {wrapper.architecture}'s: "
                         "load the artifact's diffusers LoRA instead")  # fmt: skip


def kohya_name(wrapper: PipelineWrapper, name: str) -> str:
    """The kohya key stem of the Linear ``name`` (qualified: ``unet.<path>``, ``text_encoder.<path>``, ...)."""
    component, _, path = name.partition(".")
    if component == "unet":
        return "lora_unet_" + (wrapper.original_unet_path(path) if wrapper.is_sdxl else path).replace(".", "_")
    prefixes = {"text_encoder": "lora_te1_" if wrapper.is_sdxl else "lora_te_", "text_encoder_2": "lora_te2_"}
    if component not in prefixes:
        raise ValueError(f"{name}: no kohya LoRA key for component {component!r}")
    if not _TEXT_ENCODER_MODULE.fullmatch(path):
        raise ValueError(f"{name}: Automatic1111 and ComfyUI read text-encoder LoRAs on the encoder layers only")
    return prefixes[component] + ("text_model." + path.removeprefix("text_model.")).replace(".", "_")


def kohya_state_dict(
    wrapper: PipelineWrapper, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float = 1.0
) -> dict[str, torch.Tensor]:
    """The kohya tensors of the changes ``dW = B @ A`` per qualified Linear name, with ``alpha / r = scale``:
    ``lora_down = A``, ``lora_up = B / scale``, float32."""
    if not scale > 0 or not math.isfinite(scale):
        raise ValueError(f"the LoRA scale must be a positive number, got {scale}")
    tensors: dict[str, torch.Tensor] = {}
    for name, (lora_a, lora_b) in sorted(factors.items()):
        stem = kohya_name(wrapper, name)
        if stem in {k.partition(".")[0] for k in tensors}:
            raise ValueError(f"{name}: two modules share the kohya key {stem}")
        rank = int(lora_a.shape[0])
        tensors[f"{stem}.lora_down.weight"] = lora_a.detach().float().cpu().contiguous()
        tensors[f"{stem}.lora_up.weight"] = (lora_b.detach().double().cpu() / scale).float().contiguous()
        tensors[f"{stem}.alpha"] = torch.tensor(scale * rank, dtype=torch.float32)
    return tensors


def lora_scale(artifact: ErasureArtifact, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> float:
    """The change's own LoRA scale: the trained adapters' ``alpha / rank`` (the method's config) where every factor
    has that rank, else 1 (factors of a closed form)."""
    rank, alpha = artifact.config.get("rank"), artifact.config.get("alpha")
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (rank, alpha))
    if not numbers or not rank > 0 or not alpha > 0 or any(a.shape[0] != rank for a, _ in factors.values()):
        return 1.0
    return float(alpha) / float(rank)


def _weight_change(artifact: ErasureArtifact) -> WeightChange:
    change = artifact.payload(WEIGHTS_KIND.name)
    if change is None:
        kinds = ", ".join(sorted(artifact.payloads))
        raise ValueError(f"the {artifact.method} artifact changes no weights ({kinds}): it has no LoRA form")
    return change


def kohya_bytes(artifact: ErasureArtifact, wrapper: PipelineWrapper) -> bytes:
    """The artifact's weight change as a kohya-layout safetensors file (bytes); ``wrapper`` is its base model
    (names the SDXL UNet's modules in the original layout). ``ValueError`` in one line for a runtime artifact or a
    module the UIs cannot read."""
    check_kohya_architecture(wrapper)
    factors = _weight_change(artifact).lora_factors()
    scale = lora_scale(artifact, factors)
    tensors = kohya_state_dict(wrapper, factors, scale)
    ranks = sorted({int(a.shape[0]) for a, _ in factors.values()})
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks[-1]),
        "ss_network_alpha": str(scale * ranks[-1]),
        "erase_method": artifact.method,
        "erase_concepts": json.dumps(artifact.concepts),
        "erase_base_model": artifact.base_model,
        "erase_base_fingerprint": artifact.base_fingerprint,
    }
    return save(tensors, metadata)


def save_kohya_lora(artifact: ErasureArtifact, wrapper: PipelineWrapper, path: str | Path) -> Path:
    """Write :func:`kohya_bytes` to ``path`` atomically (a temporary sibling renamed into place; ``WriteError`` in one
    line when it cannot)."""
    path = Path(path)
    atomic_write_bytes(path, kohya_bytes(artifact, wrapper))
    return path
