#!/usr/bin/env python
"""Train the sparse autoencoders the SAE family (itd, saeuron) reads a model with: one per (model, hook point).

python scripts/train_sae.py --hook text_encoder.encoder.layers.2 --out saes              # micro, world captions
python scripts/train_sae.py --hook unet.up_blocks.0.attentions.1 --set epochs=5 --out saes
python scripts/train_sae.py --model ./my-sd-folder --hook text_encoder.encoder.layers.8 --prompts prompts.txt \\
    --device cuda --out saes
python scripts/train_sae.py --model tiny --list-hooks

Each SAE goes to OUT/<model>-<hook point>/ (sae.safetensors, sae.json, prompts.txt); pass OUT to a method with
``--set sae_stores='["OUT"]'`` (or the folder itself with ``--set sae=OUT/...``). Activations and training checkpoints
are kept under OUT/<...>/.work: rerunning the same command resumes. The report gives the SAE's fraction of variance
unexplained and dead-feature share on held-out tokens, and with --check-images the accuracy of images generated
through its plain reconstruction beside the original model's. An SAE below the quality floor (fraction of variance
unexplained >= 1, or fewer training tokens than features) is refused and not written, unless --force.

Prompts: 'world' (the micro world's captions, --prompt-count of them) or a text file, one prompt a line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
from pathlib import Path

# scripts/erase.py would shadow the erase package: drop this folder from the import path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]

from pipelines.checks import run_script  # noqa: E402

EXIT_BAD_INPUT = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default="micro", help="'micro' (default), 'tiny', a local diffusers folder or hub id"
    )
    parser.add_argument("--hook", action="append", default=[], help="hook point to train an SAE on (repeatable)")
    parser.add_argument("--list-hooks", action="store_true", help="list the model's hook points and exit")
    parser.add_argument("--prompts", default="world", help="'world' (default) or a text file, one prompt a line")
    parser.add_argument("--prompt-count", type=int, default=4096, help="world captions to use (default: 4096)")
    parser.add_argument("--out", default="saes", help="folder of SAE folders (default: saes)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="SAE training setting")
    parser.add_argument("--steps", type=int, help="sampling steps of a UNet hook's images (default: 20)")
    parser.add_argument("--guidance", type=float, help="their guidance scale (default: 7.5)")
    parser.add_argument("--check-images", type=int, default=0, help="images of the reconstruction check (0: skip)")
    parser.add_argument("--scorer", help="CLIP scorer of the check (default: as scripts/erase.py)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--restart", action="store_true", help="start the training afresh (delete its checkpoint)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="save an SAE below the quality floor (FVU >= 1, fewer tokens than features)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--verbose", action="store_true", help="log details")
    args = parser.parse_args(argv)
    if not args.hook and not args.list_hooks:
        parser.error("the following arguments are required: --hook")
    return args


def read_prompts(source: str, count: int, seed: int) -> list[str]:
    """The training prompts: the world's captions, or a file's non-empty lines (a bad file is a ValueError)."""
    if source == "world":
        import numpy as np

        from evals.microworld import world

        rng = np.random.default_rng(seed)
        return [world.caption(world.random_scene(rng), rng) for _ in range(count)]
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"--prompts {source}: no such file")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"--prompts {source}: cannot read it ({err})") from None
    prompts = [line for line in lines if line]
    if len(prompts) < 2:
        raise ValueError(f"--prompts {source}: needs at least 2 non-empty lines, found {len(prompts)}")
    return prompts


def sae_folder(out: str, model_id: str, hook: str) -> Path:
    """``OUT/<model>-<hook point>``, distinct for distinct models: a model id that is not a plain name (a hub id, a
    folder's path) is shown by its last part, marked ``@`` and 16 hex digits of the sha256 of the whole id (which a
    plain name cannot hold), so two folders called ``sd`` get two SAE folders."""
    plain = re.fullmatch(r"[A-Za-z0-9_.=-]+", model_id) is not None
    name = model_id if plain else re.sub(r"[^A-Za-z0-9_.=-]+", "-", Path(model_id).name).strip("-")
    if not plain:
        name = f"{name[:60]}@{hashlib.sha256(model_id.encode()).hexdigest()[:16]}"
    return Path(out) / f"{name}-{hook}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if args.model in ("micro", "tiny", "tiny-sdxl") or os.path.isdir(args.model):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from erase.core.inputs import check_option_minimums, config_from_overrides, parse_config_overrides

        check_option_minimums(args, {"prompt_count": 2, "check_images": 0, "steps": 1, "guidance": 0})
        from erase.core.layout import check_writable_folder
        from erase.sae.sae import SAETrainConfig, build_sae
        from pipelines import DEFAULT_GUIDANCE, DEFAULT_STEPS, load_pipeline, resolve_device, set_library_verbosity
        from pipelines.files import claim_folder

        config = config_from_overrides(SAETrainConfig, parse_config_overrides(args.set), "the SAE training")
        prompts = None if args.list_hooks else read_prompts(args.prompts, args.prompt_count, config.seed)
        if not args.list_hooks:
            check_writable_folder(args.out)
        set_library_verbosity(args.verbose)
        wrapper = load_pipeline(args.model, device=resolve_device(args.device))
        if args.list_hooks:
            for hook in wrapper.hook_points():
                print(f"{hook}  (width {wrapper.hook_width(hook)})")
            return 0
        for hook in args.hook:
            wrapper.hook_point(hook)
            check_writable_folder(sae_folder(args.out, wrapper.model_id, hook), entries=(".work",))
        scorer = None
        if args.check_images:
            from erase.workflow import load_check_scorer

            scorer = load_check_scorer(wrapper, args.scorer)[1]
        steps = args.steps or DEFAULT_STEPS
        guidance = DEFAULT_GUIDANCE if args.guidance is None else args.guidance
        reports = []
        for hook in args.hook:
            folder = sae_folder(args.out, wrapper.model_id, hook)
            with claim_folder(folder):
                sae, meta = build_sae(wrapper, hook, prompts, folder, config, steps=steps, guidance=guidance,
                                      restart=args.restart, progress=not (args.quiet or args.json),
                                      force=args.force)  # fmt: skip
            report = {"hook_point": hook, "folder": str(folder), **meta["quality"], "latents": sae.latents, "k": sae.k}
            if scorer is not None:
                from erase.workflow import reconstruction_check

                report["check"] = reconstruction_check(wrapper, hook, sae, scorer, args.check_images, steps=steps)
            reports.append(report)
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError) as err:
        from erase.core.inputs import error_line

        print(f"error: {error_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.json:
        print(json.dumps(reports, indent=2))
        return 0
    for r in reports:
        print(f"{r['hook_point']}: {r['latents']} features, k={r['k']} -> {r['folder']}")
        print(f"  fraction of variance unexplained {r['fvu']:.4f}, dead features {r['dead_share']:.1%} "
              f"({r['held_out_tokens']} held-out tokens)")  # fmt: skip
        if r.get("below_floor"):
            print("  warning: below the quality floor, saved (--force) for inspection only: no method uses it")
            print(f"    {'; '.join(r['below_floor'])}")
        if "check" in r:
            c = r["check"]
            before, after = c["accuracy_original"], c["accuracy_reconstructed"]
            print(f"  accuracy original {before:.1%} -> through the SAE {after:.1%} ({c['images']} images)")
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
