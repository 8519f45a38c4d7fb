#!/usr/bin/env python
"""Benchmark a LoRA erasure (the fine-tuning family) on the micro model: its cost, not its efficacy.

    python scripts/bench_lora.py                                  # esd, reference defaults
    python scripts/bench_lora.py --set lr=1e-3                    # esd as measured on micro
    python scripts/bench_lora.py --method ca --set lr=1e-3        # concept ablation (anchor: --guide, default "art")
    python scripts/bench_lora.py --set lr=1e-3 --efficacy-at 25,50,100,200   # CPU time and steps to erase
    python scripts/bench_lora.py --method stereo --set preset=micro  # and each stage's cost (rounds, robust erase)
    python scripts/bench_uce.py --save-sd14 /tmp/sd14 && python scripts/bench_lora.py --model /tmp/sd14 \
        --set steps=1 --set pool_images=1 --set pool_steps=2 --repeats 1        # one step at SD 1.4 shapes
    python scripts/bench_lora.py --model sdxl-shapes --device cuda --dtype bfloat16 --set steps=1 \
        --set pool_images=1 --set pool_steps=2 --repeats 1 --json               # one step at SDXL shapes (random)

Prints the edit's CPU seconds (all threads of this process) and wall seconds, split into sampling the pool of
frozen-model trajectories and training; seconds per training step relative to one forward+backward of the UNet at
the same batch with the same LoRA adapters trainable (the trainer's step is a frozen forward pass or two plus that);
and the peak resident memory relative to the same process right after ``load_pipeline`` (the pipeline alone); on
CUDA also the peak GPU memory allocated, and the same after loading. ``--model sdxl-shapes`` is SDXL 1.0 base's
architecture with random weights (``pipelines.shapes``), drawn on ``--device``: no download.
``--efficacy-at`` adds how many steps and CPU-seconds it takes to erase the concept (micro CLIP on its probes);
the full before/after tables are ``scripts/measure_erasure.py``'s business.

Figures: ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import sys
import time

# scripts/erase.py would shadow the erase package: drop this folder from the import path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]

from pipelines.checks import run_script  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import erase  # noqa: E402
from erase.core.inputs import check_concept_text, check_option_minimums, error_line, parse_config_overrides  # noqa: E402
from erase.workflow import erasure_settings  # noqa: E402
from pipelines import load_pipeline, resolve_device, set_library_verbosity, wrap_pipeline  # noqa: E402
from pipelines.shapes import SHAPED_MODELS, sdxl_shaped_pipeline  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def peak_rss_mb() -> float:
    """This process's peak resident set so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gpu_peak_mb(device: torch.device) -> float | None:
    """Peak GPU memory allocated by torch since the last reset, on CUDA; ``None`` elsewhere."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_pipeline(model: str, device: torch.device, dtype: torch.dtype):  # noqa: ANN201 - a PipelineWrapper
    """``model`` loaded, or built at its real shapes with random weights (``SHAPED_MODELS``)."""
    if model in SHAPED_MODELS:
        return wrap_pipeline(sdxl_shaped_pipeline(device, dtype), model)
    return load_pipeline(model, device=device, dtype=dtype)


def forward_backward_seconds(wrapper, config, concept: str, repeats: int) -> float:
    """Median seconds of one forward+backward of the UNet, LoRA adapters on the method's modules trainable, at the
    trainer's batch size (one warm-up call first)."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.cat([wrapper.initial_latents(i) for i in range(config.batch_size)]).to(wrapper.device)
    timesteps = torch.randint(0, 1000, (config.batch_size,), generator=generator).to(wrapper.device)
    encoding = wrapper.encode_prompts([concept] * config.batch_size)
    times = []
    with wrapper.lora_adapters(config.patterns, config.rank, config.alpha, generator=generator) as adapters:
        for i in range(repeats + 1):
            start = time.perf_counter()
            loss = wrapper.noise_prediction(latents.to(wrapper.dtype), timesteps, encoding).float().pow(2).mean()
            loss.backward()
            synchronize(wrapper.device)
            if i:
                times.append(time.perf_counter() - start)
            for p in adapters.parameters():
                p.grad = None
    return statistics.median(times)


