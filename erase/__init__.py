"""erase: concept erasure for text-to-image diffusion models.

The public names load on first use (PEP 562), so ``erase.inputs`` and ``erase.layout`` check a command's input
before torch and diffusers are imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipelines.lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "ArtifactError": "layout",
    "ArtifactExistsError": "layout",
    "ArtifactMismatchError": "layout",
    "check_output_folder": "layout",
    "concept_key": "inputs",
    "ErasureArtifact": "artifact",
    "apply_artifact": "artifact",
    "attach": "intervention",
    "SAEIntervention": "intervention",
    "FacilitatedTransport": "transport",
    "check_artifact_base": "artifact",
    "load": "artifact",
    "load_artifact": "artifact",
    "low_rank_factors": "artifact",
    "save_artifact": "artifact",
    "ConceptSpec": "registry",
    "Method": "registry",
    "WeightEdit": "registry",
    "available_methods": "registry",
    "erase_concepts": "registry",
    "get_method": "registry",
    "register_method": "registry",
}

__all__ = [
    "ArtifactError",
    "ArtifactExistsError",
    "ArtifactMismatchError",
    "ConceptSpec",
    "ErasureArtifact",
    "FacilitatedTransport",
    "Method",
    "SAEIntervention",
    "WeightEdit",
    "__version__",
    "apply_artifact",
    "attach",
    "available_methods",
    "check_artifact_base",
    "check_output_folder",
    "concept_key",
    "erase_concepts",
    "get_method",
    "load",
    "load_artifact",
    "low_rank_factors",
    "register_method",
    "save_artifact",
]

if TYPE_CHECKING:
    from .artifact import (
        ErasureArtifact,
        apply_artifact,
        check_artifact_base,
        load,
        load_artifact,
        low_rank_factors,
        save_artifact,
    )
    from .inputs import concept_key
    from .intervention import SAEIntervention, attach
    from .layout import ArtifactError, ArtifactExistsError, ArtifactMismatchError, check_output_folder
    from .registry import (
        ConceptSpec,
        Method,
        WeightEdit,
        available_methods,
        erase_concepts,
        get_method,
        register_method,
    )
    from .transport import FacilitatedTransport

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
