"""pFedLoRA: clients of different base models sharing one small homogeneous adapter.

Yi et al., "pFedLoRA: Model-Heterogeneous Personalized Federated Learning with LoRA Tuning"
(arXiv 2310.13283). What each rule here follows in the paper, named by the step of its method
(its abstract and method overview: the homogeneous small adapter, iterative training, adapter
aggregation; section numbers differ between the paper's versions, v1 "FedLoRA" and v2):

* **Heterogeneous local models** (the problem setting): every client keeps its own model, which
  may differ from client to client. Here a client's local model is its base
  (``federation.profiles[i].model``, ``fedlora-client --model``; default ``model.name``) with its
  own LoRA on ``lora.target_modules``, plus a personal projection and head
  (:mod:`fedlora.strategies.pfedlora_head`). It never leaves the client: it lives in the node's
  state (:class:`~fedlora.strategies.hooks.NodeStore`, checkpointed in simulation and written
  beside the data file on a device), as FedSA-LoRA's private B does.
* **The homogeneous small adapter**: one low-rank adapter with the same shapes on every client,
  the only tensors uploaded and downloaded. The paper puts it on the fully connected layers of
  CNNs; here it is LoRA on a common-width fully connected layer of the head (see
  :mod:`~fedlora.strategies.pfedlora_head` and docs/pfedlora.md for the transfer).
* **Iterative training** each round: first the local model with the adapter frozen
  (``strategy.local_model_steps``), then the adapter with the local model frozen
  (``strategy.adapter_steps``). The paper counts local *epochs* for both; fedlora counts steps,
  as ``federation.local_steps`` does (choice: budgets comparable with every other strategy).
* **Aggregation**: the server averages the uploaded adapters weighted by the clients' examples
  (FedAvg's rule, which the paper uses), :func:`pfedlora_aggregate`; the average is exact.
* **Personalized evaluation**: every client is judged on its own held-out part, with the new
  global adapter in its own local model, and exports that model on the last round (as fedsa).

Choices the paper leaves open: the adapter's init (LoRA's: A random, B zero, so the first
forward pass is the local model's own); the order inside a round (local model first, as the
paper lists it); the local model's LoRA is trained in the local-model phase only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from pydantic import model_validator

from fedlora.config import RunConfig
from fedlora.errors import ConfigError, ModelError
from fedlora.model.adapters import from_record, to_record
from fedlora.wire import protocol as P

from .base import ClientUpdate
from .fedavg import weighted_mean
from .fedsa import FedSALoRA
from .hooks import ClientHooks, NodeStore
from .options import StrategyOptions, option, require
from .pfedlora_head import HeadSpec, head_path, initial_private, is_shared, load_bundle
from .registry import register

__all__ = ["PFedLoRA", "PFedLoRAClient", "PFedLoRAOptions", "load_bundle", "pfedlora_aggregate", "shared_adapter"]

#: Round-config keys the server half sets and the client half reads.
LOCAL_MODEL_STEPS = "pfedlora-local-model-steps"
ADAPTER_STEPS = "pfedlora-adapter-steps"
INIT_SEED = "pfedlora-init-seed"


class PFedLoRAOptions(StrategyOptions):
    """``[strategy]`` options of ``pfedlora``."""

    adapter_width: int = option(64, "common width d of the head the shared adapter sits in", ge=2, le=4096)
    adapter_rank: int = option(8, "rank r of the shared adapter (A: r x d, B: d x r)", ge=1, le=1024)
    adapter_alpha: float | None = option(None, "shared adapter's alpha, scaling alpha / r (default 2 r)", gt=0)
    local_model_steps: int | None = option(
        None, "steps on the local model (adapter frozen) per round (default federation.local_steps)", ge=0, le=100_000
    )
    adapter_steps: int | None = option(
        None,
        "steps on the shared adapter (local model frozen) per round (default federation.local_steps)",
        ge=0,
        le=100_000,
    )

    @model_validator(mode="after")
    def _rules(self) -> PFedLoRAOptions:
        require(self.adapter_rank <= self.adapter_width, "adapter_rank", "must be at most strategy.adapter_width")
        require(
            self.local_model_steps != 0 or self.adapter_steps != 0,
            "adapter_steps",
            "and strategy.local_model_steps are both 0: nothing would train",
        )
        return self

    def phases(self, local_steps: int) -> tuple[int, int]:
        """(local-model steps, adapter steps) per round, ``local_steps`` standing in for an unset one."""
        first = self.local_model_steps if self.local_model_steps is not None else local_steps
        return first, self.adapter_steps if self.adapter_steps is not None else local_steps


def shared_adapter(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What crosses the network: the homogeneous adapter's tensors alone."""
    return {k: v for k, v in state.items() if is_shared(k)}


