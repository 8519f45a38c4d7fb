"""The sparse autoencoder the SAE family reads activations with: a TopK SAE, its training, its files and its store.

The model (Gao et al., 2024, "Scaling and evaluating sparse autoencoders")::

    z     = TopK(ReLU(W_enc (x - b_dec) + b_enc))        k of ``latents`` features are non-zero
    x_hat = W_dec z + b_dec                               the rows of W_dec (one per feature) have unit norm

trained on ``FVU(x, x_hat) + aux_coef * AuxK`` where FVU is the fraction of variance unexplained and AuxK asks the
``aux_k`` largest pre-activations of *dead* features (none fired in the last ``dead_tokens`` tokens) to reconstruct
the residual ``x - x_hat``, which revives them. Training follows SAeUron's trainer (``cywinski/SAeUron``,
``SAE/trainer.py``): Adam (eps 6.25e-10) with a linearly decaying learning rate, gradient clipping at 1, the decoder
initialised as the encoder's transpose, its rows renormalised after every step and the gradient parallel to each row
removed, ``b_dec`` started at the geometric median of the first batch. We differ in two places: TopK is per token in
training as at inference (SAeUron trains with batch-TopK and infers per token), and the dead-feature window is
counted in tokens seen by this run, with a default scaled to our small datasets (reference: 10M tokens).

A trained SAE is a folder: ``sae.safetensors`` (the four tensors), ``sae.json`` (hook point, sizes, the fingerprint of
the model component it reads, the collection settings, its quality) and ``prompts.txt`` (what it was trained on).
``find_sae`` looks one up by hook point and component fingerprint, so a shipped SAE is found for the model whose
weights it was trained on, whatever that model is called.

Quality floor (``sae_quality_problems``): an SAE whose fraction of variance unexplained on held-out tokens is 1 or
more explains less than the activations' mean, and one trained on fewer tokens than it has features cannot have
learnt them; neither is a result. ``build_sae`` refuses to save such an SAE unless forced (to look at it), and
neither a method (``resolve_sae``) nor an artifact's intervention uses one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from pipelines import DEFAULT_GUIDANCE, DEFAULT_STEPS, PipelineWrapper
from pipelines.files import (
    atomic_save_safetensors,
    atomic_write_bytes,
    atomic_write_json,
    damaged_checkpoint,
    file_sha256,
    read_json_object,
    read_safetensors_metadata,
    read_tensors,
    remove_stale_temporaries,
)

from ..core.inputs import check_number_fields
from ..core.layout import current_umask

__all__ = [
    "pinned_sae",
    "SAE_FILE",
    "SAE_METADATA",
    "SAETrainConfig",
    "TopKSAE",
    "build_sae",
    "collect_activations",
    "component_fingerprint",
    "find_sae",
    "fraction_of_variance_unexplained",
    "load_sae",
    "resolve_sae",
    "sae_prompts",
    "sae_quality_problems",
    "save_sae",
    "shipped_sae_store",
    "train_sae",
]

logger = logging.getLogger(__name__)

SAE_FILE = "sae.safetensors"
SAE_METADATA = "sae.json"
PROMPTS_FILE = "prompts.txt"
_CHECKPOINT_FILE = "checkpoint.safetensors"
_CHECKPOINT_STATE = "checkpoint.json"


class TopKSAE(torch.nn.Module):
    """z = TopK(ReLU(W_enc (x - b_dec) + b_enc)), x_hat = W_dec z + b_dec, with unit-norm decoder rows."""

    def __init__(self, d_in: int, latents: int, k: int) -> None:
        super().__init__()
        if not 0 < k <= latents:
            raise ValueError(f"k must be in [1, latents={latents}], got {k}")
        self.d_in, self.latents, self.k = d_in, latents, k
        self.encoder = torch.nn.Linear(d_in, latents)
        self.W_dec = torch.nn.Parameter(self.encoder.weight.detach().clone())  # (latents, d_in): one row per feature
        self.b_dec = torch.nn.Parameter(torch.zeros(d_in))
        with torch.no_grad():
            self.encoder.bias.zero_()
            self.normalize_decoder()

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.encoder(x - self.b_dec))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The sparse code z: the k largest ReLU pre-activations of each token, zeros elsewhere."""
        pre = self.pre_activations(x)
        top = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, top.indices, top.values)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def fraction_of_variance_unexplained(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over a batch of tokens (rows)."""
    return (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)


def _geometric_median(x: torch.Tensor, iterations: int = 50) -> torch.Tensor:
    """Weiszfeld's iteration: the point minimising the summed distance to the rows of ``x``."""
    median = x.mean(0)
    for _ in range(iterations):
        weights = 1.0 / (x - median).norm(dim=1).clamp_min(1e-8)
        median = (weights[:, None] * x).sum(0) / weights.sum()
    return median


@dataclass
class SAETrainConfig:
    """How an SAE is trained. Defaults: SAeUron's (``cywinski/SAeUron`` README and ``SAE/config.py``).

    Attributes:
        expansion: latents per input dimension (SAeUron 16; ItD's released text-encoder SAE is far wider).
        k: features active per token (SAeUron 32; ItD 64).
        lr: Adam's learning rate, decayed linearly to 0 over the run (SAeUron 4e-4).
        batch_size: tokens per step (SAeUron 4096).
        epochs: passes over the collected tokens (SAeUron 5-10).
        aux_k: dead features asked to explain the residual (``None``: half the input width, as SAeUron).
        aux_coef: weight of that auxiliary loss (1/32).
        dead_tokens: a feature that fired in none of this many recent tokens is dead (reference 10M; ours is
            scaled to datasets of a few hundred thousand tokens).
        seed: seeds the initialisation and the batch order.
    """

    NUMBER_RANGES: ClassVar[dict[str, str]] = {
        "expansion": ">= 1", "k": ">= 1", "lr": "(0, 1)", "batch_size": ">= 1", "epochs": ">= 1", "aux_k": ">= 1",
        "aux_coef": ">= 0", "dead_tokens": ">= 1", "seed": ">= 0",
    }  # fmt: skip

    expansion: int = 16
    k: int = 32
    lr: float = 4e-4
    batch_size: int = 4096
    epochs: int = 10
    aux_k: int | None = None
    aux_coef: float = 1 / 32
    dead_tokens: int = 200_000
    seed: int = 0

    def __post_init__(self) -> None:
        check_number_fields(self)


def _aux_loss(sae: TopKSAE, x: torch.Tensor, x_hat: torch.Tensor, pre: torch.Tensor, dead: torch.Tensor, aux_k: int):
    """AuxK: the residual x - x_hat reconstructed by the ``aux_k`` largest pre-activations among dead features,
    as a fraction of the residual's variance, scaled down while fewer than ``aux_k`` features are dead."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return x.new_zeros(())
    k = min(aux_k, n_dead)
    masked = pre.masked_fill(~dead, 0.0)
    top = masked.topk(k, dim=-1)
    z = torch.zeros_like(pre).scatter_(-1, top.indices, top.values)
    residual = (x - x_hat).detach()
    return fraction_of_variance_unexplained(residual, z @ sae.W_dec) * min(n_dead / aux_k, 1.0)


def train_sae(
    activations: torch.Tensor,
    config: SAETrainConfig,
    *,
    device: str | torch.device = "cpu",
    checkpoint_dir: str | Path | None = None,
    restart: bool = False,
    progress: bool = False,
) -> tuple[TopKSAE, dict[str, Any]]:
    """Train a TopK SAE on ``activations`` (tokens x width); returns it with its training statistics.

    With ``checkpoint_dir`` the run is checkpointed after every epoch (one safetensors file, its state in the header,
    written atomically) and rerunning the same call resumes from the last epoch; a checkpoint of other settings or
    other data is refused, a damaged one named (``DamagedCheckpointError``). ``restart`` deletes the checkpoint
    first.
    """
    if activations.dim() != 2 or activations.shape[0] < 2:
        raise ValueError(f"activations must be (tokens, width) with at least 2 tokens, got {tuple(activations.shape)}")
    if not torch.isfinite(activations).all():
        raise ValueError("the activations hold NaN or infinite values")
    device = torch.device(device)
    tokens, d_in = activations.shape
    generator = torch.Generator("cpu").manual_seed(config.seed)
    torch_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(config.seed)  # nn.Linear's initialisation draws from the global generator
        sae = TopKSAE(d_in, config.expansion * d_in, config.k)
    finally:
        torch.random.set_rng_state(torch_state)
    sae.to(device)
    aux_k = config.aux_k or max(1, d_in // 2)
    optimizer = torch.optim.Adam(sae.parameters(), lr=config.lr, eps=6.25e-10)
    steps_per_epoch = math.ceil(tokens / config.batch_size)
    total = steps_per_epoch * config.epochs
    since_fired = torch.zeros(sae.latents, dtype=torch.long, device=device)
    run_key = hashlib.sha256(
        json.dumps(dataclasses.asdict(config), sort_keys=True).encode()
        + activations[:: max(1, tokens // 1024)].numpy().tobytes()
        + str(tuple(activations.shape)).encode()
    ).hexdigest()
    history: list[float] = []
    start_epoch = 0
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if folder is not None and restart:
        for name in (_CHECKPOINT_FILE, _CHECKPOINT_STATE):
            (folder / name).unlink(missing_ok=True)
    if folder is not None:
        remove_stale_temporaries(folder)
    if folder is not None and (folder / _CHECKPOINT_FILE).exists():
        start_epoch, history, generator = _resume(folder, run_key, sae, optimizer, since_fired)
        logger.info("resuming SAE training at epoch %d of %d", start_epoch, config.epochs)
    else:
        with torch.no_grad():
            first = activations[torch.randperm(tokens, generator=generator)[: config.batch_size]].to(device)
            sae.b_dec.copy_(_geometric_median(first))
    bar = tqdm(total=total, initial=start_epoch * steps_per_epoch, desc="train SAE", unit="step", disable=not progress)
    try:
        for epoch in range(start_epoch, config.epochs):
            order = torch.randperm(tokens, generator=generator)
            losses = []
            for i in range(steps_per_epoch):
                for group in optimizer.param_groups:  # linear decay to 0 over the run
                    group["lr"] = config.lr * (1.0 - (epoch * steps_per_epoch + i) / total)
                x = activations[order[i * config.batch_size : (i + 1) * config.batch_size]].to(device)
                pre = sae.pre_activations(x)
                top = pre.topk(sae.k, dim=-1)
                z = torch.zeros_like(pre).scatter_(-1, top.indices, top.values)
                x_hat = sae.decode(z)
                fvu = fraction_of_variance_unexplained(x, x_hat)
                fired = torch.zeros(sae.latents, dtype=torch.bool, device=device)
                fired[top.indices[top.values > 0].unique()] = True
                since_fired += x.shape[0]
                since_fired[fired] = 0
                dead = since_fired >= config.dead_tokens
                loss = fvu + config.aux_coef * _aux_loss(sae, x, x_hat, pre, dead, aux_k)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                with torch.no_grad():  # no gradient along each decoder row: the step keeps it (near) unit-norm
                    grad = sae.W_dec.grad
                    grad -= (grad * sae.W_dec).sum(1, keepdim=True) * sae.W_dec
                torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
                optimizer.step()
                sae.normalize_decoder()
                losses.append(float(fvu.detach()))
                bar.update(1)
                bar.set_postfix(fvu=f"{losses[-1]:.3f}", dead=int(dead.sum()))
            history.append(sum(losses) / len(losses))
            logger.info("SAE epoch %d: mean FVU %.4f, %d dead features", epoch + 1, history[-1], int(dead.sum()))
            if folder is not None:
                _checkpoint(folder, run_key, epoch + 1, history, generator, sae, optimizer, since_fired)
    finally:
        bar.close()
    sae.eval().requires_grad_(False)
    stats = {"epochs": config.epochs, "steps": total, "tokens": tokens, "fvu_by_epoch": history,
             "dead_at_end": int((since_fired >= config.dead_tokens).sum())}  # fmt: skip
    return sae, stats


def _checkpoint(folder, run_key, epoch, history, generator, sae, optimizer, since_fired) -> None:  # noqa: ANN001
    """One file, its state (run, epoch, losses) in the safetensors header: tensors and state are replaced together."""
    tensors = {f"sae.{k}": v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}
    tensors["since_fired"] = since_fired.cpu()
    tensors["generator"] = generator.get_state()
    for i, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"adam.{i}.{key}"] = torch.as_tensor(value).cpu().contiguous()
    state = {"run": run_key, "epoch": epoch, "history": history}
    atomic_save_safetensors(tensors, folder / _CHECKPOINT_FILE, metadata={"state": json.dumps(state)}, digest=True)


def _resume(folder, run_key, sae, optimizer, since_fired):  # noqa: ANN001, ANN202
    """Restore a checkpoint: ``DamagedCheckpointError`` naming the file when it cannot be read back, or does not
    match the digest of its tensors and state that it carries."""
    path = folder / _CHECKPOINT_FILE
    try:
        tensors = read_tensors(path, digest=True)
        state = json.loads(read_safetensors_metadata(path)["state"])
        if not isinstance(state, dict) or not isinstance(state.get("history"), list):
            raise ValueError("its state is not a record of epochs")
        epoch = state["epoch"]
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch != len(state["history"]):
            raise ValueError(f"epoch {epoch!r} is not the count of its {len(state['history'])} epochs")
    except (ValueError, KeyError) as err:
        raise damaged_checkpoint(path, err) from None
    if state.get("run") != run_key:
        raise ValueError(
            f"{folder} holds a checkpoint of another SAE run (other settings or data); use another folder"
        )
    try:
        sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
        since_fired.copy_(tensors["since_fired"])
        generator = torch.Generator("cpu")
        generator.set_state(tensors["generator"])
        opt_state = optimizer.state_dict()
        for i in range(len(list(sae.parameters()))):
            entry = {key.split(".", 2)[2]: value for key, value in tensors.items() if key.startswith(f"adam.{i}.")}
            if entry:
                opt_state["state"][i] = entry
        optimizer.load_state_dict(opt_state)
    except (KeyError, RuntimeError, ValueError, TypeError) as err:
        raise damaged_checkpoint(path, err) from None
    return epoch, list(state["history"]), generator


# ---------------------------------------------------------------------------------------------------- files
def save_sae(sae: TopKSAE, folder: str | Path, metadata: dict[str, Any], prompts: Sequence[str] = ()) -> Path:
    """Write an SAE folder (each file atomically): weights, ``sae.json`` and the training prompts."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {"encoder.weight": sae.encoder.weight, "encoder.bias": sae.encoder.bias, "W_dec": sae.W_dec,
               "b_dec": sae.b_dec}  # fmt: skip
    path = folder / SAE_FILE
    atomic_save_safetensors({k: v.float() for k, v in weights.items()}, path)
    path.chmod(0o666 & ~current_umask())  # safetensors writes 0600; an SAE store is shared like any file
    meta = {**metadata, "d_in": sae.d_in, "latents": sae.latents, "k": sae.k, "sha256": file_sha256(path)}
    if prompts:
        atomic_write_bytes(folder / PROMPTS_FILE, ("\n".join(prompts) + "\n").encode())
    atomic_write_json(folder / SAE_METADATA, meta)
    return folder


