"""erase: concept erasure for text-to-image diffusion models."""

__version__ = "0.1.0"

from .artifact import (  # noqa: E402 - __version__ first: artifact reads it
    ArtifactError,
    ArtifactExistsError,
    ArtifactMismatchError,
    ErasureArtifact,
    apply_artifact,
    check_artifact_base,
    load_artifact,
    low_rank_factors,
    save_artifact,
)
from .registry import (  # noqa: E402
    ConceptSpec,
    Method,
    WeightEdit,
    available_methods,
    erase_concepts,
    get_method,
    register_method,
)

__all__ = [
    "ArtifactError",
    "ArtifactExistsError",
    "ArtifactMismatchError",
    "ConceptSpec",
    "ErasureArtifact",
    "Method",
    "WeightEdit",
    "__version__",
    "apply_artifact",
    "available_methods",
    "check_artifact_base",
    "erase_concepts",
    "get_method",
    "load_artifact",
    "low_rank_factors",
    "register_method",
    "save_artifact",
]
