"""Fast end-to-end checks of the micro world's training code with tiny configs (the real presets train for hours)."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from safetensors import safe_open
from tiny_clip import tiny_clip_arch
from transformers import CLIPModel

from evals.microworld import world
from evals.microworld.clip import (
    ClipTrainConfig,
    caption_consistency,
    load_micro_clip,
    pixel_values,
    train_micro_clip,
    zero_shot_accuracy,
)
from evals.microworld.sd_model import UNetArch, VAEArch
from evals.microworld.train_utils import init_path, load_pool, replay_batch
from evals.microworld.training import (
    UNetTrainConfig,
    VAETrainConfig,
    evaluate_micro,
    export_micro,
    final_path,
    import_micro,
    save_final_clip,
    train_unet,
    train_vae,
    vae_reconstructor,
)
from pipelines import DEFAULT_GUIDANCE

TINY_CLIP = ClipTrainConfig(
    arch=tiny_clip_arch(layers=1, projection_dim=32),
    steps=3,
    batch_size=16,
    warmup=1,
    pool_size=64,
    heldout_size=32,
    eval_every=3,
    checkpoint_every_s=0.0,
)
TINY_VAE = VAETrainConfig(
    arch=VAEArch(block_out_channels=(8, 16, 16), norm_num_groups=8), steps=3, batch_size=8, warmup=1, pool_size=64
)
TINY_UNET = UNetTrainConfig(
    arch=UNetArch(block_out_channels=(16, 32, 32), norm_num_groups=8, attention_head_dim=16),
    steps=6,
    batch_size=8,
    warmup=1,
    pool_size=64,
    checkpoint_every_s=0.0,
)


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A work dir in which the clip and vae stages have run (tiny configs)."""
    torch.manual_seed(0)
    work = tmp_path_factory.mktemp("micro")
    model = train_micro_clip(TINY_CLIP, device="cpu", seed=0, work_dir=work)
    save_final_clip(model, TINY_CLIP.arch, work)
    train_vae(TINY_VAE, device="cpu", seed=0, work_dir=work)
    return work


def test_caption_consistency_is_multi_positive():
    scenes = [
        world.Scene("star", "red", "monet"),
        world.Scene("star", "blue", "monet"),
        world.Scene("heart", "red", "seurat"),
    ]
    # each caption is written for the scene at the same index
    m = caption_consistency(["a red star", "claude monet style", "crimson"], scenes)
    assert m.diagonal().all()
    assert m[0].tolist() == [True, False, False]  # "a red star" fits only scene 0
    assert m[1].tolist() == [True, True, False]  # both monet scenes
    assert m[2].tolist() == [True, False, True]  # a synonym of red fits both red scenes


def test_caption_consistency_reads_emblems():
    a, b = world.emblem_names()[:2]
    scenes = [
        world.Scene("star", "red", "monet", a),
        world.Scene("star", "red", "monet", b),
        world.Scene("star", "red", "monet"),
    ]
    synonym = world.emblem_of(a).synonyms[0]
    m = caption_consistency([f"a red star with {synonym}", "a red star", "a red star"], scenes)
    assert m[0].tolist() == [True, False, False]  # naming emblem a fits only the scene that shows it
    assert m[1].all() and m[2].all()  # a caption that names no emblem fits a scene with or without one


def test_replay_batch_draws_the_share_of_scenes_without_an_emblem():
    has = np.array([False] * 10 + [True] * 30)
    rng = np.random.default_rng(0)
    idx = replay_batch(rng, has, 8, 0.25, replace=False)
    assert len(set(idx)) == 8 and (~has[idx]).sum() == 2
    assert (~has[replay_batch(rng, has, 64, 0.5, replace=True)]).sum() == 32
    with pytest.raises(ValueError, match="larger pool"):
        replay_batch(rng, has, 40, 0.5, replace=False)


def test_version_2_pool_cache_keeps_the_emblem(tmp_path):
    seeds = range(16)
    images, scenes = load_pool(seeds, tmp_path, 1, tag="t", version=2)
    again_images, again = load_pool(seeds, tmp_path, 1, tag="t", version=2)
    assert again == scenes == [world.scene_of_seed(s, version=2) for s in seeds]
    assert any(s.emblem for s in again) and np.array_equal(images, again_images)
    _, v1 = load_pool(seeds, tmp_path, 1, tag="t")  # a cache of its own: version 1 scenes have no emblem
    assert all(s.emblem is None for s in v1) and sorted(p.name for p in tmp_path.glob("*.json")) == [
        "t-0-16-v2.json",
        "t-0-16.json",
    ]


