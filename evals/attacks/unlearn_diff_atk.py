"""UnlearnDiffAtk (Zhang et al., 2024, "To Generate or Not? Safety-Driven Unlearned Diffusion Models Are Still Easy
To Generate Unsafe Images ... For Now"): an adversarial text prefix found with the diffusion model's own loss.

k adversarial tokens are put in front of the probe prompt, and their input embeddings z are optimised so that the
*erased* model's noise prediction under the attacked prompt matches the *original* model's under the plain one:

    z* = argmin_z  E_{(x_t, t)} || eps'(x_t, t, E'([z ; prompt])) - eps(x_t, t, E(prompt)) ||^2

eps / E the original UNet and text encoder, eps' / E' the erased ones. Every step the continuous z is projected to
the nearest vocabulary tokens (cosine similarity) and the loss is taken at the projected tokens, its gradient
applied to z (straight through, as PEZ, Wen et al. 2023, does): the attack writes a real text prompt, whose tokens
are decoded and prepended to each probe prompt, and the images are drawn by the erased model from that *text*.

Reference defaults (OPTML-Group/Diffusion-MU-Attack, ``text_grad`` attacker and its configs): k = 5 prefix tokens (3
in its Van Gogh config), Adam with lr 0.01 and weight decay 0.1, 40 iterations at each of 50 timesteps taken in
turn, one prompt at a time, x_t the original model's image noised to t, the target the noise that was added.

Where we differ (a CPU budget of a minute or two on the micro model):

* One *universal* prefix for all probes, optimised over a few of them (``optimisation_probes``) for ``iterations``
  steps in all, each on a random batch of (x_t, t) pairs, instead of one prefix per prompt and 2,000 steps.
* x_t are the UNet inputs of the original model's own sampling runs of those probe prompts (fresh seeds, the
  attack's sampler settings; :meth:`pipelines.PipelineWrapper.sample_trajectories`) and the target is the original
  model's conditional noise prediction there: no VAE encoding, and the pairs are the states the sampler visits.
* The reference optimises a distribution over the vocabulary (one simplex per token, sampled straight through); we
  optimise continuous embeddings with nearest-token projection (PEZ), with AdamW at lr 0.02 (of 0.005, 0.02 and
  0.05 tried on micro).
* The reference stops a prompt's search when its classifier sees the concept; ours never sees a classifier and
  keeps, of the start and ``checks`` checkpoints, the prefix whose text has the lowest loss on fixed pairs.
* ``vocabulary="words"`` (the default) projects only to whole-word alphabetic tokens that tokenise back to
  themselves, so the decoded prompt re-tokenises to the optimised ids; ``"all"`` is the reference's whole
  vocabulary (BOS and EOS excepted), whose decoded text may tokenise differently.

On SD3 and Flux, which read the prompt with CLIP and T5, the prefix tokens are those every text encoder reads as one
(``PipelineWrapper.slot_token_ids``), a token's vector its input embeddings in every encoder side by side, so the
written prefix is the optimised one in each; the matched prediction is the velocity.

On micro, against UCE's erasure of "van gogh" (16 probes, defaults, seed 0; 44 s on one CPU thread): 0/16 by CLIP
and by the judge, as unattacked. The search does lower the loss (0.00207 at the random start, 0.00163 found, 0.00217
unattacked), with prefixes such as "thwaite shape love cts missing"; no prefix of whole words it finds (nor "vincent",
"starry night" or "gogh" written by hand) brings the style back through UCE's edit on micro. Lr 0.005 and the whole
vocabulary did no better.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pipelines import PipelineWrapper, PromptEncoding
from pipelines.checks import check_number_fields

from .base import AttackResult, AttackTarget, register_attack, word_vocabulary

__all__ = [
    "NoiseTargets",
    "PrefixSearch",
    "UnlearnDiffAtkConfig",
    "matching_step",
    "noise_matching_loss",
    "optimise_prefix",
    "original_noise_targets",
    "prompt_loss",
    "unlearn_diff_atk",
]

logger = logging.getLogger(__name__)

VOCABULARIES = ("words", "all")


@dataclass
class UnlearnDiffAtkConfig:
    """Settings (the budget) of UnlearnDiffAtk.

    Attributes:
        tokens: adversarial prefix tokens k (reference: 5).
        iterations: optimisation steps in all (reference: 40 per timestep, 50 timesteps, per prompt).
        lr: AdamW learning rate on the continuous token embeddings.
        weight_decay: AdamW weight decay (reference: 0.1).
        batch: (x_t, t) pairs per step.
        optimisation_probes: probes the universal prefix is optimised over (their prompts, fresh seeds).
        eval_pairs: fixed (x_t, t) pairs on which prefixes are scored (initial, checkpoints, final, unattacked).
        checks: checkpoints at which the projected prefix is scored; the best scored prefix is the attack's.
        vocabulary: ``"words"`` (whole-word alphabetic tokens) or ``"all"`` (every non-special token).
    """

    NUMBER_RANGES: ClassVar[dict[str, str]] = {
        "tokens": ">= 1", "iterations": ">= 1", "lr": "> 0", "weight_decay": ">= 0", "batch": ">= 1",
        "optimisation_probes": ">= 1", "eval_pairs": ">= 1", "checks": ">= 1",
    }  # fmt: skip
    BUDGET_FIELDS: ClassVar[tuple[str, ...]] = ("iterations", "checks")

    tokens: int = 5
    iterations: int = 200
    lr: float = 0.02
    weight_decay: float = 0.1
    batch: int = 8
    optimisation_probes: int = 4
    eval_pairs: int = 32
    checks: int = 8
    vocabulary: str = "words"

    def __post_init__(self) -> None:
        check_number_fields(self)
        if self.vocabulary not in VOCABULARIES:
            raise ValueError(f"vocabulary must be one of {VOCABULARIES}, got {self.vocabulary!r}")


@dataclass
class NoiseTargets:
    """(x_t, t, eps(x_t, t, E(prompt))) pairs of the original model, one per UNet call of its sampling runs."""

    latents: torch.Tensor  # (N, C, h, w) UNet inputs
    timesteps: torch.Tensor  # (N,)
    targets: torch.Tensor  # (N, C, h, w) the original model's conditional noise predictions
    rows: torch.Tensor  # (N,) index of the prompt each pair belongs to

    def __len__(self) -> int:
        return int(self.rows.shape[0])


@torch.no_grad()
def original_noise_targets(
    target: AttackTarget, prompts: list[str], generator: torch.Generator, eval_pairs: int
) -> tuple[NoiseTargets, torch.Tensor]:
    """The original model's sampling runs of ``prompts`` (seeds drawn from ``generator``) with the attack's sampler
    settings, every UNet input (x_t, t) of them, and the original model's conditional noise prediction there (call
    outside ``erased_model``); and the indices of ``eval_pairs`` of them, drawn next, on which a loss is compared."""
    wrapper = target.wrapper
    seeds = torch.randint(0, 2**31 - 1, (len(prompts),), generator=generator).tolist()
    latents, timesteps = wrapper.sample_trajectories(prompts, seeds, steps=target.steps, guidance=target.guidance,
                                                     batch_size=target.batch_size)  # fmt: skip
    n, k = latents.shape[:2]
    flat = latents.reshape(n * k, *latents.shape[2:])
    rows = torch.arange(n).repeat_interleave(k)
    times = timesteps.repeat(n)
    encoding = wrapper.encode_prompts(prompts)
    targets = []
    for start in range(0, n * k, target.batch_size):
        index = torch.arange(start, min(start + target.batch_size, n * k))
        x = flat[index].to(wrapper.device, wrapper.dtype)
        eps = wrapper.noise_prediction(x, times[index].to(wrapper.device), encoding.select(rows[index]))
        targets.append(eps.float().cpu())
    eval_index = torch.randperm(n * k, generator=generator)[:eval_pairs]
    return NoiseTargets(flat, times, torch.cat(targets), rows), eval_index


def noise_matching_loss(
    wrapper: PipelineWrapper, pairs: NoiseTargets, index: torch.Tensor, encoding: PromptEncoding
) -> torch.Tensor:
    """Mean squared error between the pipeline's noise prediction on ``pairs[index]`` under ``encoding`` (one row per
    pair) and the pairs' targets."""
    x = pairs.latents[index].to(wrapper.device, wrapper.dtype)
    eps = wrapper.noise_prediction(x, pairs.timesteps[index].to(wrapper.device), encoding)
    return F.mse_loss(eps.float(), pairs.targets[index].to(eps.device))


