"""Where and how loudly the pipeline runs: device strings checked before any model loads, and the loading bars of
the libraries underneath (diffusers, transformers, huggingface_hub) switched off unless a user asks for them.
"""

from __future__ import annotations

import logging

import torch

__all__ = ["resolve_device", "set_library_verbosity"]

logger = logging.getLogger(__name__)


def resolve_device(device: str | torch.device | None, default: str = "cpu") -> torch.device:
    """The ``torch.device`` a device string names, or ``ValueError`` in one line when it is malformed or absent here.

    Checked before a model loads, so a typo or a machine without CUDA costs nothing: torch itself only fails on the
    first tensor moved there, with a driver traceback.
    """
    if device is None or (isinstance(device, str) and not device.strip()):
        device = default
    try:
        resolved = torch.device(device.strip() if isinstance(device, str) else device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {str(device)!r}: expected cpu, cuda, cuda:N, mps or xpu") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r}: CUDA is not available on this machine (use --device cpu)")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif resolved.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError(f"device {str(device)!r}: MPS is not available on this machine (use --device cpu)")
    elif resolved.type == "xpu":
        if not (hasattr(torch, "xpu") and torch.xpu.is_available()):
            raise ValueError(f"device {str(device)!r}: XPU is not available on this machine (use --device cpu)")
    elif resolved.type != "cpu":
        raise ValueError(f"device {str(device)!r} is not supported: use cpu, cuda, cuda:N, mps or xpu")
    return resolved


def _open_clip_errors(record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR and "open_clip" in record.pathname)


def _failed_fetch_errors(record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR and record.getMessage().startswith("An error occurred while trying"))


def set_library_verbosity(verbose: bool) -> None:
    """Show or hide the loading bars and info logs of diffusers, transformers and huggingface_hub, and the error logs
    of a failed download or a missing cached file of open_clip and diffusers' model loader (the exception that
    follows each is what a script reports).

    Called by the scripts (``--verbose``): the bars print raw cursor codes into log files and say nothing about the
    phases that take time, which get their own bars.
    """
    import diffusers
    import huggingface_hub
    import transformers

    if verbose:
        diffusers.utils.logging.enable_progress_bar()
        transformers.utils.logging.enable_progress_bar()
        huggingface_hub.utils.enable_progress_bars()
        return
    # open_clip and diffusers log a failed download as an ERROR before raising it; the script's error line says it
    # once.
    for handler in logging.getLogger().handlers:
        handler.addFilter(_open_clip_errors)
    logging.getLogger("diffusers.models.modeling_utils").addFilter(_failed_fetch_errors)
    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    huggingface_hub.utils.disable_progress_bars()