def load_sae(folder: str | Path) -> tuple[TopKSAE, dict[str, Any]]:
    """Read an SAE folder; ``ValueError`` in one line when it is missing, corrupt or inconsistent."""
    folder = Path(folder)
    meta_path, path = folder / SAE_METADATA, folder / SAE_FILE
    if not meta_path.is_file() or not path.is_file():
        raise ValueError(f"{folder} is not an SAE folder (needs {SAE_METADATA} and {SAE_FILE})")
    meta = read_json_object(meta_path)
    if not all(isinstance(meta.get(k), int) and not isinstance(meta[k], bool) for k in ("d_in", "latents", "k")):
        raise ValueError(f"{meta_path} lacks the SAE's sizes (d_in, latents, k)")
    if not isinstance(meta.get("sha256"), str):
        raise ValueError(f"{meta_path} records no sha256 of {SAE_FILE}: it cannot be checked")
    if file_sha256(path) != meta["sha256"]:
        raise ValueError(f"{path} does not match the sha256 in {SAE_METADATA}: the file was changed")
    tensors = read_tensors(path)
    sae = TopKSAE(meta["d_in"], meta["latents"], meta["k"])
    expected = {"encoder.weight": (sae.latents, sae.d_in), "encoder.bias": (sae.latents,),
                "W_dec": (sae.latents, sae.d_in), "b_dec": (sae.d_in,)}  # fmt: skip
    for key, shape in expected.items():
        if key not in tensors or tuple(tensors[key].shape) != shape:
            raise ValueError(f"{path}: {key} must have shape {shape}")
    with torch.no_grad():
        sae.encoder.weight.copy_(tensors["encoder.weight"])
        sae.encoder.bias.copy_(tensors["encoder.bias"])
        sae.W_dec.copy_(tensors["W_dec"])
        sae.b_dec.copy_(tensors["b_dec"])
    return sae.eval().requires_grad_(False), meta


