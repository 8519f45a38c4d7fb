"""TIME, Text-to-Image Model Editing (Orgad et al., 2023): a source prompt is edited to behave like a destination.

TIME is the ridge-regularised projection edit that UCE later generalised: with no preserve set,

    W_new = (sum_i v*_i c_i^T + lambda W)(sum_i c_i c_i^T + lambda I)^-1,   v*_i = W c_dest_i,

so it runs on UCE's solver, on UCE's layers. For erasure the destination is the guide ("van gogh" -> "" or ->
"a painting").

SD3 and Flux (the TIME paper and code are SD 1.x only): the edited layers are the transformer's text-side input
projections, each solved with the embeddings it reads, as ``erase.closed_form.uce`` does there (the token rows of
every text stream at the prompt's last token, the pooled vector). Those layers have a bias b; TIME's objective
W_new c_i + b = W c_dest_i + b gives the targets v* = W c_dest_i, without b (``target_bias=False``, where uce
follows ``uce_flux_edit.py`` in taking v* = W c + b, which counts b twice on the guided direction).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from pipelines import PipelineWrapper

from ..core.inputs import check_number_fields
from ..core.registry import Capabilities, ConceptSpec, WeightEdit, register_method
from .uce import UCEConfig, erase_uce

__all__ = ["TIMEConfig", "erase_time"]


@dataclass
class TIMEConfig:
    """Settings of a TIME edit.

    Attributes:
        lamb: ridge weight lambda (the paper uses 0.1 for SD 1.4's weights).
        layers: fnmatch patterns of the denoiser's Linear modules to edit (``None``: the model's text-reading layers,
            UNet cross-attention keys and values, SD3/Flux's text-side input projections).
        templates: prompts the source and destination are embedded in, ``{}`` standing for them.
        target_bias: on layers with a bias (SD3/Flux), take the targets as the layer's outputs W c_dest + b, as uce's
            Flux reference does; ``False`` (TIME's objective): W c_dest.
    """

    NUMBER_RANGES: ClassVar[dict[str, str]] = {"lamb": "> 0"}

    lamb: float = 0.1
    layers: tuple[str, ...] | None = None
    templates: tuple[str, ...] = ("{}",)
    target_bias: bool = False

    def __post_init__(self) -> None:
        # The shared fields are validated once, by UCE's config.
        check_number_fields(self)
        shared = self.uce_config()
        self.layers, self.templates = shared.layers, shared.templates

    def uce_config(self) -> UCEConfig:
        """UCE's settings of the same edit: erase scale 1, TIME's lambda, layers, templates and bias targets."""
        return UCEConfig(lamb=self.lamb, layers=self.layers, templates=self.templates, target_bias=self.target_bias)


@register_method(
    "time",
    TIMEConfig,
    family="closed_form",
    summary="TIME: source -> destination projection edit",
    capabilities=Capabilities(templates="templates", architectures=("sd", "sdxl", "sd3", "flux")),
)
def erase_time(wrapper: PipelineWrapper, concepts: ConceptSpec, config: TIMEConfig) -> WeightEdit:
    """Send each source prompt (``targets``) to its destination (``guides``); preserve set ignored, as in TIME."""
    edit = erase_uce(wrapper, dataclasses.replace(concepts, preserve=()), config.uce_config())
    edit.info.pop("preserve_scale", None)  # no preserve term
    return edit
