"""erase: concept erasure for text-to-image diffusion models.

The public names load on first use (PEP 562), so ``erase.core.inputs`` and ``erase.core.layout`` check a command's
input before torch and diffusers are imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipelines.lazy import lazy_exports

from .core.version import __version__

_EXPORTS: dict[str, str] = {
    "ArtifactError": "core.layout",
    "ArtifactExistsError": "core.layout",
    "ArtifactMismatchError": "core.layout",
    "check_output_folder": "core.layout",
    "concept_key": "core.inputs",
    "ArtifactHandle": "core.artifact",
    "ErasureArtifact": "core.artifact",
    "ErasureStack": "stack",
    "erase_stack": "stack",
    "load_stack": "stack",
    "save_stack": "stack",
    "apply_artifact": "loading",
    "attach": "loading",
    "SAEIntervention": "sae.intervention",
    "FacilitatedTransport": "lora.transport",
    "WeightChange": "core.weights",
    "check_artifact_base": "core.artifact",
    "load": "loading",
    "load_artifact": "core.artifact",
    "low_rank_factors": "core.weights",
    "save_artifact": "core.artifact",
    "save_kohya_lora": "core.kohya",
    "ConceptSpec": "core.registry",
    "Method": "core.registry",
    "WeightEdit": "core.registry",
    "available_methods": "core.registry",
    "erase_concepts": "core.registry",
    "get_method": "core.registry",
    "register_method": "core.registry",
}

__all__ = [
    "ArtifactError",
    "ArtifactExistsError",
    "ArtifactHandle",
    "ArtifactMismatchError",
    "ConceptSpec",
    "ErasureArtifact",
    "ErasureStack",
    "FacilitatedTransport",
    "Method",
    "SAEIntervention",
    "WeightChange",
    "WeightEdit",
    "__version__",
    "apply_artifact",
    "attach",
    "available_methods",
    "check_artifact_base",
    "check_output_folder",
    "concept_key",
    "erase_concepts",
    "erase_stack",
    "get_method",
    "load",
    "load_artifact",
    "load_stack",
    "low_rank_factors",
    "register_method",
    "save_artifact",
    "save_kohya_lora",
    "save_stack",
]

if TYPE_CHECKING:
    from .core.artifact import ArtifactHandle, ErasureArtifact, check_artifact_base, load_artifact, save_artifact
    from .core.inputs import concept_key
    from .core.kohya import save_kohya_lora
    from .core.layout import ArtifactError, ArtifactExistsError, ArtifactMismatchError, check_output_folder
    from .core.registry import (
        ConceptSpec,
        Method,
        WeightEdit,
        available_methods,
        erase_concepts,
        get_method,
        register_method,
    )
    from .core.weights import WeightChange, low_rank_factors
    from .loading import apply_artifact, attach, load
    from .lora.transport import FacilitatedTransport
    from .sae.intervention import SAEIntervention
    from .stack import ErasureStack, erase_stack, load_stack, save_stack

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
