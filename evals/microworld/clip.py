"""The micro CLIP: a small ``transformers.CLIPModel`` trained from scratch on the micro world.

It plays two roles: its text tower is the frozen text encoder of the micro Stable Diffusion (so its token ids are SD's,
from the offline CLIP tokenizer), and the whole model is the zero-shot CLIP used to score generations.

Training is contrastive with a multi-positive target. World captions name only a random subset of a scene's
attributes ("a red star", "pointillism style"), so in a batch another image often fits a caption as well as its own
image does; treating those as negatives would teach the model to separate things the caption cannot distinguish.
The target row for caption i is therefore uniform over every image j whose scene is consistent with caption i, and
the image->text direction uses the transposed mask.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import cache, lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

from evals.microworld.judge import degrade, warp_images
from evals.microworld.train_utils import (
    ProgressCallback,
    SpeedMeter,
    autocast_context,
    chunks,
    cosine_lr,
    final_path,
    load_checkpoint,
    load_initial_weights,
    load_pool,
    pool_seeds,
    replay_batch,
    save_checkpoint,
    step_generator,
    step_rng,
    to_device,
)
from pipelines.files import atomic_write_json
from pipelines.tokenizer import clean_prompt, offline_clip_tokenizer

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "ClipArch",
    "ClipTrainConfig",
    "caption_consistency",
    "class_prompt_batch",
    "class_prompt_loss",
    "concept_text_embeddings",
    "encode_images",
    "encode_texts",
    "load_micro_clip",
    "micro_clip_config",
    "micro_clip_path",
    "pixel_values",
    "save_micro_clip",
    "tokenize",
    "train_micro_clip",
    "zero_shot_accuracy",
    "zero_shot_predict",
]

logger = logging.getLogger(__name__)

# OpenAI CLIP's normalisation constants; kept so the preprocessor config reads like any CLIP's.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
BOS_ID, EOS_ID, PAD_ID = 49406, 49407, 49407
VOCAB_SIZE = 49408


@dataclass(frozen=True)
class ClipArch:
    """Sizes of the micro CLIP. The vocabulary is always CLIP's 49408 tokens so SD's tokenizer ids apply."""

    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_intermediate: int = 512
    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    vision_intermediate: int = 512
    patch_size: int = 8
    projection_dim: int = 128

    def __post_init__(self) -> None:
        if self.text_hidden % self.text_heads or self.vision_hidden % self.vision_heads:
            raise ValueError("hidden sizes must be divisible by head counts")
        if 64 % self.patch_size:
            raise ValueError("patch_size must divide the 64-pixel image size")
        if min(self.text_layers, self.vision_layers, self.projection_dim) < 1:
            raise ValueError("layers and projection_dim must be positive")


@dataclass(frozen=True)
class ClipTrainConfig:
    """How to train the micro CLIP (see ``scripts/train_micro.py`` presets)."""

    arch: ClipArch = field(default_factory=ClipArch)
    steps: int = 4000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 200
    # The vision tower learns a small pool by heart; rendering costs ~1 ms an image, so every preset draws this many.
    # (The micro UNet does not memorise its 20k.) Figures: the micro model's card.
    pool_size: int = 200_000
    heldout_size: int = 1024
    render_workers: int = 1
    eval_every: int = 1000
    # Weight of ``class_prompt_loss`` (each image against every concept's one-attribute prompt), added to the
    # contrastive loss. Off by default: from scratch it costs 60% more time a step; as a vision-side continuation it is
    # cheap (the frozen text tower encodes 23 short prompts a step), and the shipped CLIP was trained with it (the
    # micro model's card, runs 13-14).
    class_prompt_weight: float = 0.0
    # From this step on only the vision side trains: the text tower is the micro SD's frozen text encoder, so once
    # the UNet has been trained on it, the scorer can keep improving without changing what the UNet reads.
    freeze_text_after: int | None = None
    # From this step on training images are degraded the way generated samples are (``judge.augment``: blur,
    # VAE-like softening, noise, colour drift): trained on clean renders only, the CLIP misreads degraded images that
    # the judge, trained with them, reads right.
    augment_from: int | None = None
    # From this step on ``vae_fraction`` of each batch are VAE reconstructions (``reconstruct`` in
    # :func:`train_micro_clip`) of the first ``vae_pool_size`` pool images, reconstructed once: every generated image
    # is a VAE decoding. Off in the shipped CLIP (it lost generated objects; the micro model's card, run 8).
    vae_from: int | None = None
    vae_pool_size: int = 20_000
    vae_fraction: float = 0.5
    # From this step on training images are warped (``judge.warp``: small rotation, scale and a smooth
    # displacement field) before any degradation: generated shapes are wobbly, and the CLIP misread warped renders
    # that the judge reads right (the micro model's card, run 11).
    warp_from: int | None = None
    warp_amplitude: float = 0.1
    # World version of the pool and captions. Version 2 (docs/design/world-100.md, stage 2) renders emblems on half
    # the pool, names them in captions, trains the text tower even over an imported UNet (which the unet stage then
    # retrains), and draws ``emblem_replay`` of every batch from scenes without an emblem.
    world_version: int = 1
    emblem_replay: float = 0.5
    checkpoint_every_s: float = 180.0
    time_limit_s: float | None = None

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 2:
            raise ValueError("steps must be >= 1 and batch_size >= 2")
        if not 0 <= self.warmup <= self.steps:
            raise ValueError("warmup must be in [0, steps]")
        if self.pool_size < self.batch_size:
            raise ValueError("pool_size must be at least batch_size")
        if self.class_prompt_weight < 0:
            raise ValueError("class_prompt_weight must be >= 0")
        if self.freeze_text_after is not None and self.freeze_text_after < 0:
            raise ValueError(f"freeze_text_after must be >= 0, got {self.freeze_text_after}")
        if self.augment_from is not None and self.augment_from < 0:
            raise ValueError(f"augment_from must be >= 0, got {self.augment_from}")
        if self.vae_from is not None and self.vae_from < 0:
            raise ValueError(f"vae_from must be >= 0, got {self.vae_from}")
        if self.warp_from is not None and self.warp_from < 0:
            raise ValueError(f"warp_from must be >= 0, got {self.warp_from}")
        if not 0 < self.warp_amplitude <= 0.5:
            raise ValueError(f"warp_amplitude must be in (0, 0.5], got {self.warp_amplitude}")
        if not 0 < self.vae_fraction <= 1 or self.vae_pool_size < 1:
            raise ValueError("vae_fraction must be in (0, 1] and vae_pool_size >= 1")
        if self.world_version not in (1, 2) or not 0.0 <= self.emblem_replay <= 1.0:
            raise ValueError(f"world_version must be 1 or 2 and emblem_replay in [0, 1], got {self.world_version}, "
                             f"{self.emblem_replay}")  # fmt: skip
        if self.lr <= 0 or self.weight_decay < 0 or self.render_workers < 1 or self.heldout_size < 1:
            raise ValueError("lr > 0, weight_decay >= 0, render_workers >= 1, heldout_size >= 1 required")


def micro_clip_config(arch: ClipArch | None = None) -> CLIPConfig:
    """The ``CLIPConfig`` of the micro CLIP. bos/eos/pad ids are SD's, so EOS pooling finds the real end token."""
    a = arch or ClipArch()
    text = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=a.text_hidden,
        intermediate_size=a.text_intermediate,
        num_hidden_layers=a.text_layers,
        num_attention_heads=a.text_heads,
        max_position_embeddings=77,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        hidden_act="quick_gelu",
        projection_dim=a.projection_dim,
    )
    vision = dict(
        image_size=64,
        patch_size=a.patch_size,
        hidden_size=a.vision_hidden,
        intermediate_size=a.vision_intermediate,
        num_hidden_layers=a.vision_layers,
        num_attention_heads=a.vision_heads,
        hidden_act="quick_gelu",
        projection_dim=a.projection_dim,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=a.projection_dim)


