"""The erasure artifact: a folder any diffusers app can load, plus the provenance that makes it auditable.

Layout::

    ARTIFACT/
      erasure.json                         method, config, concepts, base model + fingerprint, timings, layers
      pytorch_lora_weights.safetensors     weight_format "lora": dW = B A per module, with peft adapter metadata
      edited_weights.safetensors           weight_format "full": dW per module, when low rank would not be smaller
      pipeline/                            optional full ``save_pretrained`` export of the edited pipeline

Only safetensors and JSON are ever read back: nothing is unpickled.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipelines import PipelineWrapper

__all__ = [
    "ArtifactError",
    "ArtifactExistsError",
    "ArtifactMismatchError",
    "ErasureArtifact",
    "apply_artifact",
    "check_artifact_base",
    "load_artifact",
    "low_rank_factors",
    "save_artifact",
]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
METADATA_FILE = "erasure.json"
LORA_FILE = "pytorch_lora_weights.safetensors"
FULL_FILE = "edited_weights.safetensors"


class ArtifactError(ValueError):
    """An artifact folder is missing, corrupt, or not an erasure artifact."""


class ArtifactExistsError(ArtifactError):
    """The output folder already holds something that saving would destroy."""


class ArtifactMismatchError(ArtifactError):
    """The artifact was made for other base weights than the pipeline's."""


@dataclass
class ErasureArtifact:
    method: str
    config: dict[str, Any]
    concepts: list[str]
    guides: list[str]
    preserve: list[str]
    base_model: str
    base_fingerprint: str
    deltas: dict[str, torch.Tensor]  # qualified module name -> dW (float32)
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    version: str = ""

    def __post_init__(self) -> None:
        if not self.version:
            from . import __version__

            self.version = __version__

    @property
    def layers(self) -> list[str]:
        return sorted(self.deltas)

    def metadata(self, weight_format: str, ranks: dict[str, int] | None = None) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "method": self.method,
            "config": self.config,
            "concepts": self.concepts,
            "guides": self.guides,
            "preserve": self.preserve,
            "base_model": self.base_model,
            "base_fingerprint": self.base_fingerprint,
            "layers": self.layers,
            "weight_format": weight_format,
            "lora_ranks": ranks or {},
            "seconds": self.seconds,
            "created": self.created,
            "erase_version": self.version,
            "info": self.info,
        }


def low_rank_factors(delta: torch.Tensor, rtol: float = 1e-7) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact factorisation dW = B @ A, with the rank the numerical rank of dW (singular values > rtol * largest)."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    rank = max(1, int((s > rtol * s[0]).sum())) if s.numel() and s[0] > 0 else 1
    lora_b = u[:, :rank] * s[:rank]
    return vh[:rank].float(), lora_b.float()


def _check_destination(folder: Path, overwrite: bool) -> None:
    if not folder.exists():
        return
    if not folder.is_dir():
        raise ArtifactExistsError(f"{folder} exists and is not a folder")
    if any(folder.iterdir()) and not overwrite:
        what = "another erasure artifact" if (folder / METADATA_FILE).exists() else "files"
        raise ArtifactExistsError(f"{folder} already holds {what}; choose another --out or pass --overwrite")
    if any(folder.iterdir()) and not (folder / METADATA_FILE).exists():
        raise ArtifactExistsError(f"{folder} holds files that are not an erasure artifact; refusing to overwrite them")


def save_artifact(
    artifact: ErasureArtifact,
    folder: str | Path,
    wrapper: PipelineWrapper,
    *,
    overwrite: bool = False,
    export_pipeline: bool | None = None,
) -> Path:
    """Write the artifact atomically: everything goes to a temporary sibling folder that is renamed at the end.

    The weight change is stored as an exact LoRA when that is smaller than the changed weights, else as full
    weight changes. ``export_pipeline`` additionally writes a complete diffusers folder of the edited pipeline under
    ``pipeline/`` (``wrapper`` must be the *unedited* base; it is edited for the export and restored). ``None``
    exports exactly when the change is stored as full weights, which ``load_lora_weights`` cannot read.
    """
    folder = Path(folder)
    _check_destination(folder, overwrite)
    folder.parent.mkdir(parents=True, exist_ok=True)
    factors = {name: low_rank_factors(d) for name, d in artifact.deltas.items()}
    lora_size = sum(a.numel() + b.numel() for a, b in factors.values())
    full_size = sum(d.numel() for d in artifact.deltas.values())
    weight_format = "lora" if lora_size < full_size else "full"
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        if weight_format == "lora":
            wrapper.save_lora_weights(tmp, factors)
            ranks = {name: int(a.shape[0]) for name, (a, _) in factors.items()}
        else:
            save_file({k: v.contiguous() for k, v in artifact.deltas.items()}, str(tmp / FULL_FILE))
            ranks = {}
        if export_pipeline or (export_pipeline is None and weight_format == "full"):
            with wrapper.weight_deltas(artifact.deltas):
                wrapper.export_pipeline(tmp / "pipeline")
        with open(tmp / METADATA_FILE, "w") as f:
            json.dump(artifact.metadata(weight_format, ranks), f, indent=2)
        if folder.exists():
            backup = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(folder, backup)
            os.replace(tmp, folder)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved %s artifact (%s, %d modules) to %s", artifact.method, weight_format, len(factors), folder)
    return folder