@pytest.mark.slow
def test_version_2_clip_unet_and_export(work, tmp_path):
    """The clip and unet stages of world version 2 (tiny): emblem captions, the held-out emblem read from its name,
    a version-2 world.json on export, and an export refused when the UNet was trained on another text tower."""
    import dataclasses
    import shutil

    from safetensors.torch import load_file, save_file

    with pytest.raises(ValueError, match="world version 1"):  # a version-2 UNet on a version-1 text tower
        train_unet(dataclasses.replace(TINY_UNET, world_version=2), device="cpu", seed=0, work_dir=work)
    w2 = tmp_path / "v2"
    (w2 / "final").mkdir(parents=True)
    shutil.copy(final_path(work, "vae"), final_path(w2, "vae"))
    clip_cfg = dataclasses.replace(TINY_CLIP, world_version=2, heldout_size=48)
    model = train_micro_clip(clip_cfg, device="cpu", seed=0, work_dir=w2)
    metrics = json.loads((w2 / "clip" / "metrics.json").read_text())
    assert 0.0 <= metrics["heldout_zero_shot"]["emblem"] <= 1.0
    assert any(
        "emblem" in lab and lab["emblem"] for lab in json.loads((w2 / "pool" / "train-0-64-v2.json").read_text())
    )
    save_final_clip(model, clip_cfg.arch, w2, world_version=2)
    train_unet(dataclasses.replace(TINY_UNET, world_version=2, steps=2), device="cpu", seed=0, work_dir=w2)
    sd, _ = export_micro(w2, tmp_path / "sd", tmp_path / "clip")
    spec = world.load_world_json(sd / "world.json")
    assert spec["version"] == 2 and len(spec["emblem"]["concepts"]) == 120
    # a text tower changed after the UNet was trained on it: the export is refused
    tensors = load_file(str(final_path(w2, "clip")))
    key = next(k for k in tensors if k.startswith("text_model.") and "weight" in k)
    tensors[key] = tensors[key] + 0.01
    save_file(tensors, str(final_path(w2, "clip")), metadata={"arch": json.dumps(dataclasses.asdict(clip_cfg.arch)),
                                                            "world_version": "2"})  # fmt: skip
    with pytest.raises(ValueError, match="another text tower"):
        export_micro(w2, tmp_path / "sd2", tmp_path / "clip2")


@pytest.mark.slow
def test_pixel_values_match_saved_preprocessor(work, tmp_path):
    from transformers import CLIPImageProcessor

    from evals.microworld.clip import image_processor

    images, _ = world.render_dataset(range(4))
    image_processor().save_pretrained(tmp_path)
    ref = CLIPImageProcessor.from_pretrained(tmp_path)(images=list(images), return_tensors="pt")["pixel_values"]
    assert torch.allclose(pixel_values(images), ref, atol=1e-5)


