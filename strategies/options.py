"""Typed strategy options: the ``[strategy]`` table of a preset, one dataclass per strategy.

A strategy declares its options as a dataclass deriving from :class:`StrategyOptions`, one field
per option with its default and a help text, and checks ranges in ``__post_init__`` (the way
peft's ``LoraConfig`` does). :meth:`StrategyOptions.from_dict` turns the raw table into it:
an unknown name or a value of the wrong type fails with one line naming ``strategy.<option>``.

Example::

    @dataclass
    class MyOptions(StrategyOptions):
        momentum: float = option(0.9, "server momentum in [0, 1)")

        def __post_init__(self) -> None:
            require(0 <= self.momentum < 1, "momentum", f"must be in [0, 1), got {self.momentum}")
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, get_type_hints

from fedlora.errors import ConfigError


def option(default: Any, help: str) -> Any:  # noqa: A002 - "help" as argparse and dataclasses users expect
    """A dataclass field with a default and the help text that docs and errors show."""
    return dataclasses.field(default=default, metadata={"help": help})


def require(ok: bool, name: str, message: str) -> None:
    """Raise the one-line ConfigError ``config key 'strategy.<name>' <message>`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"config key 'strategy.{name}' {message}")


def _type_name(typ: Any) -> str:
    args = [a for a in typing.get_args(typ) if a is not type(None)]
    if args:
        return " or ".join(a.__name__ for a in args)
    return getattr(typ, "__name__", str(typ))


def _check_type(name: str, value: Any, typ: Any) -> Any:
    """``value`` as ``typ`` (an int is accepted where a float is expected; bools are not numbers)."""
    allowed = [typ]
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        allowed = list(typing.get_args(typ))
    if value is None and type(None) in allowed:
        return None
    for t in allowed:
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t in (str, bool) and isinstance(value, t):
            return value
    raise ConfigError(f"config key 'strategy.{name}' must be {_type_name(typ)}, got {value!r}")


@dataclasses.dataclass
class StrategyOptions:
    """Base of every strategy's options (a strategy without options uses it as is)."""

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], strategy: str) -> StrategyOptions:
        """Build from the ``[strategy]`` table (without ``name``); ConfigError naming the key.

        Parameters
        ----------
        raw : mapping
            Option names to values as TOML gave them.
        strategy : str
            The strategy's registered name, for messages.
        """
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = get_type_hints(cls)
        kwargs = {}
        for key, value in raw.items():
            if key not in fields:
                known = ", ".join(sorted(fields)) or "none"
                raise ConfigError(f"unknown config key 'strategy.{key}' for strategy '{strategy}' (options: {known})")
            kwargs[key] = _check_type(key, value, hints[key])
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
