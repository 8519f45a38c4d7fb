"""A tiny random CLIP built in code (the tests' stand-in for a scorer model), shared by the scorer and audit tests."""

from __future__ import annotations

from pathlib import Path

from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

from pipelines.tokenizer import offline_clip_tokenizer

# OpenAI CLIP's normalisation, as real CLIP folders carry it
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def tiny_clip_config(image_size: int = 64, patch_size: int = 16, projection_dim: int = 16) -> CLIPConfig:
    """Two-layer, 32-wide towers; the text side has SD's vocabulary and special tokens, so the real tokenizer fits."""
    text = dict(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def save_clip_folder(model: CLIPModel, path: Path) -> Path:
    """``model`` plus the offline tokenizer and an image processor for its input size: a folder ClipScorer loads."""
    size = model.config.vision_config.image_size
    model.save_pretrained(path)
    offline_clip_tokenizer().save_pretrained(path)
    CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, image_mean=MEAN, image_std=STD
    ).save_pretrained(path)
    return path