_REQUIRED = ("schema_version", "method", "config", "concepts", "base_model", "base_fingerprint", "layers")


def load_artifact(folder: str | Path) -> ErasureArtifact:
    """Read an artifact folder; raises ``ArtifactError`` with one line saying what is wrong."""
    folder = Path(folder)
    meta_path = folder / METADATA_FILE
    if not meta_path.is_file():
        raise ArtifactError(f"{folder} is not an erasure artifact (no {METADATA_FILE})")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{meta_path} is corrupt: {err}") from err
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise ArtifactError(f"{meta_path} lacks {', '.join(missing)}")
    if meta["schema_version"] > SCHEMA_VERSION:
        raise ArtifactError(
            f"{folder} uses artifact schema {meta['schema_version']}; this erase reads {SCHEMA_VERSION}"
        )
    fmt = meta.get("weight_format", "lora")
    weights_path = folder / (LORA_FILE if fmt == "lora" else FULL_FILE)
    try:
        tensors = load_file(str(weights_path))
    except (OSError, SafetensorError) as err:
        raise ArtifactError(f"cannot read {weights_path}: {err}") from err
    deltas: dict[str, torch.Tensor] = {}
    for name in meta["layers"]:
        if fmt == "lora":
            component, _, path = name.partition(".")
            key_a, key_b = f"{component}.{path}.lora_A.weight", f"{component}.{path}.lora_B.weight"
            if key_a not in tensors or key_b not in tensors:
                raise ArtifactError(f"{weights_path} has no LoRA weights for {name}")
            deltas[name] = tensors[key_b].double().matmul(tensors[key_a].double()).float()
        else:
            if name not in tensors:
                raise ArtifactError(f"{weights_path} has no weights for {name}")
            deltas[name] = tensors[name].float()
    return ErasureArtifact(
        method=meta["method"],
        config=meta["config"],
        concepts=meta["concepts"],
        guides=meta.get("guides", []),
        preserve=meta.get("preserve", []),
        base_model=meta["base_model"],
        base_fingerprint=meta["base_fingerprint"],
        deltas=deltas,
        seconds=float(meta.get("seconds", 0.0)),
        info=meta.get("info", {}),
        created=meta.get("created", ""),
        version=meta.get("erase_version", "unknown"),
    )


def check_artifact_base(wrapper: PipelineWrapper, artifact: ErasureArtifact, where: str = "artifact") -> None:
    """Raise ``ArtifactMismatchError`` unless the artifact was made for the pipeline's current base weights."""
    try:
        found = wrapper.fingerprint(artifact.layers)
    except KeyError as err:
        raise ArtifactMismatchError(
            f"{where} edits modules this pipeline lacks ({err}); it was made for {artifact.base_model!r}"
        ) from err
    if found != artifact.base_fingerprint:
        raise ArtifactMismatchError(
            f"{where} was made for base model {artifact.base_model!r} (weights {artifact.base_fingerprint[:12]}), "
            f"but {wrapper.model_id!r} has different weights ({found[:12]})"
        )


def apply_artifact(wrapper: PipelineWrapper, artifact: ErasureArtifact | str | Path) -> ErasureArtifact:
    """Edit ``wrapper`` in place with the artifact, after checking it was made for these base weights."""
    if not isinstance(artifact, ErasureArtifact):
        artifact = load_artifact(artifact)
    check_artifact_base(wrapper, artifact)
    wrapper.apply_weight_deltas(artifact.deltas)
    return artifact
