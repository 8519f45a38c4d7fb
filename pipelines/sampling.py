"""Noise predictions and sampling: the UNet called directly, and images drawn through the pipeline's own sampler.

Every image is a function of its (prompt, seed) pair: its starting noise and a stochastic sampler's step noise come
from one CPU generator seeded with its seed, as ``pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed))``
draws them, so batching changes only floating-point summation order.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from diffusers import DDIMScheduler
from PIL import Image
from tqdm.auto import tqdm

from .modules import Pipeline, is_sdxl
from .text import PromptEncoding

__all__ = [
    "DEFAULT_GUIDANCE",
    "DEFAULT_STEPS",
    "check_sampler_steps",
    "ddim_sampler",
    "generate",
    "guides_now",
    "image_size",
    "initial_latents",
    "noise_prediction",
    "sample_trajectories",
]

#: Default sampler settings for every model: scheduler steps and classifier-free guidance scale. Generation, audits,
#: erasure checks and the micro model's evaluation all start from these, so "default settings" means one thing.
#: The guidance is diffusers' own default, so a plain ``pipe(prompt)`` samples as the toolkit does; larger scales
#: were tried on the micro model and gave the scorer nothing beyond sampling spread (the micro model's card has
#: the figures).
DEFAULT_STEPS: int = 20
DEFAULT_GUIDANCE: float = 7.5


def image_size(pipe: Pipeline) -> int:
    """The side, in pixels, of the images the UNet was trained for."""
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


def _added_conditions(pipe: Pipeline, encoding: PromptEncoding, batch: int) -> dict[str, torch.Tensor] | None:
    """SDXL's extra UNet inputs (pooled text and size conditions: full image, no crop); ``None`` for SD 1.x/2.x."""
    if not is_sdxl(pipe):
        return None
    size, unet = image_size(pipe), pipe.unet
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], device=unet.device, dtype=unet.dtype)
    return {"text_embeds": encoding.pooled, "time_ids": time_ids.repeat(batch, 1)}


def noise_prediction(
    pipe: Pipeline, latents: torch.Tensor, timestep: torch.Tensor | int, encoding: PromptEncoding
) -> torch.Tensor:
    """The UNet's noise prediction eps(latents, t, text) for a batch (no classifier-free guidance)."""
    return pipe.unet(
        latents,
        timestep,
        encoder_hidden_states=encoding.embeddings.to(latents.dtype),
        added_cond_kwargs=_added_conditions(pipe, encoding, latents.shape[0]),
    ).sample


def guides_now(pipe: Pipeline) -> bool:
    """Whether a pipeline call that guides is under way (diffusers' ``do_classifier_free_guidance``): its UNet
    batch is then [unconditional; conditional] halves."""
    try:
        return bool(pipe.do_classifier_free_guidance)
    except AttributeError:  # no pipeline call yet: the property reads the call's guidance scale
        return False


def _draw_latents(pipe: Pipeline, generator: torch.Generator, height: int | None, width: int | None) -> torch.Tensor:
    height, width = height or image_size(pipe), width or image_size(pipe)
    shape = (1, pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def initial_latents(pipe: Pipeline, seed: int, height: int | None = None, width: int | None = None) -> torch.Tensor:
    """The starting noise for one image, a function of the seed alone (drawn on the CPU for portability)."""
    return _draw_latents(pipe, torch.Generator("cpu").manual_seed(int(seed)), height, width)


def check_sampler_steps(pipe: Pipeline, steps: int) -> None:
    """``ValueError`` in one line when the pipeline's sampler cannot run ``steps`` steps (PNDM, SD 1.x's own
    sampler, needs at least 4), instead of the scheduler's numpy error in the middle of a run."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"sampling steps must be an integer >= 1, got {steps!r}")
    scheduler = copy.deepcopy(pipe.scheduler)
    try:
        scheduler.set_timesteps(steps)
    except (ValueError, IndexError) as err:
        name = type(scheduler).__name__
        raise ValueError(f"the model's sampler ({name}) cannot run {steps} steps: {err}; use more steps") from None


@contextlib.contextmanager
def ddim_sampler(pipe: Pipeline, eta: float | None) -> Iterator[dict[str, float]]:
    """The pipeline's own sampler (``eta is None``), or DDIM with noise level ``eta`` for the block: the scheduler
    is swapped as diffusers documents (``pipe.scheduler = DDIMScheduler.from_config(...)``) and put back afterwards.
    Yields the extra keyword arguments the pipeline call takes."""
    if eta is None:
        yield {}
        return
    original = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(original.config)
    try:
        yield {"eta": float(eta)}
    finally:
        pipe.scheduler = original


def _condition(pipe: Pipeline, prompts: Sequence[str] | PromptEncoding, rows: range) -> dict[str, object]:
    """The pipeline's conditioning arguments for some rows: prompts as text, or their embeddings."""
    if not isinstance(prompts, PromptEncoding):
        return {"prompt": [prompts[i] for i in rows]}
    chunk = prompts.select(list(rows))
    unet = pipe.unet
    condition = {"prompt_embeds": chunk.embeddings.to(unet.device, unet.dtype)}
    if is_sdxl(pipe):
        condition["pooled_prompt_embeds"] = chunk.pooled.to(unet.device, unet.dtype)
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
    ancestral sampler), for every model alike.
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
    with ddim_sampler(pipe, eta) as sampler_kwargs:
        for start in tqdm(batches, desc="generating", unit="batch", disable=not progress or len(batches) < 2):
            rows = range(start, min(start + batch_size, count))
            generators = [torch.Generator("cpu").manual_seed(seeds[i]) for i in rows]
            latents = torch.cat([_draw_latents(pipe, g, height, width) for g in generators])
            result = pipe(
                **_condition(pipe, prompts, rows),
                negative_prompt=[negative_prompt] * len(rows),
                latents=latents.to(pipe.unet.device, pipe.unet.dtype),
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
    """Every UNet input of the sampler's run on each (prompt, seed): ``(latents, timesteps)``.

    ``latents`` is ``(len(prompts), K, C, h, w)`` float32 on the CPU and ``timesteps`` ``(K,)``, K being the UNet
    calls of one run (``steps`` for single-evaluation samplers). The inputs are recorded exactly as the UNet
    received them (after the scheduler's input scaling, one copy of classifier-free guidance's doubled batch), by a
    forward pre-hook that is removed afterwards: the step callback sees latents after the scheduler step, whose
    scaling into the next UNet input is scheduler-specific. ``prompts`` may be a :class:`PromptEncoding`, as in
    :func:`generate`.
    """
    encoded = isinstance(prompts, PromptEncoding)
    total = len(prompts.prompts) if encoded else len(prompts)
    if not encoded:
        prompts = list(prompts)
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    count = {"n": 0}

    def hook(_module, args, kwargs):  # noqa: ANN001, ANN202 - torch's forward pre-hook signature
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        n = count["n"]
        calls.append((sample[:n].detach().float().cpu(), torch.as_tensor(timestep).detach().float().cpu()))

    handle = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
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
