"""Training the micro Stable Diffusion: VAE, latent cache, UNet, export to a diffusers folder, and evaluation.

Stages hand over through small fp16 safetensors files in ``<work>/final`` (``clip``, ``vae``, ``unet``), each carrying
its architecture (and, for the VAE, its latent scaling factor) in the safetensors metadata. A later stage can thus
run in another process or on another machine with only those files. Resumable checkpoints live in ``<work>/<stage>``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from safetensors import safe_open
from tqdm.auto import tqdm
from transformers import CLIPModel, CLIPTextModel

from evals.microworld.clip import (
    ClipArch,
    ClipTrainConfig,
    load_micro_clip,
    micro_clip_config,
    save_micro_clip,
    tokenize,
    zero_shot_accuracy,
    zero_shot_predict,
)
from evals.microworld.sd_model import (
    UNetArch,
    VAEArch,
    build_unet,
    build_vae,
    inference_scheduler,
    training_scheduler,
)
from evals.microworld.train_utils import (
    Ema,
    ProgressCallback,
    SpeedMeter,
    atomic_save_npy,
    atomic_save_safetensors,
    autocast_context,
    chunks,
    cosine_lr,
    final_path,
    init_path,
    load_checkpoint,
    load_initial_weights,
    load_pool,
    load_weights,
    pool_seeds,
    replay_batch,
    save_checkpoint,
    step_generator,
    step_rng,
    to_device,
)
from pipelines import DEFAULT_GUIDANCE, DEFAULT_STEPS
from pipelines.files import atomic_write_bytes, atomic_write_json
from pipelines.tokenizer import clip_vocab_and_merges, offline_clip_tokenizer

__all__ = [
    "Preset",
    "UNetTrainConfig",
    "VAETrainConfig",
    "encode_pool_latents",
    "evaluate_micro",
    "export_micro",
    "declare_float32",
    "final_metadata",
    "final_path",
    "folder_vae_reconstructor",
    "text_tower_digest",
    "import_micro",
    "load_final_clip",
    "load_final_unet",
    "load_final_vae",
    "preset",
    "save_compact_tokenizer",
    "save_final_clip",
    "train_unet",
    "train_vae",
    "vae_reconstructor",
    "vae_roundtrip",
]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------
# Configs and presets
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VAETrainConfig:
    """How to train the micro VAE (L1 + MSE reconstruction, a tiny KL term as in SD's autoencoder)."""

    arch: VAEArch = field(default_factory=VAEArch)
    steps: int = 3000
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 100
    kl_weight: float = 1e-6
    pool_size: int = 40_000
    render_workers: int = 1
    checkpoint_every_s: float = 180.0
    time_limit_s: float | None = None

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or not 0 <= self.warmup <= self.steps:
            raise ValueError("steps >= 1, batch_size >= 1 and 0 <= warmup <= steps required")
        if self.lr <= 0 or self.kl_weight < 0 or self.pool_size < self.batch_size or self.render_workers < 1:
            raise ValueError("lr > 0, kl_weight >= 0, pool_size >= batch_size, render_workers >= 1 required")


@dataclass(frozen=True)
class UNetTrainConfig:
    """How to train the micro UNet (DDPM epsilon loss with min-SNR weighting, caption dropout for CFG, EMA)."""

    arch: UNetArch = field(default_factory=UNetArch)
    steps: int = 5000
    batch_size: int = 256
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup: int = 250
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    min_snr_gamma: float | None = 5.0
    pool_size: int = 40_000
    render_workers: int = 1
    encode_batch: int = 256
    # World version of the pool and captions; in version 2 ``emblem_replay`` of every batch are scenes without an
    # emblem (the replay of the world the UNet knows), the rest carry one (docs/design/world-100.md, stage 3).
    world_version: int = 1
    emblem_replay: float = 0.5
    checkpoint_every_s: float = 180.0
    time_limit_s: float | None = None

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or not 0 <= self.warmup <= self.steps:
            raise ValueError("steps >= 1, batch_size >= 1 and 0 <= warmup <= steps required")
        if self.world_version not in (1, 2) or not 0.0 <= self.emblem_replay <= 1.0:
            raise ValueError("world_version must be 1 or 2 and emblem_replay in [0, 1]")
        if not 0.0 <= self.caption_dropout < 1.0 or not 0.0 < self.ema_decay < 1.0:
            raise ValueError("caption_dropout must be in [0, 1) and ema_decay in (0, 1)")
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            raise ValueError("min_snr_gamma must be positive (or None to disable)")
        if self.lr <= 0 or self.pool_size < self.batch_size or self.render_workers < 1 or self.encode_batch < 1:
            raise ValueError("lr > 0, pool_size >= batch_size, render_workers >= 1, encode_batch >= 1 required")


@dataclass(frozen=True)
class Preset:
    """All stage configs of one training recipe plus the evaluation size."""

    clip: ClipTrainConfig
    vae: VAETrainConfig
    unet: UNetTrainConfig
    eval_images: int = 32
    eval_batch: int = 8


def preset(name: str, render_workers: int = 1) -> Preset:
    """Named recipes. ``gpu``: one H100, each of the calls ``clip,vae`` and ``unet,export,eval`` within ~7 minutes.
    ``cpu``: two CPU cores, all stages within ~4 hours (see the estimate printed by ``scripts/train_micro.py``)."""
    w = max(1, render_workers)
    if name == "gpu":
        # Measured on an H100 (16 cores): CLIP 0.063 s/step at batch 512, VAE 0.032 s/step at batch 128, UNet 0.145
        # s/step at batch 512 (0.105 at 256); all overhead-bound (a UNet step at batch 256 is 0.37 TFLOP). Start-up
        # plus rendering 50k images ~1.5 min (the CLIP's 200k add ~15 s on 16 cores at ~1 ms an image a core).
        # Call `clip,vae` ~6 min, call `unet,export,eval` ~6.5 min; the time limits stop a stage early (and still
        # save it) should a machine be slower.
        return Preset(
            clip=ClipTrainConfig(
                steps=3000,
                batch_size=512,
                lr=1e-3,
                warmup=200,
                render_workers=w,
                eval_every=500,
                time_limit_s=230.0,
            ),
            vae=VAETrainConfig(
                steps=2000, batch_size=128, lr=1e-3, warmup=100, pool_size=50_000, render_workers=w, time_limit_s=100.0
            ),
            unet=UNetTrainConfig(
                steps=2000,
                batch_size=512,
                lr=6e-4,
                warmup=200,
                ema_decay=0.999,
                pool_size=50_000,
                render_workers=w,
                encode_batch=1024,
                time_limit_s=300.0,
            ),
            eval_images=32,
            eval_batch=256,
        )
    if name == "cpu":
        return Preset(
            clip=ClipTrainConfig(
                steps=4000,
                batch_size=128,
                lr=1e-3,
                warmup=200,
                render_workers=w,
                eval_every=1000,
            ),
            vae=VAETrainConfig(steps=2000, batch_size=32, lr=1e-3, warmup=100, pool_size=20_000, render_workers=w),
            unet=UNetTrainConfig(
                steps=10_000, batch_size=32, lr=3e-4, warmup=500, ema_decay=0.999, pool_size=20_000, render_workers=w
            ),
            eval_images=32,
            eval_batch=16,
        )
    raise ValueError(f"unknown preset {name!r}; expected 'gpu' or 'cpu'")


# ----------------------------------------------------------------------------------------------------
# Final per-stage weights (fp16 safetensors with the architecture in the metadata)
# ----------------------------------------------------------------------------------------------------


def _save_final(module: torch.nn.Module, path: Path, meta: dict[str, Any]) -> None:
    tensors = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in module.state_dict().items()}
    atomic_save_safetensors(tensors, path, metadata={k: json.dumps(v) for k, v in meta.items()})


