"""Is the Hugging Face hub reachable from here? Decide once, fast, before the libraries retry.

A hub name (a model or a dataset that is not a local path) makes transformers / datasets
contact the hub; on a machine without network access they retry with backoff for up to a
minute before failing. :func:`offline_unless_reachable` probes the hub's host once (a TCP
connection, :data:`PROBE_TIMEOUT_S`) and, when it cannot be reached, switches
huggingface_hub and datasets to offline mode for this process: what is in the local cache
still loads, anything else fails at once with the libraries' own "not in the cache" message.
"""

from __future__ import annotations

import contextlib
import os
import socket
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0
_decided: bool | None = None


def _offline_asked() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def reachable(endpoint: str | None = None, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub endpoint (``HF_ENDPOINT``, default huggingface.co:443)
    opens within ``timeout`` seconds."""
    url = urlparse(endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def offline_unless_reachable() -> bool:
    """Switch this process to the hub's offline mode if the hub cannot be reached (probed once);
    returns whether the process is offline."""
    global _decided
    if _decided is None:
        _decided = _offline_asked() or not reachable()
        if _decided:
            os.environ["HF_HUB_OFFLINE"] = "1"  # for processes started from here
            with contextlib.suppress(ImportError):
                import huggingface_hub.constants as hub_constants

                hub_constants.HF_HUB_OFFLINE = True  # read at import time: set the live value too
            with contextlib.suppress(ImportError):
                import datasets.config as datasets_config

                datasets_config.HF_HUB_OFFLINE = True
    return _decided
