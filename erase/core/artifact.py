"""The erasure artifact: a folder any diffusers app can load, plus the provenance that makes it auditable.

Layout::

    ARTIFACT/
      erasure.json                         method, config, concepts, base model + fingerprint, timings, layers,
                                           the weights file's sha256, the weight norms before and after the edit
                                           and the base fingerprint rounded to float16 and bfloat16
      pytorch_lora_weights.safetensors     weight_format "lora": dW = B A per module, with peft adapter metadata
      edited_weights.safetensors           weight_format "full": dW per module, when low rank would not be smaller
      transport.json, transport.safetensors
                                           optional facilitated transport of a LoRA (``erase.lora.transport``): its
                                           strength per prompt, installed with ``erase.attach``
      intervention.json, intervention.safetensors, sae.safetensors, sae.json
                                           weight_format "intervention": the SAE family's runtime edit
                                           (``erase.sae.intervention``), installed with ``erase.attach``
      pipeline/                            optional full ``save_pretrained`` export of the edited pipeline
      before_after.png                     optional picture of the check ``scripts/erase.py`` runs

Only safetensors and JSON are ever read back: nothing is unpickled. Saving is atomic (a temporary sibling folder,
swapped in whole), follows the user's umask, and never deletes anything but an earlier artifact of ours.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import glob
import json
import logging
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipelines import PipelineWrapper, wrap_pipeline
from pipelines.files import file_sha256, move_into_place, sync_to_disk, write_error

from ..lora.transport import TRANSPORT_FILE, FacilitatedTransport
from .layout import (
    ARTIFACT_ENTRIES,
    FULL_FILE,
    LOW_PRECISION_NORM_RTOL,
    METADATA_FILE,
    PIPELINE_FOLDER,
    SCHEMA_VERSION,
    TEMPORARY_MARK,
    WEIGHTS_FILES,
    ArtifactError,
    ArtifactExistsError,
    ArtifactMismatchError,
    check_output_folder,
    current_umask,
    temporary_folder,
)

__all__ = [
    "ArtifactError",
    "ArtifactExistsError",
    "ArtifactMismatchError",
    "ErasureArtifact",
    "apply_artifact",
    "check_artifact_base",
    "check_output_folder",
    "load",
    "factor_products",
    "load_artifact",
    "low_rank_factors",
    "save_artifact",
]

logger = logging.getLogger(__name__)


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
    #: exact factors (A, B), dW = B @ A, when known: saved as the LoRA without an SVD
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    #: {"base": {module: ||W||_F}, "edited": {module: ||W + dW||_F}}: tells an edited pipeline from its base
    weight_norms: dict[str, dict[str, float]] | None = None
    #: {"float16" | "bfloat16": the base fingerprint of the same weights rounded to that dtype}: recognises a
    #: half-precision copy of the base exactly (artifacts made in float32)
    low_precision_fingerprints: dict[str, str] | None = None
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    version: str = ""
    #: the runtime family's edit (``erase.sae.intervention.SAEIntervention``); ``deltas`` is then empty
    intervention: Any = None
    #: facilitated transport (``erase.lora.transport.FacilitatedTransport``): the LoRA's strength follows each prompt's
    #: likeness to the erased concepts when it is applied (``applied``, ``erase.attach``)
    transport: Any = None
    #: the hooks of ``apply_artifact`` for a runtime artifact (remove them to restore the pipeline)
    handle: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.version:
            from .. import __version__

            self.version = __version__

    @property
    def layers(self) -> list[str]:
        """The modules the artifact edits: weight-changed Linears, or the runtime edit's hook point."""
        return [self.intervention.hook_point] if self.intervention is not None else sorted(self.deltas)

    @property
    def fingerprint_modules(self) -> list[str]:
        """The modules whose weights ``base_fingerprint`` covers (a runtime edit depends on its whole component)."""
        return [self.intervention.component] if self.intervention is not None else self.layers

    @contextlib.contextmanager
    def applied(self, wrapper: PipelineWrapper) -> Iterator[None]:
        """The edit in force for the ``with`` block (weights restored, or hooks removed, afterwards); unchecked."""
        if self.intervention is not None:
            with self.intervention.attach(wrapper):
                yield
        elif self.transport is not None:
            with self.transport.attach(wrapper, self.lora_factors()):
                yield
        else:
            with wrapper.weight_deltas(self.deltas):
                yield

    def lora_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The weight change as exact factors (A, B), dW = B A: the method's own, else by SVD."""
        return self.factors or {name: low_rank_factors(d) for name, d in self.deltas.items()}

    def metadata(
        self, weight_format: str, ranks: dict[str, int] | None = None, weights_sha256: str | None = None
    ) -> dict[str, Any]:
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
            "weights_sha256": weights_sha256,
            "weight_norms": self.weight_norms,
            "low_precision_fingerprints": self.low_precision_fingerprints,
            "seconds": self.seconds,
            "created": self.created,
            "erase_version": self.version,
            "info": self.info,
        }


