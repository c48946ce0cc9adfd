"""The fedlora ClientApp: generic over strategies (their client halves are hooks), it installs
received factors on the cached base model, trains, replies.

``app`` and ``handle_train`` come from :mod:`fedlora.client.client_app` on first use, so that
importing a light submodule (:mod:`fedlora.client.entry`, the per-message ClientApp of a
deployment, or :mod:`fedlora.client.worker`) does not import torch and transformers.
"""

from __future__ import annotations

from typing import Any

__all__ = ["app", "handle_train"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import client_app

        return getattr(client_app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
