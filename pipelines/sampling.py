"""Denoiser predictions and sampling: the denoiser called directly, and images drawn through the pipeline's sampler.

Every image is a function of its (prompt, seed) pair: its starting noise and a stochastic sampler's step noise come
from one CPU generator seeded with its seed, as ``pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed))``
draws them, so batching changes only floating-point summation order.

What the denoiser predicts is :func:`prediction_type`: the noise (``"epsilon"``, SD 1.x, SDXL, the micro model),
``"v_prediction"`` (SD 2.x 768-v: v = alpha eps - sigma x_0) or ``"flow"`` (SD3, Flux: the flow-matching velocity
v = eps - x_0 on x_t = (1 - sigma) x_0 + sigma eps). :func:`noise_prediction` returns that raw prediction; a loss that
combines predictions linearly with coefficients summing to 1 (ESD's target, a single prediction as CA's) means the same
thing in every form, since eps is affine in the prediction with coefficients shared by every condition at one x_t.

Latents are ``(batch, channels, h, w)`` everywhere in this API; Flux's 2x2-packed token form is made and undone here,
at the transformer's door. The timestep is what the denoiser receives: the scheduler's t in [0, 1000) for a UNet and
SD3, t / 1000 (the flow sigma) for Flux, whose pipeline divides it before the call.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput
from PIL import Image
from tqdm.auto import tqdm

from .defaults import DEFAULT_GUIDANCE, DEFAULT_STEPS
from .modules import Pipeline, architecture, denoiser, is_sdxl, is_transformer
from .text import PromptEncoding

__all__ = [
    "DEFAULT_GUIDANCE",
    "DEFAULT_STEPS",
    "FLUX_EMBEDDED_GUIDANCE",
    "FlowDDIMScheduler",
    "check_sampler_steps",
    "ddim_sampler",
    "generate",
    "guides_now",
    "image_size",
    "initial_latents",
    "noise_prediction",
    "prediction_type",
    "sample_trajectories",
]


#: The guidance a guidance-distilled Flux (FLUX.1-dev) is told in :func:`noise_prediction`: ``FluxPipeline``'s default.
#: In :func:`generate` Flux's ``guidance`` is this embedded value (Flux samples without classifier-free guidance).
FLUX_EMBEDDED_GUIDANCE: float = 3.5


def image_size(pipe: Pipeline) -> int:
    """The side, in pixels, of the images the denoiser was trained for (Flux's transformer has no size: its VAE's)."""
    kind = architecture(pipe)
    if kind == "flux":
        return int(pipe.vae.config.sample_size)
    return denoiser(pipe).config.sample_size * pipe.vae_scale_factor


def prediction_type(pipe: Pipeline) -> str:
    """What the denoiser predicts: ``"epsilon"``, ``"v_prediction"`` (or ``"sample"``) as its scheduler says, or
    ``"flow"`` (SD3, Flux)."""
    if is_transformer(pipe):
        return "flow"
    return str(pipe.scheduler.config.get("prediction_type", "epsilon"))


def _latent_side(pipe: Pipeline, pixels: int) -> int:
    if architecture(pipe) == "flux":  # FluxPipeline.prepare_latents: a whole number of 2x2 patches
        return 2 * (int(pixels) // (pipe.vae_scale_factor * 2))
    return int(pixels) // pipe.vae_scale_factor


def _latent_channels(pipe: Pipeline) -> int:
    channels = denoiser(pipe).config.in_channels
    return channels // 4 if architecture(pipe) == "flux" else channels


def _pack(pipe: Pipeline, latents: torch.Tensor) -> torch.Tensor:
    """Flux's token form of ``(B, C, h, w)`` latents: ``(B, h/2 * w/2, 4C)`` (the pipeline's own packing)."""
    b, c, h, w = latents.shape
    return pipe._pack_latents(latents, b, c, h, w)


def _unpack(pipe: Pipeline, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`_pack` for ``(h, w)`` latents (the pipeline's own unpacking)."""
    scale = pipe.vae_scale_factor
    return pipe._unpack_latents(tokens, h * scale, w * scale, scale)


def _added_conditions(pipe: Pipeline, encoding: PromptEncoding, batch: int) -> dict[str, torch.Tensor] | None:
    """SDXL's extra UNet inputs (pooled text and size conditions: full image, no crop); ``None`` for SD 1.x/2.x."""
    if not is_sdxl(pipe):
        return None
    size, unet = image_size(pipe), pipe.unet
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], device=unet.device, dtype=unet.dtype)
    return {"text_embeds": encoding.pooled, "time_ids": time_ids.repeat(batch, 1)}