def sae_quality_problems(meta: dict[str, Any]) -> list[str]:
    """Why an SAE (its ``sae.json``) is below the quality floor, one phrase per reason; empty when it is not."""
    quality = meta.get("quality")
    if not isinstance(quality, dict):
        return ["it records no quality (an SAE from scripts/train_sae.py does)"]
    problems = []
    fvu = quality.get("fvu")
    if isinstance(fvu, bool) or not isinstance(fvu, int | float) or not math.isfinite(fvu) or fvu >= 1:
        problems.append(f"its fraction of variance unexplained is {fvu!r} (>= 1: it explains less than the mean)")
    tokens, latents = quality.get("training_tokens"), meta.get("latents")
    if tokens is None and isinstance(meta.get("collection"), dict):  # SAEs written before training_tokens
        tokens = meta["collection"].get("tokens", 0) - quality.get("held_out_tokens", 0)
    if isinstance(latents, int) and (not isinstance(tokens, int) or tokens < latents):
        problems.append(f"it was trained on {tokens} tokens, fewer than its {latents} features")
    return problems


def sae_prompts(folder: str | Path) -> list[str]:
    """The prompts an SAE was trained on (empty if it records none)."""
    path = Path(folder) / PROMPTS_FILE
    return [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def shipped_sae_store() -> Path:
    """The SAEs that ship with the package (``pipelines/saes/``), one folder per (model, hook point)."""
    import pipelines

    return Path(pipelines.__file__).resolve().parent / "saes"


def component_fingerprint(wrapper: PipelineWrapper, hook: str) -> str:
    """sha256 of the weights of the pipeline component a hook point sits in (what its activations depend on)."""
    return wrapper.fingerprint([hook.partition(".")[0]])


def find_sae(wrapper: PipelineWrapper, hook: str, stores: Sequence[str | Path] = ()) -> Path | None:
    """The first SAE folder in ``stores`` (then the shipped store) trained on ``hook`` of this pipeline's weights.
    ``ValueError`` when a store given is no folder: a mistyped one would fall through to the shipped SAEs."""
    wrapper.hook_point(hook)
    for store in map(Path, stores):
        if not store.is_dir():
            raise ValueError(f"the SAE store {store} is not a folder (sae_stores names folders of SAE folders)")
    fingerprint = None
    for store in [*map(Path, stores), shipped_sae_store()]:
        for meta_path in sorted(store.glob(f"*/{SAE_METADATA}")) if store.is_dir() else []:
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, json.JSONDecodeError, UnicodeDecodeError):
                continue
            if not isinstance(meta, dict) or meta.get("hook_point") != hook:
                continue
            fingerprint = fingerprint or component_fingerprint(wrapper, hook)
            if meta.get("component_fingerprint") == fingerprint:
                return meta_path.parent
    return None


