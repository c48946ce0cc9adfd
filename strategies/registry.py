"""The strategy registry: ``strategy.name`` -> the strategy class (server half + client hooks).

Each strategy module registers its class once, with :func:`register` as a decorator; a second
class under a taken name is refused, as peft's ``register_peft_method`` and Opacus's
``register_accountant`` refuse one. A strategy outside this package (a research prototype, a
test) registers the same way before the run starts, and is then selectable by name in every
runtime of that process.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

from fedlora.errors import ConfigError

from .hooks import ClientHooks
from .options import StrategyOptions
from .settings import StrategySettings

if TYPE_CHECKING:
    from fedlora.config import RunConfig
    from fedlora.model.adapters import AdapterSpec

    from .base import LoRAStrategy, NodeDirectory

STRATEGIES: dict[str, type[LoRAStrategy]] = {}


def register(cls: type[LoRAStrategy]) -> type[LoRAStrategy]:
    """Make ``cls`` selectable as ``strategy.name = cls.name`` (usable as a decorator).

    Raises
    ------
    ValueError
        When ``cls`` has no name, its name is taken, it leaves an abstract method unwritten
        (:meth:`~fedlora.strategies.base.LoRAStrategy.aggregate`), or its halves are not what the
        ClientApp and the option parser expect.
    """
    from .base import LoRAStrategy

    if not (isinstance(cls, type) and issubclass(cls, LoRAStrategy)):
        raise ValueError(f"{cls!r} is not a LoRAStrategy subclass")
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(cls.__abstractmethods__))
        raise ValueError(f"{cls.__name__} does not define {missing}: a strategy must write its own aggregation")
    if cls.name in STRATEGIES:
        taken = STRATEGIES[cls.name]
        raise ValueError(f"strategy name {cls.name!r} is already registered by {taken.__module__}.{taken.__qualname__}")
    if not (isinstance(cls.client_hooks, type) and issubclass(cls.client_hooks, ClientHooks)):
        raise ValueError(f"{cls.__name__}.client_hooks must be a ClientHooks subclass")
    if not (isinstance(cls.options_class, type) and issubclass(cls.options_class, StrategyOptions)):
        raise ValueError(f"{cls.__name__}.options_class must be a StrategyOptions subclass")
    STRATEGIES[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Forget strategy ``name`` (tests, plugins reloading); unknown names are ignored."""
    STRATEGIES.pop(name, None)


def get_strategy_class(name: str) -> type[LoRAStrategy]:
    """The registered class for ``name``; ConfigError listing the known names otherwise."""
    if name not in STRATEGIES:
        raise ConfigError(
            f"config key 'strategy.name': unknown strategy {name!r} (known: {', '.join(sorted(STRATEGIES))})"
        )
    return STRATEGIES[name]


def create(cfg: RunConfig, spec: AdapterSpec, *, tasks=(), nodes: NodeDirectory | None = None) -> LoRAStrategy:
    """Instantiate the configured strategy (options validated)."""
    cls = get_strategy_class(cfg.strategy.name)
    settings = StrategySettings.of_run(cfg, cls.parse_options(cfg.strategy.options))
    return cls(settings, spec, tasks=tasks, nodes=nodes)
