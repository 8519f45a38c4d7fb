"""The main job, as ``scripts/erase.py`` runs it: erase, save the artifact, check the result on fixed seeds.

Kept out of the script so tests call exactly what users run.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from pipelines import DEFAULT_GUIDANCE, DEFAULT_STEPS, PipelineWrapper
from pipelines.files import claim_folder, png_bytes
from pipelines.hub import HubUnreachableError

from .core.artifact import ErasureArtifact, save_artifact
from .core.inputs import (
    CONCEPT_TYPES,
    DEFAULT_CONCEPT_TYPE,
    PRESERVE_SETS,
    concept_key,
    config_from_overrides,
    error_line,
)
from .core.kohya import LORA_FORMATS, check_kohya_architecture, kohya_bytes
from .core.layout import (
    CHECK_PICTURE,
    KOHYA_FILE,
    METADATA_FILE,
    STACK_FILE,
    check_checkpoint_folder,
    check_output_folder,
    default_output_folder,
)
from .core.registry import ConceptSpec, get_method
from .stack import (
    STACK_FORMAT,
    STACK_SEPARATOR,
    ErasureStack,
    check_erasure_base,
    erase_stack,
    member_overrides,
    parse_method_stack,
    read_erasure,
    save_stack,
)

__all__ = [
    "CheckResult",
    "EraseSummary",
    "GENERIC_PRESERVE",
    "audit_models",
    "check_probes",
    "edit_size_warnings",
    "erasure_settings",
    "load_check_scorer",
    "micro_world_name",
    "preserve_set",
    "reconstruction_check",
    "run_erase",
    "self_check",
    "stack_settings",
]

logger = logging.getLogger(__name__)

#: Preserve set of common artists and subjects (``--preserve-set generic``).
GENERIC_PRESERVE: tuple[str, ...] = (
    "pablo picasso", "claude monet", "rembrandt", "salvador dali", "andy warhol",
    "a dog", "a cat", "a car", "a house", "a tree", "a person", "a city at night",
)  # fmt: skip


def preserve_set(name: str, targets: Sequence[str]) -> list[str]:
    """A named preserve set, minus the targets (and their synonyms).

    ``"world"``: every concept of the micro world (``pipelines/micro/world.json``) but "plain"; ``"generic"``:
    ``GENERIC_PRESERVE``.
    """
    if name not in PRESERVE_SETS:
        raise ValueError(f"unknown preserve set {name!r}; expected one of {', '.join(PRESERVE_SETS)}")
    erased = {concept_key(t) for t in targets}
    if name == "generic":
        return [p for p in GENERIC_PRESERVE if concept_key(p) not in erased]
    from evals.microworld import world

    erased |= {world.canonical(t) for t in map(_world_name, targets) if t is not None}
    return [c for cat in world.CATEGORIES for c in world.concepts(cat) if c not in erased and c != "plain"]


def _world_name(name: str) -> str | None:
    """The micro-world name ``name`` stands for (``evals.probes.world_concept``), or ``None``."""
    from evals.probes import world_concept

    return world_concept(name)


#: How alike (``difflib``'s ratio) a name outside the micro world must be to a world name to read as a misspelling
#: of it: "van gohg", "vangogh", "monnet", "circles" do; "a dog", "dark red", "box" against "fox" do not.
NEAR_NAME_RATIO = 0.8


def micro_world_name(name: str, what: str, *, outside: str | None) -> str | None:
    """The micro-world name ``name`` stands for (read as the tokenizer reads it: ``evals.probes.world_concept``).

    A name that is none but nearly spells one (``NEAR_NAME_RATIO``: "van gohg") is a ``ValueError`` in one line
    listing the near world names, ``outside`` saying what else the user can do; so is any other name when
    ``outside`` is ``None`` (only world concepts will do), while with ``outside`` given it is ``None`` (the caller
    takes it as it is: the check probes "a dog" generically)."""
    import difflib

    from evals.microworld import world

    found = _world_name(name)
    if found is not None:
        return found
    known = [n for cat in world.CATEGORIES for c in world.concepts(cat) for n in world.all_names(c)]
    spaced = " ".join(re.sub(r"[-_]+", " ", concept_key(name)).split())  # as world_concept reads it
    bare = re.sub(r"^(a|an|the) ", "", spaced)
    near = difflib.get_close_matches(bare, known, n=3, cutoff=NEAR_NAME_RATIO)
    if near:
        suffix = f" ({outside})" if outside else ""
        raise ValueError(f"{what} {name!r} is no micro-world name; near ones: {', '.join(map(repr, near))}{suffix}")
    if outside is None:
        names = ", ".join(c for cat in world.CATEGORIES for c in world.concepts(cat))
        raise ValueError(f"{what} {name!r} is no micro-world name; the world's concepts: {names}")
    return None


@dataclass
class CheckResult:
    """Accuracy of the named concept on a few fixed-seed images, before and after the edit."""

    target_before: float
    target_after: float
    preserved_before: float
    preserved_after: float
    images: int


@dataclass
class EraseSummary:
    concepts: list[str]
    method: str
    model: str
    out: str
    weight_format: str
    edit_seconds: float
    layers: int
    check: CheckResult | None
    load_code: str
    grid: str | None
    relative_change_median: float
    relative_change_max: float
    extra: dict[str, Any] = field(default_factory=dict)
    #: what the user should know about the result, one line each (an edit larger than the weights it changes)
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        from dataclasses import asdict

        return json.dumps(asdict(self), indent=2)


def load_check_scorer(wrapper: PipelineWrapper, scorer: str | None) -> tuple[str, Any]:
    """The CLIP scorer of the check, loaded before any edit; ``ValueError`` naming the flags when it cannot load."""
    from evals.scorer import load_scoring

    try:
        name, clip, _ = load_scoring(wrapper.model_id, scorer, judge=False, device=wrapper.device)
    except HubUnreachableError as err:  # its line already says what to pass instead
        raise HubUnreachableError(f"{error_line(err)} (the check needs it: --no-check skips the check)") from None
    except ValueError as err:
        raise ValueError(
            f"{error_line(err)}; the check needs it: pass --no-check to skip the check, or --scorer with a local CLIP "
            "folder"
        ) from None
    return name, clip


def check_probes(
    wrapper: PipelineWrapper,
    targets: Sequence[str],
    preserve: Sequence[str],
    images_per_group: int,
    seed: int,
    per_preserved: int = 1,
) -> tuple[list, list, dict[str, list[str]]]:
    """The check's probes: (target probes, preserved probes, the labels they are scored among); ``per_preserved``
    images of each preserved concept before thinning to ``images_per_group``.

    Decided before any edit, for any concept a user can write: on the micro world a target that names a world
    concept in any spelling (``evals.probes.world_concept``) gets world probes, judged in its category; any other
    ("a dog") gets generic probes, judged among the other such targets and the preserved world concepts; a name that
    nearly spells a world name ("van gohg") is refused with the near names, before any work.
    """
    from evals.microworld import world
    from evals.probes import generic_probes, world_labels, world_probes

    if wrapper.world_file is not None:
        for names, what in ((targets, "concept to erase"), (preserve, "preserved concept")):
            for name in names:  # a near miss of a world name is refused here, before any work
                micro_world_name(name, what, outside="use one, or give --no-check to erase the text as written")
        per_target = max(1, images_per_group // max(1, len(targets)))
        named = [_world_name(t) for t in targets]
        outside = [t for t, n in zip(targets, named, strict=True) if n is None]
        target_probes = world_probes([n for n in named if n is not None], per_target, seed)
        target_probes = (target_probes + generic_probes(outside, per_target, seed))[:images_per_group]
        kept = [n for n in map(_world_name, preserve) if n is not None] or preserve_set("world", targets)
        preserved_probes = world_probes(kept, per_preserved, seed + 1)
        step = max(1, len(preserved_probes) // images_per_group)
        labels: dict[str, list[str]] = world_labels()
        if outside:
            logger.info("the check probes %s generically: not micro-world concepts", ", ".join(map(repr, outside)))
            labels["concept"] = [*outside, *(world.canonical(k) for k in kept)]
        return target_probes, preserved_probes[::step][:images_per_group], labels
    kept = list(preserve) or preserve_set("generic", targets)
    per_target = max(1, images_per_group // max(1, len(targets)))
    target_probes = generic_probes(targets, per_target, seed) if targets else []
    preserved_probes = generic_probes(kept[:images_per_group], per_preserved, seed + 1)[:images_per_group]
    return target_probes, preserved_probes, {"concept": list(targets) + kept}


def reconstruction_check(
    wrapper: PipelineWrapper,
    hook: str,
    sae: Any,
    scorer: Any,
    images: int = 32,
    seed: int = 0,
    *,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
) -> dict[str, float]:
    """Accuracy of the check's preserved probes generated by the original model and through the SAE's plain
    reconstruction at ``hook`` (every activation there replaced by W_dec z + b_dec): what the SAE costs by itself."""
    from evals.probes import probe_accuracy, probe_correct

    _, probes, labels = check_probes(wrapper, [], [], images, seed, per_preserved=-(-images // 8))
    prompts, seeds = [p.prompt for p in probes], [p.seed for p in probes]
    before = wrapper.generate(prompts, seeds, steps=steps, guidance=guidance, progress=False)
    with torch.no_grad(), wrapper.add_output_edit(hook, lambda tokens, _t: sae(tokens.float()).to(tokens.dtype)):
        after = wrapper.generate(prompts, seeds, steps=steps, guidance=guidance, progress=False)
    return {
        "images": len(probes),
        "accuracy_original": probe_accuracy(probe_correct(scorer, before, probes, labels)),
        "accuracy_reconstructed": probe_accuracy(probe_correct(scorer, after, probes, labels)),
    }


def self_check(
    wrapper: PipelineWrapper,
    artifact: ErasureArtifact,
    scorer: Any,
    images_per_group: int = 8,
    seed: int = 0,
    *,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    progress: bool = False,
    probes: tuple[list, list, dict[str, list[str]]] | None = None,
) -> tuple[CheckResult, Image.Image]:
    """Generate target and preserved probes before and after the edit and score them with the CLIP ``scorer``.

    ``probes``: the check's probes as :func:`check_probes` decided them before the edit (default: decided here).
    ``progress`` shows one bar over every denoising step of the check (its estimate is what a user on a CPU needs:
    SD-sized images take minutes each there).
    """
    from evals.grids import labelled_grid
    from evals.probes import probe_accuracy, probe_correct

    if probes is None:
        probes = check_probes(wrapper, artifact.concepts, artifact.preserve, images_per_group, seed)
    target_probes, preserved_probes, labels = probes
    probes = target_probes + preserved_probes
    prompts, seeds = [p.prompt for p in probes], [p.seed for p in probes]
    batch_size = 8
    batches = -(-len(prompts) // batch_size)
    with tqdm(total=2 * batches * steps, desc="check", unit="step", disable=not progress) as bar:

        def tick(_pipe: Any, _step: int, _timestep: Any, kwargs: dict) -> dict:
            bar.update(1)
            return kwargs

        settings = dict(
            steps=steps, guidance=guidance, batch_size=batch_size, progress=False, callback_on_step_end=tick
        )
        before = wrapper.generate(prompts, seeds, **settings)
        with artifact.applied(wrapper):
            after = wrapper.generate(prompts, seeds, **settings)
    ok_before = probe_correct(scorer, before, probes, labels)
    ok_after = probe_correct(scorer, after, probes, labels)
    n = len(target_probes)
    check = CheckResult(
        target_before=probe_accuracy(ok_before[:n]),
        target_after=probe_accuracy(ok_after[:n]),
        preserved_before=probe_accuracy(ok_before[n:]),
        preserved_after=probe_accuracy(ok_after[n:]),
        images=2 * len(probes),
    )
    grid = labelled_grid(
        [[b, a] for b, a in zip(before, after, strict=True)],
        [("[erase] " if i < n else "[keep] ") + p.prompt for i, p in enumerate(probes)],
        ["before", "after"],
    )
    return check, grid


def erasure_settings(
    wrapper: PipelineWrapper,
    targets: Sequence[str],
    method: str = "uce",
    guides: Sequence[str] | None = None,
    preserve: Sequence[str] | None = None,
    config_overrides: dict[str, Any] | None = None,
    *,
    concept_type: str = DEFAULT_CONCEPT_TYPE,
    preserve_sets: Sequence[str] = (),
    expand_prompts: bool = False,
) -> tuple[ConceptSpec, Any]:
    """The concept spec and method config ``scripts/erase.py`` uses, with its defaults filled in and validated.

    As the reference UCE script: the guide comes from ``concept_type`` ("art" for art, else the empty prompt) unless
    given, nothing is preserved unless asked (``preserve`` and/or named ``preserve_sets``), and ``expand_prompts``
    adds the concept type's five templates to the bare concept.
    """
    spec = get_method(method)
    spec.check_architecture(wrapper)
    if concept_type not in CONCEPT_TYPES:
        raise ValueError(f"unknown concept type {concept_type!r}; expected one of {', '.join(CONCEPT_TYPES)}")
    kind = CONCEPT_TYPES[concept_type]
    preserve_list = list(preserve or [])
    for name in preserve_sets:
        preserve_list += preserve_set(name, targets)
    if not spec.capabilities.guides:
        if guides:
            raise ValueError(f"method {method!r} takes no guide: it would ignore --guide")
        guides = [""]
    guides = list(guides) if guides else [kind.guide]
    guide_keys = {concept_key(g) for g in guides if isinstance(g, str)}
    preserve_list = [p for p in preserve_list if not isinstance(p, str) or concept_key(p) not in guide_keys]
    if preserve_sets:  # a named set never repeats a target; what the user typed is checked as typed
        target_keys = {concept_key(t) for t in targets if isinstance(t, str)}
        preserve_list = [p for p in preserve_list if p in (preserve or []) or concept_key(p) not in target_keys]
    concept_spec = ConceptSpec(tuple(targets), tuple(guides), tuple(preserve_list))
    concept_spec.check_against(wrapper)
    can = spec.capabilities
    overrides = dict(config_overrides or {})
    if concept_spec.preserve and not can.preserve:
        raise ValueError(f"method {method!r} has no preserve term: it would ignore the concepts to preserve")
    if concept_spec.preserve and can.preserve_setting and can.preserve_setting not in overrides:
        overrides[can.preserve_setting] = concept_spec.preserve  # recorded in the artifact's config
    if expand_prompts:
        if can.templates is None:
            raise ValueError(f"method {method!r} takes no templates: it cannot expand prompts")
        overrides[can.templates] = ("{}", *kind.expand_templates)
    return concept_spec, config_from_overrides(spec.config_class, overrides, f"method {method!r}")


def stack_settings(
    wrapper: PipelineWrapper,
    targets: Sequence[str],
    methods: Sequence[str],
    guides: Sequence[str] | None = None,
    preserve: Sequence[str] | None = None,
    member_overrides: dict[str, dict[str, Any]] | None = None,
    *,
    concept_type: str = DEFAULT_CONCEPT_TYPE,
    preserve_sets: Sequence[str] = (),
    expand_prompts: bool = False,
) -> list[tuple[str, ConceptSpec, Any]]:
    """``(method, concepts, config)`` of each member of a stack (``erase.stack``), as :func:`erasure_settings` makes
    them; ``member_overrides``: each member's settings (``erase.stack.member_overrides``).

    A stack of one is exactly ``erasure_settings``. In a longer one the guides go to the members that read guides,
    the preserved concepts to those with a preserve term and ``expand_prompts`` to those with templates; an option no
    member takes is a ``ValueError`` in one line, as it is for one method.
    """
    overrides = member_overrides or {}
    if len(methods) == 1:
        method = methods[0]
        return [(method, *erasure_settings(
            wrapper, targets, method, guides, preserve, overrides.get(method), concept_type=concept_type,
            preserve_sets=preserve_sets, expand_prompts=expand_prompts,
        ))]  # fmt: skip
    can = {m: get_method(m).capabilities for m in methods}
    stack = STACK_SEPARATOR.join(methods)
    for given, able, what in ((guides, "guides", "a guide (--guide)"),
                              (preserve or preserve_sets, "preserve", "a preserve term (--preserve)"),
                              (expand_prompts, "templates", "templates (--expand-prompts)")):  # fmt: skip
        if given and not any(getattr(can[m], able) for m in methods):
            raise ValueError(f"no member of {stack} takes {what}")
    members = []
    for m in methods:
        try:
            members.append((m, *erasure_settings(
                wrapper, targets, m, guides if can[m].guides else None, preserve if can[m].preserve else None,
                overrides.get(m), concept_type=concept_type, preserve_sets=preserve_sets if can[m].preserve else (),
                expand_prompts=expand_prompts and can[m].templates is not None,
            )))  # fmt: skip
        except ValueError as err:  # say whose setting it is
            raise ValueError(f"{m}: {error_line(err)}") from None
    return members


def run_erase(
    wrapper: PipelineWrapper,
    concepts: Sequence[str],
    *,
    method: str = "uce",
    concept_type: str = DEFAULT_CONCEPT_TYPE,
    guides: Sequence[str] | None = None,
    preserve: Sequence[str] | None = None,
    preserve_sets: Sequence[str] = (),
    expand_prompts: bool = False,
    out: str | Path | None = None,
    overwrite: bool = False,
    check: bool = True,
    check_images: int = 8,
    check_steps: int = DEFAULT_STEPS,
    check_guidance: float = DEFAULT_GUIDANCE,
    check_seed: int = 0,
    scorer: str | None = None,
    config_overrides: dict[str, Any] | None = None,
    progress: bool = False,
    lora_format: str = "diffusers",
) -> EraseSummary:
    """Erase ``concepts`` from ``wrapper``'s model, check the result, and save the artifact.

    Every input is validated, and the check's scorer loaded, before the edit; the artifact (with the check's picture)
    is written last, in one atomic step, so a run that fails writes nothing and replaces nothing. The output folder
    is claimed for the whole run (``pipelines.files.claim_folder``): a second run to it fails at once.
    ``lora_format="kohya"`` adds the weight change in kohya-ss's LoRA layout (``erase.core.kohya``) to the artifact.
    ``method`` may be a stack (``"uce+saeuron"``, ``erase.stack``): its members are erased in order, each with the
    earlier ones in force, and saved as a stack folder; ``config_overrides`` keys ``member.field`` set one member's
    field, plain keys every member's that has it.
    """
    if lora_format not in LORA_FORMATS:
        raise ValueError(f"unknown LoRA format {lora_format!r}; expected one of {', '.join(LORA_FORMATS)}")
    if check_images < 1 or check_steps < 1:
        raise ValueError(f"the check needs at least 1 image and 1 step, got {check_images} and {check_steps}")
    methods = parse_method_stack(method)
    targets = [c.strip() if isinstance(c, str) else c for c in concepts] if concepts else []
    members = stack_settings(
        wrapper, targets, methods, guides, preserve, member_overrides(methods, dict(config_overrides or {})),
        concept_type=concept_type, preserve_sets=preserve_sets, expand_prompts=expand_prompts,
    )  # fmt: skip
    concept_spec = members[0][1]  # every member erases the same targets; the preserved ones are the members' together
    kept = list(dict.fromkeys(p for _, spec, _ in members for p in spec.preserve))
    if lora_format == "kohya" and len(methods) > 1:
        raise ValueError(f"--format kohya: the stack {method} is several erasures, not one LoRA; erase its members "
                         "one by one for their kohya LoRAs")  # fmt: skip
    if lora_format == "kohya" and get_method(methods[0]).runtime:
        raise ValueError(f"method {method!r} changes no weights (a runtime intervention): it has no kohya LoRA form")
    if lora_format == "kohya":
        check_kohya_architecture(wrapper)
    named = STACK_SEPARATOR.join(methods)
    folder = check_output_folder(out if out else default_output_folder(concept_spec.targets, named), overwrite)
    for name, _, config in members:
        check_checkpoint_folder(getattr(config, "checkpoint_dir", None), folder)
        for field_name in get_method(name).capabilities.sampler_steps:  # e.g. the LoRA methods' pool, sampled first
            wrapper.check_sampler_steps(getattr(config, field_name))
    if check:
        wrapper.check_sampler_steps(check_steps)
    probes = None  # the check's probes, decided before the edit: a concept they cannot take fails here, not after it
    if check:
        probes = check_probes(wrapper, concept_spec.targets, kept, check_images, check_seed)
    with claim_folder(folder):
        check_output_folder(folder, overwrite)  # again, now that no other run can write it
        scorer_name, clip = load_check_scorer(wrapper, scorer) if check else (None, None)
        stack = erase_stack(wrapper, members)
        artifact = stack.members[0] if len(members) == 1 else stack
        result, extra_files = None, {}
        if check:
            result, grid = self_check(
                wrapper, artifact, clip, check_images, check_seed, steps=check_steps, guidance=check_guidance,
                progress=progress, probes=probes,
            )  # fmt: skip
            extra_files[CHECK_PICTURE] = png_bytes(grid)
        if lora_format == "kohya":
            extra_files[KOHYA_FILE] = kohya_bytes(artifact, wrapper)
        if isinstance(artifact, ErasureStack):
            folder = save_stack(stack, folder, wrapper, overwrite=overwrite, extra_files=extra_files)
            weight_format = STACK_FORMAT
        else:
            folder = save_artifact(artifact, folder, wrapper, overwrite=overwrite, extra_files=extra_files)
            weight_format = json.loads((folder / METADATA_FILE).read_text())["weight_format"]
    load_code = f"handle = erase.load(pipe, {json.dumps(str(folder), ensure_ascii=False)})"  # quotes, newlines escaped
    changes = {k: v for m in stack.members for k, v in m.info.get("relative_change", {}).items()}
    relative = sorted(changes.values()) or [0.0]  # a runtime edit changes none
    return EraseSummary(
        concepts=list(concept_spec.targets),
        method=stack.method,
        model=wrapper.model_id,
        out=str(folder),
        weight_format=weight_format,
        edit_seconds=artifact.seconds,
        layers=len(artifact.layers),
        check=result,
        load_code=load_code,
        grid=str(folder / CHECK_PICTURE) if check else None,
        relative_change_median=relative[len(relative) // 2],
        relative_change_max=relative[-1],
        extra={
            "preserve": list(artifact.preserve),
            "guides": [g for m, spec, _ in members if get_method(m).capabilities.guides for g in spec.guides],
            "scorer": scorer_name,
            "info": artifact.info,
            "payloads": list(artifact.payloads),
            **({"members": [m.method for m in stack.members]} if len(members) > 1 else {}),
            **({"kohya_lora": str(folder / KOHYA_FILE)} if lora_format == "kohya" else {}),
        },
        warnings=edit_size_warnings(changes),
    )


def edit_size_warnings(relative_change: dict[str, float], limit: float = 1.0) -> list[str]:
    """A warning line when some layers' edits are larger than the layers' weights (``|dW| / |W| > limit``) or not
    finite: the edit then replaces what the layer knew rather than adjusting it."""
    large = {name: r for name, r in relative_change.items() if not r <= limit}
    if not large:
        return []
    ordered = sorted(relative_change.values(), key=lambda r: r if r == r else float("inf"))
    median, worst = ordered[len(ordered) // 2], ordered[-1]
    return [
        f"the edit is larger than the weights in {len(large)} of {len(relative_change)} layers (median {median:.0%}, "
        f"up to {worst:.0%} of a layer's norm): expect the model to change beyond the concepts; erase fewer concepts "
        "at once, or raise lamb / lower the learning rate"
    ]


def audit_models(
    wrapper: PipelineWrapper,
    folders: Sequence[str | Path],
    artifacts: Sequence[ErasureArtifact | ErasureStack] | None = None,
) -> list:  # list[evals.audit.AuditModel]
    """One audit column per artifact (or stack) folder, each checked against ``wrapper``'s base model.

    ``artifacts`` are the folders' artifacts when the caller has already read them (``scripts/audit.py`` reads them
    before the model loads), so the weights are not read and hashed twice; otherwise each folder is read here.
    Raises ``ArtifactError`` for an unreadable folder and ``ArtifactMismatchError`` for an artifact made for other
    base weights, before anything is generated.
    """
    from evals.audit import AuditModel

    if artifacts is not None and len(artifacts) != len(folders):
        raise ValueError(f"{len(artifacts)} artifacts for {len(folders)} folders")
    models = []
    for i, folder in enumerate(folders):
        artifact = artifacts[i] if artifacts is not None else read_erasure(folder)
        check_erasure_base(wrapper, artifact, where=str(folder))
        metadata = Path(folder) / (STACK_FILE if isinstance(artifact, ErasureStack) else METADATA_FILE)
        models.append(AuditModel.erased(folder, metadata.read_bytes(), artifact.applied))
    return models
