"""The main job, as ``scripts/erase.py`` runs it: erase, save the artifact, check the result on fixed seeds.

Kept out of the script so tests call exactly what users run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from pipelines import PipelineWrapper
from pipelines.files import atomic_write_bytes, png_bytes

from .artifact import ErasureArtifact, save_artifact
from .registry import ConceptSpec, erase_concepts, get_method

__all__ = [
    "CheckResult",
    "EraseSummary",
    "default_guides",
    "default_output_folder",
    "default_preserve",
    "default_templates",
    "erasure_settings",
    "run_erase",
]

logger = logging.getLogger(__name__)

#: Preserve set for models outside the micro world, when the user gives none: common artists and subjects.
GENERIC_PRESERVE: tuple[str, ...] = (
    "pablo picasso", "claude monet", "rembrandt", "salvador dali", "andy warhol",
    "a dog", "a cat", "a car", "a house", "a tree", "a person", "a city at night",
)  # fmt: skip


def default_output_folder(concepts: Sequence[str], method: str) -> Path:
    """``erased/<concept>[+<concept>...]-<method>``, with the concepts made filename-safe."""
    slug = "+".join(re.sub(r"[^a-z0-9]+", "-", c.lower()).strip("-") or "concept" for c in concepts)
    return Path("erased") / f"{slug[:80]}-{method}"


#: Contexts a style is embedded in for the edit (UCE/TIME ``templates``); more contexts generalise further.
STYLE_TEMPLATES: tuple[str, ...] = (
    "{}",
    "a painting in the style of {}",
    "a picture in the style of {}",
    "a {} painting",
)
#: What an erased art style becomes: a generic word, as UCE's authors guide artists to "art".
STYLE_GUIDE = "art"


def _micro_styles(wrapper: PipelineWrapper, targets: Sequence[str]) -> bool:
    if wrapper.model_id != "micro" or not targets:
        return False
    from evals import world

    return all(_in_world(t) and world.category_of(t) == "style" for t in targets)


def default_guides(wrapper: PipelineWrapper, targets: Sequence[str]) -> list[str]:
    """ "art" for micro-world styles (mapping a style to the empty prompt leaves the unconditional mix of
    styles, which still shows it a third of the time), else the empty prompt."""
    return [STYLE_GUIDE] if _micro_styles(wrapper, targets) else [""]


def default_templates(wrapper: PipelineWrapper, targets: Sequence[str]) -> tuple[str, ...]:
    """Style contexts for micro-world styles (measured: van gogh falls to 8% instead of 21%), else the bare concept."""
    return STYLE_TEMPLATES if _micro_styles(wrapper, targets) else ("{}",)


def default_preserve(wrapper: PipelineWrapper, targets: Sequence[str]) -> list[str]:
    """Every other micro-world concept (minus the targets' synonyms) for the micro model, else ``GENERIC_PRESERVE``."""
    if wrapper.model_id != "micro":
        return [p for p in GENERIC_PRESERVE if p not in targets]
    from evals import world

    erased = {world.canonical(t) for t in targets if _in_world(t)}
    return [c for cat in world.CATEGORIES for c in world.concepts(cat) if c not in erased and c != "plain"]


def _in_world(name: str) -> bool:
    from evals import world

    try:
        world.canonical(name)
    except (KeyError, ValueError):
        return False
    return True


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
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        from dataclasses import asdict

        return json.dumps(asdict(self), indent=2)


def self_check(
    wrapper: PipelineWrapper,
    artifact: ErasureArtifact,
    scorer_name: str,
    images_per_group: int = 8,
    seed: int = 0,
) -> tuple[CheckResult, Image.Image]:
    """Generate target and preserved probes before and after the edit and score them with the CLIP scorer."""
    from evals.grids import labelled_grid
    from evals.probes import generic_probes, probe_accuracy, probe_correct, world_labels, world_probes
    from evals.scorer import ClipScorer

    if wrapper.model_id == "micro":
        per_target = max(1, images_per_group // len(artifact.concepts))
        target_probes = world_probes(artifact.concepts, per_target, seed)[:images_per_group]
        kept = [p for p in artifact.preserve if _in_world(p)]
        preserved_probes = world_probes(kept, 1, seed + 1)
        step = max(1, len(preserved_probes) // images_per_group)
        preserved_probes = preserved_probes[::step][:images_per_group]
        labels = world_labels()
    else:
        target_probes = generic_probes(artifact.concepts, max(1, images_per_group // len(artifact.concepts)), seed)
        preserved_probes = generic_probes(artifact.preserve[:images_per_group], 1, seed + 1)
        labels = {"concept": list(artifact.concepts) + list(artifact.preserve)}
    probes = target_probes + preserved_probes
    prompts, seeds = [p.prompt for p in probes], [p.seed for p in probes]
    before = wrapper.generate(prompts, seeds, progress=False)
    with wrapper.weight_deltas(artifact.deltas):
        after = wrapper.generate(prompts, seeds, progress=False)
    scorer = ClipScorer.from_pretrained(scorer_name, device=wrapper.device, progress=False)
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
) -> tuple[ConceptSpec, Any]:
    """The concept spec and method config ``scripts/erase.py`` uses, with its defaults filled in and validated."""
    spec = get_method(method)
    preserve_list = list(preserve) if preserve else default_preserve(wrapper, targets)
    guides = list(guides) if guides else default_guides(wrapper, targets)
    preserve_list = [p for p in preserve_list if p not in guides]
    concept_spec = ConceptSpec(tuple(targets), tuple(guides), tuple(preserve_list))
    concept_spec.check_against(wrapper)
    overrides = dict(config_overrides or {})
    if "templates" in {f.name for f in dataclasses.fields(spec.config_class)}:
        overrides.setdefault("templates", default_templates(wrapper, targets))
    return concept_spec, spec.config_class(**overrides)


def run_erase(
    wrapper: PipelineWrapper,
    concepts: Sequence[str],
    *,
    method: str = "uce",
    guides: Sequence[str] | None = None,
    preserve: Sequence[str] | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    check: bool = True,
    check_images: int = 8,
    scorer: str | None = None,
    config_overrides: dict[str, Any] | None = None,
) -> EraseSummary:
    """Erase ``concepts`` from ``wrapper``'s model, save the artifact, and check the result.

    Every input is validated before any work or write, so bad input costs nothing and leaves nothing behind.
    """
    targets = [c.strip() for c in concepts] if concepts else []
    concept_spec, config = erasure_settings(wrapper, targets, method, guides, preserve, config_overrides)
    preserve_list = list(concept_spec.preserve)
    folder = Path(out) if out else default_output_folder(targets, method)
    from .artifact import _check_destination

    _check_destination(folder, overwrite)
    artifact = erase_concepts(wrapper, concept_spec, method, config)
    save_artifact(artifact, folder, wrapper, overwrite=overwrite)
    meta = json.loads((folder / "erasure.json").read_text())
    weight_format = meta["weight_format"]
    if weight_format == "lora":
        load_code = f'pipe.load_lora_weights("{folder}")'
    else:
        load_code = f'StableDiffusionPipeline.from_pretrained("{folder}/pipeline")'
    result, grid_path = None, None
    if check:
        scorer_name = scorer or ("micro" if wrapper.model_id == "micro" else "open_clip:ViT-L-14/openai")
        result, grid = self_check(wrapper, artifact, scorer_name, check_images)
        grid_path = folder / "before_after.png"
        atomic_write_bytes(grid_path, png_bytes(grid))
    return EraseSummary(
        concepts=targets,
        method=method,
        model=wrapper.model_id,
        out=str(folder),
        weight_format=weight_format,
        edit_seconds=artifact.seconds,
        layers=len(artifact.deltas),
        check=result,
        load_code=load_code,
        grid=str(grid_path) if grid_path else None,
        extra={"preserve": preserve_list, "guides": list(concept_spec.guides), "info": artifact.info},
    )
