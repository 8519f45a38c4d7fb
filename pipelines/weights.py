"""Weights: edits in place and undone exactly, trainable LoRA adapters, fingerprints and norms, and export.

Everything here addresses modules by qualified name (``"unet.<path>"``, ``"transformer.<path>"``, see
:mod:`pipelines.modules`); a LoRA is saved in diffusers' own format, so ``pipe.load_lora_weights(folder)`` reproduces
the change.

Trainable adapters go on the denoiser and, for patterns that start with a text encoder's component name and a dot
(``"text_encoder."``, SDXL's second CLIP ``"text_encoder_2."``), on that text encoder: adapter names are the
denoiser's module paths as they are and the text encoders' qualified
(``"text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj"``), so a denoiser-only setup reads as it always has.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch

from .modules import Pipeline, linear_module_names, module

logger = logging.getLogger(__name__)

__all__ = [
    "TEXT_ENCODER_COMPONENTS",
    "TEXT_ENCODER_PREFIX",
    "LoraAdapters",
    "apply_weight_deltas",
    "check_lora_rank",
    "export_pipeline",
    "fingerprint",
    "fingerprints",
    "lora_adapters",
    "lora_module_names",
    "text_encoder_component",
    "parameter_norm",
    "save_lora_weights",
    "weight_deltas",
    "weight_norms",
]


#: The text encoders' component names a LoRA target pattern can start with (``"<component>."``, then a pattern over
#: that encoder's own module names); the other patterns select denoiser modules
TEXT_ENCODER_COMPONENTS: tuple[str, ...] = ("text_encoder", "text_encoder_2", "text_encoder_3")
#: the first text encoder's prefix (SD 1.x/2.x's only one, SDXL's CLIP ViT-L)
TEXT_ENCODER_PREFIX = "text_encoder."


def text_encoder_component(name: str) -> str | None:
    """The text encoder a LoRA pattern or adapted module name belongs to (``"text_encoder_2.<path>"`` ->
    ``"text_encoder_2"``), ``None`` for a denoiser one."""
    component, dot, _ = name.partition(".")
    return component if dot and component in TEXT_ENCODER_COMPONENTS else None


def lora_module_names(
    unet: torch.nn.Module, patterns: Sequence[str], text_encoders: Mapping[str, torch.nn.Module] | None = None
) -> list[str]:
    """The Linear modules a LoRA on ``patterns`` adapts: denoiser paths as they are, then each text encoder's
    (``text_encoders``: component name -> module) qualified (``"text_encoder_2.<path>"``), each part sorted;
    ``ValueError`` when a part's patterns match nothing or name an encoder the pipeline lacks."""
    unet_patterns = [p for p in patterns if text_encoder_component(p) is None]
    names = linear_module_names(unet, unet_patterns) if unet_patterns else []
    for component in TEXT_ENCODER_COMPONENTS:
        text_patterns = [p.partition(".")[2] for p in patterns if text_encoder_component(p) == component]
        if not text_patterns:
            continue
        encoder = (text_encoders or {}).get(component)
        if encoder is None:
            raise ValueError(f"LoRA patterns name {component} modules, but the pipeline has no {component}")
        found = sorted(
            name
            for name, layer in encoder.named_modules()
            if isinstance(layer, torch.nn.Linear) and any(fnmatch.fnmatchcase(name, p) for p in text_patterns)
        )
        if not found:
            raise ValueError(f"no {component} Linear module matches the LoRA target patterns {text_patterns}")
        logger.info("%d %s Linear modules match the LoRA targets %s", len(found), component, text_patterns)
        names += [f"{component}.{name}" for name in found]
    return names