def pinned_sae(wrapper: PipelineWrapper, config: Any, default_hook: Callable[[PipelineWrapper], str]) -> Any:
    """``config`` (an SAE method's: ``sae``, ``sae_stores``, ``hook_point``) with ``sae`` naming the folder
    ``find_sae`` picks for the pipeline's weights as they are now; as it is when it names one already or none is found
    (``resolve_sae`` then says what to do). A stack (``erase.stack``) calls it on the unedited model, whose weights
    the SAE was trained on, before earlier members change them."""
    if config.sae is not None:
        return config
    folder = find_sae(wrapper, config.hook_point or default_hook(wrapper), config.sae_stores)
    return config if folder is None else dataclasses.replace(config, sae=str(folder))


def resolve_sae(
    wrapper: PipelineWrapper, hook: str, sae: str | Path | None, stores: Sequence[str | Path] = ()
) -> tuple[TopKSAE, dict[str, Any], list[str]]:
    """The SAE a method reads ``hook`` with, its metadata and its training prompts: the folder ``sae``, or the one
    ``find_sae`` finds for this pipeline's weights. ``ValueError`` saying how to train one when there is none."""
    if sae is None:
        folder = find_sae(wrapper, hook, stores)
        if folder is None:
            raise ValueError(
                f"no SAE trained on {hook} of this model's weights: train one with scripts/train_sae.py "
                f"--model <this model> --hook {hook}, then pass --set sae=<its folder>"
            )
    else:
        folder = Path(sae)
    model, meta = load_sae(folder)
    problems = sae_quality_problems(meta)
    if problems:
        raise ValueError(f"the SAE in {folder} is below the quality floor, no result to use: {'; '.join(problems)}; "
                         "train it on more prompts (scripts/train_sae.py)")  # fmt: skip
    if meta.get("hook_point") != hook:
        raise ValueError(f"the SAE in {folder} reads {meta.get('hook_point')}, not {hook}")
    width = wrapper.hook_width(hook)
    if width != model.d_in:
        raise ValueError(f"the SAE in {folder} reads width {model.d_in}, but {hook} has width {width}")
    return model, meta, sae_prompts(folder)


