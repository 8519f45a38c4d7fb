"""Tiny random Stable Diffusion components, built in code like diffusers' ``get_dummy_components``.

They load and run through every code path a real SD 1.x or SDXL checkpoint does, in milliseconds, with the real CLIP
tokenizer (so token ids and word positions are those of SD), and are what the fast tests run on.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from .tokenizer import offline_clip_tokenizer

__all__ = ["tiny_sd_pipeline", "tiny_sdxl_pipeline"]

_VOCAB = 49408


def _text_config(hidden: int, projection: int | None = None) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=_VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=projection or hidden,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )


def _scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def _unet(**family: object) -> UNet2DConditionModel:
    """Two resolutions (16x16, 8x8 latents), cross-attention at the lower one; ``family`` adds SD 1.x or SDXL parts."""
    return UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        **family,
    )


def tiny_sd_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A random SD 1.x-shaped pipeline: 32x32 images, 16x16x4 latents, cross-attention width 32."""
    torch.manual_seed(seed)
    unet = _unet(cross_attention_dim=32, attention_head_dim=8)
    vae = _vae()
    text_encoder = CLIPTextModel(_text_config(32))
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=offline_clip_tokenizer(),
        unet=unet,
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """A random SDXL-shaped pipeline: two text encoders (32 + 32 = cross-attention width 64), micro-conditioning."""
    torch.manual_seed(seed)
    unet = _unet(
        cross_attention_dim=64,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # pooled text (32) + 6 time ids * 8
    )
    return StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config(32)),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(32, projection=32)),
        tokenizer=offline_clip_tokenizer(),
        tokenizer_2=offline_clip_tokenizer(pad_token="!"),
        unet=unet,
        scheduler=_scheduler(),
        force_zeros_for_empty_prompt=True,
    )