class LoraAdapters:
    """peft LoRA adapters injected into the denoiser (and the text encoder) by :func:`lora_adapters`; valid inside
    its block.

    Training code sees only these parameters, a switch that turns the adapters off (the frozen model is then the very
    same denoiser and text encoder, so one of each sits in memory), their state for checkpoints, and the trained
    change as exact factors.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        names: Sequence[str],
        adapter_name: str,
        component: str = "unet",
        text_encoders: Mapping[str, torch.nn.Module] | None = None,
    ) -> None:
        self.names = list(names)
        self.adapter_name = adapter_name
        self.component = component
        roots = {component: model, **(text_encoders or {})}
        self._layers = {name: roots[_root(name, component)].get_submodule(_path(name)) for name in self.names}

    @property
    def adapts_text_encoder(self) -> bool:
        """Whether some adapters sit on a text encoder (its encodings then change with training)."""
        return any(text_encoder_component(name) for name in self.names)

    @torch.no_grad()
    def adapted_weights(self, patterns: Sequence[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{name: (W, W + dW)}`` float64 on the CPU for every adapted module whose name matches ``patterns``: its
        base weight and its weight with the adapter's change as it is now."""
        out = {}
        for name, layer in self._layers.items():
            if any(fnmatch.fnmatchcase(name, p) for p in patterns):
                base = layer.get_base_layer().weight.detach().double().cpu()
                lora_a = layer.lora_A[self.adapter_name].weight.detach().double().cpu()
                lora_b = layer.lora_B[self.adapter_name].weight.detach().double().cpu()
                out[name] = (base, base + float(layer.scaling[self.adapter_name]) * lora_b @ lora_a)
        return out

    def parameters(self) -> list[torch.nn.Parameter]:
        """The trainable tensors, A then B per module in name order (a stable order for optimizer state)."""
        params = []
        for layer in self._layers.values():
            params += [layer.lora_A[self.adapter_name].weight, layer.lora_B[self.adapter_name].weight]
        return params

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{"<module>.lora_A": A, "<module>.lora_B": B}``, detached copies (B without the scaling)."""
        state = {}
        for name, layer in self._layers.items():
            state[f"{name}.lora_A"] = layer.lora_A[self.adapter_name].weight.detach().clone()
            state[f"{name}.lora_B"] = layer.lora_B[self.adapter_name].weight.detach().clone()
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore ``state_dict()``'s tensors; ``ValueError`` for a missing key or a shape that differs."""
        expected = self.state_dict()
        if set(state) != set(expected):
            raise ValueError(f"LoRA state holds {len(state)} tensors, the adapters {len(expected)}: another setup")
        for name, layer in self._layers.items():
            for part in ("lora_A", "lora_B"):
                target = getattr(layer, part)[self.adapter_name].weight
                value = state[f"{name}.{part}"]
                if value.shape != target.shape:
                    raise ValueError(f"{name}.{part}: saved shape {tuple(value.shape)}, adapter {tuple(target.shape)}")
                target.copy_(value.to(target.device, target.dtype))

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """The base model for the ``with`` block: every adapter off, re-enabled afterwards (also on error)."""
        try:
            for layer in self._layers.values():
                layer.enable_adapters(False)
            yield
        finally:
            for layer in self._layers.values():
                layer.enable_adapters(True)

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The trained change as exact factors ``{"<component>.<module>" or "text_encoder[_2].<module>": (A, B *
        scaling)}``, dW = B @ A, float32 on CPU."""
        out = {}
        for name, layer in self._layers.items():
            lora_a = layer.lora_A[self.adapter_name].weight.detach().float().cpu().clone()
            lora_b = layer.lora_B[self.adapter_name].weight.detach().float().cpu() * float(
                layer.scaling[self.adapter_name]
            )
            out[name if text_encoder_component(name) else f"{self.component}.{name}"] = (lora_a, lora_b)
        return out

    @torch.no_grad()
    def _initialise(self, generator: torch.Generator) -> None:
        """A from ``generator`` within peft's own Kaiming-uniform bound, 1/sqrt(in_features); B zero."""
        for layer in self._layers.values():
            weight = layer.lora_A[self.adapter_name].weight
            bound = 1.0 / weight.shape[1] ** 0.5
            draw = torch.rand(weight.shape, generator=generator, dtype=torch.float32) * 2 * bound - bound
            weight.copy_(draw.to(weight.device, weight.dtype))
            layer.lora_B[self.adapter_name].weight.zero_()


def _root(name: str, component: str) -> str:
    """The component an adapted module name lives in: its text encoder's, or the denoiser ``component``."""
    return text_encoder_component(name) or component


def _path(name: str) -> str:
    return name.partition(".")[2] if text_encoder_component(name) else name


def check_lora_rank(
    unet: torch.nn.Module,
    patterns: Sequence[str],
    rank: int,
    text_encoders: Mapping[str, torch.nn.Module] | None = None,
) -> None:
    """``ValueError`` in one line when ``rank`` is below 1 or above the smaller side of every Linear a LoRA on
    ``patterns`` adapts: its change B @ A has at most that rank, so a larger one only costs memory (at 10^5, all
    of it), and is refused before any work."""
    _check_rank_fits(unet, lora_module_names(unet, patterns, text_encoders), rank, text_encoders)