@pytest.mark.slow
def test_stages_export_a_loadable_pipeline(work, tmp_path):
    from diffusers import StableDiffusionPipeline

    train_unet(TINY_UNET, device="cpu", seed=0, work_dir=work)
    assert final_path(work, "unet").exists()
    sd, clip_dir = export_micro(work, tmp_path / "sd", tmp_path / "clip")
    assert (sd / "model_index.json").exists() and (sd / "world.json").exists()
    assert json.loads((sd / "world.json").read_text())["categories"] == list(world.CATEGORIES)
    with safe_open(str(sd / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert all(f.get_slice(k).get_dtype() == "F16" for k in f.keys())

    pipe = StableDiffusionPipeline.from_pretrained(sd)  # plain load, no extra code or dtype
    pipe.set_progress_bar_config(disable=True)
    assert pipe.safety_checker is None
    assert any(name.endswith("attn2.to_k") for name, _ in pipe.unet.named_modules())
    out = pipe(
        ["a red star", "something blue"],
        num_inference_steps=2,
        guidance_scale=DEFAULT_GUIDANCE,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert out.shape == (2, 64, 64, 3) and np.isfinite(out).all()

    # the text encoder in the pipeline is the micro CLIP's text tower, token for token
    model, tokenizer = load_micro_clip(clip_dir)
    ids = pipe.tokenizer(["a red star"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids.tolist() == tokenizer(["a red star"], padding="max_length", max_length=77).input_ids
    with torch.no_grad():
        a = pipe.text_encoder(ids)[0]
        b = model.text_model(input_ids=ids).last_hidden_state
    assert torch.allclose(a, b, atol=1e-5)
    images, scenes = world.render_dataset(range(8))
    acc = zero_shot_accuracy(model, tokenizer, images, scenes, "cpu")
    assert set(acc) == set(world.CATEGORIES)

    # the eval stage: per-category accuracies, CLIP-judge agreement, image counts and grids
    res = evaluate_micro(sd, clip_dir, device="cpu", seed=0, n_images=2, batch=2, out_dir=tmp_path / "eval")
    for key in ("clip", "judge", "agreement"):
        assert set(res[key]) == set(world.CATEGORIES) and all(0.0 <= v <= 1.0 for v in res[key].values())
    assert res["images"] == {cat: 2 * len(world.concepts(cat)) for cat in world.CATEGORIES}
    # None where the judge read no image of the category right (two images per concept here)
    assert set(res["clip_where_judge_right"]) == set(world.CATEGORIES)
    assert all(v is None or 0.0 <= v <= 1.0 for v in res["clip_where_judge_right"].values())
    for key in ("judge_on_vae_reconstructions", "clip_on_vae_reconstructions"):
        assert set(res[key]) == set(world.CATEGORIES) and all(0.0 <= v <= 1.0 for v in res[key].values())
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["agreement"] == res["agreement"]
    assert all((tmp_path / "eval" / f"eval_{cat}.png").is_file() for cat in world.CATEGORIES)


@pytest.mark.slow
def test_resume_continues_from_saved_step(work, tmp_path):
    # Resume in a copy of the work dir, so the other tests' unet stage is unaffected.
    import shutil

    resumed = tmp_path / "resumed"
    shutil.copytree(work, resumed, ignore=shutil.ignore_patterns("unet"))
    (resumed / "final" / "unet.safetensors").unlink(missing_ok=True)

    def stop_at_3(stage, step, total, metrics):
        if step == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_unet(TINY_UNET, device="cpu", seed=0, work_dir=resumed, callback=stop_at_3)
    assert json.loads((resumed / "unet" / "ckpt.json").read_text())["step"] == 3

    seen: list[int] = []
    unet = train_unet(
        TINY_UNET, device="cpu", seed=0, work_dir=resumed, callback=lambda s, step, t, m: seen.append(step)
    )
    assert seen == [4, 5, 6]

    # an uninterrupted run from scratch draws the same data and noise, so it ends with the same weights
    fresh = tmp_path / "fresh"
    shutil.copytree(work, fresh, ignore=shutil.ignore_patterns("unet"))
    ref = train_unet(TINY_UNET, device="cpu", seed=0, work_dir=fresh)
    for (k, a), b in zip(unet.state_dict().items(), ref.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), k


@pytest.mark.slow
def test_clip_reports_held_out_and_training_pool_accuracy(work):
    # The gap between the two is how much of the pool the vision tower has memorised.
    metrics = json.loads((work / "clip" / "metrics.json").read_text())
    for split in ("heldout_zero_shot", "heldout_degraded_zero_shot", "train_pool_zero_shot"):
        assert set(metrics[split]) == set(world.CATEGORIES)
        assert all(0.0 <= v <= 1.0 for v in metrics[split].values())


@pytest.mark.slow
def test_checkpoints_contain_no_pickles(work):
    files = [f for f in work.rglob("*") if f.is_file()]
    assert any(f.name.startswith("ckpt-") for f in files)
    for f in files:
        assert f.suffix in {".safetensors", ".json", ".npy", ".png"}, f
        if f.suffix == ".safetensors":  # parses only as safetensors (its header length may start with 0x80)
            with safe_open(str(f), "pt") as sf:
                assert len(list(sf.keys())) > 0
        else:
            head = f.read_bytes()[:2]
            assert not (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")), f  # pickle
            assert head != b"PK", f  # torch.save's zip
        if f.suffix == ".npy":
            np.load(f, allow_pickle=False)


@pytest.mark.slow
def test_clip_can_continue_with_the_text_tower_frozen(work, tmp_path):
    """Continuing the scorer after the UNet is trained must not change the SD text encoder it was trained on."""
    import dataclasses
    import shutil

    longer = dataclasses.replace(TINY_CLIP, steps=TINY_CLIP.steps + 3, freeze_text_after=TINY_CLIP.steps)
    continued = {}
    for name, config in {
        "clean": longer,
        "degraded": dataclasses.replace(longer, augment_from=TINY_CLIP.steps),
        "vae": dataclasses.replace(longer, vae_from=TINY_CLIP.steps, vae_pool_size=24),
        "warped": dataclasses.replace(longer, warp_from=TINY_CLIP.steps),
        "class prompts": dataclasses.replace(longer, class_prompt_weight=0.5),
    }.items():
        cont = tmp_path / name
        shutil.copytree(work, cont)
        before = train_micro_clip(TINY_CLIP, device="cpu", seed=0, work_dir=cont)  # resumes at its last step
        reconstruct = vae_reconstructor(cont, "cpu") if config.vae_from is not None else None
        after = continued[name] = train_micro_clip(
            config, device="cpu", seed=0, work_dir=cont, reconstruct=reconstruct
        )
        text_before, text_after = before.text_model.state_dict(), after.text_model.state_dict()
        assert all(torch.equal(v, text_after[k]) for k, v in text_before.items())
        vision_before, vision_after = before.vision_model.state_dict(), after.vision_model.state_dict()
        assert any(not torch.equal(v, vision_after[k]) for k, v in vision_before.items())
    # degrading or warping the training images, mixing in VAE reconstructions or adding the zero-shot classification
    # loss changes what the vision side learns
    clean = continued["clean"].vision_model.state_dict()
    for name in ("degraded", "vae", "warped", "class prompts"):
        other = continued[name].vision_model.state_dict()
        assert any(not torch.equal(v, other[k]) for k, v in clean.items()), name
    metrics = json.loads((tmp_path / "vae" / "clip" / "metrics.json").read_text())
    assert set(metrics["heldout_vae_zero_shot"]) == set(world.CATEGORIES)
    assert set(metrics["heldout_warped_zero_shot"]) == set(world.CATEGORIES)
    assert "heldout_vae_zero_shot" not in json.loads((tmp_path / "clean" / "clip" / "metrics.json").read_text())


@pytest.mark.slow
def test_clip_vae_option_needs_a_reconstruct_function(work, tmp_path):
    import dataclasses
    import shutil

    shutil.copytree(work, tmp_path / "w")
    config = dataclasses.replace(TINY_CLIP, steps=TINY_CLIP.steps + 1, vae_from=0)
    with pytest.raises(ValueError, match="reconstruct"):
        train_micro_clip(config, device="cpu", seed=0, work_dir=tmp_path / "w")
    with pytest.raises(ValueError, match="vae_fraction"):
        dataclasses.replace(TINY_CLIP, vae_fraction=0.0)
    with pytest.raises(ValueError, match="warp_amplitude"):
        dataclasses.replace(TINY_CLIP, warp_amplitude=0.0)
    with pytest.raises(FileNotFoundError, match="vae stage"):
        vae_reconstructor(tmp_path / "no-such-work", "cpu")


@pytest.mark.slow
def test_vae_reconstructions_are_cached_per_vae_and_images(work, tmp_path):
    import shutil

    shutil.copytree(work, tmp_path / "w")
    images, _ = world.render_dataset(range(6))
    reconstruct = vae_reconstructor(tmp_path / "w", "cpu")
    first = reconstruct(images)
    assert first.shape == images.shape and first.dtype == np.uint8
    assert not np.array_equal(first, images)  # a tiny VAE does not reproduce its input
    cached = list((tmp_path / "w" / "pool").glob("vae-recon-*.npy"))
    assert len(cached) == 1
    assert np.array_equal(vae_reconstructor(tmp_path / "w", "cpu")(images), first)  # read back from the cache
    reconstruct(images[:3])  # other images: another cache entry
    assert len(list((tmp_path / "w" / "pool").glob("vae-recon-*.npy"))) == 2


@pytest.mark.slow
def test_import_continues_exported_models(work, tmp_path):
    """Exported folders seed a new work dir (checkpoints do not outlive the machine that trained them): exporting it
    again gives the same weights bit for bit, and the clip and unet stages restart from them, not from seed."""
    import dataclasses

    from safetensors.torch import load_file

    from evals.microworld.clip import micro_clip_config, save_micro_clip
    from evals.microworld.training import load_final_unet

    train_unet(TINY_UNET, device="cpu", seed=0, work_dir=work)  # already done if the export test ran first
    sd, clip_dir = export_micro(work, tmp_path / "sd", tmp_path / "clip")
    new = tmp_path / "new"
    import_micro(new, sd, clip_dir)
    sd2, clip2 = export_micro(new, tmp_path / "sd2", tmp_path / "clip2")
    for a, b in (
        (sd / "unet" / "diffusion_pytorch_model.safetensors", sd2 / "unet" / "diffusion_pytorch_model.safetensors"),
        (sd / "vae" / "diffusion_pytorch_model.safetensors", sd2 / "vae" / "diffusion_pytorch_model.safetensors"),
        (sd / "text_encoder" / "model.safetensors", sd2 / "text_encoder" / "model.safetensors"),
        (clip_dir / "model.safetensors", clip2 / "model.safetensors"),
    ):
        x, y = load_file(a), load_file(b)
        assert set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x), a

    # a tiny LR moves the weights by ~1e-8: the restarted UNet is the imported one, not a seeded random init
    imported, _ = load_final_unet(new)
    restarted = train_unet(dataclasses.replace(TINY_UNET, steps=1, lr=1e-8), device="cpu", seed=0, work_dir=new)
    for (k, a), b in zip(restarted.state_dict().items(), imported.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-4), k
    # the CLIP's text tower is the imported UNet's text encoder: training it is refused, the vision side restarts
    one_step = dataclasses.replace(TINY_CLIP, steps=1, lr=1e-8, eval_every=1)
    with pytest.raises(ValueError, match="text tower"):
        train_micro_clip(one_step, device="cpu", seed=0, work_dir=new)
    clip = train_micro_clip(dataclasses.replace(one_step, freeze_text_after=0), device="cpu", seed=0, work_dir=new)
    clip_before, _ = load_micro_clip(clip_dir)
    after, before = clip.state_dict(), clip_before.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if k.startswith("text_model."))
    assert all(torch.allclose(after[k], v, atol=1e-4) for k, v in before.items())
    with pytest.raises(ValueError, match="VAE"):
        train_vae(TINY_VAE, device="cpu", seed=0, work_dir=new)

    # refusals: a work dir that already holds training state, a folder that is no model, a CLIP from another run
    with pytest.raises(FileExistsError, match="new --work"):
        import_micro(new, sd, clip_dir)
    # an import killed before its last file (init/unet) is redone, not refused
    half = tmp_path / "half"
    import_micro(half, sd, clip_dir)
    init_path(half, "unet").unlink()
    import_micro(half, sd, clip_dir)
    assert init_path(half, "unet").is_file()
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        import_micro(tmp_path / "a", tmp_path / "nowhere", clip_dir)
    torch.manual_seed(1)
    other = save_micro_clip(CLIPModel(micro_clip_config(TINY_CLIP.arch)), tmp_path / "other")
    with pytest.raises(ValueError, match="not trained together"):
        import_micro(tmp_path / "b", sd, other)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--emblem-replay", "0.3"], "--emblem-replay takes a share"),
        (["--world-version", "2", "--emblem-replay", "1.5", "--stages", "clip"], "--emblem-replay takes a share"),
        (["--world-version", "2", "--stages", "vae,clip,unet"], "keeps the VAE"),
        (["--world-version", "2", "--stages", "clip,export"], "the unet stage has to follow"),
        (["--world-version", "3"], "invalid choice"),
    ],
)
def test_train_micro_refuses_bad_world_version_options(argv, message, tmp_path, capsys):
    import runpy

    script = Path(__file__).resolve().parents[1] / "scripts" / "train_micro.py"
    main = runpy.run_path(str(script), run_name="train_micro_script")["main"]
    with pytest.raises(SystemExit) as refused:
        main([*argv, "--work", str(tmp_path / "work")])
    assert refused.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "work").exists()
