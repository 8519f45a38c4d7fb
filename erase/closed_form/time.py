"""TIME, Text-to-Image Model Editing (Orgad et al., 2023): a source prompt is edited to behave like a destination.

TIME is the ridge-regularised projection edit that UCE later generalised: with no preserve set,

    W_new = (sum_i v*_i c_i^T + lambda W)(sum_i c_i c_i^T + lambda I)^-1,   v*_i = W c_dest_i,

so it runs on UCE's solver. For erasure the destination is the guide ("van gogh" -> "" or -> "a painting").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pipelines import CROSS_ATTENTION_PATTERNS, PipelineWrapper

from ..core.inputs import check_number_fields
from ..core.registry import Capabilities, ConceptSpec, WeightEdit, register_method
from .uce import UCEConfig, concept_embeddings, edit_from_update, uce_update

__all__ = ["TIMEConfig", "erase_time"]


@dataclass
class TIMEConfig:
    """Settings of a TIME edit.

    Attributes:
        lamb: ridge weight lambda (the paper uses 0.1 for SD 1.4's weights).
        layers: fnmatch patterns of the UNet Linear modules to edit.
        templates: prompts the source and destination are embedded in, ``{}`` standing for them.
    """

    NUMBER_RANGES: ClassVar[dict[str, str]] = {"lamb": "> 0"}

    lamb: float = 0.1
    layers: tuple[str, ...] = CROSS_ATTENTION_PATTERNS
    templates: tuple[str, ...] = ("{}",)

    def __post_init__(self) -> None:
        # The shared fields are validated once, by UCE's config.
        check_number_fields(self)
        UCEConfig(lamb=self.lamb, layers=self.layers, templates=self.templates)
        self.layers, self.templates = tuple(self.layers), tuple(self.templates)


@register_method(
    "time",
    TIMEConfig,
    family="closed_form",
    summary="TIME: source -> destination projection edit",
    capabilities=Capabilities(templates="templates"),
)
def erase_time(wrapper: PipelineWrapper, concepts: ConceptSpec, config: TIMEConfig) -> WeightEdit:
    """Send each source prompt (``targets``) to its destination (``guides``); preserve set ignored, as in TIME."""
    shared = UCEConfig(lamb=config.lamb, layers=config.layers, templates=config.templates)
    guides = [concepts.guide_for(i) for i in range(len(concepts.targets))]
    c_source, c_dest = concept_embeddings(wrapper, concepts.targets, guides, shared)
    u, v = uce_update(c_source, c_dest, None, erase_scale=1.0, preserve_scale=0.0, lamb=config.lamb)
    return edit_from_update(wrapper, config.layers, u, v)
