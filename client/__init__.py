"""The fedlora ClientApp: generic over strategies (their client halves are hooks), it installs
received factors on the cached base model, trains, replies."""

from .client_app import app, handle_train

__all__ = ["app", "handle_train"]