def micro_clip_path() -> Path:
    """The shipped micro CLIP folder (CLIPModel + tokenizer + preprocessor config)."""
    return Path(__file__).resolve().parent / "clip"


# ----------------------------------------------------------------------------------------------------
# Pre-processing and encoding
# ----------------------------------------------------------------------------------------------------


def pixel_values(images: np.ndarray | torch.Tensor, device: str | torch.device | None = None) -> torch.Tensor:
    """uint8 images (N, 64, 64, 3) -> normalised float32 (N, 3, 64, 64): the one preprocessing for train and score.

    Equal to ``CLIPImageProcessor`` with the saved preprocessor config on 64x64 inputs (rescale 1/255, CLIP mean/std).
    """
    x = torch.as_tensor(images)
    if device is not None:
        x = x.to(device)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) images, got {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def image_processor() -> CLIPImageProcessor:
    """A ``CLIPImageProcessor`` matching :func:`pixel_values` for 64x64 images (saved beside the model)."""
    return CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": 64},
        do_center_crop=True,
        crop_size={"height": 64, "width": 64},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        do_convert_rgb=True,
    )


def tokenize(
    tokenizer: CLIPTokenizer, texts: list[str], *, pad_to_max: bool = False, cache: dict[str, list[int]] | None = None
) -> torch.Tensor:
    """Token ids (N, L) for ``texts`` after ``clean_prompt``, EOS-padded; L = 77 if ``pad_to_max`` else the longest.

    CLIP's causal attention means EOS-padding to the longest or to 77 gives the same pooled output; the cache (a
    caller-owned dict) avoids re-running BPE on the few thousand distinct world captions every step.
    """
    rows: list[list[int]] = []
    missing = [t for t in dict.fromkeys(texts) if cache is None or t not in cache]
    if missing:
        enc = tokenizer([clean_prompt(t) for t in missing], truncation=True, max_length=77)["input_ids"]
        fresh = dict(zip(missing, enc, strict=True))
        if cache is not None:
            cache.update(fresh)
    else:
        fresh = {}
    for t in texts:
        rows.append(fresh[t] if t in fresh else cache[t])  # type: ignore[index]
    length = 77 if pad_to_max else max(len(r) for r in rows)
    # one tensor construction from padded lists: per-row tensor writes cost more than the model on a GPU
    return torch.tensor([r[:length] + [PAD_ID] * (length - len(r)) for r in rows], dtype=torch.long)


