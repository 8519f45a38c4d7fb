"""The runtime-intervention artifact kind: an SAE and a rule that edits its features while the pipeline runs.

The SAE family does not change weights. Its artifact is the SAE, the features to edit and the method's tables,
installed on a pipeline as forward hooks (through ``PipelineWrapper.add_output_edit``; a pre-hook on the UNet records
the timestep). ``attach(pipe, folder)`` does that for a *plain* ``StableDiffusionPipeline`` or
``StableDiffusionXLPipeline`` and returns a handle that removes the hooks (also as a context manager)::

    import erase
    handle = erase.attach(pipe, "erased/van-gogh-itd")
    image = pipe("a red star in the style of van gogh").images[0]
    handle.remove()                       # the pipeline is its original self again

Files beside ``erasure.json`` (``weight_format: "intervention"``)::

    intervention.json              kind (the method), hook point, the method's settings
    intervention.safetensors       the method's tables (features, multipliers, per-timestep tables)
    sae.safetensors, sae.json      the SAE it reads the activations with

How the features are edited is the method's: each runtime method registers its ``runtime_edit`` (intervention,
tokens, timestep, guided) -> tokens with the registry, and ``intervention.json``'s ``kind`` names it.
"""

from __future__ import annotations

import json
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from pipelines import HookHandles, PipelineWrapper, wrap_pipeline
from pipelines.files import read_json_object, read_tensors

from .sae import SAE_FILE, SAE_METADATA, TopKSAE, load_sae, save_sae

__all__ = [
    "INTERVENTION_FILE",
    "INTERVENTION_TENSORS",
    "SAEIntervention",
    "attach",
    "attach_once",
    "attached_interventions",
]

logger = logging.getLogger(__name__)

INTERVENTION_FILE = "intervention.json"
INTERVENTION_TENSORS = "intervention.safetensors"

# module -> the runtime edits attached to it now (handle id -> identity), so a second attachment of one is refused
_ATTACHED: weakref.WeakKeyDictionary[torch.nn.Module, dict[int, str]] = weakref.WeakKeyDictionary()


