"""One way to put an artifact in force: ``handle = erase.load(pipe, folder)``.

Any artifact (a weight edit stored as a LoRA or as full weights, an SAE intervention, a LoRA with facilitated
transport) on a plain diffusers ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` or a ``PipelineWrapper``::

    import erase
    pipe = StableDiffusionPipeline.from_pretrained("CompVis/stable-diffusion-v1-4")
    handle = erase.load(pipe, "erased/van-gogh-uce")
    image = pipe("a painting in the style of van gogh").images[0]
    handle.remove()                       # the pipeline is bit for bit its original self again

    with erase.load(pipe, "erased/van-gogh-itd"):   # or for a block only
        ...

A stack folder (``erase.stack``: several erasures made in order, ``--method uce+saeuron``) loads the same way: its
members go in in order and ``remove()`` takes them all off.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines import PipelineWrapper, wrap_pipeline

from .core.artifact import ArtifactHandle, ErasureArtifact, install_artifact, load_artifact
from .core.layout import ArtifactMismatchError
from .stack import ErasureStack, install_stack, is_stack_folder, load_stack, refuse_as_member

__all__ = ["apply_artifact", "attach", "load"]


def load(pipe: Any, artifact: str | Path | ErasureArtifact | ErasureStack) -> ArtifactHandle:
    """Install an erasure artifact on ``pipe``; returns the handle whose ``remove()`` undoes it exactly.

    ``pipe`` is a ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` (any precision, any device) or a
    ``PipelineWrapper`` holding the base model the artifact was made from; ``artifact`` is its folder (or an
    ``ErasureArtifact`` in memory). Every file is checked against the artifact's checksums, the base model against its
    fingerprint, and every payload against the live pipeline before anything changes; a second application of the
    same artifact is refused (``ArtifactMismatchError``). ``remove()`` copies the original weights back and takes
    every hook off, also when the handle is left as a context manager.

    A stack folder (or an ``ErasureStack``) installs its members in order, each checked against the state the ones
    before it leave; its handle (``erase.stack.StackHandle``) takes them all off. A later member of a stack loaded
    alone is refused, naming the stack.
    """
    wrapper = pipe if isinstance(pipe, PipelineWrapper) else wrap_pipeline(pipe)
    where = "artifact" if isinstance(artifact, ErasureArtifact | ErasureStack) else str(artifact)
    if isinstance(artifact, ErasureStack) or (not isinstance(artifact, ErasureArtifact) and is_stack_folder(artifact)):
        return install_stack(wrapper, artifact if isinstance(artifact, ErasureStack) else load_stack(artifact), where)
    if not isinstance(artifact, ErasureArtifact):
        artifact = load_artifact(artifact)
    try:
        return install_artifact(wrapper, artifact, where)
    except ArtifactMismatchError as err:
        raise refuse_as_member(err, artifact) from None


def attach(pipe: Any, folder: str | Path | ErasureArtifact) -> ArtifactHandle:
    """Alias of ``erase.load``, kept for the 0.1 releases and removed in 0.2: use ``erase.load``."""
    return load(pipe, folder)


def apply_artifact(wrapper: Any, artifact: str | Path | ErasureArtifact) -> ArtifactHandle:
    """Alias of ``erase.load``, kept for the 0.1 releases and removed in 0.2: use ``erase.load``."""
    return load(wrapper, artifact)
