#!/usr/bin/env python
"""Benchmark the closed-form edits: the micro model end to end, and SD 1.4-shaped weights (random) for the solver.

    python scripts/bench_uce.py                 # micro edit + SD 1.4 shapes, 1 and 100 concepts
    python scripts/bench_uce.py --skip-sd14     # micro only
    python scripts/bench_uce.py --save-sd14 /tmp/sd14   # also save the SD 1.4-shaped pipeline (4 GB) for erase.py:
    python scripts/erase.py --model /tmp/sd14 --concept "van gogh" --no-check
    python scripts/bench_uce.py --skip-sd14 --sdxl --device cuda --json sdxl.json   # UCE at SDXL shapes too
    python scripts/bench_uce.py --threads 1 --json /tmp/uce.json   # also write the figures as JSON

Each model also gets the cost breakdown of one ``erase.erase_concepts`` call (one concept, scripts/erase.py's
defaults): prompt encoding, the solve (closed form and per-layer changes), fingerprints, norms, and the whole call,
repeated on one base (its float16/bfloat16 fingerprints and norms remembered) and first on a base.

At SD 1.4 shapes the text embeddings are drawn at random (prompt encoding is excluded from the timing, as
encoding cost is the text encoder's, not the method's); the solve and the per-layer weight changes are timed.
``--sdxl`` times the whole UCE edit (both text encoders' encoding included) on SDXL 1.0 base's architecture with
random weights (``pipelines.shapes``) on ``--device``, with the peak memory it adds.
"""

from __future__ import annotations

import argparse
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
from erase.closed_form.speed import VALUE_PATTERNS, SPEEDConfig, speed_terms, speed_update  # noqa: E402
from erase.closed_form.uce import concept_embeddings, edit_from_update, uce_update  # noqa: E402
from erase.core.inputs import check_option_minimums, error_line  # noqa: E402
from erase.core.layout import check_result_file, check_writable_folder  # noqa: E402
from erase.core.registry import forget_base_records  # noqa: E402
from erase.workflow import erasure_settings  # noqa: E402
from pipelines import load_pipeline, resolve_device, wrap_pipeline  # noqa: E402
from pipelines.shapes import sdxl_shaped_pipeline, stable_diffusion_vae  # noqa: E402


