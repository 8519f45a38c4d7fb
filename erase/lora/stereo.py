"""STEREO (Srivatsan et al., CVPR 2025): search thoroughly enough, then robustly erase once.

Reference: github.com/koushiksrivats/robust-concept-erasing (``train.py``, ``utils/stereo.py``, ``utils/apg.py``),
read at commit 86f124f; ``docs/design/robust-erasure-and-architectures.md`` section 2 paraphrases it.

Stage 1, search thoroughly enough (``search_thoroughly``). For each target concept, K = ``n_iterations`` rounds; round
i (``round-{i}`` below):

1. Erase the current concept with ESD, cumulatively: round 0 erases the concept's text, round i > 0 erases ONLY the
   token found in round i - 1 (a bare prompt: start token, the found vector, end token), each round on top of the
   earlier rounds' erasures (the frozen model of round i is the original plus rounds 0..i-1). The target is the
   code's ``normalized_guidance`` (APG with eta 1, no momentum, no norm threshold, which is exactly)::

       eps_hat = e_p - (g - 1) (e_p - e_0) = e_0 - (g - 2) (e_p - e_0)

   with e_p, e_0 the frozen model's predictions on the prompt and on "": ESD (``erase.lora.esd.esd_target``) with
   eta = g - 2. At the reference's g = ``negative_guidance`` = 2, eta = 0: the target is the unconditional
   prediction itself, not a push past it. ``ste_steps`` = 200 Adam steps at ``ste_lr`` = 5e-6, batch 1.
2. Concept inversion against the erased model (the rounds so far): a new token's input embedding, initialised from
   ``init_word``, learnt with AdamW (``ci_lr`` 5e-3 x batch 1, weight decay 0.01, torch's AdamW default the
   reference keeps, a constant rate) for ``ci_steps`` = 3000 steps so that the erased model with the token predicts
   what the ORIGINAL model predicts on the gallery. The gallery is ``gallery_images`` images of the concept drawn by
   the original model (prompts naming it: the micro world's templates for a world concept, generic ones otherwise;
   ``evals.attacks.base.attack_probes``), split into K disjoint parts, round i using part i, as the reference's
   ``dataset.py`` does. The loss and its step are ``evals.attacks.concept_inversion``'s (the noise-matching loss of
   ``evals.attacks.unlearn_diff_atk``): the pairs are the UNet inputs of the gallery's sampling runs and the target is
   the original model's conditional prediction there, not the reference's added noise on VAE-encoded images at a
   uniform timestep; the templates are the gallery prompts with the concept replaced by the token, not textual
   inversion's fixed template list.

Stage 2, robustly erase once (``robustly_erase_once``), from the ORIGINAL model: one LoRA trained on the erase set
E = [the concepts] + the first ``num_adv_concepts`` found tokens of each (bare prompts), with the code's
``normalized_compositional_guidance`` (eta 1 again, so exactly)::

    eps_hat = e_0 + (g - 1) * mean_a (e_a - e_0) - (g + 1) * mean_{k in E} (e_k - e_0)
    L = || eps_theta(x_t, q, t) - eps_hat ||^2       (q in E the step's erase prompt; every e from the frozen model)

g = ``compositional_guidance`` (2.0); a = one anchor prompt per example, drawn from ``composition_anchors``
(prompts CONTAINING the concept word, as the reference's ``anchor_prompts.json``, e.g. "Starry Night by Vincent van
Gogh"; by default ``composition_anchor_count`` drawn from the world's templates, or generic ones, for each concept).
The weights are asymmetric: anchors g - 1 = 1, erase set g + 1 = 3 at g = 2, because the code gives the erase
predictions the scale -g and then applies (scale - 1) to every condition. The paper (Alg. 1) writes a symmetric
eta * mean(anchor) - eta * mean(erase): we follow the code. ``steps`` = 200 at ``lr`` = 2e-5. The family's anchor
regularization (``anchor_prompts``, ``--preserve``) is added to this stage's loss, as in ``erase.lora.esd``.

The artifact is stage 2's LoRA alone: the found embeddings are search aids. They are recorded in the artifact's
info (``found_tokens``: each vector, its nearest vocabulary words, its inversion losses) with every stage's cost.

Where we differ from the reference, beyond the inversion's loss above: every erasure is a rank-``rank`` LoRA on the
``train`` modules (``xattn``: the cross-attention projections, the default, as for ESD-x on styles; ``noxattn``, the
README's nudity setting, here covers only Linear modules, while the reference's fine-tunes every non-cross-attention
Linear and Conv2d of the UNet), trained with Adam (the reference: AdamW, weight decay 0.01, on the full weights);
x_t come from a pool of trajectories of the frozen model of each stage (``erase.lora.trainer``; the reference runs a
partial DDIM sampling with the model being trained at guidance 3 every iteration); erase prompts and anchors are drawn
uniformly per example rather than the reference's balanced shuffles; the random streams are ours (one seed, a
stream per stage) rather than seed 42 reset in every call.

Other architectures (the reference is SD 1.4 only): a found token is one token's input embeddings in every text
encoder side by side (``PipelineWrapper.encode_with_vectors``; SDXL's two CLIPs, SD3's CLIP-L, CLIP-G and T5, Flux's
CLIP and T5), started from ``init_word``'s rows in each (``PipelineWrapper.token_rows``; on SD3/Flux a word every
tokenizer reads as one token), as the concept inversion attack does there. The erasures are the same LoRAs on the
denoiser (on SD3/Flux the ``train`` sets name the joint attention's projections, ``pipelines.LORA_TARGETS``), their
targets combinations of velocities there, which carry over exactly as ESD's do (``erase.lora.esd``).

Resuming: with a ``checkpoint_dir`` every stage writes its output there (each erasure is a trainer checkpoint folder,
each gallery and inversion a safetensors file, the inversion also every ``checkpoint_every`` steps), and a rerun of
the same call continues where it stopped and ends with the weights an uninterrupted run ends with. A rerun that
changes only stage 2's settings (``STAGE_TWO_FIELDS``) reuses the search and trains stage 2 in a folder of its own.

``preset="micro"`` swaps the reference's settings for ones sized to the micro model on a CPU (``MICRO``: far fewer
steps, rates that move a rank-4 LoRA on it); fields set explicitly to another value than the reference default are
kept. Figures in ``docs/methods.md``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import resource
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from evals.attacks.base import AttackTarget, attack_probes
from evals.attacks.concept_inversion import concept_template, init_token, nearest_words
from evals.attacks.unlearn_diff_atk import (
    NoiseTargets,
    matching_step,
    noise_matching_loss,
    original_noise_targets,
    prompt_loss,
)
from pipelines import ARCHITECTURES, DEFAULT_GUIDANCE, DEFAULT_STEPS, PipelineWrapper, PromptEncoding
from pipelines.files import (
    atomic_save_safetensors,
    damaged_checkpoint,
    read_tensors,
    remove_stale_temporaries,
    write_error,
)

from ..core.registry import ConceptSpec, WeightEdit, register_method
from .esd import esd_target
from .trainer import (
    TRAINED,
    Batch,
    LoraTrainConfig,
    Predictions,
    claim_checkpoint_folder,
    config_key,
    predict_anchored,
    predict_rows,
    train_lora,
)

__all__ = [
    "MICRO",
    "STAGE_TWO_FIELDS",
    "CompositionalLoss",
    "FoundToken",
    "SearchLoss",
    "SearchRound",
    "StereoConfig",
    "compositional_target",
    "erase_stereo",
    "robustly_erase_once",
    "search_target",
    "search_thoroughly",
]

logger = logging.getLogger(__name__)

_RUN_FILE = "run.json"  # the trainer's claim (claim_checkpoint_folder)

#: The micro preset (``preset="micro"``): the micro model on a CPU in minutes rather than the reference's hours.
MICRO: dict[str, Any] = {
    "ste_steps": 100,
    "ste_lr": 1e-3,
    "ci_steps": 200,
    "ci_lr": 2e-2,
    "ci_batch": 4,
    "gallery_images": 32,
    "lr": 3e-3,
    "steps": 400,
    "pool_images": 4,
    "pool_steps": 20,
    "composition_anchor_count": 32,
}

PRESETS = ("reference", "micro")

#: The settings of stage 2 alone: a checkpoint folder's search (stage 1) is reused when only these change.
STAGE_TWO_FIELDS = ("lr", "steps", "num_adv_concepts", "compositional_guidance", "composition_anchors",
                    "composition_anchor_count", "anchor_weight", "anchor_prompts")  # fmt: skip


@dataclass
class StereoConfig(LoraTrainConfig):
    """Settings of a STEREO erasure, with the reference's defaults (``train.py``); the LoRA fields are
    ``LoraTrainConfig``'s, ``lr`` and ``steps`` those of stage 2 (the reference's ``--reo_lr``, ``--iterations``).

    Attributes:
        n_iterations: K, the search rounds per concept (``--n_iterations``).
        ste_steps, ste_lr: each round's erasure (``--iterations``, ``--ste_lr``).
        negative_guidance: g of the rounds' ``normalized_guidance`` target; ESD's eta is g - 2 (0 at the default).
        ci_steps, ci_lr, ci_batch, ci_weight_decay: each round's concept inversion (``--ti_max_train_steps``,
            ``--ci_lr`` times the batch, batch 1, AdamW's default decay).
        init_word: the one-token word each found token starts from (``--initializer_token``: art/object/person).
        gallery_images: images of each concept the original model draws for the inversions, split over the rounds
            (the README's nudity example: 500).
        gallery_steps, gallery_guidance: the sampler settings of those images (the pipeline's defaults).
        eval_pairs: gallery pairs on which each found token's loss is reported.
        num_adv_concepts: found tokens per concept in stage 2's erase set (``--num_of_adv_concepts``; at most K).
        compositional_guidance: g of stage 2's target: anchors weigh g - 1, the erase set g + 1.
        composition_anchors: stage 2's anchor prompts (containing the concept word); empty: drawn, see below.
        composition_anchor_count: anchor prompts drawn per concept when none are given.
        preset: ``reference`` or ``micro`` (``MICRO`` replaces the fields left at their reference default).
        train: ``xattn`` (default), ``noxattn`` or ``kv``.
    """

    VARIANTS: ClassVar[tuple[str, ...]] = ("xattn", "noxattn", "kv")

    NUMBER_RANGES: ClassVar[dict[str, str]] = {
        **LoraTrainConfig.NUMBER_RANGES, "n_iterations": ">= 1", "ste_steps": ">= 1", "ste_lr": "(0, 1)",
        "negative_guidance": "> 1", "ci_steps": ">= 1", "ci_lr": "> 0", "ci_batch": ">= 1", "ci_weight_decay": ">= 0",
        "gallery_images": ">= 1", "gallery_steps": ">= 1", "gallery_guidance": ">= 0", "eval_pairs": ">= 1",
        "num_adv_concepts": ">= 0", "compositional_guidance": ">= 1", "composition_anchor_count": ">= 1",
    }  # fmt: skip

    lr: float = 2e-5
    steps: int = 200
    train: str = "xattn"
    n_iterations: int = 4
    ste_steps: int = 200
    ste_lr: float = 5e-6
    negative_guidance: float = 2.0
    ci_steps: int = 3000
    ci_lr: float = 5e-3
    ci_batch: int = 1
    ci_weight_decay: float = 1e-2
    init_word: str = "art"
    gallery_images: int = 500
    gallery_steps: int = DEFAULT_STEPS
    gallery_guidance: float = DEFAULT_GUIDANCE
    eval_pairs: int = 32
    num_adv_concepts: int = 4
    compositional_guidance: float = 2.0
    composition_anchors: tuple[str, ...] = ()
    composition_anchor_count: int = 50
    preset: str = "reference"

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS}, got {self.preset!r}")
        if self.preset == "micro":
            defaults = {f.name: f.default for f in dataclasses.fields(StereoConfig)}
            for name, value in MICRO.items():
                if getattr(self, name) == defaults[name]:
                    setattr(self, name, value)
        super().__post_init__()  # every number against NUMBER_RANGES
        if self.num_adv_concepts > self.n_iterations:
            raise ValueError(
                f"num_adv_concepts={self.num_adv_concepts} but the search finds only n_iterations="
                f"{self.n_iterations} tokens per concept"
            )
        if self.gallery_images < self.n_iterations:
            raise ValueError(
                f"gallery_images={self.gallery_images} cannot be split over n_iterations={self.n_iterations} rounds"
            )
        if not isinstance(self.init_word, str) or not self.init_word.strip():
            raise ValueError("init_word is empty")
        self.composition_anchors = tuple(self.composition_anchors)
        if any(not isinstance(p, str) or not p.strip() for p in self.composition_anchors):
            raise ValueError(f"composition_anchors must be non-empty strings, got {list(self.composition_anchors)}")


# ------------------------------------------------------------------------------------------------ targets
def search_target(cond: torch.Tensor, uncond: torch.Tensor, guidance: float) -> torch.Tensor:
    """Stage 1's target, the code's ``normalized_guidance`` at eta 1: e_p - (g - 1)(e_p - e_0), which is ESD's
    e_0 - eta (e_p - e_0) with eta = g - 2."""
    return esd_target(cond, uncond, guidance - 2.0)


def compositional_target(
    uncond: torch.Tensor, anchors: Sequence[torch.Tensor], erased: Sequence[torch.Tensor], guidance: float
) -> torch.Tensor:
    """Stage 2's target, the code's ``normalized_compositional_guidance`` at eta 1:
    e_0 + (g - 1) mean_a (e_a - e_0) - (g + 1) mean_k (e_k - e_0)."""
    toward = torch.stack([a - uncond for a in anchors]).mean(0)
    away = torch.stack([e - uncond for e in erased]).mean(0)
    return uncond + (guidance - 1.0) * toward - (guidance + 1.0) * away


# ------------------------------------------------------------------------------------------------ losses
@dataclass
class SearchLoss:
    """A search round's erasure: ``encoding`` rows are the prompt erased (row 0) and "" (row 1)."""

    encoding: PromptEncoding
    guidance: float

    def __call__(self, batch: Batch, predict: Predictions) -> torch.Tensor:
        erase = torch.zeros_like(batch.prompts)
        frozen, trained = predict_rows(predict, batch, self.encoding, [erase, erase + 1], [erase])
        return torch.nn.functional.mse_loss(trained[0], search_target(frozen[0], frozen[1], self.guidance))


@dataclass
class CompositionalLoss:
    """Stage 2's loss. ``encoding`` rows: the erase set (``n_erase``, also the pool's prompts, so a pool example's
    owner is its erase prompt), "", the composition anchors (``n_anchors``), the preserved anchors (``n_preserve``)."""

    encoding: PromptEncoding
    n_erase: int
    n_anchors: int
    n_preserve: int
    guidance: float
    anchor_weight: float

    def __call__(self, batch: Batch, predict: Predictions) -> torch.Tensor:
        rows, n = batch.prompts, batch.prompts.shape[0]
        uncond = torch.full_like(rows, self.n_erase)
        anchor = self.n_erase + 1 + torch.randint(0, self.n_anchors, (n,), generator=batch.generator)
        erase_set = [torch.full_like(rows, k) for k in range(self.n_erase)]
        first_preserved = self.n_erase + 1 + self.n_anchors
        frozen, trained, anchored = predict_anchored(
            predict, batch, self.encoding, [uncond, anchor, *erase_set], [rows],
            range(first_preserved, first_preserved + self.n_preserve), self.anchor_weight,
        )  # fmt: skip
        target = compositional_target(frozen[0], [frozen[1]], frozen[2:], self.guidance)
        return torch.nn.functional.mse_loss(trained[0], target) + anchored


# ------------------------------------------------------------------------------------------------ records
@dataclass
class FoundToken:
    """A token stage 1 found: its input embedding ``vector`` (1, width) and how well it restores the concept."""

    concept: str
    round: int
    vector: torch.Tensor
    nearest_words: list[str]
    loss_initial: float  # the noise-matching loss on the eval pairs, at init_word's embedding
    loss_final: float  # ... at the found vector
    loss_unattacked: float  # ... of the erased model on the gallery prompts themselves
    loss_curve: list[float]

    @property
    def name(self) -> str:
        return f"<stereo {self.concept} {self.round}>"

    def record(self) -> dict[str, Any]:
        return {
            "concept": self.concept, "round": self.round, "embedding": self.vector.reshape(-1).tolist(),
            "nearest_words": self.nearest_words, "loss_initial": self.loss_initial, "loss_final": self.loss_final,
            "loss_unattacked": self.loss_unattacked,
        }  # fmt: skip


@dataclass
class SearchRound:
    """One search round: what its erasure erased (the concept, or the previous round's token), its LoRA, the
    deltas of every round so far (the erased model the inversion attacked), and the token it found."""

    concept: str
    index: int
    erased: str
    edit: WeightEdit
    cumulative: dict[str, torch.Tensor]
    token: FoundToken
    cost: list[dict[str, Any]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ helpers
def _stream_seed(seed: int, *labels: object) -> int:
    """A seed for one stage's random stream, a function of the run's seed and the stage, in the range a config's
    ``seed`` takes ([0, 2**32), ``pipelines.checks``), as each search round's erasure is a config of its own."""
    text = "/".join([str(seed), *map(str, labels)])
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def _join(encodings: Sequence[PromptEncoding]) -> PromptEncoding:
    """One encoding holding the rows of several of one pipeline (with their pooled vectors where it has them)."""
    pooled = [e.pooled for e in encodings]
    return PromptEncoding(
        [p for e in encodings for p in e.prompts],
        torch.cat([e.input_ids for e in encodings]),
        torch.cat([e.embeddings for e in encodings]),
        torch.cat([e.lengths for e in encodings]),
        None if any(p is None for p in pooled) else torch.cat(pooled),
    )


@torch.no_grad()
def _token_encoding(wrapper: PipelineWrapper, token: FoundToken) -> PromptEncoding:
    """The bare prompt of a found token: start, the vector, end (the reference's placeholder word alone)."""
    encoding = wrapper.encode_with_vectors(["{}"], token.vector.to(wrapper.device))
    return dataclasses.replace(encoding, prompts=[token.name])


def _vector_digest(vector: torch.Tensor) -> str:
    return hashlib.sha256(vector.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


class _Cost:
    """CPU seconds (every thread of this process), wall seconds and the peak resident memory of a stage."""

    def __init__(self, stage: str, steps: int) -> None:
        self.stage, self.steps = stage, steps

    def __enter__(self) -> _Cost:
        self.cpu, self.wall = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.record = {
            "stage": self.stage,
            "steps": self.steps,
            "cpu_seconds": time.process_time() - self.cpu,
            "wall_seconds": time.perf_counter() - self.wall,
            "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }


def _claim(folder: Path, key: str, restart: bool) -> None:
    """Mark ``folder`` as this STEREO run's (deleting the stages it holds first on ``restart``), or refuse another
    run's."""
    try:
        if restart and (folder / _RUN_FILE).exists():
            for child in folder.iterdir():
                if not child.name.startswith(("concept-", "stage-2", _RUN_FILE, f".{_RUN_FILE}")):
                    continue
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(folder)
        claim_checkpoint_folder(folder, key)
    except OSError as err:
        raise write_error(folder, err) from err


# ------------------------------------------------------------------------------------------------ stage 1
def _erase_round(
    wrapper: PipelineWrapper,
    concept: str,
    index: int,
    prompt: PromptEncoding,
    config: StereoConfig,
    folder: Path | None,
    progress: bool | None,
) -> WeightEdit:
    """A search round's ESD erasure of ``prompt`` (one row) on the pipeline as it is now (the earlier rounds in
    force)."""
    round_config = dataclasses.replace(
        config,
        lr=config.ste_lr,
        steps=config.ste_steps,
        seed=_stream_seed(config.seed, concept, index, "erase"),
        checkpoint_dir=str(folder / f"round-{index}-erase") if folder else None,
        restart=False,
        anchor_prompts=(),
        preset="reference",
    )
    encoding = _join([prompt, wrapper.encode_prompts([""])])
    key = {
        "method": "stereo", "stage": "search erase", "concept": concept, "round": index,
        "prompt": _vector_digest(prompt.embeddings),
        "config": config_key(round_config, ("checkpoint_dir", "checkpoint_every", "restart", *STAGE_TWO_FIELDS)),
    }  # fmt: skip
    return train_lora(
        wrapper,
        pool_prompts=encoding.select([0]),
        loss_fn=SearchLoss(encoding, float(config.negative_guidance)),
        config=round_config,
        layers=config.patterns,
        run_key=key,
        progress=progress,
        description=f"stereo {concept}: round {index + 1}/{config.n_iterations} erase",
    )


def _gallery(
    wrapper: PipelineWrapper, concept: str, index: int, prompts: list[str], config: StereoConfig, folder: Path | None
) -> tuple[NoiseTargets, torch.Tensor]:
    """The original model's pairs on this round's part of the gallery (and the eval pairs' indices); read back from
    ``folder`` when a run wrote them."""
    path = folder / f"round-{index}-gallery.safetensors" if folder else None
    if path is not None and path.exists():
        try:
            t = read_tensors(path, digest=True)
            return NoiseTargets(t["latents"], t["timesteps"], t["targets"], t["rows"]), t["eval_index"]
        except (ValueError, KeyError) as err:
            raise damaged_checkpoint(path, err) from None
    target = AttackTarget(wrapper, lambda _: contextlib.nullcontext(), concept, [], steps=config.gallery_steps,
                          guidance=config.gallery_guidance, progress=False)  # fmt: skip
    generator = torch.Generator().manual_seed(_stream_seed(config.seed, concept, index, "gallery"))
    pairs, eval_index = original_noise_targets(target, prompts, generator, config.eval_pairs)
    if path is not None:
        atomic_save_safetensors({**dataclasses.asdict(pairs), "eval_index": eval_index}, path, digest=True)
    return pairs, eval_index


@torch.no_grad()
def _pairs_loss(
    wrapper: PipelineWrapper, pairs: NoiseTargets, index: torch.Tensor, templates: list[str], vector: torch.Tensor
) -> float:
    encoding = wrapper.encode_with_vectors([templates[int(r)] for r in pairs.rows[index]], vector)
    return float(noise_matching_loss(wrapper, pairs, index, encoding))


def _invert(
    wrapper: PipelineWrapper,
    concept: str,
    index: int,
    prompts: list[str],
    gallery: tuple[NoiseTargets, torch.Tensor],
    config: StereoConfig,
    folder: Path | None,
    progress: bool | None,
) -> FoundToken:
    """A search round's concept inversion against the pipeline as it is now (the erased model): a new token's input
    embedding learnt on ``gallery``, the original model's pairs of ``prompts`` (and the indices of the eval pairs).
    Checkpointed every ``checkpoint_every`` steps and at the end."""
    pairs, eval_index = gallery
    templates = [concept_template(p, concept) for p in prompts]
    start = wrapper.token_rows([init_token(wrapper, config.init_word)]).float().clone()
    vector = start.clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([vector], lr=config.ci_lr * config.ci_batch, weight_decay=config.ci_weight_decay)
    generator = torch.Generator().manual_seed(_stream_seed(config.seed, concept, index, "inversion"))
    path = folder / f"round-{index}-inversion.safetensors" if folder else None
    curve: list[float] = []
    if path is not None and path.exists():
        try:
            t = read_tensors(path, digest=True)
            with torch.no_grad():
                vector.copy_(t["vector"])
            curve = t["losses"].tolist()
            generator.set_state(t["generator"])
            if curve:
                optimizer.state[vector] = {"step": t["step"], "exp_avg": t["exp_avg"], "exp_avg_sq": t["exp_avg_sq"]}
        except (ValueError, KeyError, RuntimeError) as err:
            raise damaged_checkpoint(path, err) from None
        if len(curve) > config.ci_steps:
            raise ValueError(f"{path} holds {len(curve)} inversion steps, beyond ci_steps={config.ci_steps}")

    def save() -> None:
        state = optimizer.state[vector]
        atomic_save_safetensors(
            {"vector": vector.detach(), "losses": torch.tensor(curve, dtype=torch.float64),
             "generator": generator.get_state(), "step": torch.as_tensor(state["step"]).clone(),
             "exp_avg": state["exp_avg"], "exp_avg_sq": state["exp_avg_sq"]},
            path, digest=True,
        )  # fmt: skip

    show = None if progress is None else not progress
    bar = tqdm(total=config.ci_steps, initial=len(curve), unit="step", disable=show,
               desc=f"stereo {concept}: round {index + 1}/{config.n_iterations} inversion")  # fmt: skip
    with bar:
        for step in range(len(curve), config.ci_steps):
            curve.append(matching_step(wrapper, pairs, templates, config.ci_batch, generator, vector, optimizer))
            bar.set_postfix(loss=f"{curve[-1]:.4g}")
            bar.update(1)
            if path is not None and ((step + 1) % config.checkpoint_every == 0 or step + 1 == config.ci_steps):
                save()
    learnt = vector.detach()
    return FoundToken(
        concept, index, learnt.cpu(), nearest_words(wrapper, learnt),
        _pairs_loss(wrapper, pairs, eval_index, templates, start),
        _pairs_loss(wrapper, pairs, eval_index, templates, learnt),
        prompt_loss(wrapper, pairs, eval_index, prompts), curve,
    )  # fmt: skip


def _sum_deltas(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: a.get(k, 0) + b.get(k, 0) for k in dict.fromkeys([*a, *b])}


def search_thoroughly(
    wrapper: PipelineWrapper,
    concept: str,
    config: StereoConfig,
    folder: Path | None = None,
    progress: bool | None = None,
) -> list[SearchRound]:
    """Stage 1 for one concept: K rounds of (erase the current concept on top of the earlier rounds, then invert the
    concept against that erased model); ``folder`` holds the stages' checkpoints. The pipeline is left as it was."""
    parts = attack_probes(concept, config.gallery_images, _stream_seed(config.seed, concept, "gallery") % 2**31)
    size = config.gallery_images // config.n_iterations
    rounds: list[SearchRound] = []
    cumulative: dict[str, torch.Tensor] = {}
    for index in range(config.n_iterations):
        if index == 0:
            erased, prompt = concept, wrapper.encode_prompts([concept])
        else:
            previous = rounds[-1].token
            erased, prompt = previous.name, _token_encoding(wrapper, previous)
        costs = []
        with wrapper.weight_deltas(cumulative):
            with _Cost(f"{concept} round {index} erase", config.ste_steps) as cost:
                edit = _erase_round(wrapper, concept, index, prompt, config, folder, progress)
            costs.append(cost.record)
        cumulative = _sum_deltas(cumulative, {k: v.detach().cpu() for k, v in edit.deltas.items()})
        prompts = [p.prompt for p in parts[index * size : (index + 1) * size]]
        with _Cost(f"{concept} round {index} inversion", config.ci_steps) as cost:
            gallery = _gallery(wrapper, concept, index, prompts, config, folder)  # the original model's
            with wrapper.weight_deltas(cumulative):
                token = _invert(wrapper, concept, index, prompts, gallery, config, folder, progress)
        costs.append(cost.record)
        logger.info("stereo %s round %d: erased %s; found a token near %s (loss %.4g -> %.4g, unattacked %.4g)",
                    concept, index, erased, token.nearest_words, token.loss_initial, token.loss_final,
                    token.loss_unattacked)  # fmt: skip
        rounds.append(SearchRound(concept, index, erased, edit, cumulative, token, costs))
    return rounds


# ------------------------------------------------------------------------------------------------ stage 2
def composition_anchors(concepts: Sequence[str], config: StereoConfig) -> list[str]:
    """Stage 2's anchor prompts: the config's, or ``composition_anchor_count`` prompts naming each concept."""
    if config.composition_anchors:
        return list(config.composition_anchors)
    drawn = []
    for concept in concepts:
        seed = _stream_seed(config.seed, concept, "anchors") % 2**31
        drawn += [p.prompt for p in attack_probes(concept, config.composition_anchor_count, seed)]
    return list(dict.fromkeys(drawn))


def robustly_erase_once(
    wrapper: PipelineWrapper,
    concepts: ConceptSpec,
    tokens: Sequence[FoundToken],
    config: StereoConfig,
    folder: Path | None = None,
    progress: bool | None = None,
) -> WeightEdit:
    """Stage 2: one LoRA, from the original model, with the compositional target over the concepts and ``tokens``
    and the composition anchors (plus the family's anchor regularization on the preserved concepts)."""
    anchors = composition_anchors(concepts.targets, config)
    preserved = list(dict.fromkeys([*config.anchor_prompts, *concepts.preserve]))
    erase_set = _join([wrapper.encode_prompts(list(concepts.targets)), *(_token_encoding(wrapper, t) for t in tokens)])
    n_erase = len(erase_set.prompts)
    encoding = _join([erase_set, wrapper.encode_prompts(["", *anchors, *preserved])])
    loss = CompositionalLoss(encoding, n_erase, len(anchors), len(preserved), float(config.compositional_guidance),
                             float(config.anchor_weight))  # fmt: skip
    stage_config = dataclasses.replace(config, restart=False, preset="reference")
    key = {
        "method": "stereo", "stage": "robust erase", "targets": list(concepts.targets),
        "tokens": [_vector_digest(t.vector) for t in tokens], "anchors": anchors, "preserved": preserved,
        "config": config_key(stage_config),
    }  # fmt: skip
    if folder is not None:  # a folder per stage-2 setting: other stage-2 settings reuse the search on disk
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
        stage_config = dataclasses.replace(stage_config, checkpoint_dir=str(folder / f"stage-2-{digest}"))
    edit = train_lora(
        wrapper,
        pool_prompts=erase_set,
        loss_fn=loss,
        config=stage_config,
        layers=config.patterns,
        run_key=key,
        progress=progress,
        description=f"stereo {', '.join(concepts.targets)}: robust erase",
    )
    edit.info.update({"erase_set": erase_set.prompts, "composition_anchors": anchors, "anchors": preserved})
    return edit


# ------------------------------------------------------------------------------------------------ the method
def _check_inputs(wrapper: PipelineWrapper, concepts: ConceptSpec, config: StereoConfig) -> None:
    """What needs the model, before any work: the init word is one token, the prompts fit the text encoder."""
    init_token(wrapper, config.init_word)
    for prompt in [*config.composition_anchors, *config.anchor_prompts, *concepts.preserve]:
        wrapper.check_prompt(prompt, "anchor prompt")
    for concept in concepts.targets:
        for probe in attack_probes(concept, 2):
            concept_template(probe.prompt, concept)  # the gallery's prompts name the concept as written


@register_method(
    "stereo",
    StereoConfig,
    "lora",
    "STEREO (Srivatsan et al., 2025): K rounds of ESD erasure and concept inversion find adversarial tokens, then one "
    "LoRA from the original model erases the concept and the tokens with compositional guidance and anchors",
    capabilities=dataclasses.replace(
        TRAINED,
        guides=False,
        architectures=ARCHITECTURES,
        sampler_steps=("pool_steps", "gallery_steps"),
        quick={
            "steps": 6,
            "lr": 1e-2,
            "pool_images": 1,
            "pool_steps": 3,
            "n_iterations": 2,
            "ste_steps": 3,
            "ste_lr": 1e-2,
            "ci_steps": 3,
            "ci_lr": 2e-2,
            "gallery_images": 2,
            "gallery_steps": 3,
            "eval_pairs": 4,
            "num_adv_concepts": 2,
            "composition_anchor_count": 2,
        },
    ),  # fmt: skip
)
def erase_stereo(wrapper: PipelineWrapper, concepts: ConceptSpec, config: StereoConfig) -> WeightEdit:
    """Stage 1 for every target, then stage 2; the artifact is stage 2's LoRA, the found tokens are in its info."""
    _check_inputs(wrapper, concepts, config)
    folder = Path(config.checkpoint_dir) if config.checkpoint_dir else None
    if folder is not None:
        modules = wrapper.lora_modules(config.patterns)
        search = config_key(config, ("checkpoint_dir", "checkpoint_every", "restart", "preset", *STAGE_TWO_FIELDS))
        key = {"targets": list(concepts.targets), "config": search,
               "base": wrapper.fingerprint([f"{wrapper.denoiser_name}.{m}" for m in modules])}  # fmt: skip
        _claim(folder, hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest(), config.restart)
    rounds: list[SearchRound] = []
    for j, concept in enumerate(concepts.targets):
        where = folder / f"concept-{j}" if folder else None
        if where is not None:
            where.mkdir(exist_ok=True)
        rounds += search_thoroughly(wrapper, concept, config, where)
    tokens = [r.token for r in rounds if r.index < config.num_adv_concepts]
    stages = [c for r in rounds for c in r.cost]
    with _Cost("robust erase", config.steps) as cost:
        edit = robustly_erase_once(wrapper, concepts, tokens, config, folder)
    stages.append(cost.record)
    edit.info.update(
        {
            "variant": config.train,
            "patterns": list(config.patterns),
            "found_tokens": [r.token.record() for r in rounds],
            "search_rounds": [
                {"concept": r.concept, "round": r.index, "erased": r.erased, "final_loss": r.edit.info["final_loss"]}
                for r in rounds
            ],
            "stages": stages,
            "total_cpu_seconds": sum(s["cpu_seconds"] for s in stages),
            "total_steps": sum(s["steps"] for s in stages),
        }
    )
    return edit