def encode_texts(
    model: CLIPModel, tokenizer: CLIPTokenizer, texts: list[str], device: str | torch.device, batch: int = 512
) -> torch.Tensor:
    """L2-normalised projected text embeddings (N, D), float32."""
    outs = []
    for sl in chunks(len(texts), batch):
        ids = tokenize(tokenizer, texts[sl]).to(device)
        outs.append(model.get_text_features(input_ids=ids).pooler_output.float())
    return F.normalize(torch.cat(outs), dim=-1)


def encode_images(
    model: CLIPModel, images: np.ndarray | torch.Tensor, device: str | torch.device, batch: int = 512
) -> torch.Tensor:
    """L2-normalised projected image embeddings (N, D), float32, from uint8 images."""
    outs = []
    for sl in chunks(len(images), batch):
        pv = pixel_values(images[sl], device=device)
        outs.append(model.get_image_features(pixel_values=pv).pooler_output.float())
    return F.normalize(torch.cat(outs), dim=-1)


@torch.no_grad()
def concept_text_embeddings(
    model: CLIPModel, tokenizer: CLIPTokenizer, category: str, device: str | torch.device
) -> tuple[list[str], torch.Tensor]:
    """Zero-shot class embeddings for a category: each concept's mean over the world's one-attribute templates
    (the emblems of version 2: their ``emblem`` templates)."""
    from evals.microworld import world

    names = world.emblem_names() if category == world.EMBLEM else world.concepts(category)
    rows = []
    for name in names:
        named = {c: c == category for c in (*world.CATEGORIES, world.EMBLEM)}
        n_templates = len(world.templates_for(**named, plain=name == "plain"))
        prompts = [world.prompt(**{category: name}, template=k) for k in range(n_templates)]
        rows.append(encode_texts(model, tokenizer, prompts, device).mean(0))
    return names, F.normalize(torch.stack(rows), dim=-1)


@torch.no_grad()
def zero_shot_predict(
    model: CLIPModel,
    tokenizer: CLIPTokenizer,
    images: np.ndarray | torch.Tensor,
    category: str,
    device: str | torch.device,
    image_embeds: torch.Tensor | None = None,
) -> list[str]:
    """Predicted concept of ``category`` for each uint8 image (argmax cosine similarity to the class embeddings)."""
    names, text = concept_text_embeddings(model, tokenizer, category, device)
    img = image_embeds if image_embeds is not None else encode_images(model, images, device)
    return [names[i] for i in (img @ text.T).argmax(-1).tolist()]


