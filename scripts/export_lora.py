#!/usr/bin/env python
"""Write an erasure artifact's weight change as a LoRA file for Automatic1111, ComfyUI and kohya-ss.

python scripts/export_lora.py erased/van-gogh-uce                      # -> erased/van-gogh-uce/lora_kohya.safetensors
python scripts/export_lora.py erased/van-gogh-esd --out ~/webui/models/Lora/no-van-gogh.safetensors

The key layout is kohya-ss's (erase/core/kohya.py): SD 1.x/2.x keys name diffusers' modules, SDXL keys the original
UNet's blocks. The base model (the artifact's own, or --model) is loaded to check the artifact was made for it and
to name the SDXL UNet's modules. ``scripts/erase.py --format kohya`` writes the same file while erasing.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

# scripts/erase.py would shadow the erase package: drop this folder from the import path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]

from pipelines.checks import run_script  # noqa: E402

EXIT_BAD_INPUT = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", help="erasure artifact folder")
    parser.add_argument("--format", default="kohya", choices=["kohya"], help="key layout (default: kohya)")
    parser.add_argument("--out", help="file to write (default: ARTIFACT/lora_kohya.safetensors)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.add_argument("--model", help="base model (default: the artifact's own base model)")
    parser.add_argument("--verbose", action="store_true", help="log details")
    return parser.parse_args(argv)


def _is_exported_lora(path: Path) -> bool:
    """A safetensors file whose header says erase wrote it (``erase.core.kohya``'s ``erase_method`` metadata)."""
    from pipelines.files import read_safetensors_metadata

    try:
        return "erase_method" in read_safetensors_metadata(path)
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    from erase import ArtifactError, check_artifact_base, load_artifact, save_kohya_lora
    from erase.core.inputs import error_line
    from erase.core.layout import KOHYA_FILE, check_replaceable_file
    from pipelines import ModelNotFoundError, check_model_reference, load_pipeline, set_library_verbosity
    from pipelines.loading import TINY_NAMES

    set_library_verbosity(args.verbose)
    try:
        out = args.out or os.path.join(args.artifact, KOHYA_FILE)
        if os.path.isdir(out) or not out.endswith(".safetensors"):
            raise ValueError(f"--out {out}: give a .safetensors file name")
        # a link to nothing is refused (writing would create its target); a file is replaced only with --overwrite,
        # and only when it is a LoRA erase exported
        check_replaceable_file(out, "--out", _is_exported_lora, "a LoRA exported by erase")
        if os.path.exists(out) and not args.overwrite:
            raise ValueError(f"{out} exists; pass --overwrite to replace it")
        artifact = load_artifact(args.artifact)
        if not artifact.deltas:
            raise ValueError(f"{args.artifact}: the {artifact.method} erasure changes no weights (a runtime "
                             "intervention): it has no LoRA form")  # fmt: skip
        model = args.model or artifact.base_model
        check_model_reference(model)
        if model in ("micro", *TINY_NAMES) or os.path.isdir(model):
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        wrapper = load_pipeline(model)
        check_artifact_base(wrapper, artifact, where=args.artifact)
        path = save_kohya_lora(artifact, wrapper, out)
    except (ValueError, TypeError, OSError, ModelNotFoundError, ArtifactError) as err:
        print(f"error: {error_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"{artifact.method} erasure of {', '.join(map(repr, artifact.concepts))}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