def _read_final(path: Path, device: str | torch.device) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run the {path.stem} stage first")
    return load_weights(path, device)


def save_final_clip(model: CLIPModel, arch: ClipArch, work_dir: str | Path, world_version: int = 1) -> Path:
    """Save the trained CLIP as the clip stage's hand-over file, with the world version it was trained on."""
    path = final_path(work_dir, "clip")
    _save_final(model, path, {"arch": asdict(arch), "world_version": world_version})
    return path


def text_tower_digest(clip: CLIPModel) -> str:
    """sha256 of the CLIP's text tower as the hand-over file stores it (fp16): which text encoder a UNet was trained
    on, so that an export never pairs a UNet with a text tower trained after it."""
    h = hashlib.sha256()
    for name, tensor in sorted(clip.text_model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float16).contiguous().numpy().tobytes())
    return h.hexdigest()


def load_final_clip(work_dir: str | Path, device: str | torch.device = "cpu") -> tuple[CLIPModel, ClipArch]:
    """The clip stage's model (float32, eval mode) and architecture."""
    tensors, meta = _read_final(final_path(work_dir, "clip"), device)
    arch = ClipArch(**meta["arch"])
    model = CLIPModel(micro_clip_config(arch)).to(device)
    model.load_state_dict(tensors)
    return model.eval(), arch


def load_final_vae(work_dir: str | Path, device: str | torch.device = "cpu") -> AutoencoderKL:
    """The vae stage's autoencoder (float32, eval mode), its latent scaling factor in ``config.scaling_factor``."""
    tensors, meta = _read_final(final_path(work_dir, "vae"), device)
    arch = VAEArch(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["arch"].items()})
    vae = build_vae(arch, scaling_factor=float(meta["scaling_factor"])).to(device)
    vae.load_state_dict(tensors)
    return vae.eval()


def load_final_unet(
    work_dir: str | Path, device: str | torch.device = "cpu"
) -> tuple[UNet2DConditionModel, dict[str, Any]]:
    """The unet stage's EMA UNet (float32, eval mode) and the stage's metadata."""
    tensors, meta = _read_final(final_path(work_dir, "unet"), device)
    arch = UNetArch(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["arch"].items()})
    unet = build_unet(arch, cross_attention_dim=int(meta["cross_attention_dim"])).to(device)
    unet.load_state_dict(tensors)
    return unet.eval(), meta


def _text_encoder_from_clip(clip: CLIPModel) -> CLIPTextModel:
    text = CLIPTextModel(clip.config.text_config)
    text.load_state_dict(clip.text_model.state_dict())
    return text.to(clip.device).eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------
# VAE
# ----------------------------------------------------------------------------------------------------


