"""Exceptions that mean "the user gave us something wrong", reported as one line, exit 2."""

from __future__ import annotations


class FedLoraError(Exception):
    """Base class of user-facing errors: the CLI prints ``str(err)`` and exits with status 2."""


class ConfigError(FedLoraError):
    """A preset, a ``--set`` override or a flag is invalid (names the key)."""


class DataError(FedLoraError):
    """A data file or dataset is missing, unreadable or lacks a named column (names the file)."""


class ModelError(FedLoraError):
    """The model cannot be loaded or does not fit the configuration (names the model)."""
