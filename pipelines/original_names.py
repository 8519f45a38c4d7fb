"""UNet module paths in the original Stable Diffusion checkpoint layout (the SGM/LDM ``UNetModel``), which kohya-ss
writes SDXL LoRA keys in.

diffusers numbers a UNet's transformer blocks per down/up block (``down_blocks.b.attentions.j``); the original
layout numbers every layer of the encoder (``input_blocks.n``) and decoder (``output_blocks.n``) in one run, each
holding a resnet (``.0``) and, where there is one, its transformer (``.1``). With ``L`` resnets per down block
(``layers_per_block``; an up block has ``L + 1``), as diffusers' ``_maybe_map_sgm_blocks_to_diffusers`` and
Automatic1111's ``convert_diffusers_name_to_compvis`` map them back:

    down_blocks.b.attentions.j  <->  input_blocks.(1 + (L + 1) b + j).1
    mid_block.attentions.0      <->  middle_block.1
    up_blocks.b.attentions.j    <->  output_blocks.((L + 1) b + j).1

Inside a transformer the two layouts name modules alike (``transformer_blocks.0.attn2.to_k``, ``proj_in``, ...).
"""

from __future__ import annotations

import re

import torch

__all__ = ["original_unet_path"]

_ATTENTION = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.attentions\.(\d+)\.(.+)|mid_block\.attentions\.0\.(.+)")


def original_unet_path(unet: torch.nn.Module, path: str) -> str:
    """The original-layout path of a module inside one of the UNet's transformers (diffusers path ``path``);
    ``ValueError`` in one line for a module outside them or a UNet whose blocks differ in depth."""
    layers = unet.config.layers_per_block
    if not isinstance(layers, int):
        raise ValueError(f"the UNet has {layers} resnets per block: the original layout needs one count for all")
    match = _ATTENTION.fullmatch(path)
    if match is None:
        raise ValueError(f"unet.{path} is outside the UNet's transformers: no original-layout name is mapped for it")
    if match.group(5) is not None:
        return f"middle_block.1.{match.group(5)}"
    kind, block, layer, rest = match.group(1), int(match.group(2)), int(match.group(3)), match.group(4)
    if kind == "down_blocks":
        return f"input_blocks.{1 + (layers + 1) * block + layer}.1.{rest}"
    return f"output_blocks.{(layers + 1) * block + layer}.1.{rest}"
