"""The shared Stable Diffusion pipeline wrapper.

This is the one module that knows diffusers' internals: which modules are cross-attention projections, how a
prompt becomes text embeddings, how a noise prediction is taken and how images are sampled. Erasure methods and
evaluations ask it; they never reach into the UNet or the text encoder themselves.

SD 1.x/2.x and the micro world use one text encoder; SDXL's two are concatenated along the feature axis exactly as
``StableDiffusionXLPipeline.encode_prompt`` does, so every caller sees one ``(batch, tokens, width)`` tensor.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image
from tqdm.auto import tqdm

from .checks import error_line

__all__ = [
    "CROSS_ATTENTION_PATTERNS",
    "DEFAULT_GUIDANCE",
    "DEFAULT_STEPS",
    "CrossAttentionLayer",
    "HOOK_POINT_PATTERNS",
    "HookHandles",
    "LORA_TARGETS",
    "LoraAdapters",
    "ModelNotFoundError",
    "check_model_reference",
    "PipelineWrapper",
    "PromptEncoding",
    "load_pipeline",
    "micro_model_path",
    "world_file",
    "wrap_pipeline",
]

logger = logging.getLogger(__name__)

#: Default sampler settings for every model: scheduler steps and classifier-free guidance scale. Generation, audits,
#: erasure checks and the micro model's evaluation all start from these, so "default settings" means one thing.
#: 7.5 is diffusers' own default guidance, so a plain ``pipe(prompt)`` samples like we do; on the micro model it
#: draws objects a little better than 5 (judge: 74.2% vs 73.4% on 256 images, 79.7% vs 72.7% on 128 others). On the
#: models shipped with the DPM-Solver++ sampler, 256 object images (CLIP / judge): 7.5 -> 84.4 / 87.5%, 10 -> 84.8 /
#: 89.8%, 12.5 -> 85.9 / 93.8%, 15 -> 85.5 / 92.6%, 20 -> 85.9 / 92.6%, 50 steps at 7.5 -> 83.2 / 87.9%: the scorer
#: gains nothing beyond sampling spread, so the defaults stay diffusers' guidance. (What helped was the micro model's
#: own sampler: ``evals.microworld.sd_model.inference_scheduler``.)
DEFAULT_STEPS: int = 20
DEFAULT_GUIDANCE: float = 7.5

# Cross-attention in diffusers' transformer blocks is always ``attn2``; its key/value projections read the text.
CROSS_ATTENTION_PATTERNS: tuple[str, ...] = ("*attn2.to_k", "*attn2.to_v")

#: LoRA target sets by name: fnmatch patterns over the UNet's Linear module names (diffusers' transformer blocks:
#: ``attn1`` self-attention, ``attn2`` cross-attention, ``ff`` the GEGLU feed-forward, ``proj_in``/``proj_out`` the
#: block's input and output projections, which are Linear only where ``use_linear_projection`` is set: SD 2.x, SDXL).
#: ``noxattn`` is every transformer-block Linear but cross-attention: ESD-u's "everything but cross-attention" as far
#: as a LoRA on Linear layers reaches (the official ESD-u also fine-tunes convolutions, resnets and time embeddings).
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "xattn": ("*attn2.to_q", "*attn2.to_k", "*attn2.to_v", "*attn2.to_out.0"),
    "kv": CROSS_ATTENTION_PATTERNS,
    "noxattn": (
        "*attn1.to_q", "*attn1.to_k", "*attn1.to_v", "*attn1.to_out.0", "*ff.net.0.proj", "*ff.net.2",
        "*proj_in", "*proj_out",
    ),
}  # fmt: skip
#: every Linear of the transformer blocks (SPM's "Transformer2DModel" modules); Conv2d projections are not reached
LORA_TARGETS["transformer"] = LORA_TARGETS["xattn"] + LORA_TARGETS["noxattn"]

#: Where the SAE family reads and edits activations, as fnmatch patterns over qualified module names (digits spelled
#: out, since fnmatch's ``*`` would also match deeper modules): a CLIP text encoder's layers (the residual stream
#: after layer N; SDXL's second encoder too) and the UNet's transformer blocks (``Transformer2DModel`` in a down, mid
#: or up block). transformers 5 names CLIPTextModel's layers ``encoder.layers.N``, earlier versions
#: ``text_model.encoder.layers.N``.
HOOK_POINT_PATTERNS: tuple[str, ...] = tuple(
    f"{encoder}.{prefix}encoder.layers.{digits}"
    for encoder in ("text_encoder", "text_encoder_2")
    for prefix in ("", "text_model.")
    for digits in ("[0-9]", "[0-9][0-9]")
) + (
    "unet.down_blocks.[0-9].attentions.[0-9]",
    "unet.mid_block.attentions.[0-9]",
    "unet.up_blocks.[0-9].attentions.[0-9]",
)


class ModelNotFoundError(ValueError):
    """The model argument names no embedded model, local folder or reachable hub repository."""


@dataclass(frozen=True)
class CrossAttentionLayer:
    """One key or value projection of a cross-attention block: ``y = W c`` for a text embedding ``c``."""

    name: str  # module name inside the UNet, e.g. "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    module: torch.nn.Linear

    @property
    def in_features(self) -> int:
        return self.module.in_features

    @property
    def out_features(self) -> int:
        return self.module.out_features


@dataclass
class PromptEncoding:
    """Text-encoder output for a batch of prompts, as the UNet's cross-attention consumes it."""

    prompts: list[str]
    input_ids: torch.Tensor  # (batch, tokens) of the first tokenizer
    embeddings: torch.Tensor  # (batch, tokens, width)
    lengths: torch.Tensor  # (batch,) number of real tokens, BOS and EOS included
    pooled: torch.Tensor | None = None  # SDXL's pooled embedding of the second encoder

    def eos_position(self, index: int) -> int:
        return int(self.lengths[index]) - 1

    def select(self, index: torch.Tensor | Sequence[int]) -> PromptEncoding:
        """The encoding of a sub-batch (rows may repeat): what a training batch drawn from a prompt set needs."""
        rows = torch.as_tensor(index, dtype=torch.long)
        return PromptEncoding(
            [self.prompts[int(i)] for i in rows],
            self.input_ids[rows],
            self.embeddings[rows.to(self.embeddings.device)],
            self.lengths[rows],
            None if self.pooled is None else self.pooled[rows.to(self.pooled.device)],
        )


