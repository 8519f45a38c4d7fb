"""The SDXL-shaped random pipeline the benchmarks time is SDXL 1.0 base's architecture (built on the meta device)."""

from __future__ import annotations

import pytest
import torch

from erase.core.kohya import kohya_name
from pipelines import wrap_pipeline
from pipelines.shapes import sdxl_shaped_pipeline


@pytest.mark.slow
def test_sdxl_shapes_are_sdxl_base_and_its_kohya_keys_name_kohyas_blocks():
    pipe = sdxl_shaped_pipeline("meta", torch.bfloat16)
    counts = {n: sum(p.numel() for p in getattr(pipe, n).parameters()) for n in ("unet", "text_encoder",
                                                                               "text_encoder_2", "vae")}  # fmt: skip
    # stabilityai/stable-diffusion-xl-base-1.0's parameter counts
    assert counts == {"unet": 2_567_463_684, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840,
                      "vae": 83_653_863}  # fmt: skip
    assert pipe.unet.dtype == torch.bfloat16 and torch.get_default_dtype() == torch.float32
    wrapper = wrap_pipeline(pipe, "sdxl-shapes")
    layers = wrapper.cross_attention_layers()
    assert len(layers) == 140 and wrapper.image_size == 1024
    blocks = {kohya_name(wrapper, f"unet.{layer.name}").split("_transformer_blocks")[0] for layer in layers}
    # the transformers of kohya-ss's SDXL LoRA keys: input blocks 4, 5, 7, 8, the middle block, output blocks 0-5
    expected = {f"lora_unet_input_blocks_{i}_1" for i in (4, 5, 7, 8)} | {"lora_unet_middle_block_1"}
    assert blocks == expected | {f"lora_unet_output_blocks_{i}_1" for i in range(6)}
