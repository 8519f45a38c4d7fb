"""Tiny random diffusion pipelines, built in code like diffusers' ``get_dummy_components``.

They load and run through every code path a real checkpoint of their family does, in milliseconds, with the real CLIP
tokenizer (so CLIP token ids and word positions are those of SD) and a T5-style tokenizer built offline
(:func:`pipelines.tokenizer.offline_t5_tokenizer`), and are what the fast tests run on. By name
(:data:`TINY_MODELS`): ``tiny`` (SD 1.x), ``tiny-sd2`` (SD 2.x with v-prediction), ``tiny-sdxl``, ``tiny-sd3``
(MMDiT, two CLIPs and T5) and ``tiny-flux`` (double- and single-stream blocks, CLIP pooled + T5).

The tiny Flux keeps two of the real model's widths, because the reference UCE-Flux script
(``trainscripts/uce_flux_edit.py``) decides which text embedding a layer reads by its width: the pooled CLIP vector
is 768-d (``pooled_projection_dim``) and the T5 width (``joint_attention_dim``) is not 768. Its CLIP text encoder is
therefore 768 wide (one layer), the largest part of it.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from .architectures import TINY_ARCHITECTURES
from .tokenizer import offline_clip_tokenizer, offline_t5_tokenizer

__all__ = [
    "TINY_MODELS",
    "tiny_flux_pipeline",
    "tiny_pipeline",
    "tiny_sd2_pipeline",
    "tiny_sd3_pipeline",
    "tiny_sd_pipeline",
    "tiny_sdxl_pipeline",
]

_VOCAB = 49408


def _text_config(hidden: int, projection: int | None = None, layers: int = 2) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=_VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=projection or hidden,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def _vae(**flow: float) -> AutoencoderKL:
    """Two resolutions (vae_scale_factor 2), 4 latent channels; ``flow`` sets SD3/Flux's ``shift_factor`` and
    ``scaling_factor``, which their pipelines read."""
    return AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
        **flow,
    )


def _scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def _t5(width: int) -> T5EncoderModel:
    """A two-layer T5 encoder of ``width`` over :func:`offline_t5_tokenizer`'s vocabulary."""
    config = T5Config(
        vocab_size=len(offline_t5_tokenizer()),
        d_model=width,
        d_kv=8,
        d_ff=2 * width,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        dropout_rate=0.0,
    )
    return T5EncoderModel(config).eval()  # as from_pretrained leaves it


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


def tiny_sd2_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A random SD 2.x-shaped pipeline: v-prediction, linear transformer projections, OpenCLIP's ``"!"`` padding;
    32x32 images, cross-attention width 32."""
    torch.manual_seed(seed)
    unet = _unet(cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True)
    return StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config(32)),
        tokenizer=offline_clip_tokenizer(pad_token="!"),
        unet=unet,
        scheduler=_scheduler("v_prediction"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sd3_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """A random SD3-shaped pipeline: an MMDiT (two joint blocks) on 32x32 images (16x16x4 latents, 2x2 patches),
    two CLIPs (32 + 32 wide, pooled 64) and a 96-wide T5 (``joint_attention_dim``), flow matching."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=96,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
        pos_embed_max_size=16,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(shift_factor=0.0, scaling_factor=1.0),
        text_encoder=CLIPTextModelWithProjection(_text_config(32, projection=32)),
        tokenizer=offline_clip_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(32, projection=32)),
        tokenizer_2=offline_clip_tokenizer(pad_token="!"),
        text_encoder_3=_t5(96),
        tokenizer_3=offline_t5_tokenizer(),
    )


def tiny_flux_pipeline(seed: int = 0) -> FluxPipeline:
    """A random Flux-shaped pipeline: one double-stream and one single-stream block, guidance embedding (as
    FLUX.1-dev), 32x32 images (16x16x4 latents packed 2x2 into 64 tokens of 16), a 768-wide one-layer CLIP for the
    pooled vector and a 32-wide T5, flow matching with resolution-dependent shift."""
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=768,
        guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=_vae(shift_factor=0.0, scaling_factor=1.0),
        text_encoder=CLIPTextModel(_text_config(768, layers=1)),
        tokenizer=offline_clip_tokenizer(),
        text_encoder_2=_t5(32),
        tokenizer_2=offline_t5_tokenizer(),
        transformer=transformer,
    )


#: The tiny pipelines by the name ``load_pipeline`` takes, and the architecture each stands for.
TINY_MODELS: dict[str, str] = TINY_ARCHITECTURES


def tiny_pipeline(
    name: str, seed: int = 0
) -> StableDiffusionPipeline | StableDiffusionXLPipeline | StableDiffusion3Pipeline | FluxPipeline:
    """The tiny pipeline ``name`` (a key of :data:`TINY_MODELS`), its weights drawn from ``seed``."""
    builders = {
        "tiny": tiny_sd_pipeline,
        "tiny-sd2": tiny_sd2_pipeline,
        "tiny-sdxl": tiny_sdxl_pipeline,
        "tiny-sd3": tiny_sd3_pipeline,
        "tiny-flux": tiny_flux_pipeline,
    }
    if name not in builders:
        raise ValueError(f"no tiny pipeline {name!r}; have {', '.join(builders)}")
    return builders[name](seed)
