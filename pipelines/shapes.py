"""Pipelines of a real checkpoint's shapes with random weights, built in code (no download): what the benchmarks
time, so a GPU user knows what a method costs at that size before fetching the model.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from .tokenizer import offline_clip_tokenizer

__all__ = ["SHAPED_MODELS", "sdxl_shaped_pipeline", "stable_diffusion_vae"]

#: the shaped models by the name the benchmarks' ``--model`` takes
SHAPED_MODELS = ("sdxl-shapes",)


def sdxl_shaped_pipeline(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> StableDiffusionXLPipeline:
    """Stable Diffusion XL 1.0 base (``stabilityai/stable-diffusion-xl-base-1.0``'s configs written out): a 2.6B UNet
    at 1024 px, CLIP ViT-L and OpenCLIP bigG text encoders, the SDXL VAE; weights drawn on ``device`` in
    ``dtype`` (``device="meta"`` builds the shapes alone)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # drawn in ``dtype``: 2 bytes a weight where asked, never a float32 copy first
    try:
        return _sdxl_pipeline(device)
    finally:
        torch.set_default_dtype(default)


def stable_diffusion_vae(sample_size: int = 512, scaling_factor: float = 0.18215) -> AutoencoderKL:
    """The VAE of Stable Diffusion 1.x/2.x and XL (one architecture; SDXL's scales its latents by 0.13025)."""
    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
    )


def _sdxl_pipeline(device: str | torch.device) -> StableDiffusionXLPipeline:
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=128,
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            hidden_act="quick_gelu", projection_dim=768,
        ))  # fmt: skip
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
            hidden_act="gelu", projection_dim=1280,
        ))  # fmt: skip
        vae = stable_diffusion_vae(sample_size=1024, scaling_factor=0.13025)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=offline_clip_tokenizer(),
        tokenizer_2=offline_clip_tokenizer(pad_token="!"),
        unet=unet,
        scheduler=scheduler,
    )
