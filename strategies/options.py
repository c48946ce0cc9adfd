"""Typed strategy options: the ``[strategy]`` table of a preset, one pydantic model per strategy.

A strategy declares its options as a model deriving from :class:`StrategyOptions`: one typed
field per option, made by :func:`option` with its default, its help text and its bounds (or a
``Literal`` for a choice). Validation is the run configuration's (:mod:`fedlora.config`): an
unknown name, a value of the wrong type, a non-finite number or one out of bounds fails with one
line naming ``strategy.<option>``. A rule between options is a ``model_validator`` that calls
:func:`require`.

Example::

    class MyOptions(StrategyOptions):
        momentum: float = option(0.9, "server momentum", ge=0, lt=1)
        warmup: int = option(0, "rounds before the momentum applies", ge=0)

        @model_validator(mode="after")
        def _rules(self) -> MyOptions:
            require(self.warmup == 0 or self.momentum > 0, "warmup", "needs strategy.momentum > 0")
            return self
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import Field, model_validator

from fedlora.config import ConfigModel
from fedlora.errors import ConfigError

from .server_opt import SERVER_OPTIMIZERS, ServerOptimizerName


def option(default: Any, help: str, **bounds: Any) -> Any:  # noqa: A002 - "help" as argparse users expect
    """A field with its default, the help text that docs show, and its bounds (``ge``, ``gt``, ``le``, ``lt``)."""
    return Field(default, description=help, **bounds)


def require(ok: bool, name: str, message: str) -> None:
    """Raise the one-line ConfigError ``config key 'strategy.<name>' <message>`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"config key 'strategy.{name}' {message}")


class StrategyOptions(ConfigModel):
    """Base of every strategy's options (a strategy without options uses it as is).

    Its fields are the ``[strategy]`` keys every strategy takes: the server optimizer applied to
    each round's aggregate (:mod:`fedlora.strategies.server_opt`; a strategy where it is not
    defined refuses it in ``check_setup``).
    """

    KEY_PREFIX = "strategy."
    server_optimizer: ServerOptimizerName = option(
        "none", f"FedOpt on each round's aggregate: {', '.join(SERVER_OPTIMIZERS)}"
    )
    server_lr: float | None = option(
        None, "server learning rate (default 1.0 for none/avgm, 1e-2 for adam/yogi/adagrad)", gt=0
    )
    server_momentum: float = option(0.9, "avgm's momentum", ge=0, lt=1)
    beta1: float = option(0.9, "adam/yogi/adagrad: first-moment decay", ge=0, lt=1)
    beta2: float = option(0.99, "adam/yogi: second-moment decay", ge=0, lt=1)
    tau: float = option(1e-3, "adam/yogi/adagrad: adaptivity, added to sqrt(v); v starts at tau^2", gt=0)

    @model_validator(mode="after")
    def _shared_rules(self) -> StrategyOptions:
        lr = self.server_lr
        require(
            self.server_optimizer != "none" or lr is None or lr == 1.0,
            "server_lr",
            "has no effect with server_optimizer = 'none'; for a server learning rate on plain averaging use "
            "server_optimizer = 'avgm' with server_momentum = 0",
        )
        return self

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
        return cls.parse(raw, strategy=strategy)

    def to_dict(self) -> dict[str, Any]:
        """The strategy's own options, plus the shared ones (server optimizer) set to other than their default."""
        shared = {name: info.default for name, info in StrategyOptions.model_fields.items()}
        return {k: v for k, v in self.model_dump().items() if k not in shared or v != shared[k]}
