"""LoRA files in kohya-ss's key layout (what Automatic1111 and ComfyUI load), read back by diffusers' own converter.

The layout, per changed Linear (sd-scripts ``networks/lora.py``; ``erase/core/kohya.py``)::

    <stem>.lora_down.weight (r, in)   <stem>.lora_up.weight (out, r)   <stem>.alpha (0-d)   dW = alpha / r * up @ down

    SD 1.x   lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k    (diffusers' UNet path)
             lora_te_text_model_encoder_layers_0_self_attn_q_proj
    SDXL     lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k              (the original UNet's blocks)
             lora_te1_text_model_encoder_layers_0_mlp_fc1, lora_te2_...              (CLIP-L, CLIP-G)
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers.loaders.lora_conversion_utils import _convert_unet_lora_key, _maybe_map_sgm_blocks_to_diffusers
from diffusers.utils.state_dict_utils import (
    StateDictType,
    convert_state_dict_to_diffusers,
    convert_state_dict_to_peft,
    convert_unet_state_dict_to_peft,
)
from safetensors.torch import load

from erase import ErasureArtifact, WeightChange
from erase.cli import main as erase_main
from erase.core.kohya import kohya_bytes, kohya_name
from erase.core.layout import KOHYA_FILE
from erase.workflow import run_erase
from pipelines import load_pipeline
from pipelines.original_names import original_unet_path
from pipelines.tiny import tiny_sd_pipeline, tiny_sdxl_pipeline

LAYOUT = re.compile(r"lora_(unet|te|te1|te2)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)")
#: + "text_model." in transformers 4. With out_proj, as in kohya-ss's files: diffusers reads a text-encoder LoRA as
#: its old format only when a key says ``to_out_lora`` (``convert_state_dict_to_diffusers``), else drops q/k/v.
TEXT_MODULES = ["encoder.layers.0.self_attn.q_proj", "encoder.layers.0.self_attn.out_proj", "encoder.layers.1.mlp.fc1"]


@pytest.fixture(scope="module", params=["tiny", "tiny-sdxl"])
def wrapper(request):
    return load_pipeline(request.param)


def _changes(wrapper, rank: int | None, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor] | torch.Tensor]:
    """Changes on UNet attention, feed-forward and projection Linears and on text-encoder layers: full-rank deltas
    (``rank=None``, a closed form's) or rank-``rank`` factors (A, B)."""
    g = torch.Generator().manual_seed(seed)
    unet = wrapper.lora_modules(["*attn2.to_k", "*attn1.to_out.0", "*ff.net.0.proj", "*proj_in"])
    encoders = ["text_encoder", *(["text_encoder_2"] if wrapper.is_sdxl else [])]
    names = [f"unet.{n}" for n in unet]
    for encoder in encoders:
        inner = "text_model." if hasattr(wrapper.module(encoder), "text_model") else ""
        names += [f"{encoder}.{inner}{n}" for n in TEXT_MODULES]
    out = {}
    for name in names:
        w = wrapper.module(name).weight
        if rank is None:
            out[name] = 0.01 * torch.randn(w.shape, generator=g)
        else:
            out[name] = (torch.randn(rank, w.shape[1], generator=g), 0.01 * torch.randn(w.shape[0], rank, generator=g))
    return out


def _artifact(wrapper, changes, config) -> ErasureArtifact:
    if all(isinstance(v, tuple) for v in changes.values()):
        payload = WeightChange({n: (b.double() @ a.double()).float() for n, (a, b) in changes.items()}, changes)
    else:
        payload = WeightChange(changes)
    return ErasureArtifact("uce", config, ["van gogh"], ["art"], [], wrapper.model_id, "", {"weights": payload}, 0.0)


def _through_diffusers(wrapper, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each stem converted alone by diffusers' ``lora_state_dict`` (SGM block remap with the UNet's config, then
    ``_convert_non_diffusers_lora_to_diffusers``) and peft's naming: qualified module -> alpha / r * up @ down."""
    out = {}
    for stem in sorted({k.partition(".")[0] for k in tensors}):
        one = {k: v for k, v in tensors.items() if k.partition(".")[0] == stem}
        state, alphas = type(wrapper.pipe).lora_state_dict(one, unet_config=wrapper.unet.config)
        if stem.startswith("lora_unet_"):
            peft = convert_unet_state_dict_to_peft(state)
        else:
            peft = convert_state_dict_to_peft(convert_state_dict_to_diffusers(state, StateDictType.DIFFUSERS_OLD))
            encoder = "text_encoder_2" if stem.startswith("lora_te2_") else "text_encoder"
            if not hasattr(wrapper.module(encoder), "text_model"):  # diffusers strips it for a flat encoder
                peft = {k.replace(".text_model.", ".", 1): v for k, v in peft.items()}
        (key_a,) = [k for k in peft if k.endswith(".lora_A.weight")]
        module = key_a.removesuffix(".lora_A.weight")
        down, up = peft[key_a].double(), peft[f"{module}.lora_B.weight"].double()
        (alpha,) = alphas.values()
        out[module] = alpha / down.shape[0] * up @ down
    return out


@pytest.mark.parametrize("rank", [None, 2], ids=["full-rank", "rank-2"])
def test_kohya_file_follows_the_layout_and_diffusers_reads_back_the_change(wrapper, rank):
    changes = _changes(wrapper, rank)
    config = {} if rank is None else {"rank": 2, "alpha": 3.0}  # a trained LoRA's: its scale 1.5 is the file's
    artifact = _artifact(wrapper, changes, config)
    tensors = load(kohya_bytes(artifact, wrapper))
    assert all(LAYOUT.fullmatch(k) for k in tensors), sorted(tensors)[:4]
    stems = {k.partition(".")[0] for k in tensors}
    assert len(stems) == len(changes) and len(tensors) == 3 * len(changes)
    te = "lora_te1_" if wrapper.is_sdxl else "lora_te_"
    assert f"{te}text_model_encoder_layers_0_self_attn_q_proj" in stems
    assert f"{te}text_model_encoder_layers_1_mlp_fc1" in stems
    assert any(s.startswith("lora_te2_") for s in stems) == wrapper.is_sdxl
    if wrapper.is_sdxl:  # tiny SDXL: 1 resnet per down block, so down_blocks.1.attentions.0 is input_blocks.3.1
        assert "lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k" in stems
        assert "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_out_0" in stems
        assert "lora_unet_output_blocks_1_1_proj_in" in stems
        assert not any("down_blocks" in s or "up_blocks" in s for s in stems)
    else:
        assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k" in stems
        assert "lora_unet_up_blocks_0_attentions_1_transformer_blocks_0_ff_net_0_proj" in stems
    for stem in stems:
        r = tensors[f"{stem}.lora_down.weight"].shape[0]
        assert float(tensors[f"{stem}.alpha"]) / r == pytest.approx(1.0 if rank is None else 1.5)
    if rank is None:  # a full-rank change is written at full rank (an exact SVD), not truncated
        to_k = next(s for s in stems if s.endswith("attn2_to_k"))
        down, up = tensors[f"{to_k}.lora_down.weight"], tensors[f"{to_k}.lora_up.weight"]
        assert down.shape[0] == min(up.shape[0], down.shape[1])
    read = _through_diffusers(wrapper, tensors)
    assert set(read) == set(artifact.deltas)
    for name, delta in artifact.deltas.items():
        error = float((read[name] - delta.double()).norm() / delta.double().norm())
        assert error < 1e-6, (name, error)


def test_a_plain_pipeline_loading_the_kohya_file_holds_the_change(wrapper, tmp_path):
    """``load_lora_weights`` on the file, fused into a fresh plain pipeline: base + dW, alpha / r applied."""
    artifact = _artifact(wrapper, _changes(wrapper, 2, seed=1), {"rank": 2, "alpha": 1.0})
    (tmp_path / KOHYA_FILE).write_bytes(kohya_bytes(artifact, wrapper))
    pipe = (tiny_sdxl_pipeline if wrapper.is_sdxl else tiny_sd_pipeline)(0)  # the base, as from_pretrained gives it
    pipe.load_lora_weights(str(tmp_path), weight_name=KOHYA_FILE)
    pipe.fuse_lora(components=["unet", "text_encoder", *(["text_encoder_2"] if wrapper.is_sdxl else [])])
    for name, delta in artifact.deltas.items():
        component, _, path = name.partition(".")
        got = getattr(pipe, component).get_submodule(path).weight.detach() - wrapper.module(name).weight.detach()
        assert float((got - delta).norm() / delta.norm()) < 1e-5, name


def test_original_block_numbers_are_kohyas_for_real_sdxl_and_map_back():
    """SDXL's UNet (2 resnets per down block): the names kohya-ss writes, and diffusers' remap inverts them."""
    unet = SimpleNamespace(config=SimpleNamespace(layers_per_block=2))
    block = "transformer_blocks.0"
    cases = {
        f"down_blocks.1.attentions.0.{block}.attn2.to_k": f"input_blocks.4.1.{block}.attn2.to_k",
        "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2": "input_blocks.8.1.transformer_blocks.9.ff.net.2",
        "mid_block.attentions.0.proj_in": "middle_block.1.proj_in",
        f"up_blocks.0.attentions.2.{block}.attn1.to_q": f"output_blocks.2.1.{block}.attn1.to_q",
        "up_blocks.1.attentions.0.proj_out": "output_blocks.3.1.proj_out",
    }
    for path, original in cases.items():
        assert original_unet_path(unet, path) == original
        key, plain = (f"lora_unet_{p.replace('.', '_')}.lora_down.weight" for p in (original, path))
        (back,) = _maybe_map_sgm_blocks_to_diffusers({key: 0}, unet.config)
        assert _convert_unet_lora_key(back) == _convert_unet_lora_key(plain)
    with pytest.raises(ValueError, match="outside the UNet's transformers"):
        original_unet_path(unet, "time_embedding.linear_1")


def test_modules_the_uis_cannot_read_and_runtime_methods_are_refused(tiny_sdxl, tmp_path, capsys):
    with pytest.raises(ValueError, match="encoder layers only"):
        kohya_name(tiny_sdxl, "text_encoder_2.text_projection")
    with pytest.raises(ValueError, match="no kohya LoRA key"):
        kohya_name(tiny_sdxl, "vae.decoder.conv_in")
    out = tmp_path / "itd"
    args = ["--model", "tiny", "--concept", "van gogh", "--method", "itd", "--format", "kohya", "--out", str(out)]
    assert erase_main([*args, "--no-check"]) == 2
    assert not out.exists()
    flux = ["--model", "tiny-flux", "--concept", "van gogh", "--format", "kohya", "--out", str(out), "--no-check"]
    assert erase_main(flux) == 2  # the layout names UNet modules: refused before the erasure
    assert not out.exists() and "not flux's" in capsys.readouterr().err


def test_erase_format_kohya_and_the_export_script_write_the_same_lora(tiny_sdxl, tmp_path):
    spec = importlib.util.spec_from_file_location("export_lora", Path(__file__).parents[1] / "scripts/export_lora.py")
    export = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(export)
    summary = run_erase(tiny_sdxl, ["van gogh"], out=tmp_path / "vg", check=False, lora_format="kohya")
    written = Path(summary.extra["kohya_lora"])
    assert written == tmp_path / "vg" / KOHYA_FILE
    assert export.main([str(tmp_path / "vg"), "--model", "tiny-sdxl", "--out", str(tmp_path / "x.safetensors")]) == 0
    ours, exported = load(written.read_bytes()), load((tmp_path / "x.safetensors").read_bytes())
    assert ours.keys() == exported.keys() and all(torch.equal(ours[k], exported[k]) for k in ours)
    assert export.main([str(tmp_path / "vg"), "--model", "tiny-sdxl"]) == 2  # the file exists: --overwrite replaces
    assert export.main([str(tmp_path / "vg"), "--model", "tiny-sdxl", "--overwrite"]) == 0
    foreign, dangling = tmp_path / "mine.safetensors", tmp_path / "link.safetensors"
    foreign.write_bytes(b"a file erase did not write")
    dangling.symlink_to(tmp_path / "nowhere")
    for out in (foreign, dangling):  # never replaced, --overwrite or not
        assert export.main([str(tmp_path / "vg"), "--model", "tiny-sdxl", "--out", str(out), "--overwrite"]) == 2
    assert foreign.read_bytes() == b"a file erase did not write" and not (tmp_path / "nowhere").exists()
    assert export.main([str(tmp_path / "vg"), "--model", "tiny", "--out", str(tmp_path / "y.safetensors")]) == 2
    assert not (tmp_path / "y.safetensors").exists()
