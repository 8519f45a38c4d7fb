"""Attacks that try to bring an erased concept back, and their success rates.

One file per attack, each a config dataclass (its budget) and a function ``(target, config, seed) -> AttackResult``
registered by name (:mod:`.base`); :mod:`.suite` runs several against one erasure and writes their table.

Each attack's kind is its threat model, what the attacker controls: ``prompt`` (writes text any deployment accepts),
``embedding`` (feeds text embeddings to the UNet: holds the weights, and can write any prompt too) or ``sampling``
(changes how images are sampled). :data:`THREAT_MODELS` lists the kinds each admits; the suite gives a verdict per
threat model (the worst success rate within it). Every config names its ``BUDGET_FIELDS``, the fields a budget
multiplier scales (:func:`budget_config`: ``--budget 4`` in the scripts).

========================  =========  ==================================================================================
attack                    kind       what it does
========================  =========  ==================================================================================
``rece_embedding``        embedding  the closed-form embedding whose edited keys/values equal the original ones (RECE)
``ring_a_bell``           embedding  the concept's direction in embedding space added to the prompt (Ring-A-Bell)
``ring_a_bell_prompt``    prompt     a written prompt whose embedding is nearest that target (Ring-A-Bell's genetic
                                     search over tokens)
``noise_probe``           sampling   DDIM re-sampling at full noise, keeping the candidate the scorer rates most
                                     like the concept
``unlearn_diff_atk``      prompt     k adversarial prefix tokens whose erased noise prediction matches the original's
                                     (UnlearnDiffAtk; a universal prefix, projected to real words)
``concept_inversion``     embedding  a new token learnt against the erased model by textual inversion, put in the
                                     concept's place (Pham et al., concept inversion)
========================  =========  ==================================================================================
"""

from .base import (
    KINDS,
    THREAT_MODELS,
    Attack,
    AttackProbe,
    AttackResult,
    AttackTarget,
    attack_configs,
    attack_labels,
    attack_probes,
    attack_success,
    available_attacks,
    budget_config,
    budget_fields,
    check_attack,
    check_budget,
    get_attack,
    parse_budget,
    register_attack,
    resolve_attacks,
    run_attack,
)

__all__ = [
    "KINDS",
    "THREAT_MODELS",
    "Attack",
    "AttackProbe",
    "AttackResult",
    "AttackTarget",
    "attack_configs",
    "attack_labels",
    "attack_probes",
    "attack_success",
    "available_attacks",
    "budget_config",
    "budget_fields",
    "check_attack",
    "check_budget",
    "get_attack",
    "parse_budget",
    "register_attack",
    "resolve_attacks",
    "run_attack",
]