@torch.no_grad()
def zero_shot_accuracy(
    model: CLIPModel,
    tokenizer: CLIPTokenizer,
    images: np.ndarray,
    scenes: list,
    device: str | torch.device,
    emblems: bool = False,
) -> dict[str, float]:
    """Per-category zero-shot accuracy of ``model`` on labelled images; with ``emblems``, also the emblem among the
    120 on the images that show one (from its name alone: what risk 2 of docs/design/world-100.md checks)."""
    from evals.microworld import world

    was_training = model.training
    model.eval()
    img = encode_images(model, images, device)
    acc = {}
    for cat in world.CATEGORIES:
        pred = zero_shot_predict(model, tokenizer, images, cat, device, image_embeds=img)
        acc[cat] = float(np.mean([p == getattr(s, cat) for p, s in zip(pred, scenes, strict=True)]))
    marked = [i for i, s in enumerate(scenes) if s.emblem is not None]
    if emblems and marked:
        pred = zero_shot_predict(model, tokenizer, None, world.EMBLEM, device, image_embeds=img[marked])
        acc[world.EMBLEM] = float(np.mean([p == scenes[i].emblem for p, i in zip(pred, marked, strict=True)]))
    model.train(was_training)
    return acc


# ----------------------------------------------------------------------------------------------------
# Multi-positive contrastive target
# ----------------------------------------------------------------------------------------------------


@cache
def _name_pattern(name: str) -> re.Pattern[str]:
    return re.compile(r"(?<![\w-])" + re.escape(name.lower()) + r"(?![\w-])")


def _mentions(caption: str, scene) -> dict[str, str]:
    """The attributes of ``scene`` that ``caption`` names (any synonym; its emblem too, in version 2). Only the
    scene's own names are searched: a caption is written for its scene, so this cannot mistake another concept's name
    for a mention."""
    return dict(_mentions_cached(caption, scene.object, scene.colour, scene.style, scene.emblem))


@lru_cache(maxsize=1 << 18)
def _mentions_cached(
    caption: str, object: str, colour: str, style: str, emblem: str | None = None
) -> tuple[tuple[str, str], ...]:
    # Captions repeat across steps; caching the regex scan keeps it off the GPU step's critical path.
    from evals.microworld import world

    scene = world.Scene(object, colour, style, emblem)
    text = caption.lower()
    found = {}
    for cat in world.CATEGORIES:
        canon = getattr(scene, cat)
        if any(_name_pattern(n).search(text) for n in world.all_names(canon)):
            found[cat] = canon
    if emblem is not None:
        mark = world.emblem_of(emblem)
        if any(_name_pattern(n).search(text) for n in (mark.name, *mark.synonyms)):
            found[world.EMBLEM] = emblem
    return tuple(found.items())


def caption_consistency(captions: list[str], scenes: list) -> np.ndarray:
    """Bool matrix M[i, j]: caption i (written for scene i) is consistent with scene j (every attribute it names
    matches; a caption naming an emblem fits only the scenes with that emblem). The diagonal is always True."""
    from evals.microworld import world

    n = len(captions)
    mask = np.ones((n, n), dtype=bool)
    mentions = [_mentions(c, s) for c, s in zip(captions, scenes, strict=True)]
    for cat in (*world.CATEGORIES, world.EMBLEM):
        lab = np.unique([getattr(s, cat) or "" for s in scenes], return_inverse=True)[1]
        named = np.array([cat in m for m in mentions])
        if named.any():
            mask &= ~named[:, None] | (lab[:, None] == lab[None, :])
    return mask


