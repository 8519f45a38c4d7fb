"""AdvUnlearn (Zhang et al., NeurIPS 2024): bi-level adversarial unlearning of the text encoder.

Each step (after a warm-up) an inner attack optimises k soft prompt tokens v, inserted after the start token, so that
the model being trained, prompted with ``[v; c]``, predicts what the original model predicts for the concept c; the
outer step then trains the text encoder (LoRA) with ESD's loss on that adversarial prompt, plus a utility-retaining
term on a retain set of prompts. Per step, with (x_t, t) from frozen-model trajectories of c and (x^r_t, t) of the
retain prompts r (``erase.lora.trainer``)::

    v* = argmin_v  || eps(x_t, t, tau_phi([v; c])) - eps(x_t, t, tau*(c)) ||^2                  (inner attack)
    L(phi) = || eps(x_t, t, tau_phi([v*; c])) - [eps(x_t, t, tau*("")) - eta (eps(x_t, t, tau*(c)) - eps(x_t, t,
             tau*("")))] ||^2  +  gamma * mean_r || eps(x^r_t, t, tau_phi(r)) - eps(x^r_t, t, tau*(r)) ||^2

eps is the (frozen) UNet, tau_phi the text encoder with the LoRA adapters, tau* without them. During the warm-up the
first term takes the plain concept prompt, tau_phi(c).

Reference (OPTML-Group/AdvUnlearn, ``train-scripts/AdvUnlearn.py``, ``utils/attack_util.py``, ``utils/get_loss.py``;
the README's commands): 1000 iterations, Adam lr 1e-5, warm-up 200, the attack renewed every iteration
(``adv_prompt_update_step`` 1), 30 attack steps of Adam at lr 1e-3 (``pgd``; ``fast_at`` takes the gradient's sign
first), 1 prefix token (``prefix_k``), random init (``--attack_init random``: a random vocabulary token's embedding),
retain mode ``reg`` with weight 0.3 and 5 retain prompts a step ("a photo of <object>", ``coco_object``), eta 1,
start guidance 3, DDIM 50 steps. Its attack never zeroes the gradient (``attack_opt.zero_grad()`` is not called), so
each attack step's Adam step sees the sum of all gradients so far; ``attack_accumulates`` replicates that (on by
default). The reference trains the WHOLE text encoder (``text_encoder_full``: every parameter of the 12 layers, layer
norms and biases included, and the final layer norm); here a LoRA on the layers' q/k/v/out projections and fc1/fc2
(``layers`` default), which is what a LoRA file can carry and what ``pipe.load_lora_weights`` loads.

Other architectures (the reference is SD 1.4 only). A soft token is one token's input embeddings in every text
encoder side by side (``PipelineWrapper.encode_with_vectors``), each encoder reading its own part: SDXL's two CLIPs,
SD3's CLIP-L, CLIP-G and T5, Flux's CLIP and T5; a random init takes one token's rows in all of them
(``PipelineWrapper.token_rows``; on SD3/Flux among the tokens every tokenizer reads as one). The trained modules are
the CLIP encoders' (:func:`text_encoder_layers`): SDXL's and SD3's two, Flux's one, whose pooled vector is all of CLIP
that Flux reads. T5 is not trained: a T5 LoRA is no file SD3's or Flux's ``load_lora_weights`` reads, so the attack
reaches T5's rows and the defence answers through CLIP's alone; on Flux that is the pooled vector, a narrow lever.
The loss is on the velocity on SD3/Flux, as ESD's (``erase.lora.esd``).

Where we differ:

* The change is a rank-8 LoRA (alpha 8), not a full fine-tune, so the reference's rate moves it less.
* x_t come from a pool of frozen-model trajectories sampled once (the trainer's) rather than a DDIM run of the model
  being trained per iteration; the attack's 30 steps each draw a fresh (x_t, t) from that pool, as the reference draws
  a fresh t and z_t per attack step. The retain examples come from one frozen-model trajectory per retain prompt
  (``retain_pool_images``), at the concept example's timestep (the reference: same t).
* Retain prompts are drawn 5 at a time uniformly without replacement within a step (the reference cycles through the
  set without replacement across steps). The default set is the 80 COCO categories as "a photo of <object>" (the
  reference's 243-prompt ``coco_object`` CSV is not shipped); on the micro world, its objects ("a photo of a star").
* Only the ``reg`` retain mode (the README's); ``iter`` (a separate retain step) is not offered.
* ``attack_init="latest"`` warm-starts from the last round's tokens, which the checkpoint holds (``state``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from pipelines import ARCHITECTURES, PipelineWrapper, PromptEncoding

from ..core.registry import Capabilities, ConceptSpec, WeightEdit, register_method
from .esd import esd_target
from .trainer import (
    TRAINED,
    Batch,
    LoraTrainConfig,
    Predictions,
    TrainingPool,
    config_key,
    sample_pool,
    train_lora,
)

__all__ = [
    "COCO_OBJECTS",
    "TEXT_ENCODER_LAYERS",
    "AdvUnlearnConfig",
    "AdvUnlearnLoss",
    "advunlearn_loss",
    "erase_advunlearn",
    "retain_prompts",
    "text_encoder_layers",
]

logger = logging.getLogger(__name__)

#: The reference's trained modules as LoRA targets: every text-encoder layer's attention projections and MLP.
TEXT_ENCODER_LAYERS: tuple[str, ...] = (
    "text_encoder.*self_attn.q_proj", "text_encoder.*self_attn.k_proj", "text_encoder.*self_attn.v_proj",
    "text_encoder.*self_attn.out_proj", "text_encoder.*mlp.fc1", "text_encoder.*mlp.fc2",
)  # fmt: skip


def text_encoder_layers(wrapper: PipelineWrapper) -> tuple[str, ...]:
    """:data:`TEXT_ENCODER_LAYERS`, and on SDXL and SD3 the same modules of their second CLIP text encoder (Flux's
    second encoder is T5)."""
    if wrapper.architecture not in ("sdxl", "sd3"):
        return TEXT_ENCODER_LAYERS
    return (*TEXT_ENCODER_LAYERS, *(p.replace("text_encoder.", "text_encoder_2.", 1) for p in TEXT_ENCODER_LAYERS))


#: The 80 COCO object categories (the retain set for models outside the micro world).
COCO_OBJECTS: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

ATTACK_INITS = ("random", "latest")
ATTACK_METHODS = ("pgd", "fast_at")


@dataclass
class AdvUnlearnConfig(LoraTrainConfig):
    """Settings of an AdvUnlearn erasure: the reference's defaults (module docstring); training fields are
    ``LoraTrainConfig``'s.

    Attributes:
        warmup: steps on the plain concept prompt before the first attack.
        attack_every: renew the adversarial tokens every this many steps.
        attack_steps, attack_lr: the inner attack's Adam steps and learning rate.
        adv_tokens: soft tokens put before the prompt's words, after the start token where there is one
            (``prefix_k``).
        attack_init: ``"random"`` (a random vocabulary token's input embeddings per token, each renewal) or
            ``"latest"`` (the last round's tokens).
        attack_method: ``"pgd"`` (Adam on the gradient) or ``"fast_at"`` (Adam on its sign).
        attack_accumulates: the reference's attack never zeroes its gradient, so each step uses the sum of all its
            gradients so far; ``False`` uses each step's own.
        retain_weight: gamma, the retain term's weight (``reg`` mode).
        retain_batch: retain prompts a step.
        retain_prompts: the retain set; ``None``: the micro world's objects on a micro-world model, else
            :data:`COCO_OBJECTS`, each as "a photo of <object>".
        retain_pool_images: frozen-model trajectories per retain prompt.
        negative_guidance: eta of the ESD target.
        (``layers``: the adapted modules, :func:`text_encoder_layers` by default; ``adversarial`` is refused: the
        method runs its own inner attack.)
    """

    VARIANTS: ClassVar[tuple[str, ...]] = ("text_encoder",)

    NUMBER_RANGES: ClassVar[dict[str, str]] = {
        **LoraTrainConfig.NUMBER_RANGES, "warmup": ">= 0", "attack_every": ">= 1", "attack_steps": ">= 0",
        "attack_lr": "> 0", "adv_tokens": ">= 1", "retain_weight": ">= 0", "retain_batch": ">= 0",
        "retain_pool_images": ">= 1", "negative_guidance": "> 0",
    }  # fmt: skip

    train: str = "text_encoder"
    rank: int = 8
    alpha: float = 8.0
    lr: float = 1e-5
    steps: int = 1000
    batch_size: int = 1
    pool_steps: int = 50
    pool_guidance: float = 3.0
    checkpoint_every: int = 200
    warmup: int = 200
    attack_every: int = 1
    attack_steps: int = 30
    attack_lr: float = 1e-3
    adv_tokens: int = 1
    attack_init: str = "random"
    attack_method: str = "pgd"
    attack_accumulates: bool = True
    retain_weight: float = 0.3
    retain_batch: int = 5
    retain_prompts: tuple[str, ...] | None = None
    retain_pool_images: int = 1
    negative_guidance: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()  # every number and bool, against NUMBER_RANGES
        if self.attack_init not in ATTACK_INITS:
            raise ValueError(f"attack_init must be one of {ATTACK_INITS}, got {self.attack_init!r}")
        if self.attack_method not in ATTACK_METHODS:
            raise ValueError(f"attack_method must be one of {ATTACK_METHODS}, got {self.attack_method!r}")
        if self.adversarial is not None:
            raise ValueError("advunlearn runs its own inner attack: adversarial is for esd, ca and spm")
        if self.retain_prompts is not None:
            self.retain_prompts = tuple(self.retain_prompts)
            if not self.retain_prompts or any(not isinstance(p, str) or not p.strip() for p in self.retain_prompts):
                raise ValueError("retain_prompts must be non-empty strings (or None for the default set)")

    @property
    def patterns(self) -> tuple[str, ...]:
        """``layers``, else the one-encoder default (:func:`text_encoder_layers` adds SDXL's second encoder)."""
        return self.layers if self.layers is not None else TEXT_ENCODER_LAYERS


def retain_prompts(wrapper: PipelineWrapper, config: AdvUnlearnConfig) -> list[str]:
    """The retain set: ``config.retain_prompts``, else "a photo of <object>" for the micro world's objects (on a
    micro-world model) or the COCO categories."""
    if config.retain_prompts is not None:
        return list(config.retain_prompts)
    if wrapper.world_file is not None:
        from evals.microworld import world

        return [f"a photo of {world.prompt(object=o)}" for o in world.concepts("object")]
    return [f"a photo of {o}" for o in COCO_OBJECTS]


@dataclass
class AdvUnlearnLoss:
    """The AdvUnlearn loss of one erasure (module docstring), inner attack included; a callable the trainer takes.

    Encoding rows (the original text encoder's): the targets, then "", then the retain prompts. ``state`` holds the
    adversarial tokens in force (``tokens``: (targets, k, width)); the trainer checkpoints it.
    """

    wrapper: PipelineWrapper
    targets: list[str]
    retain: list[str]
    encoding: PromptEncoding
    retain_pool: TrainingPool
    config: AdvUnlearnConfig
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    attack_losses: list[float] = field(default_factory=list)

    def __call__(self, batch: Batch, predict: Predictions) -> torch.Tensor:
        config, rows = self.config, batch.prompts
        empty = torch.full_like(rows, len(self.targets))
        x, t = batch.latents, batch.timesteps
        target = esd_target(
            predict.frozen(x, t, self.encoding.select(rows)).float(),
            predict.frozen(x, t, self.encoding.select(empty)).float(),
            config.negative_guidance,
        )
        if batch.step < config.warmup:
            prompt = self.encoding.select(rows)  # re-encoded by the adapted text encoder on the trained side
        else:
            if (batch.step - config.warmup) % config.attack_every == 0 or "tokens" not in self.state:
                self._attack(batch, predict)
            prompt = self.adversarial_encoding(rows)
        loss = F.mse_loss(predict.trained(x, t, prompt).float(), target)
        return loss + config.retain_weight * self.retain_term(batch, predict) if config.retain_weight > 0 else loss

    def adversarial_encoding(self, rows: torch.Tensor) -> PromptEncoding:
        """``tau([v; c])`` for each row's target, through the text encoder as it is now (differentiably)."""
        templates = [f"{{}} {self.targets[int(r)]}" for r in rows]
        return self.wrapper.encode_with_vectors(templates, self.state["tokens"][rows].to(self.wrapper.device))

    def retain_term(self, batch: Batch, predict: Predictions) -> torch.Tensor:
        """mean over ``retain_batch`` retain prompts r of || eps(x^r_t, t, tau_phi(r)) - eps(x^r_t, t, tau*(r)) ||^2,
        x^r_t from a trajectory of r at the step index of the batch's examples (in turn)."""
        n = min(self.config.retain_batch, len(self.retain))
        if n == 0:
            return torch.zeros(())
        chosen = torch.randperm(len(self.retain), generator=batch.generator)[:n]
        pool = self.retain_pool
        latents, timesteps = [], []
        for i, prompt in enumerate(chosen.tolist()):
            t = batch.timesteps[i % len(batch.timesteps)].cpu()
            k = int(torch.nonzero(pool.timesteps == t)[0, 0])
            options = torch.nonzero(pool.owners == prompt)[:, 0]
            row = options[int(torch.randint(0, len(options), (1,), generator=batch.generator))]
            latents.append(pool.latents[row, k])
            timesteps.append(pool.timesteps[k])
        x = torch.stack(latents).to(self.wrapper.device, self.wrapper.dtype)
        t = torch.stack(timesteps).to(self.wrapper.device)
        encoding = self.encoding.select(len(self.targets) + 1 + chosen)
        return F.mse_loss(predict.trained(x, t, encoding).float(), predict.frozen(x, t, encoding).float())

    def _attack(self, batch: Batch, predict: Predictions) -> None:
        """The inner attack (``soft_prompt_attack``): ``attack_steps`` Adam steps on the tokens of the batch's
        targets, each on a fresh (x_t, t) of the target's trajectories, against the text encoder as it is now."""
        config, wrapper = self.config, self.wrapper
        n, k = len(self.targets), config.adv_tokens
        previous = self.state.get("tokens")
        if config.attack_init == "latest" and previous is not None:
            tokens = previous.clone().float()
        else:
            slots = wrapper.slot_token_ids()
            ids = slots[torch.randint(0, len(slots), (n, k), generator=batch.generator)]
            tokens = wrapper.token_rows(ids.reshape(-1)).detach().float().cpu().reshape(n, k, -1)
        present = sorted(set(batch.prompts.tolist()))
        vectors = tokens[present].to(wrapper.device).requires_grad_(True)
        optimizer = torch.optim.Adam([vectors], lr=config.attack_lr)
        summed = torch.zeros_like(vectors)
        pool = batch.pool
        loss = torch.zeros(())
        for _ in range(config.attack_steps):
            which = torch.randint(0, len(present), (1,), generator=batch.generator)
            target_row = present[int(which)]
            options = torch.nonzero(pool.owners == target_row)[:, 0]
            row = options[int(torch.randint(0, len(options), (1,), generator=batch.generator))]
            step = int(torch.randint(0, pool.latents.shape[1], (1,), generator=batch.generator))
            x = pool.latents[row, step][None].to(wrapper.device, wrapper.dtype)
            t = pool.timesteps[step][None].to(wrapper.device)
            goal = predict.frozen(x, t, self.encoding.select([target_row])).float()
            encoding = wrapper.encode_with_vectors([f"{{}} {self.targets[target_row]}"], vectors[int(which)][None])
            loss = F.mse_loss(predict.trained(x, t, encoding).float(), goal)
            (grad,) = torch.autograd.grad(loss, [vectors])
            summed = summed + grad if config.attack_accumulates else grad
            if config.attack_method == "fast_at":
                summed = summed.sign()
            optimizer.zero_grad(set_to_none=True)
            vectors.grad = summed.clone()
            optimizer.step()
        tokens[present] = vectors.detach().float().cpu()
        self.state["tokens"] = tokens
        self.attack_losses.append(float(loss.detach()))


def advunlearn_loss(wrapper: PipelineWrapper, concepts: ConceptSpec, config: AdvUnlearnConfig) -> AdvUnlearnLoss:
    """The loss for ``concepts``' targets, its retain pool sampled now (seeded from ``config.seed``)."""
    targets = list(concepts.targets)
    retain = retain_prompts(wrapper, config)
    for prompt in [*targets, *retain]:
        wrapper.check_prompt(prompt, "prompt")
    encoding = wrapper.encode_prompts([*targets, "", *retain])
    generator = torch.Generator().manual_seed(config.seed + 1_000_003)
    pool_config = _RetainPoolSettings(config.retain_pool_images, config.pool_steps, config.pool_guidance)
    retain_pool = sample_pool(wrapper, retain, pool_config, generator)
    return AdvUnlearnLoss(wrapper, targets, retain, encoding, retain_pool, config)


@dataclass
class _RetainPoolSettings:
    """What ``sample_pool`` reads of a config, for the retain prompts' trajectories."""

    pool_images: int
    pool_steps: int
    pool_guidance: float


@register_method(
    "advunlearn",
    AdvUnlearnConfig,
    "lora",
    "AdvUnlearn (Zhang et al., 2024): text-encoder LoRA trained against an inner soft-prompt attack, ESD's loss on "
    "the adversarial prompt plus a retain term",
    capabilities=Capabilities(
        preserve=False,
        training=True,
        sampler_steps=("pool_steps",),
        guides=False,
        architectures=ARCHITECTURES,
        quick={
            **TRAINED.quick,
            "steps": 6,
            "pool_images": 1,
            "warmup": 3,
            "attack_steps": 1,
            "retain_batch": 1,
            "retain_prompts": ("a photo of a cat", "a photo of a dog"),
        },
    ),
)
def erase_advunlearn(wrapper: PipelineWrapper, concepts: ConceptSpec, config: AdvUnlearnConfig) -> WeightEdit:
    """Train the AdvUnlearn text-encoder LoRA for every target of ``concepts``."""
    loss = advunlearn_loss(wrapper, concepts, config)
    layers = config.layers if config.layers is not None else text_encoder_layers(wrapper)
    edit = train_lora(
        wrapper,
        pool_prompts=loss.targets,
        loss_fn=loss,
        config=config,
        layers=layers,
        run_key={"method": "advunlearn", "targets": loss.targets, "retain": loss.retain, "config": config_key(config)},
        description=f"advunlearn {', '.join(loss.targets)}",
    )
    edit.info.update(
        {
            "retain_prompts": loss.retain,
            "patterns": list(layers),
            "attack_losses_last": loss.attack_losses[-5:],
            "attacks_this_run": len(loss.attack_losses),
        }
    )
    return edit