def noise_prediction(
    pipe: Pipeline, latents: torch.Tensor, timestep: torch.Tensor | int | float, encoding: PromptEncoding
) -> torch.Tensor:
    """The denoiser's raw prediction (:func:`prediction_type`) on ``(B, C, h, w)`` latents for a batch, with no
    classifier-free guidance; the same shape as ``latents``. ``timestep`` is as the denoiser receives it (see the
    module docstring), one for the batch or one per row."""
    kind, batch = architecture(pipe), latents.shape[0]
    text = encoding.embeddings.to(latents.device, latents.dtype)
    if kind in ("sd", "sdxl"):
        return pipe.unet(
            latents, timestep, encoder_hidden_states=text, added_cond_kwargs=_added_conditions(pipe, encoding, batch)
        ).sample
    times = torch.as_tensor(timestep, device=latents.device, dtype=latents.dtype).reshape(-1).expand(batch)
    pooled = encoding.pooled.to(latents.device, latents.dtype)
    if kind == "sd3":
        return pipe.transformer(
            hidden_states=latents, timestep=times, encoder_hidden_states=text, pooled_projections=pooled,
            return_dict=False,
        )[0]  # fmt: skip
    transformer, (_, _, h, w) = pipe.transformer, latents.shape
    guidance = None
    if transformer.config.guidance_embeds:
        guidance = torch.full((batch,), FLUX_EMBEDDED_GUIDANCE, device=latents.device, dtype=torch.float32)
    velocity = transformer(
        hidden_states=_pack(pipe, latents),
        timestep=times,
        guidance=guidance,
        pooled_projections=pooled,
        encoder_hidden_states=text,
        txt_ids=torch.zeros(text.shape[1], 3, device=latents.device, dtype=latents.dtype),
        img_ids=pipe._prepare_latent_image_ids(batch, h // 2, w // 2, latents.device, latents.dtype),
        return_dict=False,
    )[0]
    return _unpack(pipe, velocity, h, w)


def guides_now(pipe: Pipeline) -> bool:
    """Whether a pipeline call that guides is under way (diffusers' ``do_classifier_free_guidance``): its UNet
    batch is then [unconditional; conditional] halves."""
    try:
        return bool(pipe.do_classifier_free_guidance)
    except AttributeError:  # no pipeline call yet: the property reads the call's guidance scale
        return False


def _draw_latents(pipe: Pipeline, generator: torch.Generator, height: int | None, width: int | None) -> torch.Tensor:
    height, width = height or image_size(pipe), width or image_size(pipe)
    shape = (1, _latent_channels(pipe), _latent_side(pipe, height), _latent_side(pipe, width))
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def initial_latents(pipe: Pipeline, seed: int, height: int | None = None, width: int | None = None) -> torch.Tensor:
    """The starting noise for one image, ``(1, C, h, w)``, a function of the seed alone (drawn on the CPU for
    portability; Flux packs it into tokens as its pipeline does)."""
    return _draw_latents(pipe, torch.Generator("cpu").manual_seed(int(seed)), height, width)


def check_sampler_steps(pipe: Pipeline, steps: int) -> None:
    """``ValueError`` in one line when the pipeline's sampler cannot run ``steps`` steps (PNDM, SD 1.x's own
    sampler, needs at least 4), instead of the scheduler's numpy error in the middle of a run."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"sampling steps must be an integer >= 1, got {steps!r}")
    scheduler = copy.deepcopy(pipe.scheduler)
    # a resolution-shifted flow schedule (Flux) needs the shift the pipeline computes; any value tells the count
    shift = {"mu": 1.0} if scheduler.config.get("use_dynamic_shifting", False) else {}
    try:
        scheduler.set_timesteps(steps, **shift)
    except (ValueError, IndexError) as err:
        name = type(scheduler).__name__
        raise ValueError(f"the model's sampler ({name}) cannot run {steps} steps: {err}; use more steps") from None


class FlowDDIMScheduler(FlowMatchEulerDiscreteScheduler):
    """Flow matching's sampler with DDIM's noise level ``eta``: DDIM (Song et al., 2021) in the variance-preserving
    form of the flow path, so that ``eta`` means what it means for a noise-prediction model.

    On ``x = (1 - s) x0 + s eps`` the velocity ``v = eps - x0`` gives ``x0 = x - s v`` and ``eps = x + (1 - s) v``;
    ``x / sqrt((1 - s)^2 + s^2)`` is a variance-preserving state with ``abar = (1 - s)^2 / ((1 - s)^2 + s^2)``. DDIM's
    step from ``s`` to ``s'`` there, scaled back, is::

        x' = (1 - s') x0 + s' (sqrt(1 - rho^2) eps + rho z),   rho = eta sqrt((1 - abar / abar') / (1 - abar))

    ``z`` fresh noise. ``eta = 0`` is the deterministic step, equal to the pipeline's Euler step ``x + (s' - s) v``;
    ``eta = 1`` renews as much noise per step as DDPM's ancestral sampler. ``generators`` (one per image of the
    batch, set before a pipeline call) draw each image's ``z``, as a diffusers pipeline does not hand the flow
    scheduler its generators."""

    eta: float = 0.0
    generators: Sequence[torch.Generator] | None = None

    def step(  # noqa: D417 - diffusers' signature; the settings it names do not apply here
        self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor, *args: Any,
        return_dict: bool = True, **kwargs: Any,
    ) -> FlowMatchEulerDiscreteSchedulerOutput | tuple[torch.Tensor]:  # fmt: skip
        """One DDIM step of the flow path (see the class docstring)."""
        if self.step_index is None:
            self._init_step_index(timestep)
        s, s_next = (float(self.sigmas[self.step_index + i]) for i in (0, 1))
        x, v = sample.float(), model_output.float()
        x0, eps = x - s * v, x + (1 - s) * v

        def abar(sigma: float) -> float:
            return (1 - sigma) ** 2 / ((1 - sigma) ** 2 + sigma**2)

        rho = self.eta * ((1 - abar(s) / abar(s_next)) / (1 - abar(s))) ** 0.5 if self.eta and s_next < s else 0.0
        noise = eps if rho == 0.0 else (1 - rho**2) ** 0.5 * eps + rho * self._fresh_noise(x)
        previous = ((1 - s_next) * x0 + s_next * noise).to(model_output.dtype)
        self._step_index += 1
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=previous) if return_dict else (previous,)

    def _fresh_noise(self, sample: torch.Tensor) -> torch.Tensor:
        """Standard normal noise shaped like ``sample``, each row from its image's generator (the CPU's)."""
        if self.generators is None or len(self.generators) != sample.shape[0]:
            raise RuntimeError(f"FlowDDIMScheduler needs one generator per image: {sample.shape[0]} images")
        pairs = zip(sample, self.generators, strict=True)
        rows = [torch.randn(row.shape, generator=g, dtype=torch.float32) for row, g in pairs]
        return torch.stack(rows).to(sample.device)


@contextlib.contextmanager
def ddim_sampler(pipe: Pipeline, eta: float | None) -> Iterator[dict[str, float]]:
    """The pipeline's own sampler (``eta is None``), or DDIM with noise level ``eta`` for the block: the scheduler
    is swapped as diffusers documents (``pipe.scheduler = DDIMScheduler.from_config(...)``; on SD3/Flux
    :class:`FlowDDIMScheduler`, whose ``generators`` the caller sets per batch) and put back afterwards. Yields the
    extra keyword arguments the pipeline call takes."""
    if eta is None:
        yield {}
        return
    original = pipe.scheduler
    if is_transformer(pipe):
        pipe.scheduler = FlowDDIMScheduler.from_config(original.config)
        pipe.scheduler.eta = float(eta)
    else:
        pipe.scheduler = DDIMScheduler.from_config(original.config)
    try:
        yield {} if is_transformer(pipe) else {"eta": float(eta)}
    finally:
        pipe.scheduler = original


def _condition(pipe: Pipeline, prompts: Sequence[str] | PromptEncoding, rows: range) -> dict[str, object]:
    """The pipeline's conditioning arguments for some rows: prompts as text, or their embeddings."""
    if not isinstance(prompts, PromptEncoding):
        return {"prompt": [prompts[i] for i in rows]}
    chunk = prompts.select(list(rows))
    model = denoiser(pipe)
    condition = {"prompt_embeds": chunk.embeddings.to(model.device, model.dtype)}
    if chunk.pooled is not None:
        condition["pooled_prompt_embeds"] = chunk.pooled.to(model.device, model.dtype)
    return condition


