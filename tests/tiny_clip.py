"""A tiny random CLIP built in code (the tests' stand-in for a scorer model), shared by the scorer and audit tests."""

from __future__ import annotations

from pathlib import Path

from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

from evals.microworld.clip import CLIP_MEAN, CLIP_STD, ClipArch, micro_clip_config
from pipelines.tokenizer import offline_clip_tokenizer


def tiny_clip_arch(layers: int = 2, patch_size: int = 16, projection_dim: int = 16) -> ClipArch:
    """The micro CLIP's architecture at test size: ``layers`` per tower, width 32, two heads."""
    return ClipArch(
        text_hidden=32,
        text_layers=layers,
        text_heads=2,
        text_intermediate=64,
        vision_hidden=32,
        vision_layers=layers,
        vision_heads=2,
        vision_intermediate=64,
        patch_size=patch_size,
        projection_dim=projection_dim,
    )


def tiny_clip_config(image_size: int = 64, patch_size: int = 16, projection_dim: int = 16) -> CLIPConfig:
    """The micro CLIP's config (SD's vocabulary and special tokens) at two layers and width 32, for ``image_size``."""
    config = micro_clip_config(tiny_clip_arch(patch_size=patch_size, projection_dim=projection_dim))
    config.vision_config.image_size = image_size
    return config


def save_clip_folder(model: CLIPModel, path: Path) -> Path:
    """``model`` plus the offline tokenizer and an image processor for its input size: a folder ClipScorer loads."""
    size = model.config.vision_config.image_size
    model.save_pretrained(path)
    offline_clip_tokenizer().save_pretrained(path)
    CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    ).save_pretrained(path)
    return path