@dataclass
class SAEIntervention:
    """An SAE at a hook point and what a runtime method does to its features there.

    Attributes:
        kind: the method that made it (its registered ``runtime_edit`` applies it).
        hook_point: qualified module name (``PipelineWrapper.hook_points``).
        sae: the TopK SAE reading the hook point's activations.
        settings: the method's scalars (JSON), e.g. a gate threshold or a multiplier.
        tables: the method's tensors, e.g. the selected features or per-timestep tables.
        sae_metadata: the SAE's ``sae.json`` (its training and quality), kept with the artifact.
        memory: what the method remembers from one UNet call to the next within one generation (saeuron's gate
            latch); the method resets it when a new generation starts. Never saved, not part of the identity.
    """

    kind: str
    hook_point: str
    sae: TopKSAE
    settings: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, torch.Tensor] = field(default_factory=dict)
    sae_metadata: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def component(self) -> str:
        return self.hook_point.partition(".")[0]

    def identity(self) -> str:
        """What tells two interventions apart (kind, hook point, settings, tables): a second attachment is refused."""
        import hashlib

        digest = hashlib.sha256(json.dumps([self.kind, self.hook_point, self.settings], sort_keys=True).encode())
        for name in sorted(self.tables):
            digest.update(name.encode())
            digest.update(self.tables[name].detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def edit(self, tokens: torch.Tensor, timestep: torch.Tensor | None, guided: bool = False) -> torch.Tensor:
        """The hook point's activations ``(batch, tokens, width)`` after the method's edit (float32 maths);
        ``guided``: the batch is classifier-free guidance's [unconditional; conditional] halves."""
        from ..core.registry import get_method

        runtime_edit = get_method(self.kind).runtime_edit
        if runtime_edit is None:
            raise ValueError(f"method {self.kind!r} has no runtime edit")
        if self.sae.encoder.weight.device != tokens.device:
            self.sae.to(tokens.device)
            self.tables = {k: v.to(tokens.device) for k, v in self.tables.items()}
        edited = runtime_edit(self, tokens.float(), timestep, guided)
        return tokens if edited is None else edited.to(tokens.dtype)

    def attach(self, wrapper: PipelineWrapper) -> HookHandles:
        """Install on the wrapper's pipeline until the handle is removed; a second attachment is refused."""
        return attach_once(
            wrapper.hook_point(self.hook_point),
            self.identity(),
            lambda: wrapper.add_output_edit(
                self.hook_point, lambda tokens, timestep: self.edit(tokens, timestep, wrapper.guidance_halves())
            ),
            f"this {self.kind} intervention is already attached at {self.hook_point}",
        )

    # ------------------------------------------------------------------ files
    def save(self, folder: Path) -> list[str]:
        """Write the intervention's files into ``folder``; returns their names."""
        save_sae(self.sae, folder, self.sae_metadata)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in self.tables.items()}, str(folder / INTERVENTION_TENSORS)
        )
        description = {"kind": self.kind, "hook_point": self.hook_point, "settings": self.settings,
                       "tables": {k: list(v.shape) for k, v in self.tables.items()}}  # fmt: skip
        (folder / INTERVENTION_FILE).write_text(json.dumps(description, indent=2))
        return [INTERVENTION_FILE, INTERVENTION_TENSORS, SAE_FILE, SAE_METADATA]

    @classmethod
    def load(cls, folder: Path) -> SAEIntervention:
        """Read the intervention files of an artifact folder; ``ValueError`` in one line when they are bad."""
        path = folder / INTERVENTION_FILE
        description = read_json_object(path)
        for key, kind in (("kind", str), ("hook_point", str), ("settings", dict)):
            if not isinstance(description.get(key), kind):
                raise ValueError(f"{path}: {key} must be a {kind.__name__}")
        tables = read_tensors(folder / INTERVENTION_TENSORS)
        sae, sae_meta = load_sae(folder)
        from ..core.registry import get_method

        method = get_method(description["kind"])
        if method.runtime_edit is None:
            raise ValueError(f"{path}: method {description['kind']!r} makes no runtime intervention")
        intervention = cls(description["kind"], description["hook_point"], sae, description["settings"], tables,
                           sae_meta)  # fmt: skip
        if method.check_intervention is not None:
            method.check_intervention(intervention)
        return intervention


def attach_once(module: torch.nn.Module, key: str, install: Callable[[], HookHandles], refusal: str) -> HookHandles:
    """``install()`` the hooks of a runtime edit identified by ``key`` on ``module``, unless the same edit is attached
    there now (``ValueError(refusal)``: it would apply twice); the handle forgets the attachment when removed."""
    attached = _ATTACHED.setdefault(module, {})
    if key in attached.values():
        raise ValueError(refusal)
    handles = install()
    token = id(handles)
    attached[token] = key
    handles.on_remove.append(lambda: _ATTACHED.get(module, {}).pop(token, None))
    return handles


def attached_interventions(wrapper: PipelineWrapper, hook_point: str) -> int:
    """How many interventions are attached at a hook point of the wrapper's pipeline now."""
    return len(_ATTACHED.get(wrapper.hook_point(hook_point), {}))


def attach(pipe: Any, folder: str | Path) -> HookHandles:
    """Install a runtime artifact on a plain diffusers pipeline; returns the handle that removes it.

    Runtime artifacts: the SAE family's interventions, and a LoRA with facilitated transport (``spm``; its strength
    follows each prompt, see ``erase.lora.transport``).

    ``pipe`` is a ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` holding the base model the artifact was
    made for (checked by fingerprint). The handle's ``remove()`` (or leaving ``with erase.attach(pipe, folder):``)
    restores the original pipeline exactly. A weight-edit artifact is refused: use ``erase.load`` for those.
    """
    from ..core.artifact import check_artifact_base, load_artifact

    wrapper = pipe if isinstance(pipe, PipelineWrapper) else wrap_pipeline(pipe)
    artifact = load_artifact(folder)
    if artifact.intervention is None and artifact.transport is None:
        raise ValueError(f"{folder} is a weight edit ({artifact.method}), not a runtime intervention: use erase.load")
    check_artifact_base(wrapper, artifact, where=str(folder))
    if artifact.transport is not None:
        return artifact.transport.attach(wrapper, artifact.lora_factors())
    return artifact.intervention.attach(wrapper)
