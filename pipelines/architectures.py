"""Architecture names, and a model's architecture known without loading it (no torch, no diffusers).

Methods and attacks declare the architectures they run on by these names; the scripts refuse the others in one line
before any model or scorer loads, where the model's architecture can be read from its name or its folder's
``model_index.json`` (the class diffusers would build), and right after it loads otherwise (a hub id).
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["ARCHITECTURES", "ARCHITECTURE_NAMES", "PIPELINE_ARCHITECTURES", "TINY_ARCHITECTURES", "model_architecture"]

#: The pipelines the wrapper serves: SD 1.x/2.x (``sd``, any prediction type; the micro model is one), SDXL, SD3, Flux.
ARCHITECTURES: tuple[str, ...] = ("sd", "sdxl", "sd3", "flux")

#: How a user reads each architecture's name (messages, the README matrix's columns).
ARCHITECTURE_NAMES: dict[str, str] = {"sd": "SD 1.x/2.x", "sdxl": "SDXL", "sd3": "SD3", "flux": "Flux"}

#: diffusers pipeline classes (``model_index.json``'s ``_class_name``) -> architecture.
PIPELINE_ARCHITECTURES: dict[str, str] = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
}

#: The tiny pipelines built in code (``pipelines.tiny``), by the name ``load_pipeline`` takes, and their architecture.
TINY_ARCHITECTURES: dict[str, str] = {
    "tiny": "sd",
    "tiny-sd2": "sd",
    "tiny-sdxl": "sdxl",
    "tiny-sd3": "sd3",
    "tiny-flux": "flux",
}


def model_architecture(model: str) -> str | None:
    """The architecture of ``model`` as ``load_pipeline`` takes it, when known without loading: a tiny pipeline's
    name, ``"micro"`` or a local folder whose ``model_index.json`` names one of :data:`PIPELINE_ARCHITECTURES`.
    ``None`` for a hub id, or a folder that does not say (loading it tells, or refuses it)."""
    if model in TINY_ARCHITECTURES:
        return TINY_ARCHITECTURES[model]
    folder = Path(__file__).resolve().parent / "micro" if model == "micro" else Path(model).expanduser()
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return None
    return PIPELINE_ARCHITECTURES.get(index.get("_class_name")) if isinstance(index, dict) else None