# ---------------------------------------------------------------------------------------------------- collection
def collect_activations(
    wrapper: PipelineWrapper,
    hook: str,
    prompts: Sequence[str],
    *,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    batch_size: int = 8,
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Tokens x width activations of ``hook`` over ``prompts``, the SAE's training data.

    A text-encoder hook point gives every token of every prompt but CLIP's start token (whose activation is the same
    for every prompt; T5 has none); a denoiser hook point gives every image token (a UNet block's spatial position,
    an SD3/Flux block's image token) at every sampling step of one image per prompt (seeds ``seed``, ``seed + 1``,
    ...), conditional half (SAeUron). With ``cache_dir`` the result is kept as safetensors under a key of everything
    it depends on, and reused.
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts to collect activations over")
    is_text = hook.partition(".")[0].startswith("text_encoder")
    settings = {"hook": hook, "prompts": prompts, "fingerprint": component_fingerprint(wrapper, hook)}
    if not is_text:
        settings |= {"seed": seed, "steps": steps, "guidance": guidance}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"activations-{key}.safetensors" if cache_dir is not None else None
    if path is not None and path.exists():
        try:
            cached = read_tensors(path, digest=True).get("activations")
            if cached is None or cached.dim() != 2 or cached.dtype != torch.float16:
                raise ValueError(f"{path} holds no float16 tokens x width activations")
            if cached.shape[1] != wrapper.hook_width(hook):
                raise ValueError(f"{path} holds activations of width {cached.shape[1]}, not {hook}'s")
            logger.info("reusing cached activations %s", path)
            return cached.float()
        except ValueError as err:  # a cache: what cannot be read back is collected again, and replaced
            logger.warning("%s; collecting the activations again", err)
    if is_text:
        first = wrapper.start_tokens(hook.partition(".")[0])  # CLIP's start token is left out; T5 has none
        acts = wrapper.text_activations(hook, prompts, batch_size=max(batch_size, 64))[:, first:]
        tokens = acts.reshape(-1, acts.shape[-1])
    else:
        seeds = [seed + i for i in range(len(prompts))]
        acts, _ = wrapper.unet_activations(hook, prompts, seeds, steps=steps, guidance=guidance,
                                           batch_size=batch_size, progress=progress)  # fmt: skip
        tokens = acts.reshape(-1, acts.shape[-1])
    tokens = tokens.half()  # what the cache keeps: a rerun trains on the same numbers whether cached or not
    if path is not None:
        atomic_save_safetensors({"activations": tokens}, path, digest=True)
    return tokens.float()