@torch.no_grad()
def generate(
    pipe: Pipeline,
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
    model's SDE-DPM-Solver++, Euler ancestral) adds at each step: one CPU generator per image, seeded with its seed,
    draws the starting noise and then the step noise.

    ``prompts`` may also be a :class:`PromptEncoding`: its embeddings then condition the images as they are
    (diffusers' ``prompt_embeds``), which is how an attack feeds adversarial embeddings. ``eta`` samples with DDIM
    at that noise level instead of the pipeline's own sampler (0: deterministic DDIM, 1: as much noise as DDPM's
    ancestral sampler), on every model alike (SD3/Flux: :class:`FlowDDIMScheduler`). Flux samples without
    classifier-free guidance, as its pipeline does: ``guidance`` is the value its guidance embedding is told
    (FLUX.1-dev), and ``negative_prompt`` is not read.
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
    check_sampler_steps(pipe, steps)
    images: list[Image.Image] = []
    batches = range(0, count, batch_size)
    model, flux = denoiser(pipe), architecture(pipe) == "flux"
    with ddim_sampler(pipe, eta) as sampler_kwargs:
        for start in tqdm(batches, desc="generating", unit="batch", disable=not progress or len(batches) < 2):
            rows = range(start, min(start + batch_size, count))
            generators = [torch.Generator("cpu").manual_seed(seeds[i]) for i in rows]
            latents = torch.cat([_draw_latents(pipe, g, height, width) for g in generators])
            if isinstance(pipe.scheduler, FlowDDIMScheduler):  # its step noise, which flow pipelines do not pass it
                pipe.scheduler.generators = generators
            if flux:
                latents = _pack(pipe, latents)
            else:
                sampler_kwargs = {**sampler_kwargs, "negative_prompt": [negative_prompt] * len(rows)}
            result = pipe(
                **_condition(pipe, prompts, rows),
                latents=latents.to(model.device, model.dtype),
                generator=generators,
                num_inference_steps=steps,
                guidance_scale=guidance,
                height=height or image_size(pipe),
                width=width or image_size(pipe),
                output_type="np",
                callback_on_step_end=callback_on_step_end,
                **sampler_kwargs,
            )
            images.extend(Image.fromarray((np.clip(a, 0, 1) * 255).round().astype(np.uint8)) for a in result.images)
    return images


@torch.no_grad()
def sample_trajectories(
    pipe: Pipeline,
    prompts: Sequence[str] | PromptEncoding,
    seeds: Sequence[int],
    *,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    batch_size: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every denoiser input of the sampler's run on each (prompt, seed): ``(latents, timesteps)``.

    ``latents`` is ``(len(prompts), K, C, h, w)`` float32 on the CPU and ``timesteps`` ``(K,)``, K being the
    denoiser calls of one run (``steps`` for single-evaluation samplers). The inputs are recorded exactly as the
    denoiser received them (after the scheduler's input scaling, one copy of classifier-free guidance's doubled batch;
    Flux's unpacked, its timestep divided by 1000 as its pipeline passes it), by a forward pre-hook that is removed
    afterwards: the step callback sees latents after the scheduler step, whose scaling into the next input is
    scheduler-specific. Together they are what :func:`noise_prediction` takes. ``prompts`` may be a
    :class:`PromptEncoding`, as in :func:`generate`.
    """
    encoded = isinstance(prompts, PromptEncoding)
    total = len(prompts.prompts) if encoded else len(prompts)
    if not encoded:
        prompts = list(prompts)
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    count = {"n": 0}
    side = _latent_side(pipe, image_size(pipe))

    def hook(_module, args, kwargs):  # noqa: ANN001, ANN202 - torch's forward pre-hook signature
        sample = args[0] if args else kwargs["sample" if "sample" in kwargs else "hidden_states"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        n = count["n"]
        sample = sample[:n].detach()
        if sample.dim() == 3:  # Flux's packed tokens
            sample = _unpack(pipe, sample, side, side)
        calls.append((sample.float().cpu(), torch.as_tensor(timestep).detach().float().cpu()))

    handle = denoiser(pipe).register_forward_pre_hook(hook, with_kwargs=True)
    latents, timesteps = [], None
    try:
        for start in range(0, total, batch_size):
            rows = range(start, min(start + batch_size, total))
            chunk = prompts.select(list(rows)) if encoded else prompts[start : start + batch_size]
            count["n"], calls = len(rows), []
            generate(pipe, chunk, seeds[start : start + batch_size], steps=steps, guidance=guidance,
                     batch_size=batch_size, progress=False)  # fmt: skip
            latents.append(torch.stack([x for x, _ in calls], dim=1))
            found = torch.stack([t.reshape(-1)[0] for _, t in calls])
            if timesteps is not None and not torch.equal(found, timesteps):
                raise RuntimeError("the sampler's timesteps differ between batches")
            timesteps = found
    finally:
        handle.remove()
    return torch.cat(latents), timesteps