def class_prompt_batch(scenes: list, rng: np.random.Generator) -> tuple[list[str], dict[str, tuple[slice, list[int]]]]:
    """One prompt per concept of every category (random template and synonym), and each scene's class per category.

    Returns the prompts and, per category, the slice of the prompts that belongs to it and the scenes' label indices.
    """
    from evals.microworld import world

    prompts: list[str] = []
    labels: dict[str, tuple[slice, list[int]]] = {}
    for cat in world.CATEGORIES:
        names = world.concepts(cat)
        begin = len(prompts)
        for name in names:
            n_templates = len(world.templates_for(**{c: c == cat for c in world.CATEGORIES}, plain=name == "plain"))
            alias = world.all_names(name)[int(rng.integers(len(world.all_names(name))))]
            prompts.append(world.prompt(**{cat: alias}, template=int(rng.integers(n_templates))))
        labels[cat] = (slice(begin, len(prompts)), [names.index(getattr(s, cat)) for s in scenes])
    return prompts, labels


def class_prompt_loss(
    logits: torch.Tensor, labels: dict[str, tuple[slice, list[int]]], device: str | torch.device
) -> torch.Tensor:
    """Mean over categories of the image -> concept-prompt cross-entropy (the zero-shot classification objective).

    Every image gets all three of its labels every step, whereas a caption names only some; this mostly speeds up
    learning object shape, which the in-batch contrastive loss teaches slowly.
    """
    losses = [
        F.cross_entropy(logits[:, sl], to_device(torch.tensor(lab, dtype=torch.long), device))
        for sl, lab in labels.values()
    ]
    return torch.stack(losses).mean()