def build_sae(
    wrapper: PipelineWrapper,
    hook: str,
    prompts: Sequence[str],
    out: str | Path,
    config: SAETrainConfig | None = None,
    *,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    cache_dir: str | Path | None = None,
    restart: bool = False,
    progress: bool = False,
    force: bool = False,
) -> tuple[TopKSAE, dict[str, Any]]:
    """Collect ``hook``'s activations over ``prompts``, train an SAE on them and write it to ``out``.

    The last 5% of the tokens (the last prompts' tokens) are held out: the SAE's quality is measured on them, as
    the fraction of variance unexplained and the share of features that fire on none of them (dead). Training
    checkpoints go to ``cache_dir`` (default: ``out/.work``), so an interrupted run resumes; ``restart`` deletes the
    training checkpoint first (the activations, keyed by what they depend on, are kept).

    An SAE below the quality floor (``sae_quality_problems``) is a ``ValueError`` and is not written unless
    ``force``: too few tokens before training, an FVU of 1 or more after it (its checkpoint is kept, so a forced
    rerun does not train again).
    """
    config = config or SAETrainConfig()
    wrapper.hook_point(hook)
    out = Path(out)
    work = Path(cache_dir) if cache_dir is not None else out / ".work"
    tokens = collect_activations(wrapper, hook, prompts, seed=config.seed, steps=steps, guidance=guidance,
                                 cache_dir=work, progress=progress)  # fmt: skip
    held = max(1, tokens.shape[0] // 20)
    training_tokens, latents = int(tokens.shape[0]) - held, config.expansion * int(tokens.shape[1])
    if training_tokens < latents and not force:
        raise ValueError(
            f"{len(prompts)} prompts give {training_tokens} training tokens at {hook}, fewer than the SAE's {latents} "
            "features: give more prompts or a smaller expansion (or force it: train_sae.py --force)"
        )
    sae, stats = train_sae(tokens[:-held], config, device=wrapper.device, checkpoint_dir=work / "checkpoint",
                           restart=restart, progress=progress)  # fmt: skip
    sae.cpu()
    with torch.no_grad():
        test = tokens[-held:]
        z = torch.cat([sae.encode(chunk) for chunk in test.split(8192)])
        fvu = float(fraction_of_variance_unexplained(test, z @ sae.W_dec + sae.b_dec))
        dead = float((z > 0).any(0).logical_not().float().mean())
    quality = {"fvu": fvu, "dead_share": dead, "held_out_tokens": held, "training_tokens": training_tokens}
    metadata = {
        "hook_point": hook,
        "model": wrapper.model_id,
        "component_fingerprint": component_fingerprint(wrapper, hook),
        "collection": {"prompts": len(prompts), "tokens": int(tokens.shape[0]), "steps": steps, "guidance": guidance}
        if not hook.partition(".")[0].startswith("text_encoder")  # a denoiser's: sampled, with these settings
        else {"prompts": len(prompts), "tokens": int(tokens.shape[0])},
        "training": {**dataclasses.asdict(config), **stats},
        "quality": quality,
    }
    problems = sae_quality_problems({**metadata, "latents": sae.latents})
    quality["below_floor"] = problems
    if problems and not force:
        raise ValueError(f"the SAE for {hook} is below the quality floor and was not saved: {'; '.join(problems)} "
                         "(train_sae.py --force keeps it anyway)")  # fmt: skip
    save_sae(sae, out, metadata, prompts)
    logger.info("SAE for %s: FVU %.4f, %.1f%% dead features, written to %s", hook, fvu, 100 * dead, out)
    return sae, metadata
