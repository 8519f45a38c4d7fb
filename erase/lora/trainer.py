"""The shared LoRA trainer of the fine-tuning family: methods define a loss, this does everything else.

A method gives the prompts whose trajectories make the training examples, and a loss on a batch of noisy latents
``(x_t, t)`` that may ask two predictions of the ONE UNet in memory: ``trained`` (LoRA adapters on) and ``frozen``
(adapters off, no gradient), so the frozen model is never a second copy. The trainer adds peft LoRA adapters on the
config's module-name patterns (through ``PipelineWrapper.lora_adapters``), runs Adam through ``accelerate`` (device,
mixed precision), shows a progress bar with the loss and steps/s, checkpoints, and returns the adapters as exact
LoRA factors in a ``WeightEdit``, after which the UNet is its bit-identical self again.

Where x_t comes from
--------------------
The reference implementations differ:

* ESD's original script (``train-scripts/train-esd.py``, CompVis code) samples x_t with the model being TRAINED:
  each iteration runs DDIM with the fine-tuned model on the concept prompt up to a random step, so the latents
  drift as the model forgets the concept (and each iteration pays a partial denoising run).
* ESD's newer diffusers script (``esd_sd.py``) samples x_t with the FROZEN base UNet (``pipe.unet = base_unet``
  before the partial run), still one partial denoising run per iteration, and holds two UNets.
* Concept ablation (Kumari et al.) noises images the frozen model generated once, before training (a fixed set).
* SPM (Lyu et al., ``train_spm.py``) samples with the model being TRAINED, like the older ESD script: each
  iteration runs DDIM (30 steps, guidance 3) with the adapter on up to a random step.

We sample from the frozen model, once: the frozen model's trajectories do not change while the LoRA trains, so a
pool of ``pool_images`` trajectories per prompt is drawn before training (every UNet input of a sampling run is a
training example), and each step draws (x_t, t) from it uniformly. This is the newer ESD script's distribution
without its per-iteration denoising cost, and close to what concept ablation does. What it gives up is the
on-policy drift of the older ESD script and of SPM, which we do not reproduce.

Adversarial training
--------------------
``adversarial`` names a training-time adversary (:mod:`erase.lora.adversarial`, RACE-style by default: PGD on the
text encoder's output embedding of the concept prompt, renewed every step): the perturbation is added to the attacked
prompts' embeddings on the trained model's side; the frozen targets keep the clean prompts. A method says which
prompts are attacked on each pool prompt's examples (``attacked``; by default each pool prompt itself).

How it meets the frozen-model pool: the adversary attacks at the pool's (x_t, t), the same examples the step trains
on, so the trajectories stay the frozen model's on the clean prompt. RACE samples z_t with the model being trained on
the clean prompt; the pool keeps the trainer's one distribution for every method and makes the attack the only
thing that adapts to the model during training: an adversarial example is always fresh against the current adapters
(renewed on schedule), only its x_t is not on-policy. RACE's objective needs the initial noise x_T of each example's
trajectory, which the pool holds (its first UNet input, ``Batch.initial``). The pool is never re-sampled under attack.

Text-encoder adapters
---------------------
Patterns that start with ``"text_encoder."`` put adapters on the text encoder's Linear modules (e.g.
``"text_encoder.*self_attn.q_proj"``; ``"text_encoder_2."``: SDXL's second encoder, whose pooled vector then changes
too). The trained predictions then read the prompts through the adapted encoders:
:meth:`Predictions.trained` re-encodes, with gradients, every row of the encoding it is given that is text (its
prompt tokenises to its ``input_ids``); rows a loss made itself (SPM's latent anchors, embeddings with free vectors)
go to the UNet as they are. The frozen predictions take the encoding as given, adapters off: losses encode their
prompts before training, with the original encoder.

Determinism and resuming
------------------------
One explicit ``torch.Generator`` seeded with ``config.seed`` draws, in order: the pool's seeds, the LoRA A matrices,
then every batch. A checkpoint (``checkpoint_dir``, every ``checkpoint_every`` steps and at the end) holds the
adapters, Adam's state (safetensors tensors, hyperparameters in JSON), the generator's state, the losses so far and
the pool, and the adversary's state (its perturbations in force and any tensors it keeps): rerunning the same call
continues from the last checkpoint and ends with the weights an uninterrupted run
ends with; rerunning it with more ``steps`` trains a finished run further. Nothing is pickled. A checkpoint folder
made by another run (other settings, concepts, base weights or number of processes) is refused. Each safetensors
file of a checkpoint carries the digest of its contents, and ``state.json`` is checked against the step it is
named for and the optimizer it restores: a damaged or changed checkpoint is named (``DamagedCheckpointError``, with
what to do: rerun with ``restart``) before training, never found by a crash mid-run.

Several processes
-----------------
Launched as several processes (``accelerate launch --multi_gpu --num_processes N``, or ``torchrun``; on the CPU the
processes join over gloo), every process samples the same pool and starts from the same adapters, then draws its
own batches (process 0 from the run's generator, process R from one seeded by (seed, R)); after each backward pass
the adapters' gradients and the loss are averaged across processes, so every process takes the same Adam step and
ends with the same adapters: N processes train on N x ``batch_size`` examples a step. Process 0 alone writes the
checkpoints, which hold every process's generator state. Each process samples the whole pool (it is small next to
training); sharding it is left undone. Under adversarial training each process renews its adversary on its own batch; a
checkpoint holds process 0's adversary state, which every process resumes with (exact for a fresh adversary every
step, ``adversarial_every`` 1; with a longer period the other processes continue from process 0's perturbation).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import re
import resource
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from pipelines import LORA_TARGETS, LoraAdapters, PipelineWrapper, PromptEncoding, text_encoder_component
from pipelines.files import (
    DIGEST_KEY,
    atomic_output,
    atomic_save_safetensors,
    atomic_write_json,
    claim_folder,
    damaged_checkpoint,
    read_json_object,
    read_tensors,
    remove_stale_temporaries,
    safetensors_digest,
    write_error,
)

from ..core.inputs import check_number_fields
from ..core.registry import Capabilities, WeightEdit
from ..core.weights import factor_products
from .adversarial import AdversarialSchedule, check_adversarial

__all__ = [
    "TRAINED",
    "Batch",
    "LoraTrainConfig",
    "LossFunction",
    "Predictions",
    "TrainingPool",
    "claim_checkpoint_folder",
    "config_key",
    "predict_anchored",
    "predict_rows",
    "sample_pool",
    "train_lora",
]

logger = logging.getLogger(__name__)

MIXED_PRECISION = ("no", "fp16", "bf16")
_CHECKPOINT_PREFIX = "step-"
_POOL_FILE = "pool.safetensors"
_RUN_FILE = "run.json"
_CHECKPOINT_NAME = re.compile(rf"{_CHECKPOINT_PREFIX}(\d{{8}})")


@dataclass
class LoraTrainConfig:
    """Settings every LoRA method shares (a method's config dataclass extends this one).

    Attributes:
        rank, alpha: LoRA rank and alpha; the adapter's change is (alpha / rank) * B @ A.
        lr: Adam's learning rate.
        steps: optimizer steps.
        batch_size: (x_t, t) examples per step.
        seed: seeds the one generator that draws the pool's seeds, the LoRA initialisation and every batch.
        layers: fnmatch patterns of UNet Linear module names to adapt; ``None`` lets the method choose.
        pool_images: frozen-model trajectories sampled per prompt before training.
        pool_steps, pool_guidance: the sampler's steps and classifier-free guidance for those trajectories.
        checkpoint_dir: folder for checkpoints (``None``: none); rerunning with the same folder resumes.
        restart: start afresh: delete this run's checkpoints in ``checkpoint_dir`` first (only the files a run
            writes there: ``run.json``, ``pool.safetensors``, ``step-*``), e.g. when one is damaged.
        checkpoint_every: steps between checkpoints (one is also written at the end).
        mixed_precision: ``accelerate``'s setting: "no", "fp16" or "bf16" (autocast; the adapters stay float32).
        train: which modules the adapters go on, one of the method's ``VARIANTS`` (a ``pipelines.LORA_TARGETS``
            set); ``layers`` overrides it with explicit patterns.
        anchor_weight: weight of the family's anchor regularization (used only when there are anchor prompts).
        anchor_prompts: prompts whose predictions must not move; ``scripts/erase.py`` fills in ``--preserve``.
        adversarial: a training-time adversary (``evals.attacks.adversaries``: ``race_pgd``, ``rece_embedding``,
            ``ring_a_bell``) whose perturbation of the attacked prompts' embeddings the loss is taken on; ``None``:
            clean training. A name that is not one (unknown, a prompt or sampling attack) is refused.
        adversarial_every: renew the adversary every this many steps (RACE: 1, fresh every step).
        adversarial_warmup: clean steps before the first attack (AdvUnlearn: 200 of 1000).
        adversarial_steps, adversarial_step_size, adversarial_epsilon: the adversary's budget per renewal: its
            optimisation steps and step size, and its L-inf radius on the embedding (RACE: 10, epsilon / 4, 0.1);
            closed-form adversaries use none of it.
        adversarial_objective: what the adversary restores: ``"noise"`` (RACE: the trajectory's initial noise) or
            ``"frozen"`` (AdvUnlearn: the original model's prediction on the clean prompt), see
            ``erase.lora.adversarial``.
    """

    #: the ``train`` settings a method offers; a method's config narrows it
    VARIANTS: ClassVar[tuple[str, ...]] = tuple(LORA_TARGETS)

    NUMBER_RANGES: ClassVar[dict[str, str]] = {
        "rank": ">= 1", "alpha": "> 0", "lr": "(0, 1)", "steps": ">= 1", "batch_size": ">= 1", "seed": ">= 0",
        "pool_images": ">= 1", "pool_steps": ">= 1", "pool_guidance": ">= 0", "checkpoint_every": ">= 1",
        "anchor_weight": ">= 0", "adversarial_every": ">= 1", "adversarial_warmup": ">= 0",
        "adversarial_steps": ">= 1", "adversarial_step_size": "> 0", "adversarial_epsilon": "> 0",
    }  # fmt: skip

    rank: int = 4
    alpha: float = 4.0
    lr: float = 5e-5
    steps: int = 200
    batch_size: int = 1
    seed: int = 0
    layers: tuple[str, ...] | None = None
    pool_images: int = 8
    pool_steps: int = 50
    pool_guidance: float = 3.0
    checkpoint_dir: str | None = None
    checkpoint_every: int = 100
    restart: bool = False
    mixed_precision: str = "no"
    train: str = "xattn"
    anchor_weight: float = 1.0
    anchor_prompts: tuple[str, ...] = ()
    adversarial: str | None = None
    adversarial_every: int = 1
    adversarial_warmup: int = 0
    adversarial_steps: int = 10
    adversarial_step_size: float = 0.025
    adversarial_epsilon: float = 0.1
    adversarial_objective: str = "noise"

    def __post_init__(self) -> None:
        if self.layers is not None:
            self.layers = tuple(self.layers)
            if not self.layers:
                raise ValueError("layers is empty: give at least one module-name pattern, or None for the default")
        check_number_fields(self)  # every number and bool of the method's config class, against its NUMBER_RANGES
        if self.restart and not self.checkpoint_dir:
            raise ValueError("restart deletes the checkpoints in checkpoint_dir: it needs a checkpoint_dir")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        if self.train not in self.VARIANTS:
            raise ValueError(f"train must be one of {self.VARIANTS}, got {self.train!r}")
        self.anchor_prompts = tuple(self.anchor_prompts)
        if any(not isinstance(p, str) or not p.strip() for p in self.anchor_prompts):
            raise ValueError(f"anchor_prompts must be non-empty strings, got {list(self.anchor_prompts)}")
        check_adversarial(self.adversarial, self.adversarial_objective)

    @property
    def patterns(self) -> tuple[str, ...]:
        """The module-name patterns the adapters go on: ``layers`` if given, else the ``train`` set's."""
        return self.layers if self.layers is not None else LORA_TARGETS[self.train]


@dataclass
class TrainingPool:
    """Frozen-model trajectories: ``latents`` (N, K, C, h, w) UNet inputs at ``timesteps`` (K,); ``owners`` (N,)
    is the index of the prompt each trajectory was sampled for."""

    latents: torch.Tensor
    timesteps: torch.Tensor
    owners: torch.Tensor

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"latents": self.latents, "timesteps": self.timesteps, "owners": self.owners}


@dataclass
class Batch:
    """One training step's examples: noisy latents, their timesteps and which pool prompt each came from.

    ``generator`` is the trainer's, for a loss that needs more randomness (an anchor prompt to draw): drawing from
    it keeps the run deterministic and resumable. ``initial`` is the first UNet input of each example's trajectory
    (the sampler's initial noise x_T); ``step`` the 0-based optimizer step the batch is for (a loss with a schedule);
    ``pool`` the training pool, for a loss that draws more examples of it (an inner attack), with ``generator``.
    """

    latents: torch.Tensor
    timesteps: torch.Tensor
    prompts: torch.Tensor
    generator: torch.Generator
    initial: torch.Tensor | None = None
    step: int = 0
    pool: TrainingPool | None = None


class Predictions:
    """The two noise predictions a loss may ask of the one UNet: with the adapters and, without gradient, without.

    ``perturbations`` (prompt -> (tokens, width)), set by the trainer each step under adversarial training, are added
    to the trained side's embedding of every text row of those prompts."""

    def __init__(self, wrapper: PipelineWrapper, adapters: LoraAdapters) -> None:
        self._wrapper = wrapper
        self._adapters = adapters
        self.perturbations: dict[str, torch.Tensor] = {}
        self._token_ids: dict[str, torch.Tensor] = {}

    def trained(self, latents: torch.Tensor, timesteps: torch.Tensor, encoding: PromptEncoding) -> torch.Tensor:
        return self._wrapper.noise_prediction(latents, timesteps, self.trained_encoding(encoding))

    def trained_encoding(self, encoding: PromptEncoding) -> PromptEncoding:
        """``encoding`` as the model being trained reads it: its text rows re-encoded by the adapted text encoder
        (when it is adapted), plus the perturbations in force; the other rows as they are."""
        retext = self._adapters.adapts_text_encoder
        if not retext and not self.perturbations:
            return encoding
        rows = [i for i in range(len(encoding.prompts)) if self._is_text(encoding, i)]
        pooled = encoding.pooled
        if retext:
            rows_text = [encoding.prompts[i] for i in rows]
            unique = list(dict.fromkeys(rows_text))
            if not unique:
                return encoding
            fresh = self._wrapper.encode_prompts(unique, grad=True)
            order = [unique.index(p) for p in rows_text]
            index = torch.tensor(rows, device=encoding.embeddings.device)
            embeddings = encoding.embeddings.index_copy(0, index, fresh.embeddings[order])
            if pooled is not None:  # SDXL's pooled vector is the second encoder's: adapted there, it changes too
                pooled = pooled.index_copy(0, index.to(pooled.device), fresh.pooled[order].to(pooled.dtype))
        else:
            embeddings = encoding.embeddings
        shifts = [(i, self.perturbations[p]) for i in rows if (p := encoding.prompts[i]) in self.perturbations]
        if shifts:
            delta = torch.zeros_like(embeddings)
            for i, shift in shifts:
                delta[i] = shift.to(delta.device, delta.dtype)
            embeddings = embeddings + delta
        return PromptEncoding(encoding.prompts, encoding.input_ids, embeddings, encoding.lengths, pooled)

    def _is_text(self, encoding: PromptEncoding, row: int) -> bool:
        prompt = encoding.prompts[row]
        if prompt not in self._token_ids:
            with self._adapters.disabled():
                self._token_ids[prompt] = self._wrapper.encode_prompts([prompt]).input_ids[0]
        return torch.equal(self._token_ids[prompt], encoding.input_ids[row])

    @torch.no_grad()
    def frozen(self, latents: torch.Tensor, timesteps: torch.Tensor, encoding: PromptEncoding) -> torch.Tensor:
        with self._adapters.disabled():
            return self._wrapper.noise_prediction(latents, timesteps, encoding)


def predict_rows(
    predict: Predictions,
    batch: Batch,
    encoding: PromptEncoding,
    frozen_rows: Sequence[torch.Tensor],
    trained_rows: Sequence[torch.Tensor],
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """The frozen and the trained predictions (float32) on the batch's x_t, one per example under each entry of
    ``frozen_rows`` / ``trained_rows`` (encoding rows, one per example): each model in one UNet call, split back per
    entry."""
    n = batch.latents.shape[0]

    def run(model: Callable, rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        k = len(rows)
        x, t = batch.latents.repeat(k, 1, 1, 1), batch.timesteps.repeat(k)
        return model(x, t, encoding.select(torch.cat(list(rows)))).float().split(n)

    return run(predict.frozen, frozen_rows), run(predict.trained, trained_rows)


def predict_anchored(
    predict: Predictions,
    batch: Batch,
    encoding: PromptEncoding,
    frozen_rows: Sequence[torch.Tensor],
    trained_rows: Sequence[torch.Tensor],
    anchors: range,
    weight: float,
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], torch.Tensor | float]:
    """``predict_rows`` plus the family's anchor regularization, in the same two UNet calls::

        anchor_term = weight * || eps_theta(x_t, a, t) - eps*(x_t, a, t) ||^2

    with one anchor prompt ``a`` per example drawn from the encoding rows ``anchors`` (by the batch's generator).
    Returns the frozen and the trained predictions of the given rows and the term (0 when it is off: no anchors, or
    weight 0)."""
    if not len(anchors) or not weight > 0:
        return (*predict_rows(predict, batch, encoding, frozen_rows, trained_rows), 0.0)
    drawn = anchors.start + torch.randint(0, len(anchors), (batch.latents.shape[0],), generator=batch.generator)
    frozen, trained = predict_rows(predict, batch, encoding, [*frozen_rows, drawn], [*trained_rows, drawn])
    return frozen[:-1], trained[:-1], weight * torch.nn.functional.mse_loss(trained[-1], frozen[-1])


#: ``loss_fn(batch, predictions) -> loss``. A loss that carries tensors from step to step (an inner attack's
#: warm start) keeps them in a ``state`` attribute, a ``dict[str, torch.Tensor]``: the trainer checkpoints it and
#: restores it on resume.
LossFunction = Callable[[Batch, Predictions], torch.Tensor]


def _prompt_count(prompts: Sequence[str] | PromptEncoding) -> int:
    return len(prompts.prompts) if isinstance(prompts, PromptEncoding) else len(prompts)


def sample_pool(
    wrapper: PipelineWrapper,
    prompts: Sequence[str] | PromptEncoding,
    config: LoraTrainConfig,
    generator: torch.Generator,
) -> TrainingPool:
    """``config.pool_images`` frozen-model trajectories per prompt (text, or the rows of an encoding: prompts made of
    free vectors), their seeds drawn from ``generator``."""
    seeds = torch.randint(0, 2**31 - 1, (_prompt_count(prompts) * config.pool_images,), generator=generator).tolist()
    owners = torch.arange(_prompt_count(prompts)).repeat_interleave(config.pool_images)
    drawn = prompts.select(owners) if isinstance(prompts, PromptEncoding) else [prompts[int(i)] for i in owners]
    latents, timesteps = wrapper.sample_trajectories(
        drawn, seeds, steps=config.pool_steps, guidance=config.pool_guidance
    )
    return TrainingPool(latents, timesteps, owners)


def _draw(pool: TrainingPool, batch_size: int, generator: torch.Generator, device: torch.device) -> tuple:
    rows = torch.randint(0, pool.latents.shape[0], (batch_size,), generator=generator)
    steps = torch.randint(0, pool.latents.shape[1], (batch_size,), generator=generator)
    latents, initial = pool.latents[rows, steps].to(device), pool.latents[rows, 0].to(device)
    return latents, pool.timesteps[steps].to(device), pool.owners[rows], initial


def _run_key(wrapper: PipelineWrapper, key: dict[str, Any], modules: Sequence[str]) -> str:
    """What identifies a run for resuming: the caller's description and the adapted modules' base weights."""
    qualified = [m if text_encoder_component(m) else f"{wrapper.denoiser_name}.{m}" for m in modules]
    text = json.dumps({"run": key, "base": wrapper.fingerprint(qualified)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


# ------------------------------------------------------------------------------------------------ checkpoints
def claim_checkpoint_folder(folder: Path, key: str) -> None:
    """Mark ``folder`` as the run ``key``'s (``run.json``), or refuse it when another run's checkpoints, or files of
    no run, are there."""
    path = folder / _RUN_FILE
    if path.exists():
        try:
            found = read_json_object(path).get("key")
        except ValueError as err:
            raise damaged_checkpoint(path, err) from None
        if found != key:
            raise ValueError(
                f"{folder} holds checkpoints of another run (other settings, concepts or base weights): "
                "delete it or choose another checkpoint_dir"
            )
        return
    if folder.is_dir() and any(folder.iterdir()):
        raise ValueError(f"{folder} is not empty and holds no checkpoints of ours: choose another checkpoint_dir")
    atomic_write_json(path, {"key": key})


def _clear_checkpoints(folder: Path) -> None:
    """Delete this run's files in ``folder`` (``run.json``, the pool, ``step-*``, their temporaries), nothing else."""
    if not folder.is_dir():
        return
    ours = (_RUN_FILE, _POOL_FILE, f"{_CHECKPOINT_PREFIX}*", f".{_RUN_FILE}.*", f".{_POOL_FILE}.*",
            f".{_CHECKPOINT_PREFIX}*")  # fmt: skip
    for pattern in ours:
        for path in folder.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    logger.info("restart: deleted the checkpoints in %s", folder)


def _latest_checkpoint(folder: Path) -> Path | None:
    """The last ``step-NNNNNNNN`` entry of ``folder``; a complete checkpoint folder is the only thing the writer leaves
    under that name, so whatever else it is is damaged (``_load_checkpoint`` names it)."""
    found = sorted(p for p in folder.glob(f"{_CHECKPOINT_PREFIX}*") if _CHECKPOINT_NAME.fullmatch(p.name))
    return found[-1] if found else None


def _process_seed(seed: int, rank: int) -> int:
    """The batch generator's seed of process ``rank`` > 0 (process 0 goes on with the run's own generator)."""
    return int(hashlib.sha256(f"{seed}/{rank}".encode()).hexdigest()[:15], 16)


def _generator_states(accelerator: Any, generator: torch.Generator) -> list[torch.Tensor]:
    """Every process's batch-generator state, on every process (a collective call when there are several)."""
    state = generator.get_state()
    if accelerator.num_processes == 1:
        return [state]
    gathered = accelerator.gather(state.to(torch.int32)[None].to(accelerator.device)).cpu()
    return [row.to(torch.uint8) for row in gathered]


def _save_checkpoint(
    folder: Path, step: int, adapters: LoraAdapters, optimizer: torch.optim.Optimizer,
    generator_states: list[torch.Tensor], state: dict[str, Any], extra: dict[str, torch.Tensor] | None = None,
) -> None:  # fmt: skip
    """Write ``step-NNNNNNNN/`` whole (a temporary folder renamed into place), then drop older checkpoints.

    ``generator_states`` holds each process's batch generator (``generator`` for process 0, ``generator.R`` for
    process R), so a multi-process run resumes with every process where it was. ``extra`` tensors (the adversary's
    and the loss's state, names prefixed ``adversary.`` and ``loss.``) go into the optimizer file beside them."""
    final = folder / f"{_CHECKPOINT_PREFIX}{step:08d}"
    opt_state = optimizer.state_dict()
    tensors = {"generator" if r == 0 else f"generator.{r}": g for r, g in enumerate(generator_states)}
    tensors.update(extra or {})
    for index, values in opt_state["state"].items():
        for key, value in values.items():
            tensors[f"state.{index}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    state_json = json.dumps({**state, "param_groups": opt_state["param_groups"]}, indent=1).encode()
    lora = {k: v.contiguous().cpu() for k, v in adapters.state_dict().items()}
    with atomic_output(final, folder=True) as tmp:  # a failed write leaves the last checkpoint as it was
        save_file(lora, str(tmp / "lora.safetensors"), metadata={DIGEST_KEY: safetensors_digest(lora)})
        save_file(tensors, str(tmp / "optimizer.safetensors"), metadata={DIGEST_KEY: safetensors_digest(tensors)})
        (tmp / "state.json").write_bytes(state_json)
    for old in folder.glob(f"{_CHECKPOINT_PREFIX}*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(
    path: Path,
    adapters: LoraAdapters,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    rank: int = 0,
    extra: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Restore a checkpoint; ``DamagedCheckpointError`` naming the file that cannot be read back. ``extra`` receives
    the saved ``adversary.*`` and ``loss.*`` tensors."""
    file = path / "state.json"
    try:
        state = read_json_object(file)
        _check_state(state, int(path.name.removeprefix(_CHECKPOINT_PREFIX)), optimizer)
        file = path / "lora.safetensors"
        adapters.load_state_dict(read_tensors(file, digest=True))
        file = path / "optimizer.safetensors"
        tensors = read_tensors(file, digest=True)
        states = {name: tensors.pop(name) for name in list(tensors) if name.startswith("generator")}
        generator.set_state(states["generator" if rank == 0 else f"generator.{rank}"])
        for name in [n for n in tensors if n.startswith(("adversary.", "loss."))]:
            value = tensors.pop(name)
            if extra is not None:
                extra[name] = value
        opt_state: dict[int, dict[str, torch.Tensor]] = {}
        for name, value in tensors.items():
            _, index, key = name.split(".", 2)
            opt_state.setdefault(int(index), {})[key] = value
        file = path / "state.json"
        optimizer.load_state_dict({"state": opt_state, "param_groups": state.pop("param_groups")})
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        raise damaged_checkpoint(file, err) from None
    return state


def _check_state(state: dict[str, Any], step: int, optimizer: torch.optim.Optimizer) -> None:
    """``ValueError`` unless ``state.json`` is what ``_save_checkpoint`` writes for ``step``: one finite loss per step
    so far, finite seconds, and the optimizer's own hyperparameters (they are fixed by the run's settings)."""
    losses, seconds = state.get("losses"), state.get("seconds")
    if not isinstance(losses, list) or not all(_is_finite_number(v) for v in losses):
        raise ValueError("losses is not a list of finite numbers")
    if state.get("step") != step or len(losses) != step:
        raise ValueError(f"it is the checkpoint of step {step}, but records step {state.get('step')!r} and "
                         f"{len(losses)} losses")  # fmt: skip
    if not _is_finite_number(seconds) or seconds < 0:
        raise ValueError(f"seconds {seconds!r} is not a time")
    if state.get("param_groups") != json.loads(json.dumps(optimizer.state_dict()["param_groups"])):
        raise ValueError("its param_groups are not this run's optimizer settings")


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak resident set"


# ------------------------------------------------------------------------------------------------ training
def train_lora(
    wrapper: PipelineWrapper,
    *,
    pool_prompts: Sequence[str] | PromptEncoding,
    loss_fn: LossFunction,
    config: LoraTrainConfig,
    layers: Sequence[str],
    run_key: dict[str, Any],
    progress: bool | None = None,
    description: str = "training",
    attacked: Sequence[Sequence[str]] | None = None,
) -> WeightEdit:
    """Train LoRA adapters on ``layers`` (fnmatch patterns) to minimise ``loss_fn`` and return them as a change.

    ``pool_prompts`` are text, or a ``PromptEncoding`` whose rows are the prompts (free vectors, say).
    Under ``config.adversarial``, ``attacked[j]`` are the prompts the adversary perturbs on the examples of pool
    prompt j (default: the pool prompt itself); every other prompt is trained on as it is.
    ``run_key`` describes the run (method, concepts, settings that change the result) so that a checkpoint folder is
    only resumed by the same run. ``progress`` shows the bar (``None``: only on a terminal). The returned edit's
    ``factors`` are the exact adapters and ``deltas`` their products; ``info`` records steps, the final loss, the
    mean loss of every 100 steps, wall time and peak memory.

    The checkpoint folder is claimed for the run (``pipelines.files.claim_folder``, by process 0): a second run with
    the same ``checkpoint_dir`` fails at once (``FolderInUseError``) instead of writing and dropping checkpoints
    beside this one's.
    """
    from accelerate import Accelerator

    device = wrapper.device
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=config.mixed_precision)
    processes, rank = accelerator.num_processes, accelerator.process_index
    if processes > 1 and device != accelerator.device and device.type != "cpu":
        raise ValueError(f"process {rank} trains on {device}, but accelerate assigned it {accelerator.device}")
    with contextlib.ExitStack() as hold:
        if config.checkpoint_dir and accelerator.is_main_process:
            hold.enter_context(claim_folder(config.checkpoint_dir, option="checkpoint_dir"))
        return _train(wrapper, accelerator, pool_prompts, loss_fn, config, layers, run_key, progress, description,
                      attacked)  # fmt: skip


def _train(
    wrapper: PipelineWrapper,
    accelerator: Any,
    pool_prompts: Sequence[str] | PromptEncoding,
    loss_fn: LossFunction,
    config: LoraTrainConfig,
    layers: Sequence[str],
    run_key: dict[str, Any],
    progress: bool | None,
    description: str,
    attacked: Sequence[Sequence[str]] | None,
) -> WeightEdit:
    """``train_lora``'s run, under its claim on the checkpoint folder."""
    device = wrapper.device
    processes, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    folder = Path(config.checkpoint_dir) if config.checkpoint_dir else None
    wrapper.check_lora_rank(layers, config.rank)
    key = _run_key(wrapper, {**run_key, "processes": processes}, wrapper.lora_modules(layers))
    if folder is not None:
        if main:
            try:
                if config.restart:
                    _clear_checkpoints(folder)
                remove_stale_temporaries(folder)
                claim_checkpoint_folder(folder, key)
            except OSError as err:
                raise write_error(folder, err) from err
        accelerator.wait_for_everyone()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    generator = torch.Generator("cpu").manual_seed(config.seed)
    pool_start = time.perf_counter()
    pool = _pool(wrapper, pool_prompts, config, generator, folder if main else None)
    pool_seconds = time.perf_counter() - pool_start
    with wrapper.lora_adapters(layers, config.rank, config.alpha, generator=generator) as adapters:
        if rank:  # every process starts from the same adapters, then draws its own batches
            generator = torch.Generator("cpu").manual_seed(_process_seed(config.seed, rank))
        optimizer = torch.optim.Adam(adapters.parameters(), lr=config.lr)
        predictions = Predictions(wrapper, adapters)
        adversary = None
        if config.adversarial is not None:
            texts = pool_prompts.prompts if isinstance(pool_prompts, PromptEncoding) else list(pool_prompts)
            if attacked is None and isinstance(pool_prompts, PromptEncoding):
                raise ValueError("adversarial training on a pool of embeddings needs the attacked prompts (attacked)")
            groups = [[p] for p in texts] if attacked is None else [list(g) for g in attacked]
            if len(groups) != len(texts):
                raise ValueError(f"attacked has {len(groups)} groups for {len(texts)} pool prompts")
            with adapters.disabled():
                adversary = AdversarialSchedule(wrapper, adapters, config, groups)
        losses: list[float] = []
        seconds_before = 0.0
        resumed_from = 0
        latest = _latest_checkpoint(folder) if folder else None
        if latest is not None:
            saved: dict[str, torch.Tensor] = {}
            state = _load_checkpoint(latest, adapters, optimizer, generator, rank, saved)
            if adversary is not None:
                adversary.load(saved)
            if isinstance(getattr(loss_fn, "state", None), dict):
                loss_fn.state.clear()
                loss_fn.state.update({k.removeprefix("loss."): v for k, v in saved.items() if k.startswith("loss.")})
            losses, seconds_before = list(state["losses"]), float(state["seconds"])
            resumed_from = len(losses)
            if resumed_from > config.steps:
                raise ValueError(
                    f"{folder} holds a checkpoint at step {resumed_from}, beyond steps={config.steps}: ask for at "
                    "least as many steps, or choose another checkpoint_dir"
                )
            logger.info("resuming %s from step %d of %d", folder, resumed_from, config.steps)
        run_start = time.perf_counter()
        show = (None if main else False) if progress is None else (progress and main)
        bar = tqdm(total=config.steps, initial=resumed_from, desc=description, unit="step",
                   disable=None if show is None else not show)  # fmt: skip
        with bar:
            for step in range(resumed_from, config.steps):
                latents, timesteps, owners, initial = _draw(pool, config.batch_size, generator, device)
                batch = Batch(
                    latents.to(wrapper.dtype), timesteps, owners, generator, initial.to(wrapper.dtype), step, pool
                )
                if adversary is not None:
                    with accelerator.autocast():
                        predictions.perturbations = adversary.perturbations(
                            step, batch.latents, timesteps, owners, batch.initial, generator
                        )
                with accelerator.autocast():
                    loss = loss_fn(batch, predictions)
                optimizer.zero_grad(set_to_none=True)
                accelerator.backward(loss)
                loss = loss.detach()
                if processes > 1:  # gradient sync: every process takes the step of the mean gradient
                    for param in adapters.parameters():
                        param.grad = accelerator.reduce(param.grad, reduction="mean")
                    loss = accelerator.reduce(loss, reduction="mean")
                optimizer.step()
                losses.append(float(loss))
                bar.set_postfix(loss=f"{losses[-1]:.4g}")
                bar.update(1)
                done = step + 1
                if folder is not None and (done % config.checkpoint_every == 0 or done == config.steps):
                    seconds = seconds_before + time.perf_counter() - run_start
                    meta = {"step": done, "losses": losses, "seconds": seconds, "processes": processes}
                    states = _generator_states(accelerator, generator)
                    if main:
                        extra = adversary.tensors() if adversary is not None else {}
                        if isinstance(getattr(loss_fn, "state", None), dict):
                            extra.update(
                                {f"loss.{k}": v.detach().cpu().contiguous() for k, v in loss_fn.state.items()}
                            )
                        _save_checkpoint(folder, done, adapters, optimizer, states, meta, extra)
                    accelerator.wait_for_everyone()
        train_seconds = seconds_before + time.perf_counter() - run_start
        factors = adapters.factors()
        modules = list(adapters.names)
    peak, peak_kind = _peak_memory_mb(device)
    deltas = factor_products(factors)
    info = {
        "steps": config.steps,
        "final_loss": losses[-1] if losses else None,
        "loss_per_100_steps": [
            sum(losses[i : i + 100]) / len(losses[i : i + 100]) for i in range(0, len(losses), 100)
        ],
        "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - start + seconds_before,
        "pool_seconds": pool_seconds,
        "pool_examples": int(pool.latents.shape[0] * pool.latents.shape[1]),
        "peak_memory_mb": peak,
        "peak_memory_kind": peak_kind,
        "resumed_from_step": resumed_from,
        "processes": processes,
        "examples_per_step": config.batch_size * processes,
        "lora_modules": len(modules),
        "trainable_parameters": sum(a.numel() + b.numel() for a, b in factors.values()),
    }
    if adversary is not None:
        info["adversarial"] = adversary.info()
    return WeightEdit(deltas=deltas, info=info, factors=factors)


def _pool(
    wrapper: PipelineWrapper,
    prompts: Sequence[str] | PromptEncoding,
    config: LoraTrainConfig,
    generator: torch.Generator,
    folder: Path | None,
) -> TrainingPool:
    """The training pool; with a checkpoint folder it is sampled once and read back on resume.

    The pool's seeds are drawn either way, so the generator is in the same state after this whether the pool was
    sampled or read.
    """
    path = folder / _POOL_FILE if folder else None
    if path is not None and path.exists():
        torch.randint(0, 2**31 - 1, (_prompt_count(prompts) * config.pool_images,), generator=generator)
        return _read_pool(path, _prompt_count(prompts), config.pool_images)
    pool = sample_pool(wrapper, prompts, config, generator)
    if path is not None:
        _save_pool(path, pool)
    return pool


def _save_pool(path: Path, pool: TrainingPool) -> None:
    atomic_save_safetensors(pool.tensors(), path, digest=True)


def _read_pool(path: Path, prompts: int, images: int) -> TrainingPool:
    """The pool a checkpoint folder holds: ``images`` trajectories for each of ``prompts`` prompts, matching its
    digest; ``DamagedCheckpointError`` naming the file otherwise."""
    try:
        tensors = read_tensors(path, digest=True)
        pool = TrainingPool(tensors["latents"], tensors["timesteps"], tensors["owners"])
        owners = torch.arange(prompts).repeat_interleave(images)
        if not torch.equal(pool.owners, owners) or pool.latents.shape[:2] != (len(owners), len(pool.timesteps)):
            raise ValueError(f"it is not a pool of {images} trajectories for each of {prompts} prompts")
    except (ValueError, KeyError) as err:
        raise damaged_checkpoint(path, err) from None
    return pool


#: What every method of the LoRA trainer can do: keep preserved concepts as anchors (``anchor_prompts``, filled in
#: by the workflow), train, sample its pool with ``pool_steps`` sampler steps; ``quick``: a few large steps on a
#: small pool, seconds on the tiny model.
TRAINED = Capabilities(
    preserve=True,
    preserve_setting="anchor_prompts",
    training=True,
    sampler_steps=("pool_steps",),
    quick={"steps": 8, "lr": 1e-2, "pool_images": 2, "pool_steps": 4},
)


def config_key(
    config: Any, ignore: Sequence[str] = ("checkpoint_dir", "checkpoint_every", "restart", "steps")
) -> dict[str, Any]:
    """A config as a JSON-able dict without the fields that do not change the result (for ``run_key``).

    ``steps`` is left out because the first k steps of a run do not depend on how many follow (constant learning
    rate): rerunning with more steps and the same checkpoint folder continues a finished run. Without adversarial
    training the ``adversarial_*`` fields are left out too (they change nothing then).
    """
    clean = getattr(config, "adversarial", None) is None
    return {
        k: v
        for k, v in dataclasses.asdict(config).items()
        if k not in ignore and not (clean and k.startswith("adversarial"))
    }