def _to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) on any device -> float (N, 3, H, W) in [-1, 1], SD's VAE input range."""
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_vae(
    config: VAETrainConfig,
    *,
    device: str | torch.device,
    seed: int,
    work_dir: str | Path,
    progress: bool = False,
    callback: ProgressCallback | None = None,
) -> AutoencoderKL:
    """Train (or resume) the micro VAE, set ``scaling_factor`` = 1 / std of its latents, save ``final/vae``."""
    device = torch.device(device)
    work_dir = Path(work_dir)
    ckpt_dir = work_dir / "vae"
    torch.manual_seed(seed)
    vae = build_vae(config.arch).to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.lr, betas=(0.9, 0.99), weight_decay=0.0)
    start = 0
    ckpt = load_checkpoint(ckpt_dir, optimizer, device=device)
    if ckpt is not None:
        vae.load_state_dict(ckpt.tensors["model"])
        start = ckpt.step
        logger.info("resuming micro VAE from step %d", start)
    if start < config.steps and final_path(work_dir, "unet").exists():
        raise ValueError(
            f"{work_dir} holds a UNet trained on this VAE's latents: training the VAE now would invalidate it "
            "(continue the VAE in a new --work)"
        )
    images, _ = load_pool(pool_seeds(seed, config.pool_size), work_dir / "pool", config.render_workers, tag="train")
    pool = torch.from_numpy(images).to(device)
    vae.train()
    last_ckpt = t0 = time.monotonic()
    meter = SpeedMeter(start)
    metrics: dict[str, float] = {}
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc="vae", disable=not progress)
    for step in bar:
        rng = step_rng(seed, step, stream=1)
        idx = to_device(torch.from_numpy(rng.integers(0, len(pool), size=config.batch_size)), device)
        x = _to_unit(pool[idx])
        for g in optimizer.param_groups:
            g["lr"] = cosine_lr(step, config.steps, config.warmup, config.lr)
        with autocast_context(device):
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(
                posterior.mean.shape, generator=step_generator(seed, step, device, stream=1), device=device
            )
            recon = vae.decode(z).sample.float()
        rec = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        kl = posterior.kl().mean() / x[0].numel()
        loss = rec + config.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        done = step + 1
        meter.tick(done)
        if done % 50 == 0 or done == config.steps:
            mse = F.mse_loss(recon.detach().clamp(-1, 1), x).item() / 4  # in [0, 1] pixel units
            metrics = {"loss": loss.item(), "psnr": 10 * math.log10(1 / max(mse, 1e-10))}
            bar.set_postfix({k: f"{v:.3f}" for k, v in metrics.items()}, refresh=False)
        now = time.monotonic()
        out_of_time = config.time_limit_s is not None and now - t0 > config.time_limit_s
        if done == config.steps or out_of_time or now - last_ckpt >= config.checkpoint_every_s:
            save_checkpoint(ckpt_dir, done, {"model": vae}, optimizer, {"seed": seed})
            last_ckpt = now
        if callback is not None:
            callback("vae", done, config.steps, metrics)
        if out_of_time and done < config.steps:
            logger.warning("micro VAE stopped at step %d/%d: time limit reached", done, config.steps)
            break
    bar.close()
    meter.log("vae")
    vae.eval()
    scale, psnr = _latent_scale_and_psnr(vae, pool[: min(len(pool), 4096)], device, seed)
    vae.register_to_config(scaling_factor=scale)
    _save_final(vae, final_path(work_dir, "vae"), {"arch": asdict(config.arch), "scaling_factor": scale})
    atomic_write_json(ckpt_dir / "metrics.json", {"scaling_factor": scale, "psnr": psnr, **metrics})
    logger.info("micro VAE: scaling_factor %.4f, PSNR %.2f dB", scale, psnr)
    return vae


@torch.no_grad()
def _latent_scale_and_psnr(
    vae: AutoencoderKL, images: torch.Tensor, device: torch.device, seed: int
) -> tuple[float, float]:
    # SD's recipe: scale so that sampled latents have unit standard deviation.
    gen = torch.Generator(device=device).manual_seed(seed)
    latents, mse = [], 0.0
    for sl in chunks(len(images), 256):
        x = _to_unit(images[sl])
        dist = vae.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen, device=device)
        latents.append(z.float())
        mse += F.mse_loss(vae.decode(dist.mean).sample.clamp(-1, 1), x, reduction="sum").item() / 4
    std = torch.cat(latents).std().item()
    psnr = 10 * math.log10(1 / max(mse / images[..., 0].numel() / 3, 1e-10))
    return 1.0 / std, psnr


