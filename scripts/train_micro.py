#!/usr/bin/env python
"""Rebuild the micro world's models from a seed: micro CLIP, micro SD (VAE + UNet), export, evaluation.

Examples::

    # on a GPU machine, two calls of <= 8 minutes each
    python scripts/train_micro.py --preset gpu --device cuda --stages clip,vae
    python scripts/train_micro.py --preset gpu --device cuda --stages unet,export,eval
    # everything on 2 CPU cores (prints a time estimate first)
    python scripts/train_micro.py --preset cpu --device cpu
    # measure per-step times and print the extrapolated total only
    python scripts/train_micro.py --preset cpu --device cpu --estimate
    # replay every run that made the shipped weights (README, runs table): about 9.5 h on 2 CPU cores
    python scripts/train_micro.py --recipe shipped --work .train/shipped
    # world version 2 (the emblems, docs/design/world-100.md): the CLIP with its text tower, then the UNet on it,
    # both from the shipped models (the VAE is kept); --estimate first prints what they cost
    python scripts/train_micro.py --world-version 2 --init-from --work .train/micro-v2 --stages clip --estimate

Every stage resumes from its checkpoint in --work; finished stages hand over through ``<work>/final/*.safetensors``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .` (e.g. on a borrowed GPU machine)
    sys.path.insert(0, str(ROOT))

from evals.microworld.clip import micro_clip_path, train_micro_clip  # noqa: E402
from evals.microworld.train_utils import init_path  # noqa: E402
from evals.microworld.training import (  # noqa: E402
    Preset,
    evaluate_micro,
    export_micro,
    final_metadata,
    import_micro,
    preset,
    save_final_clip,
    train_unet,
    train_vae,
    vae_reconstructor,
)
from pipelines import DEFAULT_GUIDANCE, DEFAULT_STEPS, micro_model_path  # noqa: E402
from pipelines.checks import check_option_minimums, run_script  # noqa: E402

# The VAE comes first: the CLIP can train on its reconstructions (--clip-vae-from); the two are otherwise independent.
STAGES = ("vae", "clip", "unet", "export", "eval")
log = logging.getLogger("train_micro")


def _override(p: Preset, args: argparse.Namespace) -> Preset:
    def cfg(c, stage: str):
        changes: dict = {"checkpoint_every_s": args.checkpoint_every_s}
        stage_steps = getattr(args, f"{stage}_steps")
        if stage_steps is not None:
            c = dataclasses.replace(c, steps=stage_steps, warmup=min(c.warmup, stage_steps))
        if getattr(args, f"{stage}_lr") is not None:
            changes["lr"] = getattr(args, f"{stage}_lr")
        if args.max_steps is not None:
            steps = min(c.steps, args.max_steps)
            changes.update(steps=steps, warmup=min(c.warmup, max(1, steps // 10)))
            if stage == "clip":
                changes["eval_every"] = max(1, min(c.eval_every, steps))
        if args.pool_size is not None:
            changes["pool_size"] = max(args.pool_size, c.batch_size)
            if stage == "clip":
                changes["heldout_size"] = min(c.heldout_size, args.pool_size)
        if args.batch_size is not None:
            changes["batch_size"] = args.batch_size
            changes.setdefault("pool_size", max(c.pool_size, args.batch_size))
        if args.time_limit_min is not None:
            changes["time_limit_s"] = 60.0 * args.time_limit_min
        if stage == "clip" and args.clip_freeze_text_after is not None:
            changes["freeze_text_after"] = args.clip_freeze_text_after
        elif stage == "clip" and args.init_from is not None and args.world_version < 2:
            changes["freeze_text_after"] = 0  # the imported UNet reads the text tower (version 2 retrains the UNet)
        if stage in ("clip", "unet"):
            changes["world_version"] = args.world_version
            if args.emblem_replay is not None:
                changes["emblem_replay"] = args.emblem_replay
        if stage == "clip":
            clip_options = {
                "augment_from": args.clip_augment_from,
                "warp_from": args.clip_warp_from,
                "vae_from": args.clip_vae_from,
                "class_prompt_weight": args.clip_class_prompt_weight,
            }
            changes.update({k: v for k, v in clip_options.items() if v is not None})
        return dataclasses.replace(c, **changes)

    eval_images = args.eval_images if args.eval_images is not None else p.eval_images
    return Preset(cfg(p.clip, "clip"), cfg(p.vae, "vae"), cfg(p.unet, "unet"), eval_images, p.eval_batch)


def _steps_timer() -> tuple[dict, object]:
    marks: dict[str, list[float]] = {}

    def callback(stage: str, step: int, total: int, metrics: dict) -> None:
        marks.setdefault(stage, []).append(time.perf_counter())

    return marks, callback


def estimate(
    p: Preset, device: str, seed: int, workers: int, n_steps: int = 6, stages: tuple[str, ...] = STAGES
) -> float:
    """Run each training stage for a few steps in a scratch dir and extrapolate the wall time of ``stages`` at the
    preset's settings (the clip and unet stages render the preset's world version)."""
    from evals.microworld import world
    from evals.microworld.training import final_path

    marks, cb = _steps_timer()
    total = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        small = dict(steps=n_steps, warmup=1, pool_size=max(256, p.clip.batch_size), checkpoint_every_s=1e9)
        t = time.perf_counter()
        world.render_dataset(range(2000), workers=workers, version=p.clip.world_version)
        render_s = (time.perf_counter() - t) / 2000 * (p.clip.pool_size + p.clip.heldout_size)
        print(f"  pool rendering (world version {p.clip.world_version}): ~{render_s / 60:.1f} min (once; cached)")
        total += render_s
        clip_cfg = dataclasses.replace(p.clip, **small, heldout_size=64, eval_every=10**9)
        model = train_micro_clip(clip_cfg, device=device, seed=seed, work_dir=tmp, callback=cb)
        save_final_clip(model, clip_cfg.arch, tmp, world_version=clip_cfg.world_version)
        train_vae(dataclasses.replace(p.vae, **small), device=device, seed=seed, work_dir=tmp, callback=cb)
        train_unet(dataclasses.replace(p.unet, **small), device=device, seed=seed, work_dir=tmp, callback=cb)
        for stage, cfg in (("clip", p.clip), ("vae", p.vae), ("unet", p.unet)):
            if stage not in stages:
                continue
            m = marks[stage]
            per_step = (m[-1] - m[1]) / (len(m) - 2)  # skip the first step (lazy init, allocator warm-up)
            print(
                f"  {stage}: {per_step:.3f} s/step x {cfg.steps} steps (batch {cfg.batch_size}) "
                f"= {per_step * cfg.steps / 60:.1f} min"
            )
            total += per_step * cfg.steps
        latent_s = 0.0
        if final_path(tmp, "vae").exists():
            from evals.microworld.training import encode_pool_latents, load_final_vae

            vae = load_final_vae(tmp, device)
            imgs, _ = world.render_dataset(range(512))
            t = time.perf_counter()
            with torch.no_grad():
                encode_pool_latents(vae, imgs, device)
            latent_s = (time.perf_counter() - t) / 512 * p.unet.pool_size
            print(f"  latent caching: {latent_s / 60:.1f} min")
        if "unet" in stages:
            total += latent_s
        if "eval" not in stages:
            print(f"  estimated total of {','.join(s for s in STAGES if s in stages)}: {total / 3600:.2f} h")
            return total
        export_micro(tmp, Path(tmp) / "sd", Path(tmp) / "clip_out")
        t = time.perf_counter()
        evaluate_micro(Path(tmp) / "sd", Path(tmp) / "clip_out", device=device, seed=seed, n_images=1, batch=1)
        n_concepts = sum(len(world.concepts(c)) for c in world.CATEGORIES)
        per_image = (time.perf_counter() - t) / n_concepts
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(Path(tmp) / "sd", dtype=torch.float32).to(device)
        pipe.set_progress_bar_config(disable=True)
        pipe(["a red star"] * p.eval_batch, num_inference_steps=2, output_type="np")
        t = time.perf_counter()
        pipe(
            ["a red star"] * p.eval_batch,
            num_inference_steps=DEFAULT_STEPS,
            guidance_scale=DEFAULT_GUIDANCE,
            output_type="np",
        )
        per_image = min(per_image, (time.perf_counter() - t) / p.eval_batch)
        eval_s = per_image * n_concepts * p.eval_images
        print(f"  eval: {per_image:.2f} s/image x {n_concepts * p.eval_images} images = {eval_s / 60:.1f} min")
        total += eval_s
    print(f"  estimated total: {total / 3600:.2f} h")
    return total


#: The runs that made the shipped weights (README, runs table), in order, as this script's own options. Runs 1-7 share
#: one work folder; runs 11, 13 and 14 each start a new one from the run before's export (``--init-from``).
SHIPPED_RUNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("run1", ("--stages", "vae,clip,unet")),
    ("run2", ("--stages", "clip,unet", "--clip-steps", "8000", "--clip-freeze-text-after", "4000",
              "--unet-steps", "20000")),
    ("run3", ("--stages", "clip", "--clip-steps", "14000", "--clip-freeze-text-after", "4000")),
    ("run4", ("--stages", "unet", "--unet-steps", "28000")),
    ("run5", ("--stages", "clip", "--clip-steps", "18000", "--clip-freeze-text-after", "4000")),
    ("run6", ("--stages", "unet", "--unet-steps", "40000")),
    ("run7", ("--stages", "clip,export", "--clip-steps", "22000", "--clip-freeze-text-after", "4000",
              "--clip-augment-from", "18000")),
    ("run11", ("--init-from", "--stages", "clip,export", "--clip-steps", "3000", "--clip-lr", "5e-4",
               "--clip-augment-from", "0", "--clip-warp-from", "0")),
    ("run13", ("--init-from", "--stages", "clip,export", "--clip-steps", "3000", "--clip-lr", "5e-4",
               "--clip-augment-from", "0", "--clip-warp-from", "0", "--clip-class-prompt-weight", "0.5")),
    ("run14", ("--init-from", "--stages", "clip,export,eval", "--clip-steps", "4000", "--clip-lr", "3e-4",
               "--clip-augment-from", "0", "--clip-warp-from", "0", "--clip-class-prompt-weight", "1.0")),
)  # fmt: skip
#: Options (argparse dests) a recipe sets itself, run by run, and those every run of it shares.
_RECIPE_SETS = ("stages", "init_from", "preset", "clip_steps", "clip_lr", "vae_steps", "vae_lr", "unet_steps",
                "unet_lr", "clip_freeze_text_after", "clip_augment_from", "clip_warp_from", "clip_vae_from",
                "clip_class_prompt_weight", "world_version", "emblem_replay")  # fmt: skip
_RECIPE_SHARES = ("device", "seed", "workers", "max_steps", "pool_size", "batch_size", "eval_images", "eval_seed",
                  "eval_steps", "time_limit_min", "checkpoint_every_s")  # fmt: skip


def run_recipe(shared: list[str], work: Path, out_sd: Path, out_clip: Path) -> int:
    """Run SHIPPED_RUNS one after another, each with the options ``shared`` by every run (device, seed, caps).

    Each finished run leaves ``<work>/<run>.done``; rerunning the command skips those and resumes the one it was in.
    Only the last run writes ``out_sd`` and ``out_clip``; the ones before export into ``<work>/<run>/``.
    """
    run_work, previous = work / SHIPPED_RUNS[0][0], None
    for i, (name, options) in enumerate(SHIPPED_RUNS):
        last = i == len(SHIPPED_RUNS) - 1
        sd, clip = (out_sd, out_clip) if last else (work / name / "sd", work / name / "clip")
        extra = list(options)
        if "--init-from" in extra:  # from the run before's export: an SD folder and a CLIP folder
            run_work = work / name
            at = extra.index("--init-from") + 1
            extra[at:at] = [str(previous[0]), str(previous[1])]
        done = work / f"{name}.done"
        if done.exists():
            print(f"=== {name}: done before, skipped", flush=True)
        else:
            print(f"=== {name} ({i + 1} of {len(SHIPPED_RUNS)}): {' '.join(options)}", flush=True)
            paths = ["--preset", "cpu", "--work", str(run_work), "--out-sd", str(sd), "--out-clip", str(clip)]
            main([*shared, *paths, *extra])
            done.write_text(" ".join(options) + "\n")
        if "export" in options[options.index("--stages") + 1]:
            previous = (sd, clip)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-sd", type=Path, default=micro_model_path(), help="diffusers pipeline folder to write")
    ap.add_argument("--out-clip", type=Path, default=micro_clip_path(), help="micro CLIP folder to write")
    ap.add_argument("--work", type=Path, default=ROOT / ".train" / "micro", help="checkpoints, pool cache, eval")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument(
        "--recipe",
        choices=("shipped",),
        default=None,
        help="replay every run that made the shipped weights (README, runs table) in --work, one after another; "
        "about 9.5 h on 2 CPU cores. Rerun the same command to resume",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes for rendering the pool")
    ap.add_argument("--max-steps", type=int, default=None, help="cap every stage's steps (smoke tests)")
    for stage in ("clip", "vae", "unet"):
        ap.add_argument(f"--{stage}-steps", type=int, default=None, help=f"override the preset's {stage} steps")
        ap.add_argument(f"--{stage}-lr", type=float, default=None, help=f"override the preset's {stage} peak LR")
    ap.add_argument(
        "--init-from",
        nargs="*",
        metavar="FOLDER",
        default=None,
        help="start a new --work from exported models instead of from seed: no value for the shipped ones, or an SD "
        "pipeline folder and a micro CLIP folder. They are step 0 of the clip and unet stages (new warm-up and cosine "
        "schedule); the CLIP's text tower stays frozen. Rerun the same command to resume",
    )
    ap.add_argument(
        "--clip-freeze-text-after",
        type=int,
        default=None,
        help="train only the CLIP's vision side from this step on (continue the scorer after the UNet is trained)",
    )
    ap.add_argument(
        "--clip-augment-from",
        type=int,
        default=None,
        help="from this step on, degrade the CLIP training images as generated samples are (blur, softening, noise)",
    )
    ap.add_argument(
        "--clip-warp-from",
        type=int,
        default=None,
        help="from this step on, bend the shapes in CLIP training images as a small UNet draws them (rotation, "
        "scale, smooth displacement)",
    )
    ap.add_argument(
        "--clip-vae-from",
        type=int,
        default=None,
        help="from this step on, half of each CLIP batch are VAE reconstructions (needs the vae stage done first)",
    )
    ap.add_argument(
        "--clip-class-prompt-weight",
        type=float,
        default=None,
        help="add the zero-shot classification loss (each image against every concept's one-attribute prompt) "
        "with this weight",
    )
    ap.add_argument(
        "--world-version",
        type=int,
        choices=(1, 2),
        default=1,
        help="2: the micro world with emblems (docs/design/world-100.md): pools render them, captions name them, the "
        "clip stage trains its text tower even from --init-from, and the unet stage follows it; the VAE is kept",
    )
    ap.add_argument(
        "--emblem-replay",
        type=float,
        default=None,
        help="with --world-version 2: share of every clip and unet batch drawn from scenes without an emblem "
        "(default 0.5)",
    )
    ap.add_argument("--pool-size", type=int, default=None, help="override the pool size (smoke tests)")
    ap.add_argument("--batch-size", type=int, default=None, help="override every stage's batch size")
    ap.add_argument("--eval-images", type=int, default=None, help="images per concept in the eval stage")
    ap.add_argument(
        "--eval-seed",
        type=int,
        default=None,
        help="seed of the eval stage's image seeds (default: --seed); another value draws a fresh set of images",
    )
    ap.add_argument(
        "--eval-steps",
        type=int,
        default=None,
        help="sampler steps of the eval stage's images (default: the pipelines' default, as every audit draws them)",
    )
    ap.add_argument("--time-limit-min", type=float, default=None, help="per training stage: stop, save, move on")
    ap.add_argument("--checkpoint-every-s", type=float, default=180.0)
    ap.add_argument("--estimate", action="store_true", help="measure per-step times, print the total, exit")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        check_option_minimums(args, {"eval_steps": 1})  # and the seeds
    except ValueError as err:
        ap.error(str(err))
    if args.recipe is not None:
        owned = [f"--{d.replace('_', '-')}" for d in _RECIPE_SETS if getattr(args, d) != ap.get_default(d)]
        if owned:
            ap.error(f"--recipe sets {', '.join(owned)} itself, run by run; leave it out")
        if args.estimate:
            ap.error("--estimate times one run's stages; --recipe shipped takes about 9.5 h on 2 CPU cores")
        shared = ["--no-progress"] if args.no_progress else []
        for dest in _RECIPE_SHARES:
            if getattr(args, dest) is not None:
                shared += [f"--{dest.replace('_', '-')}", str(getattr(args, dest))]
        return run_recipe(shared, args.work, args.out_sd, args.out_clip)
    requested = {s.strip() for s in args.stages.split(",") if s.strip()}
    unknown = sorted(requested - set(STAGES))
    if unknown:
        ap.error(f"unknown stages {unknown}; choose from {STAGES}")
    if args.init_from not in (None, []) and len(args.init_from) != 2:
        ap.error("--init-from takes no folder (the shipped models) or two: an SD pipeline folder and a CLIP folder")
    stages = [s for s in STAGES if s in requested]  # always in pipeline order, whatever order they were named in
    if args.emblem_replay is not None and (args.world_version < 2 or not 0.0 <= args.emblem_replay <= 1.0):
        ap.error(f"--emblem-replay takes a share in [0, 1] with --world-version 2, got {args.emblem_replay}")
    if args.world_version >= 2 and "clip" in stages and "export" in stages and "unet" not in stages:
        ap.error("--world-version 2 trains the CLIP's text tower: the unet stage has to follow it before an export")
    if args.world_version >= 2 and "vae" in stages:
        ap.error("--world-version 2 keeps the VAE (a new one would send the UNet back to scratch): leave out the vae "
                 "stage and start from --init-from")  # fmt: skip
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed shapes every step: autotuned conv kernels pay off at once
    p = _override(preset(args.preset, render_workers=args.workers), args)
    progress = not args.no_progress
    print(f"preset {args.preset} on {args.device}: stages {stages}, work dir {args.work}", flush=True)

    if args.estimate:
        estimate(p, args.device, args.seed, args.workers, stages=tuple(stages))
        return 0

    t_all = time.perf_counter()
    if args.init_from is not None:
        sources = args.init_from or [micro_model_path(), micro_clip_path()]
        if init_path(args.work, "unet").exists():
            print(f"{args.work} already starts from imported models: resuming", flush=True)
        else:
            import_micro(args.work, *sources)
            print(f"imported {sources[0]} and {sources[1]} into {args.work}", flush=True)
    if "unet" in stages and "clip" not in stages:
        try:  # before rendering and encoding the pool
            clip_version = final_metadata(args.work, "clip")["world_version"]
        except FileNotFoundError:
            clip_version = None
        if clip_version not in (None, args.world_version):
            ap.error(f"{args.work}'s CLIP is of world version {clip_version}: run its clip stage with "
                     f"--world-version {args.world_version} before the unet stage")  # fmt: skip
    for stage in stages:
        t = time.perf_counter()
        print(f"== stage {stage}", flush=True)
        if stage == "clip":
            reconstruct = None
            if p.clip.vae_from is not None:
                reconstruct = vae_reconstructor(args.work, args.device, progress=progress)
            model = train_micro_clip(
                p.clip,
                device=args.device,
                seed=args.seed,
                work_dir=args.work,
                progress=progress,
                reconstruct=reconstruct,
            )
            path = save_final_clip(model, p.clip.arch, args.work, world_version=p.clip.world_version)
            metrics = (args.work / "clip" / "metrics.json").read_text()
            print(f"micro CLIP -> {path}\n{metrics}", flush=True)
        elif stage == "vae":
            train_vae(p.vae, device=args.device, seed=args.seed, work_dir=args.work, progress=progress)
            print((args.work / "vae" / "metrics.json").read_text(), flush=True)
        elif stage == "unet":
            train_unet(p.unet, device=args.device, seed=args.seed, work_dir=args.work, progress=progress)
        elif stage == "export":
            try:
                sd, clip = export_micro(args.work, args.out_sd, args.out_clip)
            except (ValueError, FileNotFoundError) as err:
                print(f"train_micro.py: error: {err}", file=sys.stderr)
                return 2
            for folder in (sd, clip):
                size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
                print(f"exported {folder}: {size / 1e6:.2f} MB", flush=True)
        elif stage == "eval":
            res = evaluate_micro(
                args.out_sd,
                args.out_clip,
                device=args.device,
                seed=args.seed if args.eval_seed is None else args.eval_seed,
                n_images=p.eval_images,
                batch=p.eval_batch,
                steps=args.eval_steps,
                out_dir=args.work,
                progress=progress,
            )
            print("accuracy of the named attribute (micro CLIP zero-shot):", _fmt(res["clip"]))
            if res["judge"] is not None:
                print("accuracy of the named attribute (judge):            ", _fmt(res["judge"]))
                print("CLIP and judge name the same concept:              ", _fmt(res["agreement"]))
                print("CLIP on the images the judge reads right:          ", _fmt(res["clip_where_judge_right"]))
                print("judge on VAE reconstructions of renders (ceiling): ", _fmt(res["judge_on_vae_reconstructions"]))
            else:
                print("judge: not available (evals/microworld/judge missing or untrained)")
            print("micro CLIP on VAE reconstructions of renders:       ", _fmt(res["clip_on_vae_reconstructions"]))
            print(f"images per category: {res['images']}")
            print(f"{res['seconds_per_image']:.3f} s/image; grids and eval.json in {args.work}", flush=True)
        print(f"== stage {stage} done in {(time.perf_counter() - t) / 60:.1f} min", flush=True)
    print(f"all done in {(time.perf_counter() - t_all) / 60:.1f} min", flush=True)
    return 0


def _fmt(acc: dict[str, float | None]) -> str:
    return "  ".join(f"{k} {'n/a' if v is None else format(v, '.1%')}" for k, v in acc.items())


if __name__ == "__main__":
    sys.exit(run_script(main))