class LoraAdapters:
    """peft LoRA adapters injected into the UNet by ``PipelineWrapper.lora_adapters``; valid inside its block.

    Training code sees only these parameters, a switch that turns the adapters off (the frozen model is then the very
    same UNet, so one UNet sits in memory), their state for checkpoints, and the trained change as exact factors.
    """

    def __init__(self, unet: torch.nn.Module, names: Sequence[str], adapter_name: str) -> None:
        self.names = list(names)
        self.adapter_name = adapter_name
        self._layers = {name: unet.get_submodule(name) for name in self.names}

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
        """The trained change as exact factors ``{"unet.<module>": (A, B * scaling)}``, dW = B @ A, float32 on CPU."""
        out = {}
        for name, layer in self._layers.items():
            lora_a = layer.lora_A[self.adapter_name].weight.detach().float().cpu().clone()
            lora_b = layer.lora_B[self.adapter_name].weight.detach().float().cpu() * float(
                layer.scaling[self.adapter_name]
            )
            out[f"unet.{name}"] = (lora_a, lora_b)
        return out


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
    if not model.strip() or model in ("tiny", "tiny-sdxl"):
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
    if model in ("tiny", "tiny-sdxl"):
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


def load_pipeline(
    model: str = "micro",
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> PipelineWrapper:
    """Load a Stable Diffusion pipeline and wrap it.

    Args:
        model: ``"micro"`` (the embedded default), ``"tiny"`` / ``"tiny-sdxl"`` (small random pipelines built in
            code, for tests), a local diffusers folder, or a hub id such as ``"CompVis/stable-diffusion-v1-4"``.
        device, dtype: where and in what precision the pipeline runs.
        seed: initialises the random tiny pipelines; ignored for trained models.
    """
    check_model_reference(model)
    if model == "tiny":
        from .tiny import tiny_sd_pipeline

        pipe, model_id = tiny_sd_pipeline(seed), f"tiny-sd(seed={seed})"
    elif model == "tiny-sdxl":
        from .tiny import tiny_sdxl_pipeline

        pipe, model_id = tiny_sdxl_pipeline(seed), f"tiny-sdxl(seed={seed})"
    else:
        if model == "micro":
            source, model_id = str(micro_model_path()), "micro"
        elif _is_local(model):
            path = Path(model).expanduser()
            source, model_id = str(path), str(path.resolve())
        else:
            source, model_id = model, model
        try:
            pipe = DiffusionPipeline.from_pretrained(source, dtype=dtype, safety_checker=None)
        except (OSError, ValueError) as err:
            raise ModelNotFoundError(f"cannot load model {model!r}: {error_line(err)}") from err
    if model.startswith("tiny") and dtype != torch.float32:
        pipe.to(dtype=dtype)
    if not isinstance(pipe, StableDiffusionPipeline | StableDiffusionXLPipeline):
        raise ModelNotFoundError(f"model {model!r} is a {type(pipe).__name__}, not a Stable Diffusion (XL) pipeline")
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return PipelineWrapper(pipe, model_id=model_id)


def wrap_pipeline(pipe: object, model_id: str | None = None) -> PipelineWrapper:
    """Wrap a pipeline object a user built with plain diffusers; ``TypeError`` for anything but SD 1.x/2.x/XL."""
    if not isinstance(pipe, StableDiffusionPipeline | StableDiffusionXLPipeline):
        raise TypeError(f"expected a StableDiffusionPipeline or StableDiffusionXLPipeline, got {type(pipe).__name__}")
    name = model_id or getattr(pipe, "name_or_path", None) or getattr(pipe.config, "_name_or_path", None)
    return PipelineWrapper(pipe, model_id=str(name or type(pipe).__name__))


class PipelineWrapper:
    """A Stable Diffusion (XL) pipeline with the operations erasure methods and evaluations need."""

    def __init__(self, pipe: StableDiffusionPipeline | StableDiffusionXLPipeline, model_id: str) -> None:
        self.pipe = pipe
        self._direct_unet_calls = 0  # > 0 while noise_prediction calls the UNet itself (no guidance halves)
        self.model_id = model_id

    # ------------------------------------------------------------------ properties
    @property
    def is_sdxl(self) -> bool:
        return isinstance(self.pipe, StableDiffusionXLPipeline)

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    @property
    def world_file(self) -> Path | None:
        """The micro world's description when this model was trained on it (see :func:`world_file`)."""
        return world_file(self.model_id)

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.unet.dtype

    @property
    def unet(self) -> torch.nn.Module:
        return self.pipe.unet

    @property
    def max_prompt_tokens(self) -> int:
        """Tokens a prompt may have, BOS and EOS excluded."""
        return self.pipe.tokenizer.model_max_length - 2

    @property
    def image_size(self) -> int:
        return self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor

    def components(self) -> dict[str, torch.nn.Module]:
        """The pipeline's trainable modules by component name ("unet", "text_encoder", ...)."""
        return {k: v for k, v in self.pipe.components.items() if isinstance(v, torch.nn.Module)}

    # ------------------------------------------------------------------ layers
    def cross_attention_layers(self, patterns: Sequence[str] = CROSS_ATTENTION_PATTERNS) -> list[CrossAttentionLayer]:
        """UNet cross-attention projections whose module names match any of ``patterns`` (fnmatch syntax).

        Raises ``ValueError`` when nothing matches, since an edit that touches no layer would silently do nothing.
        """
        layers = [
            CrossAttentionLayer(name, module)
            for name, module in self.unet.named_modules()
            if isinstance(module, torch.nn.Linear) and any(fnmatch.fnmatchcase(name, p) for p in patterns)
        ]
        if not layers:
            raise ValueError(f"no UNet module matches the cross-attention patterns {list(patterns)}")
        logger.info("%d cross-attention projections match %s", len(layers), list(patterns))
        return layers

    def lora_modules(self, patterns: Sequence[str]) -> list[str]:
        """UNet Linear module names (unqualified) matching any fnmatch pattern, sorted; ``ValueError`` for none.

        Patterns are explicit module names, never shape tests, so the same patterns pick the same roles in SD 1.x,
        2.x and SDXL; how many matched is logged so a pattern that reaches fewer layers than meant is visible.
        """
        patterns = list(patterns)
        names = sorted(
            name
            for name, module in self.unet.named_modules()
            if isinstance(module, torch.nn.Linear) and any(fnmatch.fnmatchcase(name, p) for p in patterns)
        )
        if not names:
            raise ValueError(f"no UNet Linear module matches the LoRA target patterns {patterns}")
        logger.info("%d UNet Linear modules match the LoRA targets %s", len(names), patterns)
        return names

    @contextlib.contextmanager
    def lora_adapters(
        self,
        patterns: Sequence[str],
        rank: int,
        alpha: float,
        *,
        generator: torch.Generator,
        adapter_name: str = "erase",
    ) -> Iterator[LoraAdapters]:
        """Trainable peft LoRA adapters on the matching UNet Linear modules, in place, for the ``with`` block.

        A is drawn from ``generator`` (peft's own Kaiming-uniform bound, 1/sqrt(in_features), so the start is a
        function of the seed alone) and B is zero, so the adapted model starts equal to the base. Afterwards the
        adapters are removed (also on error): the original Linear modules are put back, with their weights
        bit-identical (peft never writes them unless merged, which this never does) and their ``requires_grad``
        flags as they were.
        """
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.tuners_utils import BaseTunerLayer

        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        unet = self.unet
        if getattr(unet, "peft_config", None) or any(isinstance(m, BaseTunerLayer) for m in unet.modules()):
            raise ValueError("the UNet already holds peft adapters (a loaded LoRA?): erase from the plain base model")
        names = self.lora_modules(patterns)
        requires_grad = {name: p.requires_grad for name, p in unet.named_parameters()}
        had_config = hasattr(unet, "peft_config")
        config = LoraConfig(
            r=rank, lora_alpha=alpha, target_modules=names, lora_dropout=0.0, bias="none", init_lora_weights=True
        )
        try:
            inject_adapter_in_model(config, unet, adapter_name)
            adapters = LoraAdapters(unet, names, adapter_name)
            with torch.no_grad():
                for layer in adapters._layers.values():
                    weight = layer.lora_A[adapter_name].weight
                    bound = 1.0 / weight.shape[1] ** 0.5
                    draw = torch.rand(weight.shape, generator=generator, dtype=torch.float32) * 2 * bound - bound
                    weight.copy_(draw.to(weight.device, weight.dtype))
                    layer.lora_B[adapter_name].weight.zero_()
            yield adapters
        finally:
            for name in names:
                module = unet.get_submodule(name)
                if isinstance(module, BaseTunerLayer):
                    parent, _, child = name.rpartition(".")
                    setattr(unet.get_submodule(parent) if parent else unet, child, module.get_base_layer())
            if not had_config and hasattr(unet, "peft_config"):
                del unet.peft_config
            for name, param in unet.named_parameters():
                param.requires_grad_(requires_grad.get(name, param.requires_grad))

    @torch.no_grad()
    def sample_trajectories(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        *,
        steps: int = DEFAULT_STEPS,
        guidance: float = DEFAULT_GUIDANCE,
        batch_size: int = 8,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every UNet input of the sampler's run on each (prompt, seed): ``(latents, timesteps)``.

        ``latents`` is ``(len(prompts), K, C, h, w)`` float32 on the CPU and ``timesteps`` ``(K,)``, K being the UNet
        calls of one run (``steps`` for single-evaluation samplers). The inputs are recorded exactly as the UNet
        received them (after the scheduler's input scaling, one copy of classifier-free guidance's doubled batch),
        by a forward pre-hook that is removed afterwards: the step callback sees latents after the scheduler step,
        whose scaling into the next UNet input is scheduler-specific.
        """
        prompts = list(prompts)
        calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        count = {"n": 0}

        def hook(_module, args, kwargs):  # noqa: ANN001, ANN202 - torch's forward pre-hook signature
            sample = args[0] if args else kwargs["sample"]
            timestep = args[1] if len(args) > 1 else kwargs["timestep"]
            n = count["n"]
            calls.append((sample[:n].detach().float().cpu(), torch.as_tensor(timestep).detach().float().cpu()))

        handle = self.unet.register_forward_pre_hook(hook, with_kwargs=True)
        latents, timesteps = [], None
        try:
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start : start + batch_size]
                count["n"], calls = len(chunk), []
                self.generate(chunk, seeds[start : start + batch_size], steps=steps, guidance=guidance,
                              batch_size=batch_size, progress=False)  # fmt: skip
                latents.append(torch.stack([x for x, _ in calls], dim=1))
                found = torch.stack([t.reshape(-1)[0] for _, t in calls])
                if timesteps is not None and not torch.equal(found, timesteps):
                    raise RuntimeError("the sampler's timesteps differ between batches")
                timesteps = found
        finally:
            handle.remove()
        return torch.cat(latents), timesteps

    def module(self, name: str) -> torch.nn.Module:
        """A module by qualified name, ``"<component>.<path>"``, e.g. ``"unet.mid_block.attentions.0"``."""
        component, _, path = name.partition(".")
        modules = self.components()
        if component not in modules:
            raise KeyError(f"no pipeline component {component!r} (have {sorted(modules)})")
        try:
            return modules[component].get_submodule(path) if path else modules[component]
        except AttributeError as err:
            raise KeyError(f"no module {name!r} in the pipeline") from err

    def fingerprint(self, module_names: Sequence[str], precision: torch.dtype = torch.float32) -> str:
        """sha256 over the float32 weights of the named modules (qualified names), in sorted order.

        ``precision`` rounds the weights to that dtype first: a float32 pipeline's float16 fingerprint equals the
        plain fingerprint of the same weights loaded in float16 (diffusers' ``torch_dtype`` casts the same way).
        """
        digest = hashlib.sha256()
        for name in sorted(module_names):
            for pname, param in sorted(self.module(name).state_dict().items()):
                digest.update(f"{name}.{pname}".encode())
                rounded = param.detach().to("cpu").to(precision).to(torch.float32)
                digest.update(rounded.contiguous().numpy().tobytes())
        return digest.hexdigest()

    def weight_norms(self, module_names: Sequence[str]) -> dict[str, float]:
        """Frobenius norm of each named module's weight, in float64."""
        return {name: float(self.module(name).weight.detach().double().norm()) for name in sorted(module_names)}

    def parameter_norm(self, name: str) -> float:
        """Frobenius norm of all of a module's parameters together (a whole component), in float64."""
        return float(sum(p.detach().double().pow(2).sum() for p in self.module(name).parameters()) ** 0.5)

    # ------------------------------------------------------------------ prompts
    def token_count(self, prompt: str) -> int:
        """Tokens of ``prompt`` without BOS/EOS, untruncated."""
        return len(self.pipe.tokenizer(prompt, add_special_tokens=False, truncation=False)["input_ids"])

    def check_prompt(self, prompt: str, what: str = "prompt") -> str:
        """Return ``prompt`` stripped, or raise ``ValueError`` if it is empty or longer than the text encoder reads."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{what} is empty")
        n = self.token_count(prompt.strip())
        if n > self.max_prompt_tokens:
            raise ValueError(
                f"{what} {prompt[:40]!r}... has {n} tokens; the text encoder reads {self.max_prompt_tokens}"
            )
        return prompt.strip()

    def phrase_positions(self, prompt: str, phrase: str) -> list[int]:
        """Token positions (BOS = 0) that ``phrase`` occupies inside ``prompt``; its last occurrence wins."""
        ids = self.pipe.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        sub = self.pipe.tokenizer(phrase, add_special_tokens=False)["input_ids"]
        for start in range(len(ids) - len(sub), -1, -1):
            if ids[start : start + len(sub)] == sub:
                return [1 + start + i for i in range(len(sub))]
        raise ValueError(f"phrase {phrase!r} does not occur in prompt {prompt!r}")

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> PromptEncoding:
        """Per-token text embeddings exactly as the pipeline computes them for generation."""
        prompts = list(prompts)
        tok = self.pipe.tokenizer(
            prompts, padding="max_length", max_length=self.pipe.tokenizer.model_max_length, truncation=True
        )
        input_ids = torch.tensor(tok["input_ids"])
        lengths = torch.tensor([sum(m) for m in tok["attention_mask"]])
        if self.is_sdxl:
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
        else:
            embeds, _ = self.pipe.encode_prompt(
                prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
            pooled = None
        return PromptEncoding(prompts, input_ids, embeds, lengths, pooled)

    def encode_with_vectors(self, templates: Sequence[str], vectors: torch.Tensor) -> PromptEncoding:
        """Text embeddings of prompts in which free input-embedding vectors stand for words, differentiably.

        Each template holds ``{}`` exactly once; its prompt is BOS + tokens(text before ``{}``) + k slots +
        tokens(text after) + EOS + padding, and the slots' *input token embeddings* (the text encoder's
        ``get_input_embeddings()`` output, before position embeddings) are ``vectors``: ``(k, width)`` for every
        template alike or ``(len(templates), k, width)`` one set per template. Everything else is what
        :meth:`encode_prompts` computes for ordinary text, so a slot holding a real token's row of
        :meth:`token_embedding_matrix` gives that token's encoding. Gradients flow to ``vectors`` (the method runs
        under the caller's grad mode). The vectors enter through a forward hook on the input-embedding module,
        removed before returning; ``input_ids`` holds BOS's id at the slots, a placeholder the hook overwrites.

        ``ValueError`` when a template lacks ``{}`` or has it twice, or when a prompt would be longer than the text
        encoder reads; ``NotImplementedError`` on SDXL (two encoders, two input embeddings).
        """
        if self.is_sdxl:
            raise NotImplementedError("encode_with_vectors: free token vectors are SD 1.x/2.x only, not on SDXL yet")
        templates = list(templates)
        if not templates:
            raise ValueError("encode_with_vectors needs at least one template")
        tokenizer, encoder = self.pipe.tokenizer, self.pipe.text_encoder
        embedding = encoder.get_input_embeddings()
        width = embedding.embedding_dim
        if vectors.dim() == 2:
            vectors = vectors.unsqueeze(0).expand(len(templates), -1, -1)
        if vectors.dim() != 3 or vectors.shape[0] != len(templates) or vectors.shape[2] != width:
            raise ValueError(f"vectors must be (k, {width}) or (templates, k, {width}), got {tuple(vectors.shape)}")
        k, length = vectors.shape[1], tokenizer.model_max_length
        if k < 1:
            raise ValueError("vectors hold no slot (k = 0)")
        rows, starts, lengths = [], [], []
        for template in templates:
            if template.count("{}") != 1:
                raise ValueError(f"template {template!r} must contain '{{}}' exactly once")
            before, after = template.split("{}")
            ids_before = tokenizer(before, add_special_tokens=False)["input_ids"] if before.strip() else []
            ids_after = tokenizer(after, add_special_tokens=False)["input_ids"] if after.strip() else []
            ids = [tokenizer.bos_token_id, *ids_before, *[tokenizer.bos_token_id] * k, *ids_after]
            ids.append(tokenizer.eos_token_id)
            if len(ids) > length:
                raise ValueError(f"template {template[:40]!r} with {k} vector(s) has {len(ids) - 2} tokens; the text "
                                 f"encoder reads {length - 2}")  # fmt: skip
            starts.append(1 + len(ids_before))
            lengths.append(len(ids))
            rows.append(ids + [tokenizer.pad_token_id] * (length - len(ids)))
        input_ids = torch.tensor(rows)
        slots = torch.tensor(starts).unsqueeze(1) + torch.arange(k)  # (batch, k) positions of the vectors

        def insert(_module, _inputs, output):  # noqa: ANN001, ANN202 - torch's forward hook signature
            index = slots.to(output.device).unsqueeze(-1).expand(-1, -1, output.shape[-1])
            return output.scatter(1, index, vectors.to(output.device, output.dtype))

        mask = None  # as the pipeline's encode_prompt: a mask only for encoders configured to take one
        if getattr(encoder.config, "use_attention_mask", False):
            mask = (torch.arange(length) < torch.tensor(lengths).unsqueeze(1)).long().to(self.device)
        handle = embedding.register_forward_hook(insert)
        try:
            embeds = encoder(input_ids.to(self.device), attention_mask=mask)[0]
        finally:
            handle.remove()
        names = [t.replace("{}", " ".join(f"<v{i}>" for i in range(k))) for t in templates]
        return PromptEncoding(names, input_ids, embeds.to(encoder.dtype), torch.tensor(lengths))

    def token_embedding_matrix(self) -> torch.Tensor:
        """The text encoder's input token embeddings, ``(vocab, width)``, detached (shares the weight's storage:
        read it, do not write it). Row ``i`` is what token id ``i`` puts into :meth:`encode_with_vectors`' slots."""
        if self.is_sdxl:
            raise NotImplementedError("token_embedding_matrix: SD 1.x/2.x only, not on SDXL yet")
        return self.pipe.text_encoder.get_input_embeddings().weight.detach()

    def special_token_ids(self) -> set[int]:
        """The tokenizer's special token ids (start, end, padding, unknown)."""
        tokenizer = self.pipe.tokenizer
        return {int(i) for i in tokenizer.convert_tokens_to_ids(list(tokenizer.special_tokens_map.values()))
                if i is not None}  # fmt: skip

    def decode_tokens(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of token ids (special tokens dropped), as the tokenizer writes it back."""
        ids = [int(i) for i in (ids.reshape(-1).tolist() if isinstance(ids, torch.Tensor) else ids)]
        return self.pipe.tokenizer.decode(ids, skip_special_tokens=True).strip()

    # ------------------------------------------------------------------ denoising
    def _added_conditions(self, encoding: PromptEncoding, batch: int) -> dict[str, torch.Tensor] | None:
        if not self.is_sdxl:
            return None
        size = self.image_size
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], device=self.device, dtype=self.dtype)
        return {"text_embeds": encoding.pooled, "time_ids": time_ids.repeat(batch, 1)}

    def noise_prediction(
        self, latents: torch.Tensor, timestep: torch.Tensor | int, encoding: PromptEncoding
    ) -> torch.Tensor:
        """The UNet's noise prediction eps(latents, t, text) for a batch (no classifier-free guidance)."""
        self._direct_unet_calls += 1
        try:
            return self.unet(
                latents,
                timestep,
                encoder_hidden_states=encoding.embeddings.to(latents.dtype),
                added_cond_kwargs=self._added_conditions(encoding, latents.shape[0]),
            ).sample
        finally:
            self._direct_unet_calls -= 1

    def initial_latents(self, seed: int, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """The starting noise for one image, a function of the seed alone (drawn on the CPU for portability)."""
        return self._draw_latents(torch.Generator("cpu").manual_seed(int(seed)), height, width)

    def _draw_latents(self, generator: torch.Generator, height: int | None, width: int | None) -> torch.Tensor:
        height, width = height or self.image_size, width or self.image_size
        shape = (
            1,
            self.unet.config.in_channels,
            height // self.pipe.vae_scale_factor,
            width // self.pipe.vae_scale_factor,
        )
        return torch.randn(shape, generator=generator, dtype=torch.float32)

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str] | PromptEncoding,
        seeds: Sequence[int],
        *,
        steps: int = DEFAULT_STEPS,
        guidance: float = DEFAULT_GUIDANCE,
        batch_size: int = 8,
        negative_prompt: str = "",
        height: int | None = None,
        width: int | None = None,
        progress: bool = True,
        callback_on_step_end: Callable | None = None,
        eta: float | None = None,
    ) -> list[Image.Image]:
        """Images for (prompt, seed) pairs; the same pair gives the same image whatever else is in the batch.

        Each image's starting noise comes from its own seed, and so does the noise a stochastic sampler (the micro
        model's SDE-DPM-Solver++, Euler ancestral) adds at each step: one CPU generator per image, seeded with its
        seed, draws the starting noise and then the step noise, as ``pipe(prompt, generator=torch.Generator("cpu")
        .manual_seed(seed))`` would. Batching only changes floating-point summation order.

        ``prompts`` may also be a :class:`PromptEncoding`: its embeddings then condition the images as they are
        (diffusers' ``prompt_embeds``), which is how an attack feeds adversarial embeddings. ``eta`` samples with
        DDIM at that noise level instead of the pipeline's own sampler (0: deterministic DDIM, 1: as much noise as
        DDPM's ancestral sampler), for every model alike.
        """
        encoded = isinstance(prompts, PromptEncoding)
        count = len(prompts.prompts) if encoded else len(prompts)
        seeds = [int(s) for s in seeds]
        if count != len(seeds):
            raise ValueError(f"{count} prompts but {len(seeds)} seeds")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if eta is not None and not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1] (DDIM's noise level), got {eta}")
        self.check_sampler_steps(steps)
        images: list[Image.Image] = []
        batches = range(0, count, batch_size)
        with self._sampler(eta) as sampler_kwargs:
            for start in tqdm(batches, desc="generating", unit="batch", disable=not progress or len(batches) < 2):
                rows = range(start, min(start + batch_size, count))
                generators = [torch.Generator("cpu").manual_seed(seeds[i]) for i in rows]
                latents = torch.cat([self._draw_latents(g, height, width) for g in generators])
                result = self.pipe(
                    **self._condition(prompts, rows),
                    negative_prompt=[negative_prompt] * len(rows),
                    latents=latents.to(self.device, self.dtype),
                    generator=generators,
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    height=height or self.image_size,
                    width=width or self.image_size,
                    output_type="np",
                    callback_on_step_end=callback_on_step_end,
                    **sampler_kwargs,
                )
                images.extend(
                    Image.fromarray((np.clip(a, 0, 1) * 255).round().astype(np.uint8)) for a in result.images
                )
        return images

    def _condition(self, prompts: Sequence[str] | PromptEncoding, rows: range) -> dict[str, object]:
        """The pipeline's conditioning arguments for some rows: prompts as text, or their embeddings."""
        if not isinstance(prompts, PromptEncoding):
            return {"prompt": [prompts[i] for i in rows]}
        chunk = prompts.select(list(rows))
        condition = {"prompt_embeds": chunk.embeddings.to(self.device, self.dtype)}
        if self.is_sdxl:
            condition["pooled_prompt_embeds"] = chunk.pooled.to(self.device, self.dtype)
        return condition

    @contextlib.contextmanager
    def _sampler(self, eta: float | None) -> Iterator[dict[str, float]]:
        """The pipeline's own sampler (``eta is None``), or DDIM with noise level ``eta`` for the block: the
        scheduler is swapped as diffusers documents (``pipe.scheduler = DDIMScheduler.from_config(...)``) and put
        back afterwards."""
        if eta is None:
            yield {}
            return
        original = self.pipe.scheduler
        self.pipe.scheduler = DDIMScheduler.from_config(original.config)
        try:
            yield {"eta": float(eta)}
        finally:
            self.pipe.scheduler = original

    def check_sampler_steps(self, steps: int) -> None:
        """``ValueError`` in one line when the pipeline's sampler cannot run ``steps`` steps (PNDM, SD 1.x's own
        sampler, needs at least 4), instead of the scheduler's numpy error in the middle of a run."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"sampling steps must be an integer >= 1, got {steps!r}")
        scheduler = copy.deepcopy(self.pipe.scheduler)
        try:
            scheduler.set_timesteps(steps)
        except (ValueError, IndexError) as err:
            name = type(scheduler).__name__
            raise ValueError(f"the model's sampler ({name}) cannot run {steps} steps: {err}; use more steps") from None

    # ------------------------------------------------------------------ weight edits
    @torch.no_grad()
    def apply_weight_deltas(self, deltas: dict[str, torch.Tensor], scale: float = 1.0) -> None:
        """In place: ``W <- W + scale * dW`` for each Linear named (qualified) in ``deltas``.

        All or nothing: every module and shape is checked before the first weight changes.
        """
        weights = {name: self.module(name).weight for name in deltas}
        for name, delta in deltas.items():
            if weights[name].shape != delta.shape:
                raise ValueError(
                    f"{name}: weight change of shape {tuple(delta.shape)} for weight {tuple(weights[name].shape)}"
                )
        for name, delta in deltas.items():
            weights[name].add_(delta.to(weights[name].device, weights[name].dtype), alpha=scale)

    @contextlib.contextmanager
    def weight_deltas(self, deltas: dict[str, torch.Tensor]) -> Iterator[None]:
        """Apply weight changes for the ``with`` block and restore the exact original weights afterwards."""
        originals = {name: self.module(name).weight.detach().clone() for name in deltas}
        try:
            self.apply_weight_deltas(deltas)
            yield
        finally:
            with torch.no_grad():
                for name, weight in originals.items():
                    self.module(name).weight.copy_(weight)

    def save_lora_weights(self, folder: str | Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Save ``dW = B @ A`` per module as a diffusers LoRA that ``pipe.load_lora_weights(folder)`` reproduces.

        ``factors`` maps a qualified Linear name to ``(A, B)`` with A: (rank, in) and B: (out, rank). Alpha equals
        the rank so the LoRA scale is exactly 1; ranks may differ per module (peft's ``rank_pattern``).
        """
        by_component: dict[str, dict[str, torch.Tensor]] = {}
        ranks: dict[str, dict[str, int]] = {}
        for name, (lora_a, lora_b) in factors.items():
            component, _, path = name.partition(".")
            if component not in ("unet", "text_encoder", "text_encoder_2"):
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
        type(self.pipe).save_lora_weights(str(folder), safe_serialization=True, **kwargs)

    def export_pipeline(self, folder: str | Path) -> None:
        """A complete diffusers folder of the pipeline as it is now (edits included)."""
        self.pipe.save_pretrained(str(folder), safe_serialization=True)

    # ------------------------------------------------------------------ hooks
    def hook_point(self, name: str) -> torch.nn.Module:
        """The module a hook point names, validated: a text encoder's layer or a UNet transformer block.

        Hook points are qualified module names matching ``HOOK_POINT_PATTERNS`` (a text-encoder layer's output is
        the residual stream after that layer; a transformer block's output is its hidden states, ``(B, C, H, W)``).
        ``ValueError`` in one line names the hook points this pipeline has when ``name`` is not one of them.
        """
        points = self.hook_points()
        if name not in points:
            sample = ", ".join(points[:2] + points[-2:])
            raise ValueError(f"{name!r} is not a hook point of this pipeline; it has {len(points)}, e.g. {sample}")
        return self.module(name)

    def hook_width(self, name: str) -> int:
        """The width of a hook point's activations (features per token)."""
        module = self.hook_point(name)
        if name.startswith("unet."):
            return int(module.config.in_channels)  # a transformer block's output has its input's channels
        return int(self.module(name.partition(".")[0]).config.hidden_size)

    def hook_points(self) -> list[str]:
        """Every hook point of the pipeline: text-encoder layers and UNet transformer blocks, by qualified name."""
        points = []
        for component, module in self.components().items():
            for path, _ in module.named_modules():
                name = f"{component}.{path}"
                if any(fnmatch.fnmatchcase(name, p) for p in HOOK_POINT_PATTERNS):
                    points.append(name)
        return points

    @torch.no_grad()
    def text_activations(self, hook: str, prompts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """The residual stream at a text-encoder hook point, ``(len(prompts), tokens, width)`` float32 on the CPU,
        for the prompts exactly as generation encodes them (padded to the encoder's full length)."""
        if not hook.startswith("text_encoder"):
            raise ValueError(f"{hook!r} is not a text-encoder hook point")
        self.hook_point(hook)
        prompts, chunks = list(prompts), []
        for start in range(0, len(prompts), batch_size):
            with self.capture([hook]) as got:
                self.encode_prompts(prompts[start : start + batch_size])
            chunks.append(got[hook][0].float().cpu())
        return torch.cat(chunks)

    @torch.no_grad()
    def unet_activations(
        self,
        hook: str,
        prompts: Sequence[str],
        seeds: Sequence[int],
        *,
        steps: int = DEFAULT_STEPS,
        guidance: float = DEFAULT_GUIDANCE,
        batch_size: int = 8,
        progress: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A UNet hook point's output at every sampling step of each (prompt, seed), conditional half only.

        Returns ``(activations, timesteps)``: ``(len(prompts), K, H*W, C)`` float32 on the CPU (each spatial position
        a token) and the ``(K,)`` timesteps of the K UNet calls. Classifier-free guidance runs the unconditional and
        the conditional batch together (``[uncond, cond]``, as diffusers' pipelines concatenate them); only the
        conditional half is kept.
        """
        if not hook.startswith("unet."):
            raise ValueError(f"{hook!r} is not a UNet hook point")
        module = self.hook_point(hook)
        prompts = list(prompts)
        calls: list[torch.Tensor] = []
        times: list[torch.Tensor] = []
        count = {"n": 0}

        def record_timestep(_module, args, kwargs):  # noqa: ANN001, ANN202 - torch's forward pre-hook signature
            timestep = args[1] if len(args) > 1 else kwargs["timestep"]
            times.append(torch.as_tensor(timestep).detach().float().cpu().reshape(-1)[0])

        def record_output(_module, _inputs, output):  # noqa: ANN001, ANN202 - torch's forward hook signature
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = hidden[-count["n"] :]  # the conditional half ([uncond, cond]), or all without guidance
            calls.append(hidden.detach().float().cpu().flatten(2).transpose(1, 2))

        handles = [
            self.unet.register_forward_pre_hook(record_timestep, with_kwargs=True),
            module.register_forward_hook(record_output),
        ]
        activations, timesteps = [], None
        try:
            batches = range(0, len(prompts), batch_size)
            for start in tqdm(batches, desc="activations", unit="batch", disable=not progress):
                chunk = prompts[start : start + batch_size]
                count["n"], calls[:], times[:] = len(chunk), [], []
                self.generate(chunk, seeds[start : start + batch_size], steps=steps, guidance=guidance,
                              batch_size=batch_size, progress=False)  # fmt: skip
                activations.append(torch.stack(calls, dim=1))
                found = torch.stack(times)
                if timesteps is not None and not torch.equal(found, timesteps):
                    raise RuntimeError("the sampler's timesteps differ between batches")
                timesteps = found
        finally:
            for handle in handles:
                handle.remove()
        return torch.cat(activations), timesteps

    def add_output_edit(
        self, name: str, edit: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
    ) -> HookHandles:
        """Replace a hook point's output by ``edit(tokens, timestep)`` until the returned handle is removed.

        ``tokens`` is the output as ``(batch, tokens, width)``: a text encoder's as it is, a transformer block's
        ``(B, C, H, W)`` with each spatial position a token (both halves of classifier-free guidance's batch), and
        the edit returns the same shape. ``timestep`` is the UNet's current timestep for a UNet hook point
        (recorded by a forward pre-hook on the UNet) and ``None`` for a text-encoder one. Forward hooks only: the
        pipeline's classes are left untouched.
        """
        module = self.hook_point(name)
        state: dict[str, torch.Tensor | None] = {"t": None}
        handles = []

        def record_timestep(_module, args, kwargs):  # noqa: ANN001, ANN202 - torch's forward pre-hook signature
            timestep = args[1] if len(args) > 1 else kwargs["timestep"]
            state["t"] = torch.as_tensor(timestep).detach().reshape(-1)[0].cpu()

        def as_tokens(hidden: torch.Tensor) -> torch.Tensor:
            edited = edit(hidden.flatten(2).transpose(1, 2) if hidden.dim() == 4 else hidden, state["t"])
            if hidden.dim() == 4:
                edited = edited.transpose(1, 2).reshape(hidden.shape)
            return edited

        def apply(_module, _inputs, output):  # noqa: ANN001, ANN202 - torch's forward hook signature
            if isinstance(output, tuple):
                return (as_tokens(output[0]), *output[1:])
            return as_tokens(output)

        try:
            if name.startswith("unet."):
                handles.append(self.unet.register_forward_pre_hook(record_timestep, with_kwargs=True))
            handles.append(module.register_forward_hook(apply))
        except BaseException:
            for handle in handles:
                handle.remove()
            raise
        return HookHandles(handles)

    def guidance_halves(self) -> bool:
        """Whether the UNet's batch now is classifier-free guidance's [unconditional; conditional] halves: inside a
        pipeline call that guides (diffusers' ``do_classifier_free_guidance``), not in ``noise_prediction``."""
        if self._direct_unet_calls:
            return False
        try:
            return bool(self.pipe.do_classifier_free_guidance)
        except AttributeError:  # no pipeline call yet: the property reads the call's guidance scale
            return False

    def add_prompt_scaled_lora(
        self,
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
        scale_of: Callable[[torch.Tensor, list[torch.Tensor | None]], torch.Tensor],
    ) -> HookHandles:
        """Add a low-rank change to named Linears, its strength set per prompt, until the handle is removed.

        Each Linear ``W`` in ``factors`` (name -> ``(A, B)``) computes ``W x + s B A x``, with ``s`` the strength of
        the prompt that conditions the image: ``scale_of(embeddings, token_ids)`` on the conditional prompts of the
        UNet's batch (``(n, tokens, width)`` text embeddings as the UNet receives them, and each prompt's token ids
        where the text encoder made that embedding in this process, else ``None``, e.g. an embedding passed in
        directly) returns ``(n,)`` strengths, or ``(n, G)``: then the rank is G equal blocks (adapters added
        together), ``B_g A_g`` scaled by the prompt's strength g. Under classifier-free guidance the unconditional
        half takes the strength of its conditional partner, so a prompt's whole guided prediction is scaled as one.
        Hooks only: a UNet forward pre-hook computes the strengths, forward hooks on the Linears add the change; the
        text encoder's forward hook remembers which token ids made which embedding. Linears inside transformer
        blocks only (their inputs are batch-first).
        """
        import hashlib
        from collections import OrderedDict

        modules = {name: self.module(name) for name in factors}
        for name, module in modules.items():
            if not isinstance(module, torch.nn.Linear):
                raise ValueError(f"{name} is a {type(module).__name__}, not a Linear")
            lora_a, lora_b = factors[name]
            if lora_a.shape[1] != module.in_features or lora_b.shape[0] != module.out_features:
                raise ValueError(f"the change of {name} does not fit its weight {tuple(module.weight.shape)}")
        token_ids: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        state: dict[str, torch.Tensor | None] = {"scale": None}

        def digest(row: torch.Tensor) -> bytes:
            return hashlib.sha1(row.detach().float().cpu().contiguous().numpy().tobytes()).digest()

        def remember_tokens(_module, args, kwargs, output):  # noqa: ANN001, ANN202 - torch's forward hook signature
            ids = args[0] if args else kwargs.get("input_ids")
            hidden = output[0]
            if ids is None or hidden.dim() != 3:
                return
            for row_ids, row in zip(ids, hidden, strict=True):
                token_ids[digest(row)] = row_ids.detach().cpu()
                if len(token_ids) > 4096:
                    token_ids.popitem(last=False)

        def set_strengths(_module, args, kwargs):  # noqa: ANN001, ANN202 - torch's forward pre-hook signature
            text = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[2]
            halves = self.guidance_halves() and text.shape[0] % 2 == 0
            conditional = text[text.shape[0] // 2 :] if halves else text
            strengths = scale_of(conditional.float(), [token_ids.get(digest(row)) for row in conditional])
            strengths = strengths.reshape(conditional.shape[0], -1).float()  # (prompts, groups)
            state["scale"] = torch.cat([strengths, strengths]) if halves else strengths

        def add_change(name: str):  # noqa: ANN202
            lora_a, lora_b = factors[name]

            def hook(_module, inputs, output):  # noqa: ANN001, ANN202 - torch's forward hook signature
                scale = state["scale"]
                if scale is None or output.shape[0] != scale.shape[0] or lora_a.shape[0] % scale.shape[1]:
                    raise RuntimeError(f"{name}: no per-prompt strength for a batch of {tuple(output.shape)}")
                a, b = lora_a.to(output.device, output.dtype), lora_b.to(output.device, output.dtype)
                hidden = torch.nn.functional.linear(inputs[0], a)  # (rows, ..., rank)
                scale = scale.to(output.device, output.dtype).repeat_interleave(a.shape[0] // scale.shape[1], dim=1)
                hidden = hidden * scale.view(scale.shape[0], *[1] * (hidden.dim() - 2), scale.shape[1])
                return output + torch.nn.functional.linear(hidden, b)

            return hook

        handles = []
        try:
            handles.append(self.unet.register_forward_pre_hook(set_strengths, with_kwargs=True))
            if getattr(self.pipe, "text_encoder", None) is not None:
                handles.append(self.pipe.text_encoder.register_forward_hook(remember_tokens, with_kwargs=True))
            for name, module in modules.items():
                handles.append(module.register_forward_hook(add_change(name)))
        except BaseException:
            for handle in handles:
                handle.remove()
            raise
        return HookHandles(handles)

    @contextlib.contextmanager
    def capture(self, module_names: Sequence[str]) -> Iterator[dict[str, list[torch.Tensor]]]:
        """Record the outputs of the named modules (qualified names) during the ``with`` block."""
        captured: dict[str, list[torch.Tensor]] = {name: [] for name in module_names}
        handles = []
        try:
            for name in module_names:

                def hook(_module, _inputs, output, name=name):
                    captured[name].append((output[0] if isinstance(output, tuple) else output).detach())

                handles.append(self.module(name).register_forward_hook(hook))
            yield captured
        finally:
            for handle in handles:
                handle.remove()

    @contextlib.contextmanager
    def intervene(self, edits: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> Iterator[None]:
        """Replace the outputs of the named modules by ``edit(output)`` during the ``with`` block."""
        handles = []
        try:
            for name, edit in edits.items():

                def hook(_module, _inputs, output, edit=edit):
                    if isinstance(output, tuple):
                        return (edit(output[0]), *output[1:])
                    return edit(output)

                handles.append(self.module(name).register_forward_hook(hook))
            yield
        finally:
            for handle in handles:
                handle.remove()


class HookHandles:
    """The hooks of one intervention: ``remove()`` takes them all off (also as a context manager's exit)."""

    def __init__(self, handles: Sequence[torch.utils.hooks.RemovableHandle]) -> None:
        self._handles = list(handles)
        #: called once, after the hooks are off (e.g. to forget a record of the attachment)
        self.on_remove: list[Callable[[], None]] = []

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()
        while self.on_remove:
            self.on_remove.pop()()

    def __enter__(self) -> HookHandles:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.remove()
