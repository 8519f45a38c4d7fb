"""Adversarial training for the LoRA trainer: a training-time adversary renewed on a schedule (``adversarial``).

RACE (Kim et al., ECCV 2024; chkimmmmm/R.A.C.E., ``train-scripts/train-esd.py``) fine-tunes ESD with the erasure
loss taken on an adversarial conditioning: each iteration it runs PGD on the text encoder's output embedding of the
concept prompt (random start in an L-inf ball of radius 0.1, 10 sign steps of 0.025, clamped to the embedding's value
range) to make the model being trained predict the initial noise x_T of the concept trajectory it sampled z_t from,
i.e. to restore the concept; the model then learns to erase from that embedding. The adversary is fresh every step.
AdvUnlearn renews its attack every ``adv_prompt_update_step`` iterations after a warm-up; both schedules are settings
here (``adversarial_every``, ``adversarial_warmup``).

The trainer knows no attack: ``adversarial`` names an adversary of :mod:`evals.attacks.adversaries` (an embedding
attack's training-time form, or ``race_pgd``), resolved there. The perturbation it returns is added, on the TRAINED
side only, to the embedding of each attacked prompt (:class:`~erase.lora.trainer.Predictions`); the frozen targets
keep the clean prompts, as in RACE and AdvUnlearn.

Objectives (``adversarial_objective``): ``"noise"`` is RACE's, ``|| eps_theta(x_t, t, c + delta) - x_T ||^2`` with
x_T the first UNet input of the pool trajectory x_t comes from (the sampler's initial noise); it restores the pool's
image, which is the concept's own for ESD and SPM (pools of the concept prompt). ``"frozen"`` is AdvUnlearn's,
``|| eps_theta(x_t, t, c + delta) - eps*(x_t, t, c) ||^2``: the trained model under attack predicts what the original
model predicts for the concept; it is the one that means something for concept ablation, whose pool is the anchor's.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from pipelines import LoraAdapters, PipelineWrapper, PromptEncoding

__all__ = ["OBJECTIVES", "AdversarialSchedule", "check_adversarial"]

logger = logging.getLogger(__name__)

OBJECTIVES = ("noise", "frozen")


def check_adversarial(name: str | None, objective: str) -> None:
    """``ValueError`` in one line for an ``adversarial`` setting that names no training-time adversary (unknown, a
    prompt or sampling attack, an embedding attack without one) or an unknown objective."""
    if objective not in OBJECTIVES:
        raise ValueError(f"adversarial_objective must be one of {OBJECTIVES}, got {objective!r}")
    if name is None:
        return
    if not isinstance(name, str) or not name.strip():
        raise ValueError("adversarial names no attack: give an embedding attack's name, or None")
    from evals.attacks.adversaries import get_adversary

    get_adversary(name)


class AdversarialSchedule:
    """The adversary of one training run: when it is renewed, what it attacks, the perturbations now in force.

    ``attacked[j]`` are the prompts attacked on the examples of pool prompt j (their rows are the encoding
    ``encoding``'s, made by the original text encoder). The perturbations (``state["delta"]``, one per attacked
    prompt) and the adversary's own tensors are the state a checkpoint holds.
    """

    def __init__(
        self,
        wrapper: PipelineWrapper,
        adapters: LoraAdapters,
        config: Any,
        attacked: Sequence[Sequence[str]],
    ) -> None:
        from evals.attacks.adversaries import AdversaryBudget, get_adversary

        self._wrapper = wrapper
        self._adapters = adapters
        self._adversary = get_adversary(config.adversarial)
        self.name = config.adversarial
        self.every = int(config.adversarial_every)
        self.warmup = int(config.adversarial_warmup)
        self.objective = config.adversarial_objective
        self.budget = AdversaryBudget(
            int(config.adversarial_steps), float(config.adversarial_step_size), float(config.adversarial_epsilon)
        )
        self.prompts = list(dict.fromkeys(p for group in attacked for p in group))
        if not self.prompts:
            raise ValueError("adversarial training needs at least one attacked prompt")
        self._attacked_of = [[self.prompts.index(p) for p in group] for group in attacked]
        self.encoding = wrapper.encode_prompts(self.prompts)  # original text encoder: no adapters yet, or disabled
        self.state: dict[str, torch.Tensor] = {}
        self.renewals = 0

    def perturbations(
        self, step: int, latents: torch.Tensor, timesteps: torch.Tensor, owners: torch.Tensor,
        initial: torch.Tensor, generator: torch.Generator,
    ) -> dict[str, torch.Tensor]:  # fmt: skip
        """``{prompt: (tokens, width) perturbation}`` in force at ``step`` (0-based), renewing the adversary on the
        step's examples when the schedule says so; empty during the warm-up."""
        if step < self.warmup:
            return {}
        if (step - self.warmup) % self.every == 0 or "delta" not in self.state:
            self.state["delta"] = self._renew(latents, timesteps, owners, initial, generator).float().cpu()
            self.renewals += 1
        delta = self.state["delta"]
        return {p: delta[i] for i, p in enumerate(self.prompts)}

    def _renew(
        self, latents: torch.Tensor, timesteps: torch.Tensor, owners: torch.Tensor, initial: torch.Tensor,
        generator: torch.Generator,
    ) -> torch.Tensor:  # fmt: skip
        from evals.attacks.adversaries import AdversaryProblem

        wrapper = self._wrapper
        pairs = [(i, j) for i, owner in enumerate(owners.tolist()) for j in self._attacked_of[owner]]
        examples = torch.tensor([i for i, _ in pairs], dtype=torch.long)
        rows = torch.tensor([j for _, j in pairs], dtype=torch.long)
        x = latents[examples.to(latents.device)]
        t = timesteps[examples.to(timesteps.device)]
        clean = self.encoding.select(rows)
        if self.objective == "noise":
            target = initial[examples.to(initial.device)].float()
        else:
            with self._adapters.disabled(), torch.no_grad():
                target = wrapper.noise_prediction(x, t, clean).float()
        with torch.no_grad():
            current = self._current_embeddings()

        def loss(embeddings: torch.Tensor) -> torch.Tensor:
            encoding = PromptEncoding(clean.prompts, clean.input_ids, embeddings[rows.to(embeddings.device)].to(
                wrapper.dtype), clean.lengths, clean.pooled)  # fmt: skip
            return torch.nn.functional.mse_loss(wrapper.noise_prediction(x, t, encoding).float(), target)

        problem = AdversaryProblem(
            wrapper=wrapper,
            prompts=self.prompts,
            embeddings=current,
            loss=loss,
            weights=self._weights,
            original=self._adapters.disabled,
            budget=self.budget,
            generator=generator,
            state={k: v for k, v in self.state.items() if k != "delta"},
        )
        delta = self._adversary(problem)
        self.state.update(problem.state)
        if delta.shape != current.shape:
            raise RuntimeError(
                f"adversary {self.name!r} returned {tuple(delta.shape)}, expected {tuple(current.shape)}"
            )
        return delta

    def _current_embeddings(self) -> torch.Tensor:
        """The attacked prompts' embeddings under the model being trained (its text encoder when it is adapted)."""
        if self._adapters.adapts_text_encoder:
            return self._wrapper.encode_prompts(self.prompts).embeddings.detach().float()
        return self.encoding.embeddings.detach().float()

    def _weights(self, patterns: Sequence[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return self._adapters.adapted_weights(patterns)

    # ---------------------------------------------------------------- checkpoints
    def tensors(self) -> dict[str, torch.Tensor]:
        """The state to checkpoint (prefixed ``adversary.``)."""
        return {f"adversary.{k}": v.detach().cpu().contiguous() for k, v in self.state.items()}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        self.state = {k.removeprefix("adversary."): v for k, v in tensors.items() if k.startswith("adversary.")}

    def info(self) -> dict[str, Any]:
        return {"adversary": self.name, "objective": self.objective, "every": self.every, "warmup": self.warmup,
                "steps": self.budget.steps, "step_size": self.budget.step_size, "epsilon": self.budget.epsilon,
                "attacked": self.prompts, "renewals_this_run": self.renewals}  # fmt: skip