def _check_rank_fits(
    unet: torch.nn.Module, names: Sequence[str], rank: int, text_encoders: Mapping[str, torch.nn.Module] | None
) -> None:
    """:func:`check_lora_rank` on the adapted modules ``names`` (:func:`lora_module_names`)."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    roots = {"": unet, **(text_encoders or {})}
    widest = 0
    for name in names:
        layer = roots[text_encoder_component(name) or ""].get_submodule(_path(name))
        widest = max(widest, min(layer.in_features, layer.out_features))
    if rank > widest:
        raise ValueError(
            f"LoRA rank {rank} exceeds every adapted layer's width (the widest allows {widest}): a LoRA's change has "
            "at most that rank; choose a rank at most that"
        )


@contextlib.contextmanager
def lora_adapters(
    unet: torch.nn.Module,
    patterns: Sequence[str],
    rank: int,
    alpha: float,
    *,
    generator: torch.Generator,
    adapter_name: str = "erase",
    component: str = "unet",
    text_encoders: Mapping[str, torch.nn.Module] | None = None,
) -> Iterator[LoraAdapters]:
    """Trainable peft LoRA adapters on the matching Linear modules of the denoiser ``unet`` (the pipeline's
    ``component``: a UNet, or an SD3/Flux transformer) and, for patterns that start with a text encoder's name and a
    dot, of that encoder in ``text_encoders`` (:func:`lora_module_names`), in place, for the ``with`` block.

    A is drawn from ``generator`` (peft's own Kaiming-uniform bound, so the start is a function of the seed alone;
    the denoiser's modules first, then the text encoders') and B is zero, so the adapted model
    starts equal to the base. Afterwards the adapters are removed (also on error): the original Linear modules are
    put back, with their weights bit-identical (peft never writes them unless merged, which this never does) and
    their ``requires_grad`` flags as they were.
    """
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    roots = {component: unet, **(text_encoders or {})}
    for what, root in roots.items():
        if getattr(root, "peft_config", None) or any(isinstance(m, BaseTunerLayer) for m in root.modules()):
            raise ValueError(
                f"the {what} already holds peft adapters (a loaded LoRA?): erase from the plain base model"
            )
    names = lora_module_names(unet, patterns, text_encoders)
    _check_rank_fits(unet, names, rank, text_encoders)
    by_root: dict[str, list[str]] = {}
    for name in names:
        by_root.setdefault(_root(name, component), []).append(_path(name))
    requires_grad = {what: {n: p.requires_grad for n, p in root.named_parameters()} for what, root in roots.items()}
    had_config = {what: hasattr(root, "peft_config") for what, root in roots.items()}
    try:
        for what, paths in by_root.items():
            config = LoraConfig(
                r=rank, lora_alpha=alpha, target_modules=paths, lora_dropout=0.0, bias="none", init_lora_weights=True
            )
            inject_adapter_in_model(config, roots[what], adapter_name)
        adapters = LoraAdapters(unet, names, adapter_name, component, text_encoders)
        adapters._initialise(generator)
        yield adapters
    finally:
        for what, paths in by_root.items():
            root = roots[what]
            for name in paths:
                layer = root.get_submodule(name)
                if isinstance(layer, BaseTunerLayer):
                    parent, _, child = name.rpartition(".")
                    setattr(root.get_submodule(parent) if parent else root, child, layer.get_base_layer())
        for what, root in roots.items():
            if not had_config[what] and hasattr(root, "peft_config"):
                del root.peft_config
            for name, param in root.named_parameters():
                param.requires_grad_(requires_grad[what].get(name, param.requires_grad))


@torch.no_grad()
def apply_weight_deltas(pipe: Pipeline, deltas: dict[str, torch.Tensor], scale: float = 1.0) -> None:
    """In place: ``W <- W + scale * dW`` for each Linear named (qualified) in ``deltas``.

    All or nothing: every module and shape is checked before the first weight changes.
    """
    weights = {name: module(pipe, name).weight for name in deltas}
    for name, delta in deltas.items():
        if weights[name].shape != delta.shape:
            raise ValueError(
                f"{name}: weight change of shape {tuple(delta.shape)} for weight {tuple(weights[name].shape)}"
            )
    for name, delta in deltas.items():
        weights[name].add_(delta.to(weights[name].device, weights[name].dtype), alpha=scale)


@contextlib.contextmanager
def weight_deltas(pipe: Pipeline, deltas: dict[str, torch.Tensor]) -> Iterator[None]:
    """Apply weight changes for the ``with`` block and restore the exact original weights afterwards."""
    originals = {name: module(pipe, name).weight.detach().clone() for name in deltas}
    try:
        apply_weight_deltas(pipe, deltas)
        yield
    finally:
        with torch.no_grad():
            for name, weight in originals.items():
                module(pipe, name).weight.copy_(weight)


def fingerprint(pipe: Pipeline, module_names: Sequence[str], precision: torch.dtype = torch.float32) -> str:
    """sha256 over the float32 weights of the named modules (qualified names), in sorted order.

    ``precision`` rounds the weights to that dtype first: a float32 pipeline's float16 fingerprint equals the plain
    fingerprint of the same weights loaded in float16 (diffusers' ``torch_dtype`` casts the same way).
    """
    return fingerprints(pipe, module_names, (precision,))[precision]


def fingerprints(
    pipe: Pipeline, module_names: Sequence[str], precisions: Sequence[torch.dtype] = (torch.float32,)
) -> dict[torch.dtype, str]:
    """:func:`fingerprint` at each of ``precisions``, in one pass over the weights (each module looked up once,
    each tensor moved to the CPU once and hashed in place)."""
    digests = {p: hashlib.sha256() for p in precisions}
    for name in sorted(module_names):
        for pname, param in sorted(module(pipe, name).state_dict().items()):
            label = f"{name}.{pname}".encode()
            values = param.detach().to("cpu")
            for precision, digest in digests.items():
                rounded = values.to(precision).to(torch.float32).contiguous()
                digest.update(label)
                digest.update(rounded.numpy())
    return {p: d.hexdigest() for p, d in digests.items()}


def weight_norms(
    pipe: Pipeline, module_names: Sequence[str], deltas: dict[str, torch.Tensor] | None = None
) -> dict[str, float]:
    """Frobenius norm of each named module's weight, in float64; with ``deltas``, of the weight
    :func:`apply_weight_deltas` would leave (``W + dW`` summed in the weight's dtype), the pipeline left unchanged."""
    deltas = deltas or {}
    norms = {}
    for name in sorted(module_names):
        weight = module(pipe, name).weight.detach()
        if name in deltas:
            weight = weight + deltas[name].to(weight.device, weight.dtype)
        norms[name] = float(weight.double().norm())
    return norms


def parameter_norm(pipe: Pipeline, name: str) -> float:
    """Frobenius norm of all of a module's parameters together (a whole component), in float64."""
    return float(sum(p.detach().double().pow(2).sum() for p in module(pipe, name).parameters()) ** 0.5)


def save_lora_weights(
    pipe: Pipeline, folder: str | Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> None:
    """Save ``dW = B @ A`` per module as a diffusers LoRA that ``pipe.load_lora_weights(folder)`` reproduces.

    ``factors`` maps a qualified Linear name to ``(A, B)`` with A: (rank, in) and B: (out, rank). Alpha equals the
    rank so the LoRA scale is exactly 1; ranks may differ per module (peft's ``rank_pattern``).
    """
    by_component: dict[str, dict[str, torch.Tensor]] = {}
    ranks: dict[str, dict[str, int]] = {}
    for name, (lora_a, lora_b) in factors.items():
        component, _, path = name.partition(".")
        if component not in ("unet", "transformer", "text_encoder", "text_encoder_2"):
            raise ValueError(f"cannot save a LoRA for component {component!r}")
        by_component.setdefault(component, {})[f"{path}.lora_A.weight"] = lora_a.contiguous().float().cpu()
        by_component.setdefault(component, {})[f"{path}.lora_B.weight"] = lora_b.contiguous().float().cpu()
        ranks.setdefault(component, {})[path] = int(lora_a.shape[0])
    kwargs = {}
    for component, state in by_component.items():
        pattern = ranks[component]
        top = max(pattern.values())
        kwargs[f"{component}_lora_layers"] = state
        kwargs[f"{component}_lora_adapter_metadata"] = {
            "r": top,
            "lora_alpha": top,
            "rank_pattern": pattern,
            "alpha_pattern": pattern,
            "target_modules": sorted(pattern),
            "lora_dropout": 0.0,
            "bias": "none",
            "use_dora": False,
        }
    type(pipe).save_lora_weights(str(folder), safe_serialization=True, **kwargs)


def export_pipeline(pipe: Pipeline, folder: str | Path) -> None:
    """A complete diffusers folder of the pipeline as it is now (edits included)."""
    pipe.save_pretrained(str(folder), safe_serialization=True)