@torch.no_grad()
def encode_pool_latents(
    vae: AutoencoderKL, images: np.ndarray, device: str | torch.device, batch: int = 256, progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std (unscaled) of every pool image, float32 on ``device``; UNet steps then sample
    ``mean + std * eps`` without touching the VAE."""
    means, stds = [], []
    for sl in tqdm(list(chunks(len(images), batch)), desc="latents", disable=not progress):
        x = _to_unit(torch.from_numpy(images[sl]).to(device))
        dist = vae.encode(x).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    return torch.cat(means), torch.cat(stds)


# ----------------------------------------------------------------------------------------------------
# UNet
# ----------------------------------------------------------------------------------------------------


def _min_snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float | None) -> torch.Tensor:
    # Min-SNR-gamma (Hang et al. 2023) for epsilon prediction: weight = min(SNR, gamma) / SNR. Speeds convergence by
    # not spending the model's capacity on nearly-noiseless timesteps.
    if gamma is None:
        return torch.ones_like(timesteps, dtype=torch.float32)
    ac = alphas_cumprod[timesteps].float()
    snr = ac / (1 - ac)
    return torch.clamp(snr, max=gamma) / snr


def train_unet(
    config: UNetTrainConfig,
    *,
    device: str | torch.device,
    seed: int,
    work_dir: str | Path,
    progress: bool = False,
    callback: ProgressCallback | None = None,
) -> UNet2DConditionModel:
    """Train (or resume) the micro UNet on cached pool latents; needs ``final/clip`` and ``final/vae``.

    Text conditioning is the frozen micro CLIP text tower's ``last_hidden_state`` on 77-token EOS-padded ids, exactly
    what ``StableDiffusionPipeline.encode_prompt`` feeds the UNet; captions are re-drawn every step, and replaced by
    the empty string with probability ``caption_dropout`` so the same UNet serves as the unconditional model for CFG.
    Saves the EMA weights as ``final/unet`` and returns the EMA UNet.
    """
    from evals.microworld import world

    device = torch.device(device)
    work_dir = Path(work_dir)
    ckpt_dir = work_dir / "unet"
    clip_version = final_metadata(work_dir, "clip")["world_version"]
    if clip_version != config.world_version:
        raise ValueError(
            f"{work_dir}'s CLIP was trained on world version {clip_version}: a UNet of version {config.world_version} "
            "reads a text tower of its own version (run the clip stage first)"
        )
    clip, _ = load_final_clip(work_dir, device)
    text_encoder = _text_encoder_from_clip(clip)
    text_digest = text_tower_digest(clip)
    del clip
    tokenizer = offline_clip_tokenizer()
    vae = load_final_vae(work_dir, device)
    scaling = float(vae.config.scaling_factor)
    cross_dim = text_encoder.config.hidden_size

    torch.manual_seed(seed)
    unet = build_unet(config.arch, cross_attention_dim=cross_dim).to(device)
    ema = Ema(unet, config.ema_decay)
    decay, no_decay = [], []
    for name, p in unet.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(0.9, 0.999),
    )
    start = 0
    ckpt = load_checkpoint(ckpt_dir, optimizer, device=device)
    if ckpt is not None:
        unet.load_state_dict(ckpt.tensors["model"])
        ema.load_state_dict(ckpt.tensors["ema"])
        start = ckpt.step
        logger.info("resuming micro UNet from step %d", start)
    elif (init := load_initial_weights(work_dir, "unet", device)) is not None:
        unet.load_state_dict(init)
        ema = Ema(unet, config.ema_decay)

    if start < config.steps:
        images, scenes = load_pool(
            pool_seeds(seed, config.pool_size),
            work_dir / "pool",
            config.render_workers,
            tag="train",
            version=config.world_version,
        )
        emblems = config.world_version >= world.EMBLEM_VERSION
        has_emblem = np.array([s.emblem is not None for s in scenes])
        with torch.no_grad(), autocast_context(device):
            lat_mean, lat_std = encode_pool_latents(vae, images, device, config.encode_batch, progress)
        del vae, images
        noise_scheduler = training_scheduler()
        alphas = noise_scheduler.alphas_cumprod.to(device)
        token_cache: dict[str, list[int]] = {}
        unet.train()
        last_ckpt = t0 = time.monotonic()
        meter = SpeedMeter(start)
        metrics: dict[str, float] = {}
        running = torch.zeros((), device=device)
        bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc="unet", disable=not progress)
        for step in bar:
            rng = step_rng(seed, step, stream=2)
            if emblems:
                idx_np = replay_batch(rng, has_emblem, config.batch_size, config.emblem_replay, replace=True)
            else:
                idx_np = rng.integers(0, len(scenes), size=config.batch_size)
            drop = rng.random(config.batch_size) < config.caption_dropout
            captions = ["" if d else world.caption(scenes[i], rng) for i, d in zip(idx_np, drop, strict=True)]
            ids = to_device(tokenize(tokenizer, captions, pad_to_max=True, cache=token_cache), device)
            idx = to_device(torch.from_numpy(idx_np), device)
            gen = step_generator(seed, step, device, stream=2)
            mean, std = lat_mean[idx], lat_std[idx]
            latents = (mean + std * torch.randn(mean.shape, generator=gen, device=device)) * scaling
            noise = torch.randn(latents.shape, generator=gen, device=device)
            timesteps = torch.randint(0, len(alphas), (config.batch_size,), generator=gen, device=device)
            a = alphas[timesteps].view(-1, 1, 1, 1)
            noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
            for g in optimizer.param_groups:
                g["lr"] = cosine_lr(step, config.steps, config.warmup, config.lr)
            with autocast_context(device):
                with torch.no_grad():
                    states = text_encoder(input_ids=ids).last_hidden_state
                pred = unet(noisy, timesteps, encoder_hidden_states=states).sample
            per_sample = (pred.float() - noise).pow(2).mean(dim=(1, 2, 3))
            loss = (per_sample * _min_snr_weights(alphas, timesteps, config.min_snr_gamma)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            ema.update(unet, step)
            running += per_sample.detach().mean()
            done = step + 1
            meter.tick(done)
            if done % 50 == 0 or done == config.steps:
                # the only host sync of the loop: reading the loss every step would stall the GPU queue
                metrics = {"mse": running.item() / (50 if done % 50 == 0 else done % 50)}
                running.zero_()
                bar.set_postfix({k: f"{v:.4f}" for k, v in metrics.items()}, refresh=False)
            now = time.monotonic()
            out_of_time = config.time_limit_s is not None and now - t0 > config.time_limit_s
            if done == config.steps or out_of_time or now - last_ckpt >= config.checkpoint_every_s:
                save_checkpoint(ckpt_dir, done, {"model": unet, "ema": ema.state_dict()}, optimizer, {"seed": seed})
                last_ckpt = now
            if callback is not None:
                callback("unet", done, config.steps, metrics)
            if out_of_time and done < config.steps:
                logger.warning("micro UNet stopped at step %d/%d: time limit reached", done, config.steps)
                break
        bar.close()
        meter.log("unet")
        final_step = done
    else:
        final_step = start

    ema.copy_to(unet)
    unet.eval()
    meta = {
        "arch": asdict(config.arch),
        "cross_attention_dim": cross_dim,
        "step": final_step,
        "complete": final_step >= config.steps,
        "world_version": config.world_version,
        "text_tower_sha256": text_digest,
    }
    _save_final(unet, final_path(work_dir, "unet"), meta)
    return unet


# ----------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------


def save_compact_tokenizer(path: str | Path) -> Path:
    """Write the offline CLIP tokenizer as ``vocab.json`` + ``merges.txt`` (1.4 MB instead of a 3.6 MB
    ``tokenizer.json``: the shipped folders have a size budget). ``CLIPTokenizer.from_pretrained`` rebuilds the same
    tokenizer from them."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for stale in ("tokenizer.json", "special_tokens_map.json", "added_tokens.json"):
        (path / stale).unlink(missing_ok=True)
    vocab, merges = clip_vocab_and_merges()
    tok = offline_clip_tokenizer()
    atomic_write_bytes(path / "vocab.json", json.dumps(vocab, ensure_ascii=False, separators=(",", ":")).encode())
    atomic_write_bytes(
        path / "merges.txt", ("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n").encode()
    )
    atomic_write_json(
        path / "tokenizer_config.json",
        {
            "tokenizer_class": "CLIPTokenizer",
            "bos_token": tok.bos_token,
            "eos_token": tok.eos_token,
            "pad_token": tok.pad_token,
            "unk_token": tok.unk_token,
            "model_max_length": tok.model_max_length,
        },
    )
    return path


def declare_float32(config_json: str | Path) -> None:
    """Mark a transformers config as float32 although its weights are stored in fp16.

    transformers 5 loads a model in the dtype its config names when no dtype is given, while diffusers loads its
    models in float32; a plain ``StableDiffusionPipeline.from_pretrained(path)`` would then feed fp16 text states to
    a float32 UNet and fail. Declaring float32 makes the plain load consistent (fp16 weights are upcast on load).
    """
    path = Path(config_json)
    cfg = json.loads(path.read_text())
    cfg.pop("torch_dtype", None)
    cfg["dtype"] = "float32"
    atomic_write_json(path, cfg)


def _replace_dir(tmp: Path, out: Path) -> None:
    # Swap a fully written folder into place so a crash never leaves a half-exported model at ``out``.
    old = out.with_name(f".{out.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)


def final_metadata(work_dir: str | Path, stage: str) -> dict[str, Any]:
    """The JSON metadata of a stage's hand-over file (``world_version`` 1 when it does not record one)."""
    path = final_path(work_dir, stage)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run the {stage} stage first")
    with safe_open(str(path), framework="pt") as f:
        return {"world_version": 1} | {k: json.loads(v) for k, v in (f.metadata() or {}).items()}


def _check_pairing(work_dir: str | Path, clip: CLIPModel) -> int:
    """The world version of ``work_dir``'s final CLIP and UNet; ValueError unless they share it and, for version 2,
    the UNet was trained on this text tower (the clip stage of version 2 retrains it; the unet stage must follow)."""
    clip_version = final_metadata(work_dir, "clip")["world_version"]
    unet_meta = final_metadata(work_dir, "unet")
    unet_version = unet_meta["world_version"]
    if clip_version != unet_version:
        raise ValueError(
            f"{work_dir}'s CLIP is of world version {clip_version} and its UNet of version {unet_version}: "
            "run the unet stage after the clip stage"
        )
    if unet_version >= 2 and unet_meta.get("text_tower_sha256") != text_tower_digest(clip):
        raise ValueError(f"{work_dir}'s UNet was trained on another text tower than its CLIP's: run the unet stage")
    return unet_version


def export_micro(work_dir: str | Path, out_sd: str | Path, out_clip: str | Path) -> tuple[Path, Path]:
    """Assemble the shipped folders from the ``final/*`` files: the micro CLIP folder and the SD pipeline folder
    (fp16 safetensors, SDE-DPM-Solver++ scheduler, no safety checker, ``world.json`` beside ``model_index.json``, of
    the world version the models were trained on).

    A version-2 export writes the version-2 ``world.json``; ``world.WORLD_VERSION``, ``CATEGORIES`` and the name
    look-ups stay version 1 until such a model is shipped (docs/design/world-100.md, stage 8)."""
    from evals.microworld import world

    out_sd, out_clip = Path(out_sd), Path(out_clip)
    clip, _ = load_final_clip(work_dir)
    version = _check_pairing(work_dir, clip)
    tmp_clip = out_clip.with_name(f".{out_clip.name}.tmp")
    shutil.rmtree(tmp_clip, ignore_errors=True)
    save_micro_clip(clip, tmp_clip)
    save_compact_tokenizer(tmp_clip)
    declare_float32(tmp_clip / "config.json")
    _replace_dir(tmp_clip, out_clip)

    pipe = StableDiffusionPipeline(
        vae=load_final_vae(work_dir),
        text_encoder=_text_encoder_from_clip(clip),
        tokenizer=offline_clip_tokenizer(),
        unet=load_final_unet(work_dir)[0],
        scheduler=inference_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(torch.float16)
    tmp_sd = out_sd.with_name(f".{out_sd.name}.tmp")
    shutil.rmtree(tmp_sd, ignore_errors=True)
    pipe.save_pretrained(tmp_sd, safe_serialization=True)
    save_compact_tokenizer(tmp_sd / "tokenizer")
    declare_float32(tmp_sd / "text_encoder" / "config.json")
    world.write_world_json(tmp_sd / "world.json", version=version)
    _replace_dir(tmp_sd, out_sd)
    return out_sd, out_clip


def _rebuild_exported(sd_path: Path, clip_path: Path) -> tuple[CLIPModel, AutoencoderKL, UNet2DConditionModel, dict]:
    """Load exported models and rebuild each from the trainer's architecture dataclasses, so that training them
    further in a work dir is exactly what training them from seed would have been (strict ``load_state_dict``)."""
    shipped_clip = CLIPModel.from_pretrained(clip_path, dtype=torch.float32)
    tc, vc = shipped_clip.config.text_config, shipped_clip.config.vision_config
    clip_arch = ClipArch(
        text_hidden=tc.hidden_size,
        text_layers=tc.num_hidden_layers,
        text_heads=tc.num_attention_heads,
        text_intermediate=tc.intermediate_size,
        vision_hidden=vc.hidden_size,
        vision_layers=vc.num_hidden_layers,
        vision_heads=vc.num_attention_heads,
        vision_intermediate=vc.intermediate_size,
        patch_size=vc.patch_size,
        projection_dim=shipped_clip.config.projection_dim,
    )
    clip = CLIPModel(micro_clip_config(clip_arch))
    clip.load_state_dict(shipped_clip.state_dict())

    shipped_vae = AutoencoderKL.from_pretrained(sd_path / "vae", dtype=torch.float32)
    c = shipped_vae.config
    vae_arch = VAEArch(
        block_out_channels=tuple(c.block_out_channels),
        layers_per_block=c.layers_per_block,
        norm_num_groups=c.norm_num_groups,
        mid_block_add_attention=c.mid_block_add_attention,
    )
    vae = build_vae(vae_arch, scaling_factor=float(c.scaling_factor))
    vae.load_state_dict(shipped_vae.state_dict())

    shipped_unet = UNet2DConditionModel.from_pretrained(sd_path / "unet", dtype=torch.float32)
    c = shipped_unet.config
    heads = c.attention_head_dim if isinstance(c.attention_head_dim, list | tuple) else [c.attention_head_dim] * 3
    layers = c.transformer_layers_per_block
    unet_arch = UNetArch(
        block_out_channels=tuple(c.block_out_channels),
        layers_per_block=c.layers_per_block,
        norm_num_groups=c.norm_num_groups,
        attention_head_dim=c.block_out_channels[-1] // heads[-1],  # build_unet's heads = channels // head width
        transformer_layers=layers if isinstance(layers, int) else layers[0],
    )
    unet = build_unet(unet_arch, cross_attention_dim=c.cross_attention_dim)
    unet.load_state_dict(shipped_unet.state_dict())
    archs = {"clip": asdict(clip_arch), "vae": asdict(vae_arch), "unet": asdict(unet_arch)}
    return clip, vae, unet, archs


def import_micro(work_dir: str | Path, sd_path: str | Path, clip_path: str | Path) -> None:
    """Seed a new work dir with exported models (the inverse of :func:`export_micro`), so that training continues
    from them instead of from seed. Checkpoints stay in ignored work dirs and are lost with the machine; the exported
    folders are what lasts.

    Writes ``final/{clip,vae,unet}`` (export and eval then work at once) and ``init/{clip,unet}``, the weights those
    stages start from at step 0 with fresh optimizers: continuing is a warm restart, a new warm-up and cosine schedule
    over the stage's steps. The CLIP's text tower must then stay frozen (the UNet reads it), and the VAE cannot be
    retrained under the UNet; both stages refuse to.
    """
    work_dir, sd_path, clip_path = Path(work_dir), Path(sd_path), Path(clip_path)
    if not (sd_path / "model_index.json").exists():
        raise FileNotFoundError(f"{sd_path} is not a Stable Diffusion pipeline folder (no model_index.json)")
    if not (clip_path / "config.json").exists():
        raise FileNotFoundError(f"{clip_path} is not a CLIP model folder (no config.json)")
    # Only an import writes final/ and init/ without a stage's checkpoint folder beside them, and it writes
    # init/unet last: without it and without checkpoints, what is there is an interrupted import, redone here.
    taken = [p for p in (work_dir / s for s in ("clip", "vae", "unet")) if p.exists()]
    if init_path(work_dir, "unet").exists():
        taken.append(work_dir / "init")
    if taken:
        raise FileExistsError(f"{work_dir} already holds training state ({taken[0].name}/): import into a new --work")
    if (work_dir / "final").exists() or (work_dir / "init").exists():
        logger.warning("%s holds an interrupted import: importing again", work_dir)
    clip, vae, unet, archs = _rebuild_exported(sd_path, clip_path)
    text_encoder = CLIPTextModel.from_pretrained(sd_path / "text_encoder", dtype=torch.float32)
    clip_text = clip.text_model.state_dict()
    if any(not torch.equal(v, clip_text[k]) for k, v in text_encoder.state_dict().items()):
        raise ValueError(f"{clip_path}'s text tower is not {sd_path}'s text encoder: they were not trained together")
    source = {"imported_from": {"sd": str(sd_path), "clip": str(clip_path)}}
    unet_meta = {
        "arch": archs["unet"],
        "cross_attention_dim": unet.config.cross_attention_dim,
        "step": 0,
        "text_tower_sha256": text_tower_digest(clip),
    }
    _save_final(vae, final_path(work_dir, "vae"), {"arch": archs["vae"], "scaling_factor": vae.config.scaling_factor})
    # init/unet last: its presence marks a finished import (train_micro.py --init-from resumes on it)
    for path in (final_path(work_dir, "clip"), init_path(work_dir, "clip")):
        _save_final(clip, path, {"arch": archs["clip"], **source})
    for path in (final_path(work_dir, "unet"), init_path(work_dir, "unet")):
        _save_final(unet, path, {**unet_meta, "complete": True, **source})
    logger.info("imported %s and %s into %s", sd_path, clip_path, work_dir)


# ----------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------


def _load_judge():
    try:
        from evals.microworld.judge import load_judge
    except ImportError:
        return None
    try:
        return load_judge()
    except (FileNotFoundError, OSError) as err:
        logger.warning("judge unavailable: %s", err)
        return None


@torch.no_grad()
def vae_roundtrip(
    vae: AutoencoderKL, images: np.ndarray, device: str | torch.device, batch: int = 64, progress: bool = False
) -> np.ndarray:
    """uint8 images (N, 64, 64, 3) encoded to their posterior mode and decoded again, as uint8 images."""
    device = torch.device(device)
    out = []
    for sl in tqdm(list(chunks(len(images), batch)), desc="vae roundtrip", disable=not progress):
        x = _to_unit(to_device(torch.from_numpy(images[sl]), device))
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample.float().clamp(-1, 1)
        out.append(((y.permute(0, 2, 3, 1) + 1) * 127.5 + 0.5).to(torch.uint8).cpu().numpy())
    return np.concatenate(out)


def vae_reconstructor(
    work_dir: str | Path, device: str | torch.device, progress: bool = False
) -> Callable[[np.ndarray], np.ndarray]:
    """:func:`vae_roundtrip` through ``work_dir``'s final VAE, cached in ``work_dir/pool`` under a digest of the VAE
    file and the images (reconstructing 20k images takes minutes on a CPU; a resumed stage should not redo it)."""
    work_dir = Path(work_dir)
    vae = load_final_vae(work_dir, device)
    return _cached_reconstructor(vae, final_path(work_dir, "vae"), work_dir / "pool", device, progress)


def folder_vae_reconstructor(
    vae_folder: str | Path, cache_dir: str | Path | None, device: str | torch.device, progress: bool = False
) -> Callable[[np.ndarray], np.ndarray]:
    """:func:`vae_roundtrip` through a diffusers VAE folder (e.g. ``pipelines/micro/vae``), cached in ``cache_dir``
    (when given) as :func:`vae_reconstructor` caches it (the judge trains on the shipped VAE's reconstructions)."""
    vae_folder = Path(vae_folder)
    weights = sorted(vae_folder.glob("*.safetensors"))
    if not (vae_folder / "config.json").is_file() or not weights:
        raise FileNotFoundError(f"{vae_folder} is not a diffusers VAE folder (config.json and *.safetensors)")
    vae = AutoencoderKL.from_pretrained(vae_folder, dtype=torch.float32).to(device).eval()
    return _cached_reconstructor(vae, weights[0], None if cache_dir is None else Path(cache_dir), device, progress)


def _cached_reconstructor(
    vae: AutoencoderKL, weights: Path, cache_dir: Path | None, device: str | torch.device, progress: bool
) -> Callable[[np.ndarray], np.ndarray]:
    vae_digest = hashlib.sha256(weights.read_bytes()).digest()

    def reconstruct(images: np.ndarray) -> np.ndarray:
        if cache_dir is None:
            return vae_roundtrip(vae, images, device, progress=progress)
        key = hashlib.sha256(vae_digest + np.ascontiguousarray(images).tobytes()).hexdigest()[:16]
        path = cache_dir / f"vae-recon-{len(images)}-{key}.npy"
        if path.exists():
            recon = np.load(path, allow_pickle=False)
            if recon.shape == images.shape:
                return recon
            logger.warning("VAE reconstruction cache %s has the wrong shape; rebuilding", path.name)
        recon = vae_roundtrip(vae, images, device, progress=progress)
        atomic_save_npy(path, recon)
        return recon

    return reconstruct


def _vae_reconstructions(
    vae: AutoencoderKL, seed: int, device: torch.device, n: int = 512
) -> tuple[np.ndarray, list[Any]]:
    """``n`` held-out renders passed through the VAE, with their true scenes. Every generated image is a VAE
    decoding, so a scorer's accuracy on these is the most it can reach on generated images: the ceiling the UNet aims
    at."""
    from evals.microworld import world

    images, scenes = world.render_dataset(pool_seeds(seed, n, "heldout"))
    return vae_roundtrip(vae, images, device), scenes


@torch.no_grad()
def evaluate_micro(
    sd_path: str | Path,
    clip_path: str | Path,
    *,
    device: str | torch.device,
    seed: int,
    n_images: int = 32,
    batch: int = 16,
    steps: int | None = None,
    out_dir: str | Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Generate ``n_images`` per concept from its one-attribute prompt (``world.prompt``) at the default sampler
    settings (``steps``: ``DEFAULT_STEPS`` unless given) and fixed seeds, and report per-category accuracy of the
    named attribute as judged by the micro CLIP (zero-shot) and by the ground-truth judge when it exists, and how
    often the two name the same concept for an image, and CLIP's accuracy on the images the judge reads as the named
    concept (the scorer's own error, apart from the UNet's). Saves one image grid PNG per category in ``out_dir``.
    """
    from evals.microworld import world

    device = torch.device(device)
    pipe = StableDiffusionPipeline.from_pretrained(sd_path, dtype=torch.float32).to(device)
    pipe.set_progress_bar_config(disable=True)
    clip, clip_tok = load_micro_clip(clip_path, device)
    judge = _load_judge()
    results: dict[str, Any] = {
        "clip": {},
        "judge": {} if judge is not None else None,
        "agreement": {} if judge is not None else None,
        "clip_where_judge_right": {} if judge is not None else None,
        "images": {},
        "per_concept": {},
    }
    t_start = time.monotonic()
    n_generated = 0
    for c_idx, cat in enumerate(world.CATEGORIES):
        names = world.concepts(cat)
        grid_rows = []
        clip_hits, judge_hits, agree, clip_given_judge = [], [], [], []
        for n_idx, name in enumerate(tqdm(names, desc=f"eval {cat}", disable=not progress)):
            prompt = world.prompt(**{cat: name})
            imgs = []
            for sl in chunks(n_images, batch):
                gens = [
                    torch.Generator("cpu").manual_seed(seed * 1_000_003 + c_idx * 10_007 + n_idx * 1009 + i)
                    for i in range(sl.start, sl.stop)
                ]
                out = pipe(
                    [prompt] * len(gens),
                    num_inference_steps=DEFAULT_STEPS if steps is None else steps,
                    guidance_scale=DEFAULT_GUIDANCE,
                    generator=gens,
                    output_type="np",
                ).images
                imgs.append((np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8))
            images = np.concatenate(imgs)
            n_generated += len(images)
            clip_pred = zero_shot_predict(clip, clip_tok, images, cat, device)
            hits = {"clip": float(np.mean([p == name for p in clip_pred]))}
            clip_hits.append(hits["clip"])
            if judge is not None:
                judge_pred = judge.predict(images)[cat]
                hits["judge"] = float(np.mean([p == name for p in judge_pred]))
                judge_hits.append(hits["judge"])
                agree.extend(a == b for a, b in zip(clip_pred, judge_pred, strict=True))
                clip_given_judge.extend(c == name for c, j in zip(clip_pred, judge_pred, strict=True) if j == name)
            results["per_concept"][f"{cat}:{name}"] = hits
            grid_rows.append(np.concatenate(list(images[: min(8, len(images))]), axis=1))
        results["clip"][cat] = float(np.mean(clip_hits))
        results["images"][cat] = n_images * len(names)
        if judge is not None:
            results["judge"][cat] = float(np.mean(judge_hits))
            # per image: does CLIP name the same concept of this category as the judge (right or wrong)?
            results["agreement"][cat] = float(np.mean(agree))
            # the scorer's own error: CLIP's accuracy on the images the UNet drew right (by the judge)
            results["clip_where_judge_right"][cat] = float(np.mean(clip_given_judge)) if clip_given_judge else None
        if out_dir is not None:
            width = max(r.shape[1] for r in grid_rows)
            rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in grid_rows]
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.concatenate(rows, axis=0)).save(Path(out_dir) / f"eval_{cat}.png")
    results["seconds_per_image"] = (time.monotonic() - t_start) / max(1, n_generated)
    # 16 renders per eval image a concept: 512 at the default 32, as many as a smoke run's few images deserve
    recon, scenes = _vae_reconstructions(pipe.vae, seed, device, n=max(64, 16 * n_images))
    results["clip_on_vae_reconstructions"] = zero_shot_accuracy(clip, clip_tok, recon, scenes, device)
    if judge is not None:
        from evals.microworld.judge import evaluate

        results["judge_on_vae_reconstructions"] = evaluate(judge, recon, scenes)
    if out_dir is not None:
        atomic_write_json(Path(out_dir) / "eval.json", results)
    return results
