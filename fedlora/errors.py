"""Exceptions that mean "the user gave us something wrong", reported as one line, exit 2."""

from __future__ import annotations


class FedLoraError(Exception):
    """Base class of user-facing errors: the CLI prints ``str(err)`` and exits with ``exit_code``."""

    exit_code = 2


class ConfigError(FedLoraError):
    """A preset, a ``--set`` override or a flag is invalid (names the key)."""


class DataError(FedLoraError):
    """A data file or dataset is missing, unreadable or lacks a named column (names the file)."""


class ModelError(FedLoraError):
    """The model cannot be loaded or does not fit the configuration (names the model)."""


class ConnectError(FedLoraError):
    """The other side of a deployment cannot be reached or refuses us (names the address);
    the CLI exits with status 1, as for a failed run, rather than 2 for a usage mistake."""

    exit_code = 1


class RunFailed(FedLoraError):
    """A deployed run started but did not complete (names why); the CLI exits with status 1."""

    exit_code = 1