def efficacy_curve(wrapper, spec, method: str, config, stages: list[int], images: int) -> list[tuple]:  # noqa: ANN001
    """Train in stages (one checkpoint folder, so each stage continues the last) and after each stage score the
    first target's probes with the micro CLIP: ``(steps, cumulative edit CPU-s, accuracy)`` per stage."""
    import tempfile

    from evals.probes import probe_correct, world_labels, world_probes
    from evals.scorer import ClipScorer

    scorer = ClipScorer.from_pretrained("micro", device=wrapper.device)
    probes = world_probes([spec.targets[0]], images, seed=1234)
    prompts, seeds = [p.prompt for p in probes], [p.seed for p in probes]
    rows, cpu_total = [], 0.0
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as folder:
        for steps in [0, *stages]:
            if steps:
                staged = dataclasses.replace(config, steps=steps, checkpoint_dir=folder, checkpoint_every=steps)
                cpu = time.process_time()
                deltas = erase.erase_concepts(wrapper, spec, method, staged).deltas
                cpu_total += time.process_time() - cpu
            else:
                deltas = {}
            with wrapper.weight_deltas(deltas):
                images_after = wrapper.generate(prompts, seeds, batch_size=32, progress=False)
            accuracy = sum(probe_correct(scorer, images_after, probes, world_labels())) / len(probes)
            rows.append((steps, cpu_total, accuracy))
            print(f"  {steps:5d} steps  {cpu_total:7.1f} CPU-s  {spec.targets[0]!r} {accuracy:6.1%}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="esd", help="a method that trains (esd, ca, spm, ...)")
    parser.add_argument("--concept", default="van gogh")
    parser.add_argument("--guide", action="append", help="the guide (ca: the anchor); default by concept type art")
    parser.add_argument("--preserve", action="append", help="preserved concepts (anchor regularization)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="method config field")
    parser.add_argument("--model", default="micro", help=f"micro, a model folder or hub id, or {SHAPED_MODELS[0]}")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10, help="forward+backward timings (median)")
    parser.add_argument(
        "--efficacy-at",
        help="micro only: also train in stages to these step counts (e.g. 25,50,100,200) and score the concept's "
        "probes after each: CPU time and steps to erase it",
    )
    parser.add_argument("--images", type=int, default=32, help="probe images per stage of --efficacy-at")
    args = parser.parse_args(argv)
    set_library_verbosity(False)
    try:
        check_option_minimums(args, {"threads": 1, "repeats": 1, "images": 1})
        if not erase.get_method(args.method).capabilities.training:
            trained = [m for m in erase.available_methods() if erase.get_method(m).capabilities.training]
            raise ValueError(f"{args.method} is no method that trains; those are {', '.join(trained)}")
        check_concept_text(args.concept, "concept to erase")
        overrides = parse_config_overrides(args.set)
    except (ValueError, TypeError) as err:
        parser.error(error_line(err))
    torch.set_num_threads(args.threads)
    if args.efficacy_at:
        try:
            stages = sorted({int(k) for k in args.efficacy_at.split(",")})
        except ValueError:
            parser.error(f"--efficacy-at takes step counts such as 25,50,100, got {args.efficacy_at!r}")
        if stages[0] < 1 or args.model != "micro":
            parser.error("--efficacy-at needs step counts >= 1 and the micro model (its probes)")

    try:
        device = resolve_device(args.device)
        wrapper = bench_pipeline(args.model, device, DTYPES[args.dtype])
        spec, config = erasure_settings(wrapper, [args.concept], args.method, args.guide, args.preserve, overrides)
    except (ValueError, TypeError, KeyError, OSError) as err:
        parser.error(error_line(err))
    # safetensors weights are memory-mapped: read every one so the baseline is the pipeline resident in memory
    with torch.no_grad():
        for module in wrapper.components().values():
            for param in module.parameters():
                param.sum()
    baseline = peak_rss_mb()
    gpu_loaded = gpu_peak_mb(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cpu, wall = time.process_time(), time.perf_counter()
    artifact = erase.erase_concepts(wrapper, spec, args.method, config)
    synchronize(device)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    peak, gpu_peak = peak_rss_mb(), gpu_peak_mb(device)
    info = artifact.info
    fb = forward_backward_seconds(wrapper, config, args.concept, args.repeats)
    per_step = info["train_seconds"] / info["steps"]

    print(
        f"{args.method} on {args.model}: {args.concept!r} -> guide {spec.guides[0]!r}, torch threads "
        f"{torch.get_num_threads()}, {info['lora_modules']} LoRA modules ({info['trainable_parameters']} params)"
    )
    defaults = dataclasses.asdict(type(config)())
    changed = {k: v for k, v in dataclasses.asdict(config).items() if v != defaults[k]}
    print(
        f"  settings           steps {config.steps}, batch {config.batch_size}, lr {config.lr:g}, pool "
        f"{config.pool_images} x {config.pool_steps} steps; changed from defaults: {changed or 'none'}"
    )
    print(
        f"  edit               {cpu:.1f} CPU-s, {wall:.1f} s wall "
        f"(pool {info['pool_seconds']:.1f} s, training {info['train_seconds']:.1f} s wall)"
    )
    print(
        f"  per training step  {per_step * 1000:.1f} ms = {per_step / fb:.2f} x one UNet forward+backward "
        f"at batch {config.batch_size} ({fb * 1000:.1f} ms)"
    )
    print(
        f"  peak memory        {peak:.0f} MB resident = {peak / baseline:.2f} x the process after load_pipeline "
        f"({baseline:.0f} MB)"
    )
    if gpu_peak is not None:
        print(f"  peak GPU memory    {gpu_peak:.0f} MB allocated (the pipeline alone: {gpu_loaded:.0f} MB)")
    print(
        f"  final loss         {info['final_loss']:.4g} (per 100 steps: "
        f"{', '.join(f'{v:.4g}' for v in info['loss_per_100_steps'])})"
    )
    for stage in info.get("stages", []):  # a method of several stages (stereo): each one's cost
        print(
            f"  stage {stage['stage']!r:32s} {stage['steps']:5d} steps  {stage['cpu_seconds']:7.1f} CPU-s  "
            f"{stage['wall_seconds']:7.1f} s wall  peak {stage['peak_memory_mb']:.0f} MB resident so far"
        )
    if args.json:
        print(json.dumps({
            "method": args.method, "model": args.model, "device": str(device), "dtype": args.dtype,
            "steps": config.steps, "batch_size": config.batch_size, "edit_cpu_seconds": cpu, "edit_wall_seconds": wall,
            "pool_seconds": info["pool_seconds"], "train_seconds": info["train_seconds"],
            "seconds_per_step": per_step, "forward_backward_seconds": fb, "peak_rss_mb": peak,
            "loaded_rss_mb": baseline, "peak_gpu_mb": gpu_peak, "loaded_gpu_mb": gpu_loaded,
        }))  # fmt: skip
    if args.efficacy_at:
        print(f"efficacy by training steps ({args.images} images, micro CLIP; CPU-s of the edits, pool included):")
        rows = efficacy_curve(wrapper, spec, args.method, config, stages, args.images)
        reached = [r for r in rows if r[0] and r[2] <= 0.10]
        if reached:
            steps, cpu_s, accuracy = reached[0]
            print(f"  reaches <= 10% at {steps} steps, {cpu_s:.1f} CPU-s ({accuracy:.1%})")
        else:
            print("  does not reach <= 10% within these steps")
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
