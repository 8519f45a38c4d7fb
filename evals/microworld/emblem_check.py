"""Can an image path carry an emblem? Risk 1 of docs/design/world-100.md: renders with a badge go through a
reconstruction (the micro VAE's encode/decode) and the badge is read back from where it was drawn.

numpy only: the reconstruction is a callable (uint8 images in, uint8 images out), so that the check runs on the VAE
(``training.vae_roundtrip``) as on anything else.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from evals.microworld import emblems, world

__all__ = ["badge_renders", "emblem_readback"]


def badge_renders(
    seeds: Sequence[int], cell_px: int = world.EMBLEM_CELL_PX
) -> tuple[np.ndarray, list[world.Scene], list[world.EmblemMark]]:
    """One render per seed, each with an emblem: the seed's version-1 scene with the emblems in turn (every emblem
    as often as the seeds allow), its badge at ``cell_px`` pixels a cell. Images (N, 64, 64, 3) uint8."""
    names = world.emblem_names()
    images = np.empty((len(seeds), world.IMAGE_SIZE, world.IMAGE_SIZE, 3), dtype=np.uint8)
    scenes, marks = [], []
    for i, seed in enumerate(seeds):
        base = world.scene_of_seed(seed)
        scene = world.Scene(base.object, base.colour, base.style, emblem=names[i % len(names)])
        mark = world.emblem_mark(scene, seed, cell_px=cell_px)
        images[i] = world.draw_emblem(world.render_scene(base, seed), mark)
        scenes.append(scene)
        marks.append(mark)
    return images, scenes, marks


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def emblem_readback(
    images: np.ndarray, marks: Sequence[world.EmblemMark], reconstruct: Callable[[np.ndarray], np.ndarray]
) -> dict[str, float]:
    """Read every badge back from ``reconstruct(images)`` at its known place, with its known inks.

    ``emblem_accuracy``: the nearest emblem code (over all emblems) to the cells read is the true one;
    ``code_accuracy``: every cell read right; ``cell_accuracy``: cells read right; ``psnr_badge`` and ``psnr_image``
    (dB) of the reconstruction over the badges and over whole images.
    """
    recon = reconstruct(images)
    if recon.shape != images.shape or recon.dtype != np.uint8:
        raise ValueError(
            f"reconstruct must return uint8 images of shape {images.shape}, got {recon.dtype} {recon.shape}"
        )
    codes = [e.code for e in world.emblems()]
    hits = exact = cells = 0
    badge_in, badge_out = [], []
    for img, rec, mark in zip(images, recon, marks, strict=True):
        read, _ = mark.read(rec)
        hits += codes[emblems.nearest_code(read, codes)] == mark.code
        exact += read == mark.code
        cells += emblems.GRID**2 - emblems.hamming(read, mark.code)
        box = (slice(mark.y, mark.y + mark.size), slice(mark.x, mark.x + mark.size))
        badge_in.append(img[box])
        badge_out.append(rec[box])
    n = len(marks)
    return {
        "images": n,
        "emblem_accuracy": hits / n,
        "code_accuracy": exact / n,
        "cell_accuracy": cells / (n * emblems.GRID**2),
        "psnr_badge": _psnr(np.stack(badge_in), np.stack(badge_out)),
        "psnr_image": _psnr(images, recon),
    }
