"""The numbers an erasure audit reports, each a small pure function over correctness flags or CLIP embeddings.

Accuracies are fractions of images whose zero-shot verdict is the concept the prompt names (see
:func:`zero_shot_correct`); an audit reports them per prompt role, under these names:

* **efficacy**: accuracy on ``target`` prompts (the erased concept named as erased). Lower is better after erasure.
* **generality**: accuracy on ``synonym`` prompts (the erased concept under other names). Lower is better.
* **specificity**: accuracy on ``neighbour`` prompts (concepts close to the target). Higher is better.
* **preservation**: accuracy on ``unrelated`` prompts. Higher is better.

Every accuracy comes with its count ``n`` and a Wilson 95% score interval (:func:`accuracy`). Embeddings are the
scorer's L2-normalised CLIP embeddings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "CMMD_SCALE",
    "CMMD_SIGMA",
    "ROLE_METRICS",
    "Z95",
    "accuracy",
    "clip_scores",
    "cmmd",
    "harmonic_mean",
    "mean_std",
    "paired_similarity",
    "wilson_interval",
    "zero_shot_correct",
]

#: Prompt role -> the name its accuracy is reported under.
ROLE_METRICS: dict[str, str] = {
    "target": "efficacy",
    "synonym": "generality",
    "neighbour": "specificity",
    "unrelated": "preservation",
}

#: Two-sided 95% standard normal quantile.
Z95 = 1.959963984540054
#: CMMD's RBF bandwidth and output scale, as in Jayasumana et al. 2024 (arXiv:2401.09603) and their reference code.
CMMD_SIGMA = 10.0
CMMD_SCALE = 1000.0


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float] | tuple[None, None]:
    """Wilson score interval for a binomial proportion with ``k`` successes in ``n`` trials.

    ``(c - h, c + h)`` with ``c = (p + z^2 / 2n) / (1 + z^2 / n)`` and
    ``h = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2)``, ``p = k / n``; ``(None, None)`` when ``n == 0``.
    Unlike the normal (Wald) interval it stays inside [0, 1] and is not degenerate at ``p = 0`` or ``1``.
    """
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return None, None
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy(correct: Sequence[bool]) -> dict:
    """``{"value": k / n, "low", "high": Wilson 95% bounds, "n": n, "k": k}``; value and bounds None when n = 0."""
    flags = [bool(c) for c in correct]
    n, k = len(flags), sum(flags)
    low, high = wilson_interval(k, n)
    return {"value": k / n if n else None, "low": low, "high": high, "n": n, "k": k}


def mean_std(values: Sequence[float] | torch.Tensor | np.ndarray) -> dict:
    """``{"mean", "std" (population, ddof 0), "n"}`` of the values; mean and std None when there are none."""
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(array.mean()), "std": float(array.std()), "n": int(array.size)}


def zero_shot_correct(
    image_embeddings: torch.Tensor,
    class_embeddings: torch.Tensor,
    labels: Sequence[str],
    expected: Sequence[str],
) -> tuple[list[bool], list[str]]:
    """Zero-shot verdicts: image ``i`` is predicted ``labels[argmax_c cos(image_i, class_c)]``.

    This is the argmax of :meth:`evals.scorer.ClipScorer.zero_shot`'s softmax (the temperature does not move it;
    ties go to the first label). Returns whether each prediction equals ``expected[i]``, and the predictions.
    """
    if image_embeddings.shape[0] != len(expected):
        raise ValueError(f"{image_embeddings.shape[0]} images for {len(expected)} expected labels")
    if len(image_embeddings) == 0:
        return [], []
    indices = (image_embeddings.double() @ class_embeddings.double().T).argmax(dim=-1).tolist()
    predictions = [labels[i] for i in indices]
    return [p == e for p, e in zip(predictions, expected, strict=True)], predictions


def clip_scores(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """CLIPScore of each (image, prompt) pair: ``100 * max(cos(image_i, text_i), 0)``, shape ``(N,)``.

    The same number as :meth:`evals.scorer.ClipScorer.clip_score` (Hessel et al. 2021 with weight 100).
    """
    if image_embeddings.shape != text_embeddings.shape:
        raise ValueError(
            f"image and text embeddings differ in shape: {image_embeddings.shape} vs {text_embeddings.shape}"
        )
    return 100.0 * (image_embeddings.double() * text_embeddings.double()).sum(dim=-1).clamp(min=0.0)


def paired_similarity(embeddings_a: torch.Tensor, embeddings_b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each pair ``(a_i, b_i)`` of normalised image embeddings, shape ``(N,)``.

    In an audit ``a_i`` and ``b_i`` are the original and the erased model's images for the same prompt and seed:
    1 means the edit left that image unchanged (as CLIP sees it).
    """
    if embeddings_a.shape != embeddings_b.shape:
        raise ValueError(f"pairs need equal shapes, got {embeddings_a.shape} and {embeddings_b.shape}")
    return (embeddings_a.double() * embeddings_b.double()).sum(dim=-1)


def cmmd(
    embeddings_x: torch.Tensor, embeddings_y: torch.Tensor, sigma: float = CMMD_SIGMA, scale: float = CMMD_SCALE
) -> float | None:
    """CMMD (Jayasumana et al. 2024): ``scale * MMD^2`` between two image sets' CLIP embeddings, unbiased.

    With the Gaussian RBF kernel ``k(a, b) = exp(-||a - b||^2 / (2 sigma^2))`` and sets ``X`` (m images) and
    ``Y`` (n images)::

        MMD^2_u = sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (n (n - 1))
                  - 2 sum_{i, j} k(x_i, y_j) / (m n)

    i.e. the unbiased U-statistic (diagonal terms dropped), so it is 0 in expectation for equal distributions and
    can be slightly negative. ``sigma = 10`` and ``scale = 1000`` follow the paper. The paper's reference code
    averages ``k(x_i, x_j)`` over all pairs, i == j included (the biased V-statistic, which adds
    ``(1 - mean off-diagonal k) / m``-sized terms); with the small image sets of an audit that bias would dominate, so
    the diagonal is dropped here. Computed in float64; None when either set has fewer than two images.
    """
    x, y = embeddings_x.double(), embeddings_y.double()
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        return None
    gamma = 1.0 / (2.0 * sigma * sigma)

    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d2 = (a * a).sum(-1)[:, None] + (b * b).sum(-1)[None, :] - 2.0 * a @ b.T
        return torch.exp(-gamma * d2.clamp(min=0.0))

    k_xx, k_yy, k_xy = kernel(x, x), kernel(y, y), kernel(x, y)
    term_xx = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    term_yy = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return float(scale * (term_xx + term_yy - 2.0 * k_xy.mean()))


def harmonic_mean(efficacy: float | None, preservation: float | None) -> float | None:
    """``2 a b / (a + b)`` of ``a = 1 - efficacy`` (how much of the target is gone) and ``b = preservation``.

    One number that is high only when the target is erased *and* unrelated concepts survive; 0 when both parts are
    0, None when either accuracy is missing.
    """
    if efficacy is None or preservation is None:
        return None
    a, b = 1.0 - efficacy, preservation
    return 0.0 if a + b == 0 else 2.0 * a * b / (a + b)
