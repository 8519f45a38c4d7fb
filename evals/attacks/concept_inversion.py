"""Concept inversion (Pham et al., 2024, "Circumventing Concept Erasure Methods For Text-to-Image Generative
Models"): textual inversion of one new word against the erased model.

A new token's input embedding v is learnt so that the *erased* model, prompted with the concept's prompts in which
the concept is replaced by that token, predicts the noise the *original* model predicts for the concept's prompts:

    v* = argmin_v  E_{(prompt, x_t, t)} || eps'(x_t, t, E'(prompt[concept -> v])) - eps(x_t, t, E(prompt)) ||^2

eps / E the original UNet and text encoder, eps' / E' the erased ones. The erased model then draws every probe with
the learnt token in the concept's place (:meth:`pipelines.PipelineWrapper.encode_with_vectors`): an erasure that
only cut the path from the concept's *words* to the concept, and left the model able to draw it, is undone.

Reference defaults (NYU-DICE-Lab/circumventing-concept-erasure, ``train.sh`` and ``concept_inversion.py`` of each
method, after diffusers' textual-inversion example): one vector initialised from the word "art" (for styles),
AdamW with lr 5e-3 scaled by batch 4 x gradient accumulation 4 (0.08), weight decay 1e-2, 5,000 steps, a constant
schedule, on 25 images of the concept drawn by the original model, noised to random t, the target the added noise,
prompted with textual inversion's style templates ("a painting in the style of {}", ...).

Where we differ (a CPU budget of a minute or two on the micro model):

* ``steps`` steps of ``batch`` (x_t, t) pairs instead of 5,000 of 16 (the reference's lr, 0.08, kept).
* The training data are the original model's own sampling runs of ``train_prompts`` prompts naming the concept
  (:func:`.base.attack_probes` with fresh seeds, the attack's sampler settings): x_t are the UNet inputs of those
  runs and the target is the original model's conditional noise prediction there, so no image is encoded and the
  pairs are the states the sampler visits. The prompts are also the templates: each with the concept replaced by the
  learnt token, which keeps the word order the probes use.
* No token is added to the tokenizer: the vector enters through a hook on the input embeddings, which is what an
  added token's embedding row does. The attack feeds the resulting prompt embeddings to the UNet (white box).

On SD3 and Flux the token is read by CLIP and T5 alike: the learnt vector is its input embeddings in every text
encoder side by side (``PipelineWrapper.token_rows``: SD3's CLIP-L, CLIP-G and T5; Flux's CLIP, which reaches only
the pooled vector, and T5), started from ``init_word``'s rows in each, and the matched prediction is the velocity.

On micro, against UCE's erasure of "van gogh" (16 probes, defaults, seed 0; 42 s on one CPU thread): 6/16 (37.5%)
by CLIP and by the judge, against 0/16 unattacked; the loss falls from 0.0043 (the word "art") to 0.0005 (0.0028 for
the erased model with the concept's own words). 60 steps already reach it; 16 training prompts did no better, and lr
0.02 got 5/16.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pipelines import PipelineWrapper
from pipelines.checks import check_number_fields

from .base import AttackResult, AttackTarget, attack_probes, register_attack
from .unlearn_diff_atk import NoiseTargets, matching_step, noise_matching_loss, original_noise_targets, prompt_loss

__all__ = ["ConceptInversionConfig", "concept_inversion", "concept_template", "init_token", "nearest_words"]

logger = logging.getLogger(__name__)


@dataclass
class ConceptInversionConfig:
    """Settings (the budget) of concept inversion.

    Attributes:
        steps: optimisation steps (reference: 5,000).
        lr: AdamW learning rate on the token's input embedding (reference: 0.08 after scaling).
        weight_decay: AdamW weight decay (reference: 1e-2).
        batch: (x_t, t) pairs per step (reference: 16 images a step).
        init_word: the one-token word whose embedding the new token starts from (reference: "art" for styles).
        train_prompts: prompts naming the concept whose sampling runs give the pairs (reference: 25 images).
        eval_pairs: fixed pairs on which the initial, final and unattacked losses are reported.
    """

    NUMBER_RANGES: ClassVar[dict[str, str]] = {
        "steps": ">= 1", "lr": "> 0", "weight_decay": ">= 0", "batch": ">= 1", "train_prompts": ">= 1",
        "eval_pairs": ">= 1",
    }  # fmt: skip
    BUDGET_FIELDS: ClassVar[tuple[str, ...]] = ("steps",)

    steps: int = 200
    lr: float = 0.08
    weight_decay: float = 1e-2
    batch: int = 8
    init_word: str = "art"
    train_prompts: int = 8
    eval_pairs: int = 32

    def __post_init__(self) -> None:
        check_number_fields(self)
        if not isinstance(self.init_word, str) or not self.init_word.strip():
            raise ValueError("init_word is empty")


def concept_template(prompt: str, concept: str) -> str:
    """``prompt`` with its last mention of ``concept`` (case-insensitive) replaced by ``{}``."""
    matches = list(re.finditer(re.escape(concept.strip()), prompt, flags=re.IGNORECASE))
    if not matches:
        raise ValueError(f"prompt {prompt!r} does not name the concept {concept!r}")
    last = matches[-1]
    return prompt[: last.start()] + "{}" + prompt[last.end() :]


def nearest_words(wrapper: PipelineWrapper, vector: torch.Tensor, n: int = 5) -> list[str]:
    """The ``n`` vocabulary tokens whose input embeddings are closest to ``vector`` in cosine similarity (on SD3/Flux
    among the tokens every text encoder reads as one, their rows side by side: ``PipelineWrapper.token_rows``)."""
    ids = wrapper.slot_token_ids()
    rows = wrapper.token_rows(ids).float()
    similarity = F.normalize(rows, dim=-1) @ F.normalize(vector.detach().float().reshape(-1).to(rows.device), dim=0)
    return [wrapper.decode_tokens([int(ids[i])]) for i in similarity.topk(n).indices.cpu()]


def init_token(wrapper: PipelineWrapper, word: str) -> int:
    """The id of the one-token ``word``; ``ValueError`` for a longer one, or on SD3/Flux one that some text encoder
    reads as several tokens."""
    if wrapper.token_count(word.strip()) != 1:
        raise ValueError(f"init_word {word!r} is {wrapper.token_count(word.strip())} tokens; give a one-token word")
    token = int(wrapper.encode_prompts([word.strip()]).input_ids[0, wrapper.start_tokens()])
    if token not in set(wrapper.slot_token_ids().tolist()):
        raise ValueError(f"init_word {word!r} is not one token in every text encoder; give another word")
    return token


@torch.no_grad()
def _vector_loss(
    wrapper: PipelineWrapper, pairs: NoiseTargets, index: torch.Tensor, templates: list[str], vector: torch.Tensor
) -> float:
    total = 0.0
    for start in range(0, len(index), 16):
        chunk = index[start : start + 16]
        encoding = wrapper.encode_with_vectors([templates[int(r)] for r in pairs.rows[chunk]], vector)
        total += float(noise_matching_loss(wrapper, pairs, chunk, encoding)) * len(chunk)
    return total / len(index)


@register_attack("concept_inversion", ConceptInversionConfig, "a new token learnt against the erased model",
                 "embedding")  # fmt: skip
def concept_inversion(target: AttackTarget, config: ConceptInversionConfig, seed: int) -> AttackResult:
    """Learn the token on ``train_prompts`` fresh prompts of the concept (drawn with ``seed``), then draw every probe
    with it in the concept's place."""
    wrapper = target.wrapper
    probe_templates = [concept_template(p.prompt, target.concept) for p in target.probes]
    token = init_token(wrapper, config.init_word)
    generator = torch.Generator().manual_seed(seed)
    train = attack_probes(target.concept, config.train_prompts, seed + 104_729)
    prompts = [p.prompt for p in train]
    templates = [concept_template(p, target.concept) for p in prompts]
    clock = time.perf_counter()
    pairs, eval_index = original_noise_targets(target, prompts, generator, config.eval_pairs)
    seconds = {"targets": time.perf_counter() - clock}
    with target.erased_model():
        start = wrapper.token_rows([token]).float().clone()
        vector = start.clone().requires_grad_(True)
        optimizer = torch.optim.AdamW([vector], lr=config.lr, weight_decay=config.weight_decay)
        loss_unattacked = prompt_loss(wrapper, pairs, eval_index, prompts)
        loss_initial = _vector_loss(wrapper, pairs, eval_index, templates, start)
        curve = []
        for _ in tqdm(range(config.steps), desc="concept_inversion", unit="step", disable=not target.progress):
            curve.append(matching_step(wrapper, pairs, templates, config.batch, generator, vector, optimizer))
        learnt = vector.detach()
        loss_final = _vector_loss(wrapper, pairs, eval_index, templates, learnt)
        with torch.no_grad():
            encoding = wrapper.encode_with_vectors(probe_templates, learnt)
        seconds["optimisation"] = time.perf_counter() - clock - seconds["targets"]
        images = target.generate(encoding, [p.seed for p in target.probes])
        neighbours = nearest_words(wrapper, learnt)
    logger.info("concept_inversion: loss %.4g -> %.4g (unattacked %.4g); nearest words %s", loss_initial, loss_final,
                loss_unattacked, neighbours)  # fmt: skip
    seconds["generation"] = time.perf_counter() - clock - seconds["targets"] - seconds["optimisation"]
    info = {
        "seconds": seconds,
        "token_embedding": learnt.squeeze(0).cpu().tolist(),
        "init_word": config.init_word,
        "nearest_words": neighbours,
        "vector_norm": float(learnt.norm()),
        "init_norm": float(start.norm()),
        "training_prompts": prompts,
        "templates": probe_templates,
        "loss_unattacked": loss_unattacked,
        "loss_initial": loss_initial,
        "loss_final": loss_final,
        "loss_curve": curve,
    }
    return AttackResult("concept_inversion", {}, images, 0.0, embeddings=encoding.embeddings.float().cpu(), info=info)
