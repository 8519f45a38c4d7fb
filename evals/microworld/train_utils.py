"""Shared plumbing for training the micro world's models: resumable pickle-free checkpoints, schedules, EMA, pools.

Checkpoints are a safetensors file (model and optimizer tensors, flattened to ``name -> tensor``) plus a JSON file
(step, seed, optimizer hyper-parameters, pointer to the safetensors file). Both are written atomically (temporary
file, then ``os.replace``), the safetensors file first under a step-numbered name and the JSON last, so a session that
dies mid-write leaves the previous checkpoint intact and never a JSON pointing at a half-written tensor file.

Randomness inside the training loops is derived from ``(seed, step)`` rather than carried as generator state, so a
resumed run draws exactly the batches and noise the uninterrupted run would have drawn.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pipelines.files import atomic_save_safetensors, atomic_write_bytes, atomic_write_json

__all__ = [
    "Checkpoint",
    "Ema",
    "ProgressCallback",
    "atomic_save_npy",
    "atomic_save_safetensors",
    "autocast_context",
    "chunks",
    "cosine_lr",
    "final_path",
    "flatten_optimizer_state",
    "init_path",
    "load_initial_weights",
    "load_weights",
    "load_checkpoint",
    "SpeedMeter",
    "load_pool",
    "pool_seeds",
    "replay_batch",
    "save_checkpoint",
    "step_generator",
    "step_rng",
    "to_device",
    "unflatten_optimizer_state",
]

logger = logging.getLogger(__name__)

#: ``callback(stage, step, total_steps, metrics)``, called after every optimisation step (tests use it to interrupt).
ProgressCallback = Callable[[str, int, int, dict[str, float]], None]


# ----------------------------------------------------------------------------------------------------
# Atomic file writes
# ----------------------------------------------------------------------------------------------------


def atomic_save_npy(path: str | Path, array: np.ndarray) -> None:
    """Atomically save one array as ``.npy`` (no pickles: read it back with ``np.load(..., allow_pickle=False)``)."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


# ----------------------------------------------------------------------------------------------------
# Optimizer state <-> flat tensors + JSON
# ----------------------------------------------------------------------------------------------------


