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
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, get_type_hints

from fedlora.errors import ConfigError

from .server_opt import SERVER_OPTIMIZERS


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
    """Base of every strategy's options (a strategy without options uses it as is).

    Its fields are the ``[strategy]`` keys every strategy takes: the server optimizer applied to
    each round's aggregate (:mod:`fedlora.strategies.server_opt`; a strategy where it is not
    defined refuses it in ``check_setup``). They are checked by :meth:`check_shared`, which
    :meth:`from_dict` runs whatever ``__post_init__`` a subclass defines.
    """

    server_optimizer: str = option("none", f"FedOpt on each round's aggregate: {', '.join(SERVER_OPTIMIZERS)}")
    server_lr: float | None = option(
        None, "server learning rate (default 1.0 for none/avgm, 1e-2 for adam/yogi/adagrad)"
    )
    server_momentum: float = option(0.9, "avgm's momentum in [0, 1)")
    beta1: float = option(0.9, "adam/yogi/adagrad: first-moment decay in [0, 1)")
    beta2: float = option(0.99, "adam/yogi: second-moment decay in [0, 1)")
    tau: float = option(1e-3, "adam/yogi/adagrad: adaptivity (> 0), added to sqrt(v); v starts at tau^2")

    def __post_init__(self) -> None:
        self.check_shared()

    def check_shared(self) -> None:
        """Range checks of the keys every strategy takes; ConfigError naming ``strategy.<key>``."""
        kind = self.server_optimizer
        require(
            kind in SERVER_OPTIMIZERS,
            "server_optimizer",
            f"must be one of {', '.join(SERVER_OPTIMIZERS)}, got {kind!r}",
        )
        lr = self.server_lr
        require(lr is None or (math.isfinite(lr) and lr > 0), "server_lr", f"must be a finite number > 0, got {lr}")
        require(
            kind != "none" or lr is None or lr == 1.0,
            "server_lr",
            "has no effect with server_optimizer = 'none'; for a server learning rate on plain averaging use "
            "server_optimizer = 'avgm' with server_momentum = 0",
        )
        for name in ("server_momentum", "beta1", "beta2"):
            value = getattr(self, name)
            require(0 <= value < 1, name, f"must be in [0, 1), got {value}")
        require(math.isfinite(self.tau) and self.tau > 0, "tau", f"must be a finite number > 0, got {self.tau}")

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
        options = cls(**kwargs)
        options.check_shared()  # a subclass's own __post_init__ need not call the base's
        return options

    def to_dict(self) -> dict[str, Any]:
        """The strategy's own options, plus the shared ones (server optimizer) set to other than their default."""
        shared = {f.name: f.default for f in dataclasses.fields(StrategyOptions)}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in shared or v != shared[k]}
