"""The shared diffusion pipeline wrapper: :class:`PipelineWrapper`, the one object methods and evaluations ask.

It serves SD 1.x/2.x (noise or v-prediction), SDXL, SD3 and Flux (MMDiT transformers, flow matching). What differs
between them (the denoiser, its inputs and what it predicts, the text encoders, the layers that read text) is answered
here, so methods and evaluations stay architecture-blind where the mathematics allows and ask
:attr:`PipelineWrapper.architecture` / :attr:`PipelineWrapper.prediction_type` where it does not.

It is the only code that knows diffusers' internals, and it keeps them in modules by concern; this facade holds the
pipeline and answers every question through them:

* :mod:`pipelines.loading`: which model a name means, and loading it;
* :mod:`pipelines.modules`: modules by qualified name, layers picked by name patterns;
* :mod:`pipelines.text`: prompts into text embeddings;
* :mod:`pipelines.sampling`: denoiser predictions and sampling;
* :mod:`pipelines.weights`: weight edits, LoRA adapters, fingerprints, export;
* :mod:`pipelines.hooks`: hook points, activations, output edits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from . import hooks, loading, modules, original_names, sampling, text, weights
from .hooks import HookHandles
from .modules import CrossAttentionLayer, Pipeline
from .text import PromptEncoding
from .weights import LoraAdapters

__all__ = ["PipelineWrapper", "load_pipeline", "wrap_pipeline"]


def load_pipeline(
    model: str = "micro",
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> PipelineWrapper:
    """Load a diffusion pipeline (SD 1.x/2.x, SDXL, SD3, Flux) and wrap it.

    Args:
        model: ``"micro"`` (the embedded default), a tiny pipeline's name (``pipelines.tiny.TINY_MODELS``: small
            random pipelines built in code, for tests), a local diffusers folder, or a hub id such as
            ``"CompVis/stable-diffusion-v1-4"``.
        device, dtype: where and in what precision the pipeline runs.
        seed: initialises the random tiny pipelines; ignored for trained models.
    """
    pipe, model_id = loading.load_diffusers_pipeline(model, device=device, dtype=dtype, seed=seed)
    return PipelineWrapper(pipe, model_id=model_id)


def wrap_pipeline(pipe: object, model_id: str | None = None) -> PipelineWrapper:
    """Wrap a pipeline object a user built with plain diffusers; ``TypeError`` for anything but SD 1.x/2.x, SDXL,
    SD3 or Flux."""
    if not isinstance(pipe, Pipeline):
        raise TypeError(
            "expected a StableDiffusionPipeline, StableDiffusionXLPipeline, StableDiffusion3Pipeline or FluxPipeline, "
            f"got {type(pipe).__name__}"
        )
    return PipelineWrapper(pipe, model_id=loading.pipeline_name(pipe, model_id))


class PipelineWrapper:
    """A diffusion pipeline with the operations erasure methods and evaluations need.

    Each operation is a function of the pipeline in the module of its concern (see the module docstring); the
    wrapper adds the one piece of state they share: whether the denoiser is being called by :meth:`noise_prediction`
    (a plain batch) rather than inside a guided pipeline call (:meth:`guidance_halves`).
    """

    def __init__(self, pipe: Pipeline, model_id: str) -> None:
        self.pipe = pipe
        self.model_id = model_id
        self._direct_unet_calls = 0  # > 0 while noise_prediction calls the UNet itself (no guidance halves)

    # ------------------------------------------------------------------ what the pipeline is
    @property
    def is_sdxl(self) -> bool:
        return modules.is_sdxl(self.pipe)

    @property
    def architecture(self) -> str:
        """``"sd"`` (1.x/2.x), ``"sdxl"``, ``"sd3"`` or ``"flux"`` (``modules.ARCHITECTURES``)."""
        return modules.architecture(self.pipe)

    @property
    def prediction_type(self) -> str:
        """What :meth:`noise_prediction` returns: ``"epsilon"``, ``"v_prediction"`` or ``"flow"`` (velocity)."""
        return sampling.prediction_type(self.pipe)

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser.dtype

    @property
    def denoiser(self) -> torch.nn.Module:
        """The UNet (SD 1.x/2.x, SDXL) or the transformer (SD3, Flux)."""
        return modules.denoiser(self.pipe)

    @property
    def denoiser_name(self) -> str:
        """The denoiser's component name, the first part of its modules' qualified names: ``"unet"`` or
        ``"transformer"``."""
        return modules.denoiser_name(self.pipe)

    @property
    def unet(self) -> torch.nn.Module:
        """The UNet; ``TypeError`` on SD3 and Flux, whose denoiser is a transformer (:attr:`denoiser`)."""
        if modules.is_transformer(self.pipe):
            raise TypeError(f"a {self.architecture} pipeline has a transformer, not a UNet")
        return self.pipe.unet

    @property
    def world_file(self) -> Path | None:
        """The micro world's description when this model was trained on it (see :func:`loading.world_file`)."""
        return loading.world_file(self.model_id)

    @property
    def max_prompt_tokens(self) -> int:
        """Tokens a prompt may have, BOS and EOS excluded."""
        return text.max_prompt_tokens(self.pipe)

    @property
    def text_length(self) -> int:
        """Rows of token embeddings that token positions address (:func:`text.text_length`)."""
        return text.text_length(self.pipe)

    @property
    def image_size(self) -> int:
        return sampling.image_size(self.pipe)

    # ------------------------------------------------------------------ modules and layers
    def components(self) -> dict[str, torch.nn.Module]:
        """The pipeline's trainable modules by component name ("unet", "text_encoder", ...)."""
        return modules.components(self.pipe)

    def module(self, name: str) -> torch.nn.Module:
        """A module by qualified name, ``"<component>.<path>"``, e.g. ``"unet.mid_block.attentions.0"``."""
        return modules.module(self.pipe, name)

    def cross_attention_layers(self, patterns: Sequence[str] | None = None) -> list[CrossAttentionLayer]:
        """The denoiser's text-reading projections matching ``patterns`` (default: :meth:`closed_form_patterns`);
        ``ValueError`` for none (:func:`modules.cross_attention_layers`)."""
        return modules.cross_attention_layers(self.denoiser, patterns or self.closed_form_patterns())

    def closed_form_patterns(self) -> tuple[str, ...]:
        """The layers a closed-form edit changes by default: UNet cross-attention keys and values, or SD3/Flux's
        text-side input projections (:func:`modules.closed_form_patterns`)."""
        return modules.closed_form_patterns(self.pipe)

    def original_unet_path(self, path: str) -> str:
        """A UNet module's path in the original Stable Diffusion checkpoint layout, ``input_blocks.4.1...`` (kohya's
        SDXL LoRA keys; :func:`original_names.original_unet_path`)."""
        return original_names.original_unet_path(self.unet, path)

    def lora_modules(self, patterns: Sequence[str]) -> list[str]:
        """The denoiser's Linear module names matching ``patterns``, sorted: unqualified, and the text encoders'
        (patterns starting ``"text_encoder."``, ``"text_encoder_2."``) qualified; ``ValueError`` for none
        (:func:`weights.lora_module_names`)."""
        return weights.lora_module_names(self.denoiser, patterns, self._text_encoders())

    def check_lora_rank(self, patterns: Sequence[str], rank: int) -> None:
        """``ValueError`` in one line for a LoRA rank no module matching ``patterns`` can hold
        (:func:`weights.check_lora_rank`)."""
        weights.check_lora_rank(self.denoiser, patterns, rank, self._text_encoders())

    def _text_encoders(self) -> dict[str, torch.nn.Module]:
        """The pipeline's text encoders by component name (``weights.TEXT_ENCODER_COMPONENTS``)."""
        found = {name: getattr(self.pipe, name, None) for name in weights.TEXT_ENCODER_COMPONENTS}
        return {name: encoder for name, encoder in found.items() if isinstance(encoder, torch.nn.Module)}

    # ------------------------------------------------------------------ prompts (pipelines.text)
    def token_count(self, prompt: str) -> int:
        """Tokens of ``prompt`` without BOS/EOS, untruncated."""
        return text.token_count(self.pipe, prompt)

    def check_prompt(self, prompt: str, what: str = "prompt") -> str:
        """``prompt`` stripped, or ``ValueError`` if it is empty or longer than the text encoder reads."""
        return text.check_prompt(self.pipe, prompt, what)

    def token_streams(self) -> list[text.TokenStream]:
        """The text encoders' row ranges in the token embeddings (:func:`text.token_streams`: one, or SD3's CLIP rows
        then T5 rows)."""
        return text.token_streams(self.pipe)

    def stream_token_ids(self, prompt: str, stream: int = 0) -> list[int]:
        """The token ids of ``prompt`` before the padding in a stream of :meth:`token_streams`, BOS and EOS included
        where its tokenizer adds them (:func:`text.stream_token_ids`)."""
        return text.stream_token_ids(self.pipe, prompt, stream)

    def phrase_positions(self, prompt: str, phrase: str, stream: int = 0) -> list[int]:
        """Token positions (embedding rows; BOS = 0 where there is one) that ``phrase`` occupies inside ``prompt``, in
        a stream of :meth:`token_streams` (the first by default); its last occurrence wins."""
        return text.phrase_positions(self.pipe, prompt, phrase, stream)

    def last_token_position(self, prompt: str, stream: int = 0) -> int:
        """The row of ``prompt``'s last word as the reference UCE scripts compute it (:func:`text.last_token_position`:
        BOS for an empty CLIP prompt, the last padding row for an empty T5 prompt), in a stream of
        :meth:`token_streams`."""
        return text.last_token_position(self.pipe, prompt, stream)

    def encode_prompts(self, prompts: Sequence[str], grad: bool = False) -> PromptEncoding:
        """Per-token text embeddings exactly as the pipeline computes them for generation (``grad``: differentiable,
        for training the text encoder)."""
        return text.encode_prompts(self.pipe, prompts, grad)

    @property
    def prefix_encodable(self) -> bool:
        """Whether :meth:`encode_prompt_prefixes` encodes only the prefix (causal text encoders: SD 1.x/2.x, SDXL)."""
        return text.prefix_encodable(self.pipe)

    def encode_prompt_prefixes(self, prompts: Sequence[str], length: int) -> PromptEncoding:
        """The first ``length`` positions of :meth:`encode_prompts`' embeddings, from those positions alone where the
        text encoders are causal (:func:`text.encode_prompt_prefixes`)."""
        return text.encode_prompt_prefixes(self.pipe, prompts, length)

    def encode_with_vectors(self, templates: Sequence[str], vectors: torch.Tensor) -> PromptEncoding:
        """Text embeddings of prompts whose ``{}`` slots hold free input-embedding vectors, differentiably
        (:func:`text.encode_with_vectors`)."""
        return text.encode_with_vectors(self.pipe, templates, vectors)

    def token_embedding_matrix(self) -> torch.Tensor:
        """The text encoder's input token embeddings, ``(vocab, width)``, detached (read it, do not write it)."""
        return text.token_embedding_matrix(self.pipe)

    def slot_token_ids(self) -> torch.Tensor:
        """The tokens a slot of :meth:`encode_with_vectors` can hold as their text encodes
        (:func:`text.slot_token_ids`: every token, or on SD3/Flux those every tokenizer reads as one)."""
        return text.slot_token_ids(self.pipe)

    def token_rows(self, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """What a slot of :meth:`encode_with_vectors` holds to encode as each token of ``ids``
        (:func:`text.token_rows`: rows of :meth:`token_embedding_matrix`, or on SD3/Flux every text encoder's rows
        side by side)."""
        return text.token_rows(self.pipe, ids)

    @property
    def token_encoder(self) -> str:
        """The text encoder (component name) that gives most of the token rows the denoiser reads: CLIP's, or T5's on
        SD3/Flux (:func:`text.token_encoder`)."""
        return text.token_encoder(self.pipe)

    def start_tokens(self, component: str | None = None) -> int:
        """Tokens a text encoder's tokenizer (by default the position tokenizer's) puts before the first word: 1
        (CLIP's BOS) or 0 (T5)."""
        return text.start_tokens(self.pipe, component)

    def special_token_ids(self) -> set[int]:
        """The tokenizer's special token ids (start, end, padding, unknown)."""
        return text.special_token_ids(self.pipe)

    def verbatim_token_sets(self, prompts: Sequence[str]) -> tuple[list[list[int]], list[int]]:
        """Each prompt's token ids (special ones removed) by the tokenizer of the text encoder whose output the
        denoiser reads as it is, and that tokenizer's special ids (:func:`text.verbatim_token_sets`); the ids
        :meth:`add_prompt_scaled_lora` hands its ``scale_of``."""
        return text.verbatim_token_sets(self.pipe, prompts)

    def decode_tokens(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of token ids (special tokens dropped), as the tokenizer writes it back."""
        return text.decode_tokens(self.pipe, ids)

    # ------------------------------------------------------------------ denoising (pipelines.sampling)
    def noise_prediction(
        self, latents: torch.Tensor, timestep: torch.Tensor | int, encoding: PromptEncoding
    ) -> torch.Tensor:
        """The denoiser's raw prediction for a batch (no classifier-free guidance): the noise, v, or the flow
        velocity, as :attr:`prediction_type` says (:func:`sampling.noise_prediction`)."""
        self._direct_unet_calls += 1
        try:
            return sampling.noise_prediction(self.pipe, latents, timestep, encoding)
        finally:
            self._direct_unet_calls -= 1

    def guidance_halves(self) -> bool:
        """Whether the UNet's batch now is classifier-free guidance's [unconditional; conditional] halves: inside a
        pipeline call that guides, not in :meth:`noise_prediction`."""
        return not self._direct_unet_calls and sampling.guides_now(self.pipe)

    def initial_latents(self, seed: int, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """The starting noise for one image, a function of the seed alone (drawn on the CPU for portability)."""
        return sampling.initial_latents(self.pipe, seed, height, width)

    def check_sampler_steps(self, steps: int) -> None:
        """``ValueError`` in one line when the pipeline's sampler cannot run ``steps`` steps."""
        sampling.check_sampler_steps(self.pipe, steps)

    def generate(
        self, prompts: Sequence[str] | PromptEncoding, seeds: Sequence[int], **options: Any
    ) -> list[Image.Image]:
        """Images for (prompt, seed) pairs; the same pair gives the same image whatever else is in the batch.
        ``options`` are :func:`sampling.generate`'s (steps, guidance, batch_size, negative_prompt, height, width,
        progress, callback_on_step_end, eta)."""
        return sampling.generate(self.pipe, prompts, seeds, **options)

    def sample_trajectories(
        self, prompts: Sequence[str] | PromptEncoding, seeds: Sequence[int], **options: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every denoiser input of the sampler's run on each (prompt, seed): ``(latents, timesteps)``; prompts as text
        or as a :class:`PromptEncoding`. ``options`` are :func:`sampling.sample_trajectories`' (steps, guidance,
        batch_size)."""
        return sampling.sample_trajectories(self.pipe, prompts, seeds, **options)

    # ------------------------------------------------------------------ weights (pipelines.weights)
    def lora_adapters(
        self,
        patterns: Sequence[str],
        rank: int,
        alpha: float,
        *,
        generator: torch.Generator,
        adapter_name: str = "erase",
    ) -> contextlib.AbstractContextManager[LoraAdapters]:
        """Trainable peft LoRA adapters on the matching denoiser (and, for ``"text_encoder."`` and
        ``"text_encoder_2."`` patterns, text-encoder) Linear modules for the ``with`` block, removed afterwards with
        the weights bit-identical (:func:`weights.lora_adapters`)."""
        return weights.lora_adapters(
            self.denoiser, patterns, rank, alpha, generator=generator, adapter_name=adapter_name,
            component=self.denoiser_name, text_encoders=self._text_encoders(),
        )  # fmt: skip

    def apply_weight_deltas(self, deltas: dict[str, torch.Tensor], scale: float = 1.0) -> None:
        """In place, all or nothing: ``W <- W + scale * dW`` for each Linear named (qualified) in ``deltas``."""
        weights.apply_weight_deltas(self.pipe, deltas, scale)

    def weight_deltas(self, deltas: dict[str, torch.Tensor]) -> contextlib.AbstractContextManager[None]:
        """Apply weight changes for the ``with`` block and restore the exact original weights afterwards."""
        return weights.weight_deltas(self.pipe, deltas)

    def fingerprint(self, module_names: Sequence[str], precision: torch.dtype = torch.float32) -> str:
        """sha256 over the named modules' weights rounded to ``precision`` (:func:`weights.fingerprint`)."""
        return weights.fingerprint(self.pipe, module_names, precision)

    def fingerprints(
        self, module_names: Sequence[str], precisions: Sequence[torch.dtype] = (torch.float32,)
    ) -> dict[torch.dtype, str]:
        """:meth:`fingerprint` at several precisions in one pass over the weights (:func:`weights.fingerprints`)."""
        return weights.fingerprints(self.pipe, module_names, precisions)

    def weight_norms(
        self, module_names: Sequence[str], deltas: dict[str, torch.Tensor] | None = None
    ) -> dict[str, float]:
        """Frobenius norm of each named module's weight, in float64; with ``deltas``, of ``W + dW`` as applying
        them would leave it, the pipeline unchanged (:func:`weights.weight_norms`)."""
        return weights.weight_norms(self.pipe, module_names, deltas)

    def parameter_norm(self, name: str) -> float:
        """Frobenius norm of all of a module's parameters together (a whole component), in float64."""
        return weights.parameter_norm(self.pipe, name)

    def save_lora_weights(self, folder: str | Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Save ``dW = B @ A`` per module as a diffusers LoRA that ``pipe.load_lora_weights(folder)`` reproduces."""
        weights.save_lora_weights(self.pipe, folder, factors)

    def export_pipeline(self, folder: str | Path) -> None:
        """A complete diffusers folder of the pipeline as it is now (edits included)."""
        weights.export_pipeline(self.pipe, folder)

    # ------------------------------------------------------------------ hooks (pipelines.hooks)
    def hook_points(self) -> list[str]:
        """Every hook point of the pipeline: text-encoder layers (CLIP's, T5's) and UNet or SD3/Flux transformer
        blocks, by qualified name."""
        return hooks.hook_points(self.pipe)

    def hook_point(self, name: str) -> torch.nn.Module:
        """The module a hook point names; ``ValueError`` in one line when ``name`` is not a hook point."""
        return hooks.hook_point(self.pipe, name)

    def hook_width(self, name: str) -> int:
        """The width of a hook point's activations (features per token)."""
        return hooks.hook_width(self.pipe, name)

    def capture(self, module_names: Sequence[str]) -> contextlib.AbstractContextManager[dict[str, list[torch.Tensor]]]:
        """Record the outputs of the named modules (qualified names) during the ``with`` block."""
        return hooks.capture(self.pipe, module_names)

    def text_attention_names(self) -> list[str]:
        """The denoiser's attention modules where image tokens attend to text tokens, qualified: UNet cross-attention,
        SD3/Flux joint and single-stream attention (:func:`hooks.text_attention_names`)."""
        return hooks.text_attention_names(self.pipe)

    def attention_probabilities(
        self, attention_names: Sequence[str]
    ) -> contextlib.AbstractContextManager[dict[str, list[torch.Tensor]]]:
        """Record, differentiably, the attention probabilities of image queries over text keys in the named attention
        modules during the ``with`` block, ``(batch, heads, image, text)`` (:func:`hooks.attention_probabilities`)."""
        return hooks.attention_probabilities(self.pipe, attention_names)

    def intervene(
        self, edits: dict[str, Callable[[torch.Tensor], torch.Tensor]]
    ) -> contextlib.AbstractContextManager[None]:
        """Replace the outputs of the named modules by ``edit(output)`` during the ``with`` block."""
        return hooks.intervene(self.pipe, edits)

    def text_activations(self, hook: str, prompts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """The residual stream at a text-encoder hook point, ``(len(prompts), tokens, width)`` float32 on the CPU."""
        return hooks.text_activations(self.pipe, hook, prompts, batch_size)

    def unet_activations(
        self, hook: str, prompts: Sequence[str], seeds: Sequence[int], **options: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A denoiser hook point's output at every sampling step, conditional half only: ``(activations, timesteps)``;
        a UNet transformer block's, or an SD3/Flux transformer block's image tokens. ``options`` are
        :func:`hooks.unet_activations`' (steps, guidance, batch_size, progress)."""
        return hooks.unet_activations(self.pipe, hook, prompts, seeds, **options)

    def add_output_edit(
        self, name: str, edit: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
    ) -> HookHandles:
        """Replace a hook point's output by ``edit(tokens, timestep)`` until the returned handle is removed
        (:func:`hooks.add_output_edit`)."""
        return hooks.add_output_edit(self.pipe, name, edit)

    def add_prompt_scaled_lora(
        self,
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
        scale_of: Callable[[torch.Tensor, list[torch.Tensor | None]], torch.Tensor],
    ) -> HookHandles:
        """Add a low-rank change to named Linears, its strength set per prompt, until the handle is removed
        (:func:`hooks.add_prompt_scaled_lora`)."""
        return hooks.add_prompt_scaled_lora(self.pipe, factors, scale_of, self.guidance_halves)
