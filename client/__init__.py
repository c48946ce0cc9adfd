"""The fedlora ClientApp: installs received factors on the cached base model, trains, replies."""

from .client_app import app, handle_train

__all__ = ["app", "handle_train"]