def factor_products(factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The weight changes of low-rank factors, ``dW = B @ A`` per module (multiplied in float64, float32 out)."""
    return {name: b.double().matmul(a.double()).float() for name, (a, b) in factors.items()}


def low_rank_factors(delta: torch.Tensor, rtol: float = 1e-7) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact factorisation dW = B @ A, with the rank the numerical rank of dW (singular values > rtol * largest)."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    rank = max(1, int((s > rtol * s[0]).sum())) if s.numel() and s[0] > 0 else 1
    lora_b = u[:, :rank] * s[:rank]
    return vh[:rank].float(), lora_b.float()


# ---------------------------------------------------------------------------------------------------- writing
def _remove_stale_temporaries(folder: Path) -> None:
    """Delete temporary folders of earlier saves to ``folder`` whose process is gone (a killed save's litter)."""
    prefix = f".{folder.name}{TEMPORARY_MARK}"
    for path in folder.parent.glob(f"{glob.escape(prefix)}*"):
        pid = path.name[len(prefix) :].split("-")[0]
        if not pid.isdigit() or _process_alive(int(pid)):
            continue
        logger.info("removing %s, left by an interrupted save", path)
        shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _finish_tree(root: Path) -> None:
    """Give every file and folder the user's umask permissions (safetensors writes 0600) and flush them to disk."""
    mask = current_umask()
    for path in [root, *root.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
    sync_to_disk(root)


def save_artifact(
    artifact: ErasureArtifact,
    folder: str | Path,
    wrapper: PipelineWrapper,
    *,
    overwrite: bool = False,
    export_pipeline: bool | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write the artifact atomically: everything goes to a temporary sibling folder that is swapped in at the end.

    The weight change is stored as an exact LoRA when that is smaller than the changed weights, else as full
    weight changes. ``export_pipeline`` additionally writes a complete diffusers folder of the edited pipeline under
    ``pipeline/`` (``wrapper`` must be the *unedited* base; it is edited for the export and restored). ``None``
    exports exactly when the change is stored as full weights, which ``load_lora_weights`` cannot read.
    ``extra_files`` (name -> bytes, names from ``ARTIFACT_ENTRIES``) are written beside it, e.g. the check's picture.

    With ``overwrite`` an earlier artifact at ``folder`` is replaced in one atomic exchange; a folder holding anything
    else is refused. Returns the folder written (symbolic links resolved).
    """
    folder = check_output_folder(folder, overwrite)
    for name in extra_files or {}:
        if name not in ARTIFACT_ENTRIES:
            raise ValueError(f"{name!r} is not a file an artifact folder holds")
    _check_finite(artifact.deltas, "the weight change")
    if artifact.intervention is not None:
        factors, weight_format = {}, "intervention"
    else:
        factors = artifact.lora_factors()
        lora_size = sum(a.numel() + b.numel() for a, b in factors.values())
        full_size = sum(d.numel() for d in artifact.deltas.values())
        weight_format = "lora" if lora_size < full_size else "full"
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(folder)
    tmp = temporary_folder(folder)
    try:
        tmp.mkdir()
        ranks: dict[str, int] = {}
        if weight_format == "intervention":
            artifact.intervention.save(tmp)
        elif weight_format == "lora":
            wrapper.save_lora_weights(tmp, factors)
            ranks = {name: int(a.shape[0]) for name, (a, _) in factors.items()}
        else:
            save_file({k: v.contiguous() for k, v in artifact.deltas.items()}, str(tmp / FULL_FILE))
        weights_sha256 = file_sha256(tmp / WEIGHTS_FILES[weight_format])
        if artifact.transport is not None:
            artifact.transport.save(tmp)
        if weight_format == "intervention" and export_pipeline:
            raise ValueError("a runtime intervention changes no weights: there is no edited pipeline to export")
        if export_pipeline or (export_pipeline is None and weight_format == "full"):
            with wrapper.weight_deltas(artifact.deltas):
                wrapper.export_pipeline(tmp / PIPELINE_FOLDER)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        (tmp / METADATA_FILE).write_text(json.dumps(artifact.metadata(weight_format, ranks, weights_sha256), indent=2))
        _finish_tree(tmp)
        try:  # without overwrite, an artifact another run swapped in meanwhile is refused, never replaced
            move_into_place(tmp, folder, replace=overwrite)
        except FileExistsError:
            raise ArtifactExistsError(
                f"{folder} was filled by another run while this one worked; choose another --out or pass --overwrite"
            ) from None
    except (OSError, SafetensorError) as err:  # a full disk, a read-only folder: one line, nothing left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(folder, err) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info(
        "saved %s artifact (%s, %d modules) to %s", artifact.method, weight_format, len(artifact.layers), folder
    )
    return folder


# ---------------------------------------------------------------------------------------------------- reading
_REQUIRED = ("schema_version", "method", "config", "concepts", "base_model", "base_fingerprint", "layers")


def _check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise ArtifactError(f"{what} of {name} holds NaN or infinite values")


def _check_metadata(meta: Any, meta_path: Path) -> None:
    """One line naming the first field of erasure.json that is missing or of the wrong type."""
    if not isinstance(meta, dict):
        raise ArtifactError(f"{meta_path} is not a JSON object")
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise ArtifactError(f"{meta_path} lacks {', '.join(missing)}")
    version = meta["schema_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ArtifactError(f"{meta_path}: schema_version must be a positive integer, got {version!r}")
    if version > SCHEMA_VERSION:
        raise ArtifactError(f"{meta_path} uses artifact schema {version}; this erase reads {SCHEMA_VERSION}")
    expected = {"method": str, "base_model": str, "base_fingerprint": str, "config": dict, "concepts": list,
                "layers": list}  # fmt: skip
    for key, kind in expected.items():
        if not isinstance(meta[key], kind):
            raise ArtifactError(f"{meta_path}: {key} must be a {kind.__name__}, got {type(meta[key]).__name__}")
    for key in ("concepts", "layers", "guides", "preserve"):
        if not all(isinstance(v, str) for v in meta.get(key) or []):
            raise ArtifactError(f"{meta_path}: {key} must be a list of strings")
    if not meta["layers"]:
        raise ArtifactError(f"{meta_path} lists no layers: the artifact changes nothing")
    if not meta["concepts"]:
        raise ArtifactError(f"{meta_path} lists no concepts")
    if meta.get("weight_format", "lora") not in WEIGHTS_FILES:
        raise ArtifactError(f"{meta_path}: unknown weight_format {meta.get('weight_format')!r}")


def load_artifact(folder: str | Path) -> ErasureArtifact:
    """Read an artifact folder; raises ``ArtifactError`` with one line saying what is wrong."""
    folder = Path(folder)
    meta_path = folder / METADATA_FILE
    if not meta_path.is_file():
        raise ArtifactError(f"{folder} is not an erasure artifact (no {METADATA_FILE})")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise ArtifactError(f"{meta_path} is corrupt: {err}") from err
    _check_metadata(meta, meta_path)
    fmt = meta.get("weight_format", "lora")
    weights_path = folder / WEIGHTS_FILES[fmt]
    if not weights_path.is_file():  # also refuses a FIFO or device, which open() would block on
        raise ArtifactError(f"cannot read {weights_path}: not a regular file")
    if meta.get("weights_sha256") and file_sha256(weights_path) != meta["weights_sha256"]:
        raise ArtifactError(f"{weights_path} does not match the sha256 in {METADATA_FILE}: the file was changed")
    try:
        tensors = load_file(str(weights_path))
    except (OSError, SafetensorError) as err:
        raise ArtifactError(f"cannot read {weights_path}: {err}") from err
    _check_finite(tensors, str(weights_path.name))
    deltas: dict[str, torch.Tensor] = {}
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    intervention = None
    if fmt == "intervention":
        from ..sae.intervention import SAEIntervention

        try:
            intervention = SAEIntervention.load(folder)
        except ValueError as err:
            raise ArtifactError(str(err)) from err
        if meta["layers"] != [intervention.hook_point]:
            raise ArtifactError(f"{meta_path}: layers must list the intervention's hook point")
    transport = None
    if fmt != "intervention" and (folder / TRANSPORT_FILE).exists():
        try:
            transport = FacilitatedTransport.load(folder)
        except ValueError as err:
            raise ArtifactError(str(err)) from err
    for name in meta["layers"] if intervention is None else []:
        if fmt == "lora":
            component, _, path = name.partition(".")
            key_a, key_b = f"{component}.{path}.lora_A.weight", f"{component}.{path}.lora_B.weight"
            if key_a not in tensors or key_b not in tensors:
                raise ArtifactError(f"{weights_path} has no LoRA weights for {name}")
            lora_a, lora_b = tensors[key_a], tensors[key_b]
            if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_b.shape[1] != lora_a.shape[0]:
                raise ArtifactError(
                    f"{weights_path}: LoRA factors of {name} do not multiply "
                    f"(A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)})"
                )
            factors[name] = (lora_a.float(), lora_b.float())
        else:
            if name not in tensors:
                raise ArtifactError(f"{weights_path} has no weights for {name}")
            deltas[name] = tensors[name].float()
    deltas.update(factor_products(factors))
    return ErasureArtifact(
        method=meta["method"],
        config=meta["config"],
        concepts=meta["concepts"],
        guides=meta.get("guides") or [],
        preserve=meta.get("preserve") or [],
        base_model=meta["base_model"],
        base_fingerprint=meta["base_fingerprint"],
        deltas=deltas,
        seconds=float(meta.get("seconds") or 0.0),
        info=meta.get("info") if isinstance(meta.get("info"), dict) else {},
        factors=factors or None,
        weight_norms=meta.get("weight_norms") if isinstance(meta.get("weight_norms"), dict) else None,
        low_precision_fingerprints=_string_map(meta.get("low_precision_fingerprints")),
        created=str(meta.get("created", "")),
        version=str(meta.get("erase_version", "unknown")),
        intervention=intervention,
        transport=transport,
    )


# ---------------------------------------------------------------------------------------------------- applying
def _string_map(value: Any) -> dict[str, str] | None:
    if isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return dict(value)
    return None


def _low_precision_match(wrapper: PipelineWrapper, artifact: ErasureArtifact) -> bool | None:
    """Whether a float16/bfloat16 pipeline holds exactly the artifact's base rounded to its dtype; None when the
    artifact records no fingerprint for that dtype (older artifacts, or made in low precision)."""
    stored = (artifact.low_precision_fingerprints or {}).get(str(wrapper.dtype).removeprefix("torch."))
    if wrapper.dtype == torch.float32 or stored is None:
        return None
    return wrapper.fingerprint(artifact.fingerprint_modules) == stored


def _norms_match(found: dict[str, float], expected: dict[str, float] | None, rtol: float) -> bool:
    if not expected or set(expected) != set(found):
        return False
    return all(math.isclose(found[k], float(expected[k]), rel_tol=rtol, abs_tol=1e-12) for k in found)


def check_artifact_base(wrapper: PipelineWrapper, artifact: ErasureArtifact, where: str = "artifact") -> None:
    """Raise ``ArtifactMismatchError`` unless the artifact was made for the pipeline's current base weights.

    The float32 fingerprint decides. Where it differs, the per-module weight norms recorded at save time tell two
    cases apart: a pipeline that already holds this edit (refused: applying twice doubles the edit), and a
    float16/bfloat16 copy of the same base (accepted: its rounded weights cannot match a float32 fingerprint).
    """
    if artifact.intervention is not None:
        _check_runtime_base(wrapper, artifact, where)
        return
    try:
        found = wrapper.fingerprint(artifact.layers)
    except KeyError as err:
        raise ArtifactMismatchError(
            f"{where} edits modules this pipeline lacks ({err}); it was made for {artifact.base_model!r}"
        ) from err
    if found == artifact.base_fingerprint:
        return
    norms = artifact.weight_norms or {}
    current = wrapper.weight_norms(artifact.layers)
    if _norms_match(current, norms.get("edited"), 1e-6) or (
        wrapper.dtype != torch.float32 and _norms_match(current, norms.get("edited"), LOW_PRECISION_NORM_RTOL)
    ):
        raise ArtifactMismatchError(f"{where} is already applied to this pipeline; applying it twice doubles the edit")
    exact = _low_precision_match(wrapper, artifact)
    if exact:
        return
    if (
        exact is None
        and wrapper.dtype != torch.float32
        and _norms_match(current, norms.get("base"), LOW_PRECISION_NORM_RTOL)
    ):
        logger.info("%s: %s weights match the base's norms within %g", where, wrapper.dtype, LOW_PRECISION_NORM_RTOL)
        return
    raise ArtifactMismatchError(
        f"{where} was made for base model {artifact.base_model!r} (weights {artifact.base_fingerprint[:12]}), "
        f"but {wrapper.model_id!r} has different weights ({found[:12]})"
    )


def _check_runtime_base(wrapper: PipelineWrapper, artifact: ErasureArtifact, where: str) -> None:
    """A runtime edit reads a whole component: its fingerprint must match, or, in float16/bfloat16, its norm."""
    component = artifact.intervention.component
    try:
        wrapper.hook_point(artifact.intervention.hook_point)
    except ValueError as err:
        raise ArtifactMismatchError(f"{where}: {err}; it was made for {artifact.base_model!r}") from err
    if wrapper.fingerprint([component]) == artifact.base_fingerprint:
        return
    exact = _low_precision_match(wrapper, artifact)
    if exact:
        return
    expected = ((artifact.weight_norms or {}).get("base") or {}).get(component)
    if exact is None and wrapper.dtype != torch.float32 and isinstance(expected, int | float):
        if math.isclose(wrapper.parameter_norm(component), float(expected), rel_tol=LOW_PRECISION_NORM_RTOL):
            return
    raise ArtifactMismatchError(
        f"{where} was made for base model {artifact.base_model!r} (its {component}'s weights "
        f"{artifact.base_fingerprint[:12]}), but {wrapper.model_id!r} has different weights"
    )


def apply_artifact(wrapper: PipelineWrapper, artifact: ErasureArtifact | str | Path) -> ErasureArtifact:
    """Edit ``wrapper`` in place with the artifact, after checking it was made for these base weights.

    All or nothing: every module and shape is checked before the first weight changes. A runtime intervention is
    attached instead (``artifact.handle.remove()`` takes it off again).
    """
    if not isinstance(artifact, ErasureArtifact):
        artifact = load_artifact(artifact)
    check_artifact_base(wrapper, artifact)
    if artifact.intervention is not None:
        artifact.handle = artifact.intervention.attach(wrapper)
    elif artifact.transport is not None:
        artifact.handle = artifact.transport.attach(wrapper, artifact.lora_factors())
    else:
        wrapper.apply_weight_deltas(artifact.deltas)
    return artifact


def load(pipe: Any, folder: str | Path) -> ErasureArtifact:
    """Apply an erasure artifact to a plain diffusers pipeline object, in place; returns the artifact.

    ``pipe`` is a ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` (any pipeline of those classes, in any
    precision, on any device) holding the base model the artifact was made from. The base-model fingerprint is
    checked and a second application refused, so ``erase.load(pipe, folder)`` is safe to call where a LoRA could
    otherwise be stacked twice::

        pipe = StableDiffusionPipeline.from_pretrained("CompVis/stable-diffusion-v1-4")
        erase.load(pipe, "erased/van-gogh-uce")
    """
    wrapper = wrap_pipeline(pipe)
    artifact = load_artifact(folder)
    if artifact.intervention is not None:
        raise ArtifactError(f"{folder} is a runtime intervention ({artifact.method}): install it with erase.attach")
    if artifact.transport is not None:
        raise ArtifactError(
            f"{folder} scales its LoRA per prompt (facilitated transport): install it with erase.attach, or apply it "
            "at full strength to every prompt with pipe.load_lora_weights"
        )
    return apply_artifact(wrapper, artifact)
