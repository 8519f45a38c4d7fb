"""Train the ground-truth judge CNN on renders of the micro world and save it (default: the shipped
evals/microworld/judge/).

With --work, the render pool is cached and a checkpoint written every --checkpoint-every steps there; rerunning the
same command resumes. --world-version 2 adds the emblem head (docs/design/world-100.md, stage 1), and --vae trains on
a share of VAE reconstructions as well::

    python scripts/train_judge.py --world-version 2 --vae --work .train/judge-v2 --out .train/judge-v2/out
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch

# scripts/erase.py would shadow the erase package: drop this folder from the import path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]

from erase.core.layout import check_writable_folder  # noqa: E402
from evals.microworld import world  # noqa: E402
from evals.microworld.judge import JudgeConfig, check_judge_work, judge_path, train_judge  # noqa: E402
from pipelines import micro_model_path, resolve_device  # noqa: E402
from pipelines.checks import check_option_minimums, error_line, run_script  # noqa: E402


def main() -> None:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument(
        "--recipe",
        choices=("shipped", "cpu"),
        default="shipped",
        help="defaults to start from: the shipped judge's, or the smaller one that trains in ~10 min on 2 CPU cores",
    )
    recipe, _ = pre.parse_known_args()
    defaults = JudgeConfig.cpu_recipe() if recipe.recipe == "cpu" else JudgeConfig()
    parser = argparse.ArgumentParser(description=__doc__, parents=[pre])
    parser.add_argument("--out", default=str(judge_path()), help="output folder")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--pool-size", type=int, default=defaults.pool_size, help="pre-rendered training images")
    parser.add_argument("--eval-size", type=int, default=defaults.eval_size, help="held-out renders to score")
    parser.add_argument("--widths", type=int, nargs="+", default=list(defaults.widths))
    parser.add_argument("--workers", type=int, default=defaults.render_workers, help="render processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--world-version", type=int, choices=world.VERSIONS, default=defaults.world_version, help="2: the emblem head"
    )
    parser.add_argument("--work", default=None, help="pool cache and checkpoints; rerun the same command to resume")
    parser.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every, help="steps (with --work)")
    parser.add_argument(
        "--vae",
        nargs="?",
        const=str(micro_model_path() / "vae"),
        default=None,
        metavar="FOLDER",
        help="train on VAE reconstructions too (a diffusers VAE folder; no value: the shipped micro VAE)",
    )
    parser.add_argument(
        "--vae-fraction", type=float, default=None, help="share of each batch reconstructed (default 0.5 with --vae)"
    )
    parser.add_argument(
        "--vae-pool-size", type=int, default=defaults.vae_pool_size, help="pool images reconstructed (once, cached)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    try:  # everything that can fail, before the renders and the training
        check_option_minimums(args, {"seed": 0, "threads": 1})
        if args.vae_fraction is not None and args.vae is None:
            raise ValueError("--vae-fraction needs --vae")
        vae_fraction = 0.0 if args.vae is None else 0.5 if args.vae_fraction is None else args.vae_fraction
        config = JudgeConfig(
            widths=tuple(args.widths),
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            pool_size=args.pool_size,
            eval_size=args.eval_size,
            render_workers=args.workers,
            world_version=args.world_version,
            vae_fraction=vae_fraction,
            vae_pool_size=args.vae_pool_size,
            checkpoint_every=args.checkpoint_every,
        )
        device = resolve_device(args.device)
        check_writable_folder(args.out)
        if args.work is not None:
            check_writable_folder(args.work)
            if os.path.abspath(args.out) == os.path.abspath(os.path.join(args.work, "judge")):
                raise ValueError(f"--out {args.out} is --work's checkpoint folder: give another --out")
            check_judge_work(args.work, config, args.seed)
        reconstruct = None
        if args.vae is not None:
            from evals.microworld.training import folder_vae_reconstructor

            cache = None if args.work is None else os.path.join(args.work, "pool")
            reconstruct = folder_vae_reconstructor(args.vae, cache, device)
    except (ValueError, TypeError, OSError) as err:
        parser.error(error_line(err))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    judge = train_judge(
        config,
        device=device,
        seed=args.seed,
        progress=not args.no_progress,
        work_dir=args.work,
        reconstruct=reconstruct,
    )
    judge.metrics["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    judge.metrics["seed"] = args.seed
    judge.save_pretrained(args.out)
    print(json.dumps(judge.metrics, indent=2))
    print(f"saved to {args.out}")


if __name__ == "__main__":
    sys.exit(run_script(main))