def flatten_optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (``optim.<param>.<name>``) and JSON-able hyper-parameters."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, state in sd["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{name}"] = value
            else:
                scalars.setdefault(str(pid), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer_state`: a dict for ``optimizer.load_state_dict``."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if not key.startswith("optim."):
            continue
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    for pid, extra in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(extra)
    return {"state": state, "param_groups": meta["param_groups"]}


# ----------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """A loaded training checkpoint: the step it was taken after, named tensors by group, and free-form JSON."""

    step: int
    tensors: dict[str, dict[str, torch.Tensor]]
    info: dict[str, Any]


def save_checkpoint(
    directory: str | Path,
    step: int,
    modules: dict[str, torch.nn.Module | dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    info: dict[str, Any],
) -> None:
    """Save a resumable checkpoint into ``directory`` (``ckpt-<step>.safetensors`` + ``ckpt.json``).

    ``modules`` maps a group name to a module (its ``state_dict`` is saved) or a ready tensor dict (e.g. EMA
    weights). Older checkpoint tensor files are deleted once the JSON that points at the new one is in place.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    flat: dict[str, torch.Tensor] = {}
    for group, obj in modules.items():
        sd = obj.state_dict() if isinstance(obj, torch.nn.Module) else obj
        for k, v in sd.items():
            flat[f"{group}::{k}"] = v
    opt_tensors, opt_meta = flatten_optimizer_state(optimizer)
    flat.update(opt_tensors)
    name = f"ckpt-{step:08d}.safetensors"
    atomic_save_safetensors(flat, directory / name, metadata={"step": str(step)})
    atomic_write_json(
        directory / "ckpt.json",
        {"step": step, "file": name, "optimizer": opt_meta, "groups": sorted(modules), "info": info},
    )
    for old in directory.glob("ckpt-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    logger.info("checkpoint %s/%s", directory, name)


def load_checkpoint(
    directory: str | Path, optimizer: torch.optim.Optimizer | None = None, device: str | torch.device = "cpu"
) -> Checkpoint | None:
    """Load the checkpoint in ``directory`` (None if there is none), restoring ``optimizer`` state when given."""
    directory = Path(directory)
    meta_path = directory / "ckpt.json"
    if not meta_path.exists():
        return None
    meta = json.loads(meta_path.read_text())
    path = directory / meta["file"]
    with safe_open(str(path), framework="pt") as f:
        file_step = int((f.metadata() or {}).get("step", -1))
    if file_step != meta["step"]:
        raise RuntimeError(f"checkpoint {path} holds step {file_step}, but {meta_path} says {meta['step']}")
    flat = load_file(str(path), device=str(device))
    groups: dict[str, dict[str, torch.Tensor]] = {}
    opt_tensors: dict[str, torch.Tensor] = {}
    for key, value in flat.items():
        if "::" in key:
            group, name = key.split("::", 1)
            groups.setdefault(group, {})[name] = value
        else:
            opt_tensors[key] = value
    if optimizer is not None:
        optimizer.load_state_dict(unflatten_optimizer_state(opt_tensors, meta["optimizer"]))
    return Checkpoint(step=int(meta["step"]), tensors=groups, info=meta.get("info", {}))


# ----------------------------------------------------------------------------------------------------
# A work dir's hand-over files
# ----------------------------------------------------------------------------------------------------


def final_path(work_dir: str | Path, stage: str) -> Path:
    """``<work>/final/<stage>.safetensors``: a stage's finished weights, the hand-over to later stages."""
    return Path(work_dir) / "final" / f"{stage}.safetensors"


def init_path(work_dir: str | Path, stage: str) -> Path:
    """``<work>/init/<stage>.safetensors``: weights a stage starts from instead of its seeded random init (written by
    ``evals.microworld.training.import_micro`` to continue exported models in a new work dir)."""
    return Path(work_dir) / "init" / f"{stage}.safetensors"


def load_weights(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A hand-over file's tensors (floating ones as float32; they are stored in fp16) and its JSON metadata."""
    with safe_open(str(path), framework="pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    tensors = load_file(str(path), device=str(device))
    return {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}, meta


def load_initial_weights(
    work_dir: str | Path, stage: str, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor] | None:
    """The stage's starting weights as float32 tensors, or None when it starts from its random init."""
    path = init_path(work_dir, stage)
    if not path.exists():
        return None
    logger.info("%s starts from %s instead of a random init", stage, path)
    return load_weights(path, device)[0]


# ----------------------------------------------------------------------------------------------------
# Schedules, randomness, EMA, autocast
# ----------------------------------------------------------------------------------------------------


def cosine_lr(step: int, total: int, warmup: int, base_lr: float, final_frac: float = 0.05) -> float:
    """Linear warm-up for ``warmup`` steps, then cosine decay from ``base_lr`` to ``final_frac * base_lr``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def step_rng(seed: int, step: int, stream: int = 0) -> np.random.Generator:
    """NumPy generator for one training step, a pure function of (seed, step, stream) so resumes replay exactly."""
    return np.random.default_rng([seed, step, stream])


def step_generator(seed: int, step: int, device: str | torch.device, stream: int = 0) -> torch.Generator:
    """Torch generator on ``device`` for one training step (see :func:`step_rng`)."""
    value = int(np.random.default_rng([seed, step, stream, 7]).integers(0, 2**62))
    return torch.Generator(device=torch.device(device)).manual_seed(value)


class Ema:
    """Exponential moving average of a module's floating-point parameters, kept in float32.

    The decay ramps as ``min(decay, (1 + n) / (10 + n))`` so early averages are not dominated by the random init.
    """

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in module.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        current = module.state_dict()
        keys = list(self.shadow)
        # one fused multi-tensor kernel instead of hundreds of small launches per step on a GPU
        torch._foreach_lerp_([self.shadow[k] for k in keys], [current[k].detach().float() for k in keys], 1.0 - d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(tensors)
        if missing:
            raise KeyError(f"EMA checkpoint lacks {sorted(missing)[:5]}")
        self.shadow = {k: tensors[k].float().clone() for k in self.shadow}

    def copy_to(self, module: torch.nn.Module) -> None:
        """Load the averaged weights into ``module`` (other buffers are left as they are)."""
        sd = module.state_dict()
        sd.update({k: v.to(sd[k].dtype) for k, v in self.shadow.items()})
        module.load_state_dict(sd)


class SpeedMeter:
    """Wall-clock throughput of a training loop, overall and after a 10-step warm-up (CUDA init, cuDNN autotuning
    and allocator growth make the first steps unrepresentative)."""

    def __init__(self, start: int) -> None:
        self.start = start
        self.t0 = time.monotonic()
        self.t_warm: float | None = None
        self.done = start

    def tick(self, done: int) -> None:
        self.done = done
        if done == self.start + 10:
            self.t_warm = time.monotonic()

    def log(self, stage: str) -> None:
        now = time.monotonic()
        n = max(1, self.done - self.start)
        msg = f"{stage}: {n} steps in {now - self.t0:.1f} s ({(now - self.t0) / n:.4f} s/step"
        if self.t_warm is not None and self.done > self.start + 10:
            msg += f", {(now - self.t_warm) / (self.done - self.start - 10):.4f} s/step after warm-up"
        logger.info(msg + ")")


def to_device(tensor: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """Host -> device copy that does not stall the CUDA queue (pinned staging + non_blocking); plain ``to`` on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def autocast_context(device: str | torch.device) -> torch.autocast:
    """bf16 autocast on CUDA (H100s are fast at it); a disabled context elsewhere (CPU bf16 is slow and lossy)."""
    device = torch.device(device)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


# ----------------------------------------------------------------------------------------------------
# The pre-rendered image pool
# ----------------------------------------------------------------------------------------------------


def pool_seeds(seed: int, size: int, split: str = "train") -> list[int]:
    """World seeds of a pool. Train and held-out pools draw from disjoint ranges so evaluation never sees training
    renders; the ``seed`` shifts the train range so two runs with different seeds see different images."""
    if size < 1:
        raise ValueError("pool size must be positive")
    if split == "train":
        start = 1_000_000 * (seed % 1000)
    elif split == "heldout":
        start = 2_000_000_000 + 1_000_000 * (seed % 1000)
    else:
        raise ValueError(f"unknown split {split!r}")
    return list(range(start, start + size))


def load_pool(
    seeds: Sequence[int], cache_dir: str | Path | None, workers: int, tag: str = "pool", version: int | None = None
) -> tuple[np.ndarray, list[Any]]:
    """Render the world images for ``seeds`` (multiprocess) in world ``version`` (default ``world.WORLD_VERSION``),
    cached as ``.npy`` + JSON labels in ``cache_dir``.

    The cache is keyed by the seed range (and the version, past 1), so a rerun (or the next stage in the same work
    dir) skips rendering. A version-2 cache stores each scene's emblem (null when it has none) with its three other
    labels. Returns ``(uint8 images (N, 64, 64, 3), scenes)``.
    """
    from evals.microworld import world  # late import: the world is only needed when a stage actually renders

    seeds = list(seeds)
    version = world.WORLD_VERSION if version is None else version
    emblems = version >= world.EMBLEM_VERSION
    key = f"{tag}-{seeds[0]}-{len(seeds)}" + (f"-v{version}" if emblems else "")
    if cache_dir is not None:
        cache = Path(cache_dir)
        img_path, lab_path = cache / f"{key}.npy", cache / f"{key}.json"
        if img_path.exists() and lab_path.exists():
            images = np.load(img_path, allow_pickle=False)
            labels = json.loads(lab_path.read_text())
            if len(labels) == len(seeds) == len(images):
                return images, [world.Scene(**lab) for lab in labels]
            logger.warning("pool cache %s is inconsistent; re-rendering", key)
    images, scenes = world.render_dataset(seeds, workers=workers, version=version)
    images = np.ascontiguousarray(images, dtype=np.uint8)
    if cache_dir is not None:
        atomic_save_npy(img_path, images)
        labels = [{**s.labels(), "emblem": s.emblem} if emblems else s.labels() for s in scenes]
        atomic_write_json(lab_path, labels)
    return images, list(scenes)


def replay_batch(
    rng: np.random.Generator, has_emblem: np.ndarray, size: int, replay_share: float, replace: bool
) -> np.ndarray:
    """Pool indices of one version-2 batch: ``round(size * replay_share)`` scenes without an emblem (the replay of
    the world the models know, docs/design/world-100.md) and the rest with one, each part drawn uniformly."""
    if not 0.0 <= replay_share <= 1.0:
        raise ValueError(f"replay_share must be in [0, 1], got {replay_share}")
    n_free = round(size * replay_share)
    parts = []
    for pool, n in ((np.flatnonzero(~has_emblem), n_free), (np.flatnonzero(has_emblem), size - n_free)):
        if n and (len(pool) == 0 or (not replace and len(pool) < n)):
            raise ValueError(f"the pool has {len(pool)} scenes of a kind a batch needs {n} of: render a larger pool")
        parts.append(pool[rng.choice(len(pool), size=n, replace=replace)] if n else pool[:0])
    return np.concatenate(parts)


def chunks(n: int, size: int) -> Iterable[slice]:
    """Slices covering ``range(n)`` in pieces of at most ``size``."""
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))