def timed(fn, repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def erase_breakdown(wrapper, label: str, repeats: int) -> dict[str, float]:
    """Median seconds of one UCE ``erase_concepts`` call and of its parts, printed as one line."""
    spec, config = erasure_settings(wrapper, ["van gogh"], "uce")  # the defaults scripts/erase.py uses
    guides = [spec.guide_for(i) for i in range(len(spec.targets))]
    embeddings = {}

    def encode() -> None:
        embeddings["erase"], embeddings["guide"] = concept_embeddings(wrapper, spec.targets, guides, config)

    def solve() -> None:
        u, v = uce_update(embeddings["erase"], embeddings["guide"], None, config.erase_scale, 1.0, config.lamb)
        edit_from_update(wrapper, config.layers, u, v)

    def first() -> None:
        forget_base_records()
        erase.erase_concepts(wrapper, spec, "uce", config)

    steps = []
    erase.erase_concepts(wrapper, spec, "uce", config)  # warm-up
    figures = {"encode": timed(encode, repeats)[0], "solve": timed(solve, repeats)[0]}
    totals = []
    for _ in range(repeats):
        start = time.perf_counter()
        steps.append(erase.erase_concepts(wrapper, spec, "uce", config).info["seconds_by_step"])
        totals.append(time.perf_counter() - start)
    figures["total"] = statistics.median(totals)
    for step in ("fingerprints", "norms"):
        figures[step] = statistics.median(s[step] for s in steps)
    figures["total_first_on_base"] = timed(first, repeats)[0]
    figures["total_over_solve"] = figures["total"] / figures["solve"]
    print(
        f"{label}: erase_concepts, 1 concept: encode {figures['encode']:.3f} s, solve {figures['solve']:.3f} s, "
        f"fingerprints {figures['fingerprints']:.3f} s, norms {figures['norms']:.3f} s, "
        f"total {figures['total']:.3f} s ({figures['total_over_solve']:.1f}x the solve; "
        f"first on a base {figures['total_first_on_base']:.3f} s)"
    )
    return figures


def sd14_wrapper():
    """SD 1.4's UNet and text-encoder shapes with random weights (no download: configs written out here)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from pipelines import offline_clip_tokenizer
    from pipelines.wrapper import PipelineWrapper

    unet = UNet2DConditionModel(
        sample_size=64,
        cross_attention_dim=768,
        attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    text = CLIPTextModel(
        CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    )
    vae = stable_diffusion_vae()
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=offline_clip_tokenizer(),
        unet=unet,
        scheduler=PNDMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return PipelineWrapper(pipe, "sd14-shaped-random")


def sdxl_uce(repeats: int, device: str, dtype: str) -> dict:
    """UCE's default edit of one concept, end to end, at SDXL shapes with random weights: median and best seconds,
    and the peak memory above the loaded pipeline (resident; on CUDA also allocated GPU memory)."""
    torch_device = resolve_device(device)
    wrapper = wrap_pipeline(sdxl_shaped_pipeline(torch_device, getattr(torch, dtype)), "sdxl-shapes")
    cuda = torch_device.type == "cuda"
    loaded_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    loaded_gpu = torch.cuda.memory_allocated(torch_device) / 2**20 if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats(torch_device)
    spec, config = erasure_settings(wrapper, ["van gogh"], "uce")
    artifact = None

    def edit() -> None:
        nonlocal artifact
        artifact = erase.erase_concepts(wrapper, spec, "uce", config)
        if cuda:
            torch.cuda.synchronize(torch_device)

    med, best = timed(edit, repeats)
    return {
        "model": "sdxl-shapes", "device": str(torch_device), "dtype": dtype, "layers": len(artifact.layers),
        "median_seconds": med, "best_seconds": best, "loaded_rss_mb": loaded_rss,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "loaded_gpu_mb": loaded_gpu,
        "peak_gpu_mb": torch.cuda.max_memory_allocated(torch_device) / 2**20 if cuda else None,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-sd14", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save-sd14", metavar="DIR", help="save the SD 1.4-shaped random pipeline to DIR")
    parser.add_argument("--sdxl", action="store_true", help="also time UCE end to end at SDXL shapes (random)")
    parser.add_argument("--device", default="cpu", help="torch device of --sdxl (default: cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="of --sdxl")
    parser.add_argument("--json", metavar="FILE", help="also write the cost breakdowns to FILE (JSON)")
    args = parser.parse_args()
    try:
        check_option_minimums(args, {"repeats": 1, "threads": 1})
        if args.save_sd14:
            check_writable_folder(args.save_sd14)
        if args.json:
            check_writable_folder(os.path.dirname(os.path.abspath(args.json)))
            check_result_file(args.json, "--json", ("threads", "breakdown"))
    except (ValueError, OSError) as err:
        parser.error(error_line(err))
    torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}")
    report = {"threads": torch.get_num_threads(), "load_average": os.getloadavg()[0], "breakdown": {}}

    try:
        micro = load_pipeline("micro")
    except ValueError as err:
        print(f"micro model unavailable ({err}); skipping the micro benchmark")
    else:
        spec, config = erasure_settings(micro, ["van gogh"], "uce")  # the defaults scripts/erase.py uses
        med, best = timed(lambda: erase.erase_concepts(micro, spec, "uce", config), args.repeats)
        print(f"micro: full UCE edit of 1 concept (encoding included): median {med:.3f} s, best {best:.3f} s")
        report["breakdown"]["micro"] = erase_breakdown(micro, "micro", args.repeats)

    if args.sdxl:
        figures = sdxl_uce(args.repeats, args.device, args.dtype)
        print(
            f"SDXL shapes ({figures['device']}, {args.dtype}): UCE edit of 1 concept over {figures['layers']} "
            f"projections (encoding included): median {figures['median_seconds']:.3f} s, best "
            f"{figures['best_seconds']:.3f} s; peak memory {figures['peak_rss_mb']:.0f} MB resident (loaded: "
            f"{figures['loaded_rss_mb']:.0f} MB)"
            + (f", {figures['peak_gpu_mb']:.0f} MB GPU (loaded: {figures['loaded_gpu_mb']:.0f} MB)"
               if figures["peak_gpu_mb"] is not None else "")
        )  # fmt: skip
        report["sdxl"] = figures
    if not args.skip_sd14:
        sd14(args, report)
    if args.json:
        write_json(args.json, report)


def write_json(path: str, report: dict) -> None:
    """``report`` as JSON at ``path``, written atomically."""
    report["load_average_after"] = os.getloadavg()[0]
    temporary = f"{path}.tmp{os.getpid()}"
    with open(temporary, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(temporary, path)


def sd14(args: argparse.Namespace, report: dict) -> None:
    """The SD 1.4-shaped benchmarks: the cost breakdown of a whole call, then the solver at 1 and 100 concepts."""
    wrapper = sd14_wrapper()
    if args.save_sd14:
        wrapper.export_pipeline(args.save_sd14)
        print(f"SD 1.4-shaped random pipeline saved to {args.save_sd14}")
    layers = wrapper.cross_attention_layers()
    params = sum(p.numel() for p in wrapper.unet.parameters()) / 1e6
    print(f"SD 1.4 shapes: {len(layers)} cross-attention projections, {params:.0f}M UNet params")
    report["breakdown"]["sd14"] = erase_breakdown(wrapper, "SD 1.4 shapes", args.repeats)
    gen = torch.Generator().manual_seed(0)
    # one embedding a concept ("last_token", the default) and 75 ("from_last": last token, EOS and padding)
    for mode, positions in (("last_token", 1), ("from_last", 75)):
        preserve = torch.randn(20 * positions, 768, generator=gen, dtype=torch.float64)
        for n in (1, 100):
            c_erase = torch.randn(n * positions, 768, generator=gen, dtype=torch.float64)
            c_guide = torch.randn(n * positions, 768, generator=gen, dtype=torch.float64)

            def edit(c_erase: torch.Tensor = c_erase, c_guide: torch.Tensor = c_guide, p=preserve) -> None:
                u, v = uce_update(c_erase, c_guide, p, 1.0, 1.0, 0.5)
                edit_from_update(wrapper, erase.closed_form.uce.UCEConfig().layers, u, v)

            med, best = timed(edit, args.repeats)
            print(
                f"SD 1.4 shapes: closed-form UCE ({mode}), {n:3d} concept(s) ({n * positions} embeddings, "
                f"20 preserved): median {med:.3f} s, best {best:.3f} s"
            )
    report["speed_sd14"] = speed_solve(wrapper, args.repeats)


def speed_solve(wrapper, repeats: int) -> dict[str, float]:
    """SPEED's closed form on every value projection (its default layers) at 1 and 100 concepts, 100 retained
    concepts and the reference's refinement (random embeddings), median seconds."""
    config = SPEEDConfig()
    layers = wrapper.cross_attention_layers(VALUE_PATTERNS)
    weights = [layer.module.weight.detach().double() for layer in layers]
    gen = torch.Generator().manual_seed(1)
    retain = torch.randn(100, 768, generator=gen, dtype=torch.float64)
    invariant = torch.randn(1 + config.null_clusters, 768, generator=gen, dtype=torch.float64)
    figures = {}
    for n in (1, 100):
        c_target = torch.randn(n, 768, generator=gen, dtype=torch.float64)
        c_anchor = torch.randn(n, 768, generator=gen, dtype=torch.float64)

        def edit(c_target: torch.Tensor = c_target, c_anchor: torch.Tensor = c_anchor) -> None:
            draws, terms = torch.Generator().manual_seed(0), speed_terms(c_target, c_anchor)
            for weight in weights:
                lora_b, lora_a = speed_update(weight, terms, retain, invariant, config, draws)
                (lora_b @ lora_a).float()

        med, best = timed(edit, repeats)
        figures[f"concepts_{n}"] = med
        print(
            f"SD 1.4 shapes: closed-form SPEED (reference defaults, {len(layers)} value projections), {n:3d} "
            f"concept(s), 100 retained: median {med:.3f} s, best {best:.3f} s"
        )
    return figures


if __name__ == "__main__":
    sys.exit(run_script(main))