def matching_step(
    wrapper: PipelineWrapper,
    pairs: NoiseTargets,
    templates: list[str],
    batch: int,
    generator: torch.Generator,
    parameter: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    vectors: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """One optimiser step on ``batch`` pairs drawn with ``generator``: the noise-matching loss of their templates with
    ``vectors(parameter)`` (the parameter itself by default) in the slots, its gradient applied to ``parameter``."""
    index = torch.randint(0, len(pairs), (batch,), generator=generator)
    slots = parameter if vectors is None else vectors(parameter)
    encoding = wrapper.encode_with_vectors([templates[int(r)] for r in pairs.rows[index]], slots)
    loss = noise_matching_loss(wrapper, pairs, index, encoding)
    (grad,) = torch.autograd.grad(loss, [parameter])
    optimizer.zero_grad(set_to_none=True)
    parameter.grad = grad
    optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def prompt_loss(wrapper: PipelineWrapper, pairs: NoiseTargets, index: torch.Tensor, prompts: list[str]) -> float:
    """:func:`noise_matching_loss` of text prompts on ``pairs[index]`` (``prompts[row]`` for each pair's row), as
    the pipeline is now, batched."""
    total = 0.0
    for start in range(0, len(index), 16):
        chunk = index[start : start + 16]
        encoding = wrapper.encode_prompts([prompts[int(r)] for r in pairs.rows[chunk]])
        total += float(noise_matching_loss(wrapper, pairs, chunk, encoding)) * len(chunk)
    return total / len(index)


def _all_vocabulary(wrapper: PipelineWrapper) -> torch.Tensor:
    """Every token id a slot can hold (``PipelineWrapper.slot_token_ids``) but the special ones (BOS, EOS, which
    decode to nothing)."""
    return torch.tensor([i for i in wrapper.slot_token_ids().tolist() if wrapper.decode_tokens([i])])


class _Projection:
    """Nearest allowed vocabulary token by cosine similarity, and the allowed tokens' slot rows."""

    def __init__(self, wrapper: PipelineWrapper, allowed: torch.Tensor) -> None:
        self.allowed = allowed
        self.rows = wrapper.token_rows(allowed).float()
        self.unit = F.normalize(self.rows, dim=-1)
        self.index = {int(token): row for row, token in enumerate(allowed)}

    def ids(self, vectors: torch.Tensor) -> torch.Tensor:
        similarity = F.normalize(vectors.detach().float(), dim=-1) @ self.unit.T.to(vectors.device)
        return self.allowed[similarity.argmax(dim=-1).cpu()]

    def embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows[[self.index[int(i)] for i in ids]]


@dataclass
class PrefixSearch:
    """What :func:`optimise_prefix` found: the prefix's token ids and the losses on the evaluation pairs."""

    start_ids: torch.Tensor
    ids: torch.Tensor  # the best prefix among the checkpoints (the start included)
    last_ids: torch.Tensor  # the prefix at the last step
    loss_initial: float
    loss_final: float  # of ``ids``
    loss_last: float  # of ``last_ids``
    curve: list[float]  # the minibatch loss at each step
    vocabulary_size: int


def optimise_prefix(
    wrapper: PipelineWrapper,
    pairs: NoiseTargets,
    prompts: list[str],
    config: UnlearnDiffAtkConfig,
    generator: torch.Generator,
    eval_index: torch.Tensor,
    progress: bool = False,
) -> PrefixSearch:
    """The projected-gradient search for k prefix tokens on the pipeline as it is now (the erased model).

    ``checks`` times during the run (and at the start) the projected prefix is scored as text on the evaluation
    pairs, and the best of them is kept: the minibatch losses of different timesteps are not comparable.
    """
    k = config.tokens
    allowed = word_vocabulary(wrapper) if config.vocabulary == "words" else _all_vocabulary(wrapper)
    projection = _Projection(wrapper, allowed)
    start_ids = allowed[torch.randint(0, len(allowed), (k,), generator=generator)]
    z = projection.embeddings(start_ids).clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([z], lr=config.lr, weight_decay=config.weight_decay)
    templates = ["{} " + p for p in prompts]

    def text_loss(ids: torch.Tensor) -> float:
        prefix = wrapper.decode_tokens(ids)
        return prompt_loss(wrapper, pairs, eval_index, [f"{prefix} {p}" for p in prompts])

    loss_initial = text_loss(start_ids)
    best_ids, best_loss, scored = start_ids, loss_initial, {tuple(start_ids.tolist()): loss_initial}
    check_at = {round(config.iterations * (c + 1) / config.checks) for c in range(config.checks)}

    def straight(z: torch.Tensor) -> torch.Tensor:  # the loss at the projected tokens, its gradient to z
        return z + (projection.embeddings(projection.ids(z)).to(z.device) - z).detach()

    curve = []
    for step in tqdm(range(1, config.iterations + 1), desc="unlearn_diff_atk", unit="step", disable=not progress):
        curve.append(matching_step(wrapper, pairs, templates, config.batch, generator, z, optimizer, straight))
        if step in check_at:
            ids = projection.ids(z)
            key = tuple(ids.tolist())
            if key not in scored:
                scored[key] = text_loss(ids)
            if scored[key] < best_loss:
                best_ids, best_loss = ids, scored[key]
    last_ids = projection.ids(z)
    return PrefixSearch(start_ids, best_ids, last_ids, loss_initial, best_loss, scored[tuple(last_ids.tolist())],
                        curve, int(len(allowed)))  # fmt: skip


def _check_prefix_room(target: AttackTarget, config: UnlearnDiffAtkConfig) -> None:
    wrapper, k = target.wrapper, config.tokens
    for probe in target.probes:
        if wrapper.token_count(probe.prompt) + k > wrapper.max_prompt_tokens:
            raise ValueError(
                f"probe {probe.prompt[:40]!r} plus {k} prefix tokens is longer than the text encoder reads"
            )


@register_attack("unlearn_diff_atk", UnlearnDiffAtkConfig, "adversarial prefix tokens matching the original's noise",
                 "prompt", check=_check_prefix_room)  # fmt: skip
def unlearn_diff_atk(target: AttackTarget, config: UnlearnDiffAtkConfig, seed: int) -> AttackResult:
    """Optimise one prefix over ``optimisation_probes`` probes (chosen and initialised with ``seed``), then draw every
    probe from ``"<prefix> <probe prompt>"`` with the erased model."""
    wrapper, k = target.wrapper, config.tokens
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(target.probes), generator=generator)[: config.optimisation_probes].sort().values
    prompts = [target.probes[int(i)].prompt for i in chosen]
    clock = time.perf_counter()
    pairs, eval_index = original_noise_targets(target, prompts, generator, config.eval_pairs)
    seconds = {"targets": time.perf_counter() - clock}
    with target.erased_model():
        loss_unattacked = prompt_loss(wrapper, pairs, eval_index, prompts)
        found = optimise_prefix(wrapper, pairs, prompts, config, generator, eval_index, target.progress)
        prefix = wrapper.decode_tokens(found.ids)
        attacked = [f"{prefix} {p.prompt}" for p in target.probes]
        first = wrapper.start_tokens()  # the prefix's first row: after CLIP's BOS, T5's first (Flux)
        kept = wrapper.encode_prompts(attacked).input_ids[:, first : first + k]
        seconds["optimisation"] = time.perf_counter() - clock - seconds["targets"]
        images = target.generate(attacked, [p.seed for p in target.probes])
    same = float((kept == found.ids.unsqueeze(0)).all(dim=1).float().mean())
    logger.info("unlearn_diff_atk: prefix %r, loss %.4g -> %.4g (unattacked %.4g)", prefix, found.loss_initial,
                found.loss_final, loss_unattacked)  # fmt: skip
    seconds["generation"] = time.perf_counter() - clock - seconds["targets"] - seconds["optimisation"]
    info = {
        "seconds": seconds,
        "prefix": prefix,
        "prefix_ids": found.ids.tolist(),
        "initial_prefix": wrapper.decode_tokens(found.start_ids),
        "last_prefix": wrapper.decode_tokens(found.last_ids),
        "optimisation_prompts": prompts,
        "loss_unattacked": loss_unattacked,
        "loss_initial": found.loss_initial,
        "loss_final": found.loss_final,
        "loss_last": found.loss_last,
        "loss_curve": found.curve,
        "vocabulary_size": found.vocabulary_size,
        "retokenized_same": same,
    }
    return AttackResult("unlearn_diff_atk", {}, images, 0.0, prompts=attacked, info=info)