def pfedlora_aggregate(
    states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """The global adapter: the example-weighted mean of the clients' adapters (the paper's
    aggregation, FedAvg's rule), exact in float32.

    Raises
    ------
    ValueError
        When the adapters do not all have the same keys and shapes (it is homogeneous by design).
    """
    check_homogeneous(states)
    return weighted_mean([dict(s) for s in states], list(weights))


def check_homogeneous(states: Sequence[Mapping[str, torch.Tensor]]) -> None:
    """ValueError unless there are adapters and they all have the same keys and shapes."""
    if not states:
        raise ValueError("no adapters to aggregate")
    first = {k: tuple(v.shape) for k, v in states[0].items()}
    for state in states[1:]:
        if {k: tuple(v.shape) for k, v in state.items()} != first:
            raise ValueError("pfedlora's adapters must have identical keys and shapes on every client")


@contextlib.contextmanager
def alternating(model: torch.nn.Module, local_model_steps: int) -> Iterator[Any]:
    """Yield a ``before_step`` that trains the local model (every trained tensor but the shared
    adapter's) for the first ``local_model_steps`` steps, then the shared adapter alone.

    A frozen tensor keeps ``grad`` None, which AdamW skips: it does not move in that phase.
    """
    groups: dict[bool, list[torch.nn.Parameter]] = {}

    def before_step(step: int) -> None:
        if not groups:  # the tensors train_local asked to train, split once
            trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            groups[True] = [p for n, p in trained if is_shared(n)]
            groups[False] = [p for n, p in trained if not is_shared(n)]
        adapter_phase = step >= local_model_steps
        for shared, params in groups.items():
            for p in params:
                p.requires_grad_(shared == adapter_phase)

    yield before_step


class PFedLoRAClient(ClientHooks):
    """Client half: the received tensors are the global adapter; everything else of the adapter
    (the base's LoRA, the projection and head) is the node's own, kept in its state across
    rounds; each round trains the local model, then the adapter, and sends the adapter back."""

    def kept(self, shapes, received, store: NodeStore) -> dict[str, torch.Tensor]:
        stored = store.load()
        own = {k: tuple(s) for k, s in shapes.items() if k not in received}
        fresh = initial_private(own, int(self.config.get(INIT_SEED, 0)))
        return {k: stored[k] if k in stored and tuple(stored[k].shape) == own[k] else fresh[k] for k in own}

    def keep(self, store: NodeStore, kept: dict[str, torch.Tensor]) -> None:
        if kept:
            store.save(kept)

    def training(self, model: torch.nn.Module, spec: Any) -> contextlib.AbstractContextManager:
        return alternating(model, int(self.config.get(LOCAL_MODEL_STEPS, 0)))


@register
class PFedLoRA(FedSALoRA):
    """Clients of different bases (``pfedlora``): one homogeneous adapter averaged, the rest personal."""

    name = "pfedlora"
    options_class = PFedLoRAOptions
    client_hooks = PFedLoRAClient
    heterogeneous_models = True
    local_dp_refusal = (
        "freezes half of what it trains at every step, which DP-SGD's per-step privacy accounting does not "
        "cover; use privacy.mode = 'central' or 'none'"
    )
    #: The shared adapter is a mean of same-shape tensors: any coordinate-wise reducer fits.
    robust_aggregators = ("mean", "trimmed_mean", "median")

    @classmethod
    def model_head(cls, cfg: RunConfig) -> HeadSpec:
        o = cls.parse_options(cfg.strategy.options)
        alpha = o.adapter_alpha if o.adapter_alpha is not None else 2.0 * o.adapter_rank
        return HeadSpec(width=o.adapter_width, rank=o.adapter_rank, alpha=float(alpha), seed=cfg.seed)

    @classmethod
    def check_setup(cls, cfg: RunConfig, tasks: list[str]) -> None:
        super().check_setup(cfg, tasks)
        if cfg.model.task != "classification":
            raise ConfigError(
                "config key 'model.task': strategy 'pfedlora' puts its shared adapter in a classification head; "
                "use task = 'classification'"
            )
        if cfg.federation.local_epochs > 0:
            raise ConfigError(
                "config key 'federation.local_epochs': strategy 'pfedlora' trains strategy.local_model_steps then "
                "strategy.adapter_steps per round; set local_epochs = 0"
            )
        check_bases(cfg)

    def payload(self, node_id: int, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return shared_adapter(state)

    def client_config(self, node_id: int, server_round: int) -> dict[str, Any]:
        local_model_steps, adapter_steps = self.options.phases(self.settings.federation.local_steps)
        return {
            P.LOCAL_STEPS: local_model_steps + adapter_steps,  # the ClientApp's budget: both phases
            LOCAL_MODEL_STEPS: local_model_steps,
            ADAPTER_STEPS: adapter_steps,
            INIT_SEED: self.settings.seed,
        }

    def aggregate(
        self, server_round: int, state: dict[str, torch.Tensor], updates: list[ClientUpdate]
    ) -> dict[str, torch.Tensor]:
        states = [shared_adapter(u.state) for u in updates]
        check_homogeneous(states)
        # pfedlora_aggregate's weighted mean, or the robust reducer robustness.aggregator names.
        state.update(self.average(weighted_mean)(states, [u.num_examples for u in updates]))
        return state

    def configure_evaluate(
        self,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        grid: Grid,
        *,
        nodes: Sequence[int] | None = None,
        export: Collection[int] = (),
    ) -> Iterable[Message]:
        """Each of ``nodes`` evaluates its own local model with the global adapter (and exports it when asked)."""
        shared = to_record(shared_adapter(from_record(arrays)))
        return super().configure_evaluate(server_round, shared, config, grid, nodes=nodes, export=export)


def check_bases(cfg: RunConfig) -> None:
    """Every base of the run (``model.name`` and each profile's ``model``) must be readable and put
    its head at the same module path, so the shared adapter has the same keys on every client.

    Raises
    ------
    ConfigError
        One line naming ``federation.profiles[i].model`` (or ``model.name``).
    """
    from fedlora.model.loading import resolve_model_source, skeleton

    bases = [("model.name", cfg.model.name)] + [
        (f"federation.profiles[{i}].model", p.model) for i, p in enumerate(cfg.federation.profiles) if p.model
    ]
    paths: dict[str, tuple[str, str]] = {}
    for key, name in bases:
        try:
            model = skeleton(resolve_model_source(name), "classification", 2)
        except ModelError as err:
            raise ConfigError(f"config key '{key}': {str(err).split(': ', 1)[-1]}") from None
        if model is None:
            raise ConfigError(f"config key '{key}': cannot read the configuration of model {name!r}")
        paths[name] = (key, head_path(model))
    if len({path for _, path in paths.values()}) > 1:
        found = ", ".join(f"{name!r} has {path!r}" for name, (_, path) in paths.items())
        raise ConfigError(
            f"config key '{bases[-1][0]}': pfedlora's shared adapter is keyed by the head's module path, which "
            f"differs between these bases ({found}); use bases of one family"
        )
