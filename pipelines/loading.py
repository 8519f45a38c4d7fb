"""Which model a name means, and loading it as a diffusers pipeline.

A model is ``"micro"`` (the embedded default), a tiny pipeline's name (``pipelines.tiny.TINY_MODELS``: ``tiny``,
``tiny-sd2``, ``tiny-sdxl``, ``tiny-sd3``, ``tiny-flux``, small random pipelines built in code, for tests), a local
diffusers folder, or a hub id such as ``"CompVis/stable-diffusion-v1-4"``. What can be known
without loading (an empty name, a missing folder, a folder that is no pipeline) is checked before anything slow; a
hub id goes through :func:`pipelines.hub.load_from_hub`, so no network is said in one line within seconds.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from .checks import error_line
from .hub import HubUnreachableError, load_from_hub
from .modules import Pipeline

__all__ = [
    "TINY_NAMES",
    "ModelNotFoundError",
    "check_model_reference",
    "load_diffusers_pipeline",
    "micro_model_path",
    "pipeline_name",
    "world_file",
]

#: The tiny pipelines' names (``pipelines.tiny.TINY_MODELS``' keys, spelled here so that names are checked without
#: importing diffusers' models).
TINY_NAMES: tuple[str, ...] = ("tiny", "tiny-sd2", "tiny-sdxl", "tiny-sd3", "tiny-flux")
_TINY = TINY_NAMES


class ModelNotFoundError(ValueError):
    """The model argument names no embedded model, local folder or reachable hub repository."""


def micro_model_path() -> Path:
    """The shipped micro SD pipeline folder, ``pipelines/micro/`` (``model_index.json`` and ``world.json`` at its
    root; it is trained and written by ``evals.microworld.training``)."""
    return Path(__file__).resolve().parent / "micro"


def world_file(model: str) -> Path | None:
    """The ``world.json`` of a model trained on the micro world's renders (the shipped micro model, or one
    ``scripts/train_micro.py`` exported), else ``None``.

    What a model draws decides how it is read: a model of the world is probed with the world's concepts, scored by
    the world's CLIP and checked by its judge; any other with generic prompts and a hub CLIP. Decided by the folder,
    not by the name ``"micro"``, so a retrained world model is read as the shipped one is.
    """
    if not model.strip() or model in _TINY:
        return None
    folder = micro_model_path() if model == "micro" else Path(model).expanduser()
    if not (folder / "world.json").is_file():
        return None
    return folder / "world.json"


def _is_local(model: str) -> bool:
    return Path(model).expanduser().exists()


def _looks_like_path(model: str) -> bool:
    """A reference no hub id can be: a hub id is ``name`` or ``owner/name``, never absolute, relative or deeper."""
    return model.startswith(("/", "./", "../", "~")) or model.count("/") > 1


def check_model_reference(model: object) -> None:
    """``ModelNotFoundError`` in one line when ``model`` cannot load and that is known without loading it.

    Checked by the scripts before a scorer or anything else slow loads: an empty name, the embedded micro model
    missing, a folder that is not a diffusers pipeline, a path that does not exist. A hub id is only found missing
    when it loads.
    """
    if not isinstance(model, str) or not model.strip():
        raise ModelNotFoundError("model must be a non-empty string")
    if model in _TINY:
        return
    if model == "micro":
        path = micro_model_path()
        if not (path / "model_index.json").is_file():
            raise ModelNotFoundError(f"the embedded micro model is missing at {path}: run scripts/train_micro.py")
    elif _is_local(model):
        path = Path(model).expanduser()
        if not (path / "model_index.json").is_file():
            raise ModelNotFoundError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
    elif _looks_like_path(model):
        raise ModelNotFoundError(f"model folder {model} does not exist")


def _from_pretrained(model: str, source: str, dtype: torch.dtype, hub: bool) -> DiffusionPipeline:
    def load(local_files_only: bool) -> DiffusionPipeline:
        return DiffusionPipeline.from_pretrained(
            source, dtype=dtype, safety_checker=None, local_files_only=local_files_only
        )

    try:
        return load_from_hub(f"model {model!r}", load) if hub else load(True)
    except HubUnreachableError as err:
        raise ModelNotFoundError(str(err)) from err
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(f"cannot load model {model!r}: {error_line(err)}") from err


def load_diffusers_pipeline(
    model: str = "micro",
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[Pipeline, str]:
    """The diffusion pipeline ``model`` names, on ``device`` in ``dtype`` with its progress bar off, and the id it is
    known by (``"micro"``, a folder's resolved path, a hub id, ``"tiny-sd(seed=0)"``).

    ``seed`` initialises the random tiny pipelines and is ignored for trained models. ``ModelNotFoundError`` in one
    line for anything that does not load as SD 1.x/2.x, SDXL, SD3 or Flux.
    """
    check_model_reference(model)
    if model in _TINY:
        from .tiny import tiny_pipeline

        name = "tiny-sd" if model == "tiny" else model
        pipe, model_id = tiny_pipeline(model, seed), f"{name}(seed={seed})"
    elif model == "micro":
        pipe, model_id = _from_pretrained(model, str(micro_model_path()), dtype, hub=False), "micro"
    elif _is_local(model):
        path = Path(model).expanduser()
        pipe, model_id = _from_pretrained(model, str(path), dtype, hub=False), str(path.resolve())
    else:
        pipe, model_id = _from_pretrained(model, model, dtype, hub=True), model
    if model in _TINY and dtype != torch.float32:
        pipe.to(dtype=dtype)
    if not isinstance(pipe, Pipeline):
        raise ModelNotFoundError(
            f"model {model!r} is a {type(pipe).__name__}, not an SD 1.x/2.x, SDXL, SD3 or Flux pipeline"
        )
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, model_id


def pipeline_name(pipe: object, model_id: str | None = None) -> str:
    """The id a pipeline a user built with plain diffusers is known by: ``model_id`` when given, else the folder or
    hub id it was loaded from, else its class name."""
    name = (
        model_id
        or getattr(pipe, "name_or_path", None)
        or getattr(getattr(pipe, "config", None), "_name_or_path", None)
    )
    return str(name or type(pipe).__name__)
