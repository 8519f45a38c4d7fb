"""The SAE intervention payload kind: an SAE and a rule that edits its features while the pipeline runs.

The SAE family does not change weights. Its artifact is the SAE, the features to edit and the method's tables,
installed on a pipeline as forward hooks (through ``PipelineWrapper.add_output_edit``; a pre-hook on the UNet records
the timestep) by ``erase.load(pipe, folder)``, whose handle removes them again::

    import erase
    handle = erase.load(pipe, "erased/van-gogh-itd")
    image = pipe("a red star in the style of van gogh").images[0]
    handle.remove()                       # the pipeline is its original self again

Files beside ``erasure.json`` (each covered by its checksums)::

    intervention.json              kind (the method), hook point, the method's settings
    intervention.safetensors       the method's tables (features, multipliers, per-timestep tables)
    sae.safetensors, sae.json      the SAE it reads the activations with

How the features are edited is the method's: each runtime method registers its ``runtime_edit`` (intervention,
tokens, timestep, guided) -> tokens with the registry, and ``intervention.json``'s ``kind`` names it. Before anything
is installed, the intervention is checked against the live pipeline: the hook point's width is the SAE's, and the
method's own check (``check_intervention``) accepts the tables and settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from pipelines import HookHandles, PipelineWrapper
from pipelines.files import read_json_object, read_tensors

from ..core.payloads import PayloadKind, install_once, register_payload_kind
from ..core.registry import get_method
from .sae import SAE_FILE, SAE_METADATA, TopKSAE, load_sae, sae_quality_problems, save_sae

__all__ = [
    "INTERVENTION_FILE",
    "INTERVENTION_KIND",
    "INTERVENTION_TENSORS",
    "SAEIntervention",
    "check_intervention_keys",
]

logger = logging.getLogger(__name__)

INTERVENTION_FILE = "intervention.json"
INTERVENTION_TENSORS = "intervention.safetensors"
#: the keys of ``intervention.json``
DESCRIPTION_KEYS = ("kind", "hook_point", "settings", "tables")


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
        digest = hashlib.sha256(json.dumps([self.kind, self.hook_point, self.settings], sort_keys=True).encode())
        for name in sorted(self.tables):
            digest.update(name.encode())
            digest.update(self.tables[name].detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def edit(self, tokens: torch.Tensor, timestep: torch.Tensor | None, guided: bool = False) -> torch.Tensor:
        """The hook point's activations ``(batch, tokens, width)`` after the method's edit (float32 maths);
        ``guided``: the batch is classifier-free guidance's [unconditional; conditional] halves."""
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
        return install_once(
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
        """Read the intervention files of an artifact folder; ``ValueError`` in one line when they are bad: a key
        ``intervention.json`` does not hold, tables other than it describes, an SAE trained at another hook point (or
        recording none) or below the quality floor, or what the method's own check refuses."""
        path = folder / INTERVENTION_FILE
        description = read_json_object(path)
        unknown = sorted(set(description) - set(DESCRIPTION_KEYS))
        if unknown:
            raise ValueError(f"{path}: {unknown[0]!r} is no key of an intervention ({', '.join(DESCRIPTION_KEYS)})")
        for key, kind in (("kind", str), ("hook_point", str), ("settings", dict), ("tables", dict)):
            if not isinstance(description.get(key), kind):
                raise ValueError(f"{path}: {key} must be a {kind.__name__}")
        tables = read_tensors(folder / INTERVENTION_TENSORS)
        shapes = {name: list(tensor.shape) for name, tensor in tables.items()}
        if description["tables"] != shapes:
            raise ValueError(f"{path}: it describes the tables {description['tables']}, but {INTERVENTION_TENSORS} "
                             f"holds {shapes}")  # fmt: skip
        sae, sae_meta = load_sae(folder)
        trained_at = sae_meta.get("hook_point")
        if trained_at != description["hook_point"]:
            raise ValueError(f"{path}: the hook point {description['hook_point']!r} is not the one its SAE was "
                             f"trained at ({trained_at!r})")  # fmt: skip
        problems = sae_quality_problems(sae_meta)
        if problems:
            raise ValueError(f"{path}: its SAE is below the quality floor, no result to apply: {'; '.join(problems)}")
        method = get_method(description["kind"])
        if method.runtime_edit is None:
            raise ValueError(f"{path}: method {description['kind']!r} makes no runtime intervention")
        intervention = cls(description["kind"], description["hook_point"], sae, description["settings"], tables,
                           sae_meta)  # fmt: skip
        if method.check_intervention is not None:
            method.check_intervention(intervention)
        return intervention


def check_intervention_keys(
    intervention: SAEIntervention, settings: Collection[str], tables: Collection[str], where: str
) -> None:
    """``ValueError`` in one line naming a setting or table the method does not read: the artifact would claim an
    edit that does not happen (a misspelt setting, a table of another method)."""
    for what, found, known in (("setting", intervention.settings, settings), ("table", intervention.tables, tables)):
        unknown = sorted(set(found) - set(known))
        if unknown:
            raise ValueError(f"{where} has no {what} {unknown[0]!r} (it reads {', '.join(known)})")


class InterventionKind(PayloadKind):
    name = "intervention"
    payload_type = SAEIntervention
    files = (INTERVENTION_FILE, INTERVENTION_TENSORS, SAE_FILE, SAE_METADATA)

    def save(self, payload: SAEIntervention, folder: Path, wrapper: PipelineWrapper) -> dict[str, Any]:
        payload.save(folder)
        return {"weight_format": "intervention", "hook_point": payload.hook_point}

    def load(self, folder: Path, record: dict[str, Any]) -> SAEIntervention:
        intervention = SAEIntervention.load(folder)
        if record.get("hook_point") != intervention.hook_point:
            raise ValueError(f"{folder / INTERVENTION_FILE}: its hook point is not the one erasure.json records")
        return intervention

    def modules(self, payload: SAEIntervention) -> list[str]:
        return [payload.hook_point]

    def fingerprinted(self, payload: SAEIntervention) -> list[str]:
        return [payload.component]  # the edit reads the whole component's activations

    def norms(self, payload: SAEIntervention, wrapper: PipelineWrapper) -> dict[str, float]:
        return {payload.component: wrapper.parameter_norm(payload.component)}

    def check(self, payload: SAEIntervention, wrapper: PipelineWrapper) -> None:
        check_intervention = get_method(payload.kind).check_intervention
        if check_intervention is not None:
            check_intervention(payload)
        width = wrapper.hook_width(payload.hook_point)
        if width != payload.sae.d_in:
            raise ValueError(f"the hook point {payload.hook_point} is {width} wide, but the intervention's SAE reads "
                             f"{payload.sae.d_in}")  # fmt: skip

    def install(self, payload: SAEIntervention, wrapper: PipelineWrapper, payloads: dict[str, Any]) -> HookHandles:
        return payload.attach(wrapper)


INTERVENTION_KIND = register_payload_kind(InterventionKind())
