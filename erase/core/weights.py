"""The weight-change payload kind: additive changes dW to Linear weights, saved as a diffusers LoRA when that is
smaller than the changed weights (``pytorch_lora_weights.safetensors``), else as the changes themselves
(``edited_weights.safetensors``).

A LoRA is read back as ``pipe.load_lora_weights`` reads it: each module's change is ``scale * B @ A`` with ``scale =
alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), ``r`` and ``alpha`` from the file's adapter metadata (peft's
``rank_pattern`` / ``alpha_pattern``, matched as peft matches them), ``scale = 1`` without metadata. What diffusers
would read differently, or not at all, is refused: a key that is no LoRA factor of a listed module, factors that are
not floating point or do not multiply, a rank other than the metadata's, DoRA, a bias, modules to save whole.

Installed, the change is added to the weights in place; the handle's ``remove()`` copies the saved original
weights back, so the pipeline is restored bit for bit.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from pipelines import PipelineWrapper

from .layout import FULL_FILE, LORA_FILE
from .payloads import PayloadKind, register_payload_kind

__all__ = ["WEIGHTS_KIND", "RestoredWeights", "WeightChange", "factor_products", "low_rank_factors"]

#: diffusers' key of the adapter metadata in a LoRA file's safetensors header
LORA_METADATA_KEY = "lora_adapter_metadata"
LORA_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")
#: peft adapter settings that make ``load_lora_weights`` do more than add ``scale * B @ A`` (whole modules saved
#: beside the LoRA, a bias on B), or fail; diffusers builds its layers from the file's keys, so ``target_modules``,
#: ``exclude_modules`` and ``layers_to_transform`` change nothing
_UNMODELLED = ("modules_to_save", "lora_bias")


def factor_products(factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The weight changes of low-rank factors, ``dW = B @ A`` per module (multiplied in float64, float32 out)."""
    return {name: b.double().matmul(a.double()).float() for name, (a, b) in factors.items()}


def low_rank_factors(delta: torch.Tensor, rtol: float = 1e-7) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact factorisation dW = B @ A, with the rank the numerical rank of dW (singular values > rtol * largest)."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    rank = max(1, int((s > rtol * s[0]).sum())) if s.numel() and s[0] > 0 else 1
    lora_b = u[:, :rank] * s[:rank]
    return vh[:rank].float(), lora_b.float()


@dataclass
class WeightChange:
    """Additive weight changes, qualified Linear name -> dW (float32), and their exact factors (A, B), dW = B @ A,
    when known (saved as the LoRA without an SVD)."""

    deltas: dict[str, torch.Tensor]
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def lora_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The change as exact factors (A, B): the method's own, else by SVD."""
        return self.factors or {name: low_rank_factors(d) for name, d in self.deltas.items()}


class RestoredWeights:
    """The handle of an installed weight change: ``remove()`` copies the original weights back."""

    def __init__(self, wrapper: PipelineWrapper, deltas: dict[str, torch.Tensor]) -> None:
        self._originals = {name: wrapper.module(name).weight.detach().clone() for name in deltas}
        self._wrapper = wrapper
        wrapper.apply_weight_deltas(deltas)
        self.on_remove: list = []

    def remove(self) -> None:
        with torch.no_grad():
            for name, weight in self._originals.items():
                self._wrapper.module(name).weight.copy_(weight)
        self._originals = {}
        while self.on_remove:
            self.on_remove.pop()()


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a safetensors file and its header metadata; ``ValueError`` in one line when unreadable."""
    if not path.is_file():  # also refuses a FIFO or device, which open() would block on
        raise ValueError(f"cannot read {path}: not a regular file")
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
    except (OSError, SafetensorError) as err:
        raise ValueError(f"cannot read {path}: {err}") from None


def _check_factors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise ValueError(f"{path}: {key} holds {str(tensor.dtype).removeprefix('torch.')} values, not floats")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{path}: {key} holds NaN or infinite values")


def _pattern_value(pattern: dict[str, Any], path: str, default: Any, where: str) -> Any:
    """peft's ``get_pattern_key``: the first key of ``pattern`` that matches the end of ``path`` as a regex."""
    for key, value in pattern.items():
        try:
            if re.match(rf"(.*\.)?({key})$", path):
                return value
        except re.error:
            raise ValueError(f"{where}: {key!r} is no pattern peft can match") from None
    return default


