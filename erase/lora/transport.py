"""Facilitated transport (SPM, Lyu et al., 2024): an erasing LoRA whose strength follows each prompt's likeness to
the erased concepts, so prompts far from them meet the base model.

For a prompt p and the erased concepts' prompts c_j, the adapter's strength is ::

    s(p) = max_j max( cos(flat(E(p)), flat(E(c_j))),  |T(p) & T(c_j)| / |T(c_j)| )

with E the text embedding the UNet receives (every token position, flattened) and T the set of a prompt's token
ids without special tokens: the reference's ``clipcos_tokenuni`` metric (``infer_spm.py`` of
github.com/Con6924/SPM), where a prompt naming every token of a concept gets the full adapter. Under classifier-free
guidance the unconditional half runs at its prompt's strength too, as the reference scales the whole call.

SD3 and Flux (the reference is SD 1.x/2.x only): the UNet's cross-attention text input has its equivalent in the
transformer's text tokens (``encoder_hidden_states``, which every joint-attention block reads through its text-side
projections), so E is those tokens (Flux: T5's rows; SD3: both CLIPs' rows then T5's), and T is counted in T5's
tokens, the encoder whose output the transformer reads as it is (``PipelineWrapper.verbatim_token_sets``). Flux's
true classifier-free guidance (``true_cfg_scale`` > 1) runs the negative prompt in a call of its own, at that prompt's
strength.

Where we differ from the reference: it computes s per prompt before generating one prompt at a time; we compute it
inside the UNet's call for every prompt of a batch (``PipelineWrapper.add_prompt_scaled_lora``), from the
embeddings the UNet receives. A prompt's token ids are known when the text encoder made its embedding in this
process; an embedding passed in directly (``prompt_embeds``, as the embedding attacks do) or made another way (SDXL's
two encoders, ``clip_skip``) is scored by the cosine term alone, clipped at 0 (the reference's token term is never
negative, so its strength never is).

Installed with ``erase.load(pipe, folder)``, in place of the artifact's LoRA (which stays a plain LoRA:
``pipe.load_lora_weights`` applies it at full strength to every prompt). Files beside ``erasure.json``::

    transport.json           the metric, the erased prompts, their token-id sets, the special token ids, and the
                             sha256 of the embeddings file
    transport.safetensors    the erased prompts' text embeddings
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipelines import HookHandles, PipelineWrapper
from pipelines.files import atomic_save_safetensors, file_sha256, read_json_object, read_tensors

from ..core.payloads import PayloadKind, install_once, register_payload_kind
from ..core.weights import WEIGHTS_KIND

__all__ = ["TRANSPORT_FILE", "TRANSPORT_KIND", "TRANSPORT_TENSORS", "FacilitatedTransport"]

logger = logging.getLogger(__name__)

TRANSPORT_FILE = "transport.json"
TRANSPORT_TENSORS = "transport.safetensors"
METRICS = ("clipcos_tokenuni", "clipcos", "tokenuni")


@dataclass
class FacilitatedTransport:
    """The erased concepts as the strength rule reads them.

    Attributes:
        prompts: the erased concepts' prompts c_j.
        embeddings: their text embeddings ``(n, tokens, width)``, float32.
        token_sets: each prompt's token ids, special tokens removed.
        special_ids: the tokenizer's special token ids (removed from a prompt's ids before the overlap).
        metric: ``clipcos_tokenuni`` (the reference's default), ``clipcos`` or ``tokenuni``.
        groups: which adapter each prompt belongs to (``None``: one adapter for all). With G groups the LoRA's rank
            is G equal blocks, block g the adapter of group g, scaled by group g's strength: the reference's one
            adapter per concept, each at its own strength.
    """

    prompts: list[str]
    embeddings: torch.Tensor
    token_sets: list[list[int]]
    special_ids: list[int]
    metric: str = "clipcos_tokenuni"
    groups: list[int] | None = None

    def __post_init__(self) -> None:
        if self.groups is not None and (
            len(self.groups) != len(self.prompts) or sorted(set(self.groups)) != list(range(max(self.groups) + 1))
        ):
            raise ValueError(f"groups must number each prompt's adapter 0, 1, ..., got {self.groups!r}")
        if self.metric not in METRICS:
            raise ValueError(f"unknown transport metric {self.metric!r}; expected one of {', '.join(METRICS)}")
        if not self.prompts or self.embeddings.dim() != 3 or self.embeddings.shape[0] != len(self.prompts):
            raise ValueError(f"transport embeddings of shape {tuple(self.embeddings.shape)} for {len(self.prompts)} "
                             "prompts")  # fmt: skip
        if len(self.token_sets) != len(self.prompts) or not all(self.token_sets):
            raise ValueError("every erased prompt needs a non-empty token set")

    @property
    def group_count(self) -> int:
        return 1 if self.groups is None else max(self.groups) + 1

    @classmethod
    def of_concepts(  # noqa: ANN206
        cls,
        wrapper: PipelineWrapper,
        prompts: list[str],
        metric: str = "clipcos_tokenuni",
        groups: list[int] | None = None,
    ):
        """The rule for ``prompts`` as ``wrapper``'s text encoder reads them."""
        encoding = wrapper.encode_prompts(prompts)
        token_sets, special = wrapper.verbatim_token_sets(prompts)
        return cls(list(prompts), encoding.embeddings.detach().float().cpu(), token_sets, special, metric, groups)

    def strengths(self, embeddings: torch.Tensor, token_ids: list[torch.Tensor | None]) -> torch.Tensor:
        """``(m, groups)``: each group's strength, the largest s(p) over its prompts, for each row of ``embeddings``
        ``(m, tokens, width)``; ``token_ids[i]`` None when unknown."""
        likeness = self.likeness(embeddings, token_ids)  # (m, prompts)
        groups = torch.tensor(self.groups or [0] * len(self.prompts), device=likeness.device)
        return torch.stack([likeness[:, groups == g].amax(dim=1) for g in range(self.group_count)], dim=1)

    def likeness(self, embeddings: torch.Tensor, token_ids: list[torch.Tensor | None]) -> torch.Tensor:
        """``(m, prompts)``: max(cosine, token share) of each row of ``embeddings`` to each erased prompt."""
        concepts = self.embeddings.to(embeddings.device)
        if concepts.shape[1:] != embeddings.shape[1:]:
            raise ValueError(f"prompt embeddings of shape {tuple(embeddings.shape[1:])}, but the erased concepts' are "
                             f"{tuple(concepts.shape[1:])}")  # fmt: skip
        cosine = torch.nn.functional.cosine_similarity(
            embeddings.flatten(1)[:, None], concepts.flatten(1)[None], dim=-1
        )  # (m, n)
        rows = []
        for i, ids in enumerate(token_ids):
            terms = []
            if self.metric != "tokenuni":
                terms.append(cosine[i].clamp(min=0.0) if ids is None else cosine[i])
            if self.metric != "clipcos" and ids is not None:
                prompt = set(ids.tolist()) - set(self.special_ids)
                terms.append(torch.tensor([len(prompt & set(c)) / len(c) for c in self.token_sets]))
            if not terms:  # tokenuni alone and no token ids: nothing says the concept is there
                terms.append(torch.zeros(len(self.prompts)))
            rows.append(torch.stack([t.to(cosine.device, cosine.dtype) for t in terms]).amax(dim=0))
        return torch.stack(rows)

    def identity(self) -> str:
        digest = hashlib.sha256(json.dumps([self.prompts, self.metric, self.token_sets, self.groups]).encode())
        digest.update(self.embeddings.contiguous().numpy().tobytes())
        return digest.hexdigest()

    def attach(self, wrapper: PipelineWrapper, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> HookHandles:
        """Install the adapter ``factors`` (name -> (A, B), dW = B A) at per-prompt strength until the handle is
        removed; attaching the same transport to the same UNet twice is refused."""
        return install_once(
            wrapper.denoiser,
            self.identity(),
            lambda: wrapper.add_prompt_scaled_lora(factors, self.strengths),
            "this facilitated-transport adapter is already attached to the pipeline",
        )

    # ------------------------------------------------------------------ files
    def save(self, folder: Path) -> list[str]:
        atomic_save_safetensors({"embeddings": self.embeddings.contiguous()}, folder / TRANSPORT_TENSORS)
        description = {"metric": self.metric, "prompts": self.prompts, "token_sets": self.token_sets,
                       "special_ids": self.special_ids, "groups": self.groups,
                       "embeddings_sha256": file_sha256(folder / TRANSPORT_TENSORS)}  # fmt: skip
        (folder / TRANSPORT_FILE).write_text(json.dumps(description, indent=2))
        return [TRANSPORT_FILE, TRANSPORT_TENSORS]

    @classmethod
    def load(cls, folder: Path):  # noqa: ANN206
        """Read the transport files of an artifact folder; ``ValueError`` in one line when they are bad."""
        path, tensors_path = folder / TRANSPORT_FILE, folder / TRANSPORT_TENSORS
        description = read_json_object(path)
        prompts, token_sets = description.get("prompts"), description.get("token_sets")
        special, metric = description.get("special_ids"), description.get("metric")
        if not (isinstance(prompts, list) and all(isinstance(p, str) for p in prompts)):
            raise ValueError(f"{path}: prompts must be a list of strings")
        if not (isinstance(token_sets, list) and all(_ints(t) for t in token_sets) and _ints(special)):
            raise ValueError(f"{path}: token_sets and special_ids must be lists of integers")
        groups = description.get("groups")
        if groups is not None and not _ints(groups):
            raise ValueError(f"{path}: groups must be null or a list of integers")
        if not isinstance(description.get("embeddings_sha256"), str):
            raise ValueError(f"{path}: embeddings_sha256 must be a string")
        if tensors_path.is_file() and file_sha256(tensors_path) != description["embeddings_sha256"]:
            raise ValueError(f"{tensors_path} does not match the sha256 in {TRANSPORT_FILE}: the file was changed")
        embeddings = read_tensors(tensors_path).get("embeddings")
        if embeddings is None or not embeddings.is_floating_point():
            raise ValueError(f"{tensors_path}: no 'embeddings' tensor")
        return cls(prompts, embeddings.float(), token_sets, special, metric, groups)


def _ints(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in value)


class TransportKind(PayloadKind):
    """Installs the artifact's LoRA (its weight change, read as diffusers reads it) at each prompt's strength."""

    name = "transport"
    payload_type = FacilitatedTransport
    files = (TRANSPORT_FILE, TRANSPORT_TENSORS)
    replaces = (WEIGHTS_KIND.name,)

    def save(self, payload: FacilitatedTransport, folder: Path, wrapper: PipelineWrapper) -> dict[str, Any]:
        payload.save(folder)
        return {"metric": payload.metric}

    def load(self, folder: Path, record: dict[str, Any]) -> FacilitatedTransport:
        return FacilitatedTransport.load(folder)

    def check(self, payload: FacilitatedTransport, wrapper: PipelineWrapper) -> None:
        width = wrapper.encode_prompts([""]).embeddings.shape[1:]
        if tuple(width) != tuple(payload.embeddings.shape[1:]):
            raise ValueError(f"the transport's concept embeddings are {tuple(payload.embeddings.shape[1:])}, but the "
                             f"pipeline's prompt embeddings are {tuple(width)}")  # fmt: skip

    def install(
        self, payload: FacilitatedTransport, wrapper: PipelineWrapper, payloads: dict[str, Any]
    ) -> HookHandles:
        weights = payloads.get(WEIGHTS_KIND.name)
        if weights is None:
            raise ValueError("a facilitated transport needs the artifact's LoRA, and the artifact has none")
        return payload.attach(wrapper, weights.lora_factors())


TRANSPORT_KIND = register_payload_kind(TransportKind())