def multi_positive_loss(logits_per_text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy against row-normalised multi-positive targets (texts x images)."""
    m = mask.float()
    t2i = -(m / m.sum(1, keepdim=True) * F.log_softmax(logits_per_text, dim=1)).sum(1).mean()
    mt = m.T
    i2t = -(mt / mt.sum(1, keepdim=True) * F.log_softmax(logits_per_text.T, dim=1)).sum(1).mean()
    return 0.5 * (t2i + i2t)


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # No decay on biases, norms, embeddings and the temperature: decaying them only hurts small models.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.ndim < 2 or "embedding" in name or "logit_scale" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_micro_clip(
    config: ClipTrainConfig,
    *,
    device: str | torch.device,
    seed: int,
    work_dir: str | Path,
    progress: bool = False,
    callback: ProgressCallback | None = None,
    reconstruct: Callable[[np.ndarray], np.ndarray] | None = None,
) -> CLIPModel:
    """Train (or resume) the micro CLIP; checkpoints live in ``work_dir/clip``. Returns the model in eval mode.

    Images come from a pre-rendered pool (cached in ``work_dir/pool``); captions are re-drawn every step with
    ``world.caption`` from a generator seeded by (seed, step), so a resumed run replays the same data.
    ``reconstruct`` (uint8 images -> their VAE reconstructions, e.g. ``evals.microworld.training.vae_reconstructor``)
    is required when ``config.vae_from`` is set.
    """
    from evals.microworld import world

    device = torch.device(device)
    work_dir = Path(work_dir)
    ckpt_dir = work_dir / "clip"
    torch.manual_seed(seed)
    model = CLIPModel(micro_clip_config(config.arch)).to(device)
    tokenizer = offline_clip_tokenizer()
    optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.98))
    start = 0
    ckpt = load_checkpoint(ckpt_dir, optimizer, device=device)
    if ckpt is not None:
        model.load_state_dict(ckpt.tensors["model"])
        start = ckpt.step
        logger.info("resuming micro CLIP from step %d", start)
    elif (init := load_initial_weights(work_dir, "clip", device)) is not None:
        model.load_state_dict(init)
    if start >= config.steps:
        return model.eval()
    if config.vae_from is not None and reconstruct is None:
        raise ValueError("config.vae_from is set but no reconstruct function was given")
    text_trains = config.freeze_text_after is None or config.freeze_text_after > start
    if text_trains and final_path(work_dir, "unet").exists() and config.world_version >= world.EMBLEM_VERSION:
        # the emblem names are new words: the text tower has to learn them, and the unet stage retrains the UNet
        # on it (export_micro refuses a UNet trained on another text tower)
        logger.warning("the UNet in %s reads the text tower this stage changes: run the unet stage after it", work_dir)
    elif text_trains and final_path(work_dir, "unet").exists():
        raise ValueError(
            f"{work_dir} holds a UNet that reads this CLIP's text tower: train only the vision side "
            f"(freeze_text_after <= {start}, --clip-freeze-text-after {start})"
        )

    version = config.world_version
    images, scenes = load_pool(
        pool_seeds(seed, config.pool_size), work_dir / "pool", config.render_workers, tag="train", version=version
    )
    held_images, held_scenes = load_pool(
        pool_seeds(seed, config.heldout_size, "heldout"),
        work_dir / "pool",
        config.render_workers,
        tag="heldout",
        version=version,
    )
    emblems = version >= world.EMBLEM_VERSION
    has_emblem = np.array([s.emblem is not None for s in scenes])
    pool = torch.from_numpy(images).to(device)
    # The same number of training images as held-out ones: their accuracy gap is how much the pool is memorised.
    seen = np.random.default_rng(seed).choice(len(scenes), size=min(len(scenes), len(held_scenes)), replace=False)
    seen_images, seen_scenes = images[seen], [scenes[i] for i in seen]

    # The held-out renders once more, degraded as generated samples are: how well the scorer reads imperfect images.
    held_degraded = degrade(held_images, torch.Generator().manual_seed(seed + 1), mirror=not emblems).numpy()
    # ... and with their shapes bent as a small UNet bends them (amplitude up to 0.1, see ``warp_from``)
    held_warped = warp_images(held_images, torch.Generator().manual_seed(seed + 2)).numpy()
    recon_pool, held_recon = None, None
    if config.vae_from is not None:
        recon_pool = torch.from_numpy(reconstruct(images[: config.vae_pool_size])).to(device)
        held_recon = reconstruct(held_images)

    def evaluate() -> dict[str, dict[str, float]]:
        def accuracy(imgs: np.ndarray, labelled: list) -> dict[str, float]:
            return zero_shot_accuracy(model, tokenizer, imgs, labelled, device, emblems)

        acc = {
            "heldout_zero_shot": accuracy(held_images, held_scenes),
            "heldout_degraded_zero_shot": accuracy(held_degraded, held_scenes),
            "heldout_warped_zero_shot": accuracy(held_warped, held_scenes),
            "train_pool_zero_shot": accuracy(seen_images, seen_scenes),
        }
        if held_recon is not None:
            acc["heldout_vae_zero_shot"] = accuracy(held_recon, held_scenes)
        return acc

    evaluation: dict[str, dict[str, float]] = {}
    evaluated_at = -1
    token_cache: dict[str, list[int]] = {}
    model.train()
    last_ckpt = t0 = time.monotonic()
    meter = SpeedMeter(start)
    metrics: dict[str, float] = {}
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc="clip", disable=not progress)
    step = start
    for step in bar:
        if config.freeze_text_after is not None and step >= config.freeze_text_after:
            # Parameters without gradients are skipped by AdamW: the text tower stays bit-identical.
            model.text_model.requires_grad_(False)
        rng = step_rng(seed, step)
        if emblems:
            idx = replay_batch(rng, has_emblem, config.batch_size, config.emblem_replay, replace=False)
        else:
            idx = rng.choice(len(scenes), size=config.batch_size, replace=False)
        n_recon = 0
        if recon_pool is not None and step >= config.vae_from:
            # The batch's first n_recon images become reconstructions (of other pool images, drawn separately so
            # the caption stream above stays what it was without this option).
            n_recon = round(config.batch_size * config.vae_fraction)
            idx[:n_recon] = step_rng(seed, step, stream=4).choice(len(recon_pool), size=n_recon, replace=False)
        batch_scenes = [scenes[i] for i in idx]
        captions = [world.caption(s, rng) for s in batch_scenes]
        mask = to_device(torch.from_numpy(caption_consistency(captions, batch_scenes)), device)
        ids = to_device(tokenize(tokenizer, captions, cache=token_cache), device)
        batch_images = pool[to_device(torch.from_numpy(idx[n_recon:]), device)]
        if config.warp_from is not None and step >= config.warp_from:
            warp_gen = step_generator(seed, step, "cpu", stream=5)
            batch_images = warp_images(batch_images.cpu(), warp_gen, config.warp_amplitude).to(device)
        if config.augment_from is not None and step >= config.augment_from:
            degrade_gen = step_generator(seed, step, "cpu", stream=3)
            batch_images = degrade(batch_images.cpu(), degrade_gen, mirror=not emblems).to(device)
        if n_recon:
            recon = recon_pool[to_device(torch.from_numpy(idx[:n_recon]), device)]
            batch_images = torch.cat([recon, batch_images])
        pv = pixel_values(batch_images)
        for g in optimizer.param_groups:
            g["lr"] = cosine_lr(step, config.steps, config.warmup, config.lr)
        with autocast_context(device):
            out = model(input_ids=ids, pixel_values=pv)
            loss = multi_positive_loss(out.logits_per_text.float(), mask)
            if config.class_prompt_weight > 0:
                class_ids, labels = class_prompt_batch(batch_scenes, rng)
                ids = to_device(tokenize(tokenizer, class_ids, cache=token_cache), device)
                text = model.get_text_features(input_ids=ids)
                text = F.normalize(text.pooler_output.float(), dim=-1)
                logits = model.logit_scale.exp() * out.image_embeds.float() @ text.T
                loss = loss + config.class_prompt_weight * class_prompt_loss(logits, labels, device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0.0, 4.6052)  # CLIP's cap: temperature >= 1/100
        done = step + 1
        meter.tick(done)
        metrics = {"loss": loss.item(), "scale": model.logit_scale.exp().item()}
        if done % config.eval_every == 0 or done == config.steps:
            evaluation, evaluated_at = evaluate(), done
            metrics.update({f"acc_{k}": v for k, v in evaluation["heldout_zero_shot"].items()})
            metrics.update({f"train_acc_{k}": v for k, v in evaluation["train_pool_zero_shot"].items()})
            metrics.update({f"degraded_acc_{k}": v for k, v in evaluation["heldout_degraded_zero_shot"].items()})
            metrics.update({f"warped_acc_{k}": v for k, v in evaluation["heldout_warped_zero_shot"].items()})
            if "heldout_vae_zero_shot" in evaluation:
                metrics.update({f"vae_acc_{k}": v for k, v in evaluation["heldout_vae_zero_shot"].items()})
            logger.info("clip step %d: %s", done, metrics)
        bar.set_postfix({k: f"{v:.3f}" for k, v in metrics.items()}, refresh=False)
        now = time.monotonic()
        out_of_time = config.time_limit_s is not None and now - t0 > config.time_limit_s
        if done == config.steps or out_of_time or now - last_ckpt >= config.checkpoint_every_s:
            save_checkpoint(ckpt_dir, done, {"model": model}, optimizer, {"seed": seed, "config": _jsonable(config)})
            last_ckpt = now
        if callback is not None:
            callback("clip", done, config.steps, metrics)
        if out_of_time and done < config.steps:
            logger.warning("micro CLIP stopped at step %d/%d: time limit reached", done, config.steps)
            break
    bar.close()
    meter.log("clip")
    model.eval()
    if evaluated_at != step + 1:  # stopped by the time limit between evaluations
        evaluation = evaluate()
    atomic_write_json(ckpt_dir / "metrics.json", {"step": step + 1, **evaluation, **metrics})
    return model


def _jsonable(config) -> dict:
    return json.loads(json.dumps(asdict(config)))


# ----------------------------------------------------------------------------------------------------
# Saving and loading
# ----------------------------------------------------------------------------------------------------


def save_micro_clip(model: CLIPModel, path: str | Path) -> Path:
    """Save the model (fp16 safetensors), the offline tokenizer and the preprocessor config as a CLIP folder."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    half = CLIPModel(model.config)
    half.load_state_dict(model.state_dict())
    half.to(torch.float16).save_pretrained(path, safe_serialization=True)
    offline_clip_tokenizer().save_pretrained(path)
    image_processor().save_pretrained(path)
    return path


def load_micro_clip(
    path: str | Path | None = None, device: str | torch.device = "cpu"
) -> tuple[CLIPModel, CLIPTokenizer]:
    """Load a micro CLIP folder (default: the shipped one) as float32, eval mode, with its tokenizer."""
    path = Path(path) if path is not None else micro_clip_path()
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no micro CLIP at {path}; build it with scripts/train_micro.py")
    model = CLIPModel.from_pretrained(path, dtype=torch.float32).to(device).eval()
    tokenizer = CLIPTokenizer.from_pretrained(path)
    return model, tokenizer