def _lora_scales(path: Path, metadata: dict[str, str], ranks: dict[str, int]) -> dict[str, float]:
    """Each module's LoRA scale as diffusers applies it, from the file's adapter metadata; ``ValueError`` where
    diffusers would read the file differently from a plain ``scale * B @ A``."""
    if LORA_METADATA_KEY not in metadata:
        return dict.fromkeys(ranks, 1.0)  # diffusers: alpha = rank for a file without alphas
    try:
        adapter = json.loads(metadata[LORA_METADATA_KEY])
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: the adapter metadata is not JSON ({err})") from None
    if not isinstance(adapter, dict):
        raise ValueError(f"{path}: the adapter metadata is not a JSON object")
    scales = {}
    for name, rank in ranks.items():
        component, _, module = name.partition(".")
        config = {k.removeprefix(f"{component}."): v for k, v in adapter.items() if k.startswith(f"{component}.")}
        where = f"{path} ({component} adapter metadata)"
        if config.get("use_dora"):
            raise ValueError(f"{where}: a DoRA adapter; erase applies plain LoRA only")
        if config.get("bias", "none") != "none":
            raise ValueError(f"{where}: a LoRA with biases ({config['bias']!r}); erase applies plain LoRA only")
        for key in _UNMODELLED:
            if config.get(key) not in (None, False, [], {}, ""):
                raise ValueError(f"{where}: {key} is {config[key]!r}; erase applies plain LoRA only")
        rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
        if not isinstance(rank_pattern, dict) or not isinstance(alpha_pattern, dict):
            raise ValueError(f"{where}: rank_pattern and alpha_pattern must be objects")
        r = _pattern_value(rank_pattern, module, config.get("r", rank), where)
        alpha = _pattern_value(alpha_pattern, module, config.get("lora_alpha", r), where)
        for what, value in (("rank", r), ("alpha", alpha)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{where}: the {what} of {module} is {value!r}, not a finite number")
        if r != rank:
            raise ValueError(f"{where}: {module} has rank {rank} but the metadata says {r}")
        scales[name] = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return scales


class WeightsKind(PayloadKind):
    name = "weights"
    payload_type = WeightChange
    files = (LORA_FILE, FULL_FILE)

    def save(self, payload: WeightChange, folder: Path, wrapper: PipelineWrapper) -> dict[str, Any]:
        factors = payload.lora_factors()
        lora_size = sum(a.numel() + b.numel() for a, b in factors.values())
        if lora_size < sum(d.numel() for d in payload.deltas.values()):
            wrapper.save_lora_weights(folder, factors)
            ranks = {name: int(a.shape[0]) for name, (a, _) in factors.items()}
            return {"weight_format": "lora", "modules": sorted(payload.deltas), "lora_ranks": ranks}
        save_file({k: v.contiguous() for k, v in payload.deltas.items()}, str(folder / FULL_FILE))
        return {"weight_format": "full", "modules": sorted(payload.deltas)}

    def load(self, folder: Path, record: dict[str, Any]) -> WeightChange:
        modules, weight_format = record.get("modules"), record.get("weight_format")
        if not (isinstance(modules, list) and modules and all(isinstance(m, str) for m in modules)):
            raise ValueError(f"{folder}: the weight change lists no modules")
        if weight_format == "full":
            path = folder / FULL_FILE
            tensors, _ = _read_safetensors(path)
            _check_factors(path, tensors)
            unknown = sorted(set(tensors) - set(modules))
            if unknown:
                raise ValueError(f"{path}: {unknown[0]!r} is no weight change of a listed module")
            missing = sorted(set(modules) - set(tensors))
            if missing:
                raise ValueError(f"{path} has no weights for {missing[0]}")
            return WeightChange({k: tensors[k].float() for k in modules})
        if weight_format != "lora":
            raise ValueError(f"{folder}: unknown weight_format {weight_format!r}")
        path = folder / LORA_FILE
        tensors, metadata = _read_safetensors(path)
        _check_factors(path, tensors)
        expected = {f"{m}.lora_{ab}.weight": (m, ab) for m in modules for ab in "AB"}
        unknown = sorted(set(tensors) - set(expected))
        if unknown:
            raise ValueError(f"{path}: {unknown[0]!r} is no LoRA factor of a listed module")
        factors = {}
        for name in modules:
            if name.partition(".")[0] not in LORA_COMPONENTS:
                raise ValueError(f"{path}: {name} is in no component a LoRA file holds")
            key_a, key_b = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
            if key_a not in tensors or key_b not in tensors:
                raise ValueError(f"{path} has no LoRA weights for {name}")
            lora_a, lora_b = tensors[key_a], tensors[key_b]
            if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_b.shape[1] != lora_a.shape[0]:
                shapes = f"A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)}"
                raise ValueError(f"{path}: LoRA factors of {name} do not multiply ({shapes})")
            factors[name] = (lora_a.float(), lora_b.float())
        scales = _lora_scales(path, metadata, {name: int(a.shape[0]) for name, (a, _) in factors.items()})
        factors = {name: (a, b * scales[name]) if scales[name] != 1.0 else (a, b) for name, (a, b) in factors.items()}
        return WeightChange(factor_products(factors), factors)

    def modules(self, payload: WeightChange) -> list[str]:
        return sorted(payload.deltas)

    def weight_changes(self, payload: WeightChange) -> dict[str, torch.Tensor]:
        return payload.deltas

    def check(self, payload: WeightChange, wrapper: PipelineWrapper) -> None:
        for name, delta in payload.deltas.items():
            try:
                weight = wrapper.module(name).weight
            except (KeyError, AttributeError) as err:
                raise ValueError(f"the pipeline has no Linear {name} to change ({err})") from None
            if weight.shape != delta.shape:
                raise ValueError(
                    f"{name}: weight change of shape {tuple(delta.shape)} for weight {tuple(weight.shape)}"
                )

    def install(self, payload: WeightChange, wrapper: PipelineWrapper, payloads: dict[str, Any]) -> RestoredWeights:
        return RestoredWeights(wrapper, payload.deltas)


WEIGHTS_KIND = register_payload_kind(WeightsKind())
