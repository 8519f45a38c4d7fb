"""The model hub, asked with a short timeout before a download, and the one line that says what to do without it.

huggingface_hub retries a download it cannot start several times, with growing waits, before it fails, and
diffusers' error then points at a stack trace the scripts do not show. Whoever loads something the hub serves (a
pipeline by hub id, an open_clip pretrained tag) asks :func:`hub_unreachable` first: a TCP connection to the hub's
endpoint (huggingface_hub's ``ENDPOINT``, which ``HF_ENDPOINT`` sets; through the proxy the environment names for
it, as the hub client connects) that must open within :data:`HUB_TIMEOUT_S` seconds. When it does not, the files are
read from the local cache alone, and when they are not all there, :class:`HubUnreachableError` says so in one line
with the ways to work offline.
"""

from __future__ import annotations

import socket
import threading
import urllib.request
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlsplit

__all__ = [
    "HUB_TIMEOUT_S",
    "MODEL_INSTEAD",
    "HubUnreachableError",
    "hub_error",
    "hub_offline",
    "hub_unreachable",
    "load_from_hub",
]

T = TypeVar("T")

#: Seconds the hub's endpoint has to accept a connection (name lookup included) before it counts as unreachable.
HUB_TIMEOUT_S: float = 3.0

#: What a script's user passes instead of a hub id of a model, to work without the hub.
MODEL_INSTEAD = "a local folder or --model micro"


class HubUnreachableError(ValueError):
    """Something must come from the model hub, the hub cannot be reached (or downloads are off) and the local cache
    does not hold it: one line, with the ways to work offline."""


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _connect_target(url: str) -> tuple[str, int]:
    """The host and port a client opens for ``url``: the URL's own, or its scheme's proxy when one applies."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        return proxy_parts.hostname or "", proxy_parts.port or (443 if proxy_parts.scheme == "https" else 80)
    return host, parts.port or (443 if parts.scheme == "https" else 80)


def _connection_error(host: str, port: int, timeout: float) -> str | None:
    """Why a TCP connection to ``host:port`` does not open within ``timeout`` seconds, or ``None`` when it does.

    The attempt runs in a daemon thread so that a name lookup that hangs (which the socket timeout does not bound)
    costs ``timeout`` too."""
    outcome: list[str | None] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(err.strerror or str(err) or type(err).__name__)

    worker = threading.Thread(target=attempt, name="hub-probe", daemon=True)
    worker.start()
    worker.join(timeout)
    return outcome[0] if outcome else f"no answer within {timeout:g} s"


def hub_offline() -> bool:
    """Whether huggingface_hub's offline mode is on (``HF_HUB_OFFLINE``): the libraries read their cache alone and
    try no connection."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_unreachable(timeout: float = HUB_TIMEOUT_S) -> str | None:
    """Why the hub's endpoint does not accept a connection within ``timeout`` seconds (``"Connection refused"``, a
    failed name lookup, no answer), or ``None`` when it does."""
    endpoint = _endpoint()
    host, port = _connect_target(endpoint)
    if not host:
        return f"the endpoint {endpoint!r} names no host"
    error = _connection_error(host, port, timeout)
    return None if error is None else f"{host}:{port}: {error}"


def hub_error(
    what: str, reason: str | None, *, cached: bool = False, instead: str = MODEL_INSTEAD
) -> HubUnreachableError:
    """The one-line error for ``what`` (e.g. ``"model 'org/name'"``) when the hub cannot serve it: ``reason`` from
    :func:`hub_unreachable`, or ``None`` for offline mode. ``cached``: the files are in the local cache but the
    loader cannot read them without trying the network first (open_clip), so offline mode is the way to use them.
    ``instead``: what the user can pass in its place (a model's local folder, a scorer's)."""
    if reason is None:
        return HubUnreachableError(
            f"{what} is not in the local cache and HF_HUB_OFFLINE is set (no downloads): download it once with "
            f"HF_HUB_OFFLINE unset and the network on, or pass {instead}"
        )
    head = f"no network: the model hub {_endpoint()} cannot be reached ({reason})"
    if cached:
        return HubUnreachableError(f"{head}; {what} is in the local cache: set HF_HUB_OFFLINE=1 to use it offline")
    return HubUnreachableError(
        f"{head} and {what} is not (fully) in the local cache; to work offline, pass {instead}, or set "
        "HF_HUB_OFFLINE=1 once the files are cached"
    )


def load_from_hub(what: str, load: Callable[[bool], T], *, timeout: float = HUB_TIMEOUT_S) -> T:
    """``load(local_files_only)`` for something the hub serves: online when the hub answers, from the local cache
    alone in offline mode or when the hub does not answer, and :class:`HubUnreachableError` in one line when the
    cache lacks files (``load`` raised ``OSError``, as diffusers, transformers and huggingface_hub do for a missing
    cached file). Other errors of ``load`` pass through."""
    offline = hub_offline()
    reason = None if offline else hub_unreachable(timeout)
    if not offline and reason is None:
        return load(False)
    try:
        return load(True)
    except OSError as err:
        raise hub_error(what, reason) from err
