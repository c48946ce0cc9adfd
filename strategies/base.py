"""The base of every fedlora strategy: a Flower message-API ``Strategy`` over LoRA factors.

Protocol between a strategy and the ClientApp (both sides read this):

* Query (message type ``query``, once per node, before its first train message, for strategies
  whose payload depends on it: :attr:`LoRAStrategy.needs_node_info`): the client answers what it
  has in ``content["info"]`` (``rank`` it will train, ``device``, ``memory-gb``,
  ``num-examples``, ``tasks``); the server keeps it in :attr:`LoRAStrategy.node_info`. Every
  train reply carries the same ``info`` record, so the other strategies learn it without the
  extra round trip (on a deployment, each message costs a ClientApp process start).
* Down (message type ``train``): ``content["arrays"]`` holds the tensors the client must install
  *and train*, plus base-delta factors (``<module>.base_delta_A/B``, ``D = B @ A``) that it folds
  into its frozen weights; ``content["config"]`` holds the round's settings (``rank``, ``alpha``,
  ``local-steps``, ``lr``, ...). Adapter tensors that were not sent are reset by the client from
  the config (``a-seed``: FFA-LoRA's shared frozen A) and stay frozen; ``svd-rank`` asks the
  client to replace each target weight by its FeDeRA residual; ``tasks`` (FL-TAC) lists the task
  adapters in the arrays, keyed ``<task>::<key>``, each trained on that task's examples.
* Up: ``content["arrays"]`` with the same keys and shapes as the trained tensors sent;
  ``content["metrics"]`` with ``num-examples``, ``train-loss``, ``train-seconds``, ``rank`` (after
  any self-pruning) and, per task, ``num-examples::<task>``.

Subclasses override the hooks (:meth:`initialize`, :meth:`payload`, :meth:`client_config`,
:meth:`aggregate`); the message plumbing, sampling and metrics stay here. The global state is a
flat ``dict[str, Tensor]`` keyed as in :mod:`fedlora.adapters`; the update of a target module is
``(alpha / r) * B @ A``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO
from typing import Any, ClassVar

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedlora.adapters import AdapterHost, AdapterSpec, from_record, is_base_delta, module_of, to_record
from fedlora.config import RunConfig
from fedlora.errors import ConfigError

TASK_SEP = "::"


@dataclass
class NodeInfo:
    """What a node said about itself in its query reply.

    Attributes
    ----------
    node_id : int
        The node.
    rank : int
        The LoRA rank it trains (its device profile, ``fedlora-client --rank``, or ``lora.rank``).
    device : str
        ``cpu``, ``cuda``, ...
    memory_gb : float
        Memory the device reports (0 when unknown).
    num_examples : int
        Its training examples.
    tasks : dict of str to int
        Examples per task (multi-task data), else empty.
    """

    node_id: int
    rank: int
    device: str = "cpu"
    memory_gb: float = 0.0
    num_examples: int = 0
    tasks: dict[str, int] = field(default_factory=dict)


@dataclass
class GlobalView:
    """One model that the global state describes, as the server evaluates and exports it.

    Attributes
    ----------
    name : str
        ``""`` for the single global adapter; a task name for FL-TAC's per-task adapters.
    spec : AdapterSpec
        Shape of the adapter (rank, alpha, targets).
    state : dict of str to Tensor
        LoRA factors and trained head, keyed as in :mod:`fedlora.adapters`.
    base_delta : dict of str to (Tensor, Tensor)
        Per target module, factors ``(B_d, A_d)`` of a delta folded into the frozen weight:
        the model is ``W0 + B_d @ A_d + scaling * B @ A``.
    """

    name: str
    spec: AdapterSpec
    state: dict[str, torch.Tensor]
    base_delta: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def split_base_delta(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor],
                                                                 dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(adapter tensors, {module: (B_d, A_d)}) from a state that may hold base-delta factors."""
    adapter = {k: v for k, v in state.items() if not is_base_delta(k)}
    deltas: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key in state:
        if is_base_delta(key) and key.endswith("_A"):
            module = module_of(key)
            deltas[module] = (state[f"{module}.base_delta_B"], state[key])
    return adapter, deltas


def task_key(task: str, key: str) -> str:
    """Key of tensor ``key`` of task ``task``'s adapter inside one flat state."""
    return f"{task}{TASK_SEP}{key}"


def split_task_key(key: str) -> tuple[str, str]:
    """Inverse of :func:`task_key`; ``("", key)`` for keys of no task."""
    if TASK_SEP in key:
        task, _, rest = key.partition(TASK_SEP)
        return task, rest
    return "", key


@dataclass
class ClientUpdate:
    """One validated reply, decoded.

    Attributes
    ----------
    node_id : int
        The replying node.
    state : dict of str to Tensor
        The trained tensors (float32), same keys as were sent to this node.
    num_examples : int
        Examples the client trained on this round (the FedAvg weight).
    metrics : dict
        The reply's MetricRecord as plain values.
    """

    node_id: int
    state: dict[str, torch.Tensor]
    num_examples: int
    metrics: dict[str, Any] = field(default_factory=dict)


class LoRAStrategy(Strategy):
    """Federated LoRA over Flower's message API.

    Parameters
    ----------
    cfg : RunConfig
        The run: federation settings (fraction, local steps, lr, transport dtype), seed, LoRA
        settings, and ``cfg.strategy.options`` checked against :attr:`option_types`.
    spec : AdapterSpec
        The global adapter's shape (rank, alpha, target modules).
    """

    name: ClassVar[str] = ""
    #: Strategy options accepted under ``[strategy]``, with their types and defaults.
    option_types: ClassVar[dict[str, tuple[type, Any]]] = {}
    #: Whether clients may train different ranks (device profiles); others need all at lora.rank.
    heterogeneous_ranks: ClassVar[bool] = False
    #: Whether the strategy rewrites the frozen base weights (SVD init, merges): needs float weights.
    needs_float_base: ClassVar[bool] = False
    #: Whether each client ends with its own model (evaluated on the clients: configure_evaluate).
    personalized: ClassVar[bool] = False
    #: Whether what a node is sent depends on its :attr:`node_info` (its rank, its tasks), so the
    #: server must query a node before its first train message.
    needs_node_info: ClassVar[bool] = False

    def __init__(self, cfg: RunConfig, spec: AdapterSpec) -> None:
        self.cfg = cfg
        self.spec = spec
        self.options = self._parse_options(cfg.strategy.options)
        self._global: dict[str, torch.Tensor] = {}
        self.last_sent: dict[int, ArrayRecord] = {}
        self.node_info: dict[int, NodeInfo] = {}
        #: Task names of multi-task data, in order (set by the server before initialisation).
        self.tasks: list[str] = []
        #: Per-node facts from the last aggregation, merged into metrics.jsonl's client entries.
        self.client_report: dict[int, dict[str, Any]] = {}

    @classmethod
    def check_setup(cls, cfg: RunConfig, tasks: list[str]) -> None:
        """Raise ConfigError when this strategy cannot run ``cfg`` (checked before any training).

        Parameters
        ----------
        cfg : RunConfig
            The run.
        tasks : list of str
            Task names of multi-task data (empty otherwise).
        """
        cls._parse_options(cfg.strategy.options)
        if cls.needs_float_base and cfg.model.quantization != "none":
            raise ConfigError(
                f"config key 'model.quantization': strategy '{cls.name}' folds updates into the frozen base "
                f"weights, which cannot be done exactly on a {cfg.model.quantization} base; use quantization = 'none'"
            )
        ranks = {p.rank for p in cfg.federation.profiles}
        if not cls.heterogeneous_ranks and ranks - {cfg.lora.rank}:
            raise ConfigError(
                f"config key 'federation.profiles': strategy '{cls.name}' trains every client at lora.rank = "
                f"{cfg.lora.rank}; profiles with ranks {sorted(ranks)} need a heterogeneous-rank strategy (hetlora, flora)"
            )

    def node_rank(self, node_id: int) -> int:
        """The rank node ``node_id`` trains this round."""
        return self.spec.rank

    def node_spec(self, node_id: int) -> AdapterSpec:
        """The adapter shape node ``node_id`` trains (the global one unless ranks differ)."""
        return self.spec

    def views(self, state: Mapping[str, torch.Tensor]) -> list[GlobalView]:
        """The model(s) ``state`` describes, for evaluation and export."""
        adapter, deltas = split_base_delta(state)
        return [GlobalView(name="", spec=self.spec, state=adapter, base_delta=deltas)]

    # -- options -------------------------------------------------------------------------------

    @classmethod
    def _parse_options(cls, raw: Mapping[str, Any]) -> dict[str, Any]:
        out = {}
        for key, value in raw.items():
            if key not in cls.option_types:
                known = ", ".join(sorted(cls.option_types)) or "none"
                raise ConfigError(f"unknown config key 'strategy.{key}' for strategy '{cls.name}' (options: {known})")
            typ, _ = cls.option_types[key]
            if typ is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
                raise ConfigError(f"config key 'strategy.{key}' must be {typ.__name__}, got {value!r}")
            out[key] = value
        for key, (_, default) in cls.option_types.items():
            out.setdefault(key, default)
        return out

    # -- hooks for subclasses ------------------------------------------------------------------

    def initialize(self, state: dict[str, torch.Tensor], host: AdapterHost | None = None) -> dict[str, torch.Tensor]:
        """Turn the freshly initialised adapter into the round-0 global state.

        Parameters
        ----------
        state : dict of str to Tensor
            peft's seeded init of the global adapter.
        host : AdapterHost, optional
            Gives access to the pretrained weights (:meth:`AdapterHost.base_weight`) for
            strategies that initialise from them.
        """
        return state

    def round_metrics(self) -> dict[str, Any]:
        """Strategy-level facts about the last aggregation for metrics.jsonl (e.g. cluster purity)."""
        return {}

    def payload(self, node_id: int, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors node ``node_id`` receives, installs and trains this round."""
        return dict(state)

    def client_config(self, node_id: int, server_round: int) -> dict[str, Any]:
        """Extra ConfigRecord entries for node ``node_id``."""
        return {}

    def aggregate(
        self, server_round: int, state: dict[str, torch.Tensor], updates: list[ClientUpdate]
    ) -> dict[str, torch.Tensor]:
        """New global state from the current one and the round's validated updates."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Strategy state beyond the global tensors, JSON-serialisable (for checkpoints)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` on resume."""

    # -- Flower Strategy interface -------------------------------------------------------------

    def sample(self, grid: Grid, server_round: int) -> list[int]:
        """Seeded sample of ``round(fraction * N)`` nodes (at least one), reproducible per round."""
        nodes = sorted(grid.get_node_ids())
        if not nodes:
            return []
        count = max(1, math.floor(self.cfg.federation.fraction * len(nodes) + 0.5))
        rng = random.Random(self.cfg.seed * 100_003 + server_round)
        return sorted(rng.sample(nodes, min(count, len(nodes))))

    def base_client_config(self, node_id: int, server_round: int) -> dict[str, Any]:
        fed = self.cfg.federation
        return {
            "server-round": server_round,
            "rank": self.node_spec(node_id).rank,
            "alpha": float(self.node_spec(node_id).alpha),
            "local-steps": fed.local_steps,
            "local-epochs": float(fed.local_epochs),
            "batch-size": fed.batch_size,
            "lr": float(fed.lr),
            # The client mixes in its partition id (or node id), so seeds differ per client yet
            # do not depend on the node ids a runtime happens to assign.
            "seed": self.cfg.seed * 1_000_003 + server_round * 10_007,
            "transport-dtype": fed.transport_dtype,
        }

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One message per sampled node: its payload and the round's config.

        Parameters
        ----------
        server_round : int
            1-based round number.
        arrays : ArrayRecord
            The current global state (float32).
        config : ConfigRecord
            Entries shared by every node this round (the run description, labels).
        grid : Grid
            Where the nodes are.
        """
        self._global = from_record(arrays)
        messages = []
        self.last_sent = {}
        # Nodes whose payload is the very same tensors share one serialized record.
        records: dict[tuple, ArrayRecord] = {}
        for node_id in self.sample(grid, server_round):
            entries = dict(config)
            entries.update(self.base_client_config(node_id, server_round))
            entries.update(self.client_config(node_id, server_round))
            payload = self.payload(node_id, self._global)
            signature = tuple((k, id(v)) for k, v in sorted(payload.items()))
            if signature not in records:
                records[signature] = to_record(payload, self.cfg.federation.transport_dtype)
            record = records[signature]
            self.last_sent[node_id] = record
            content = RecordDict({"arrays": record, "config": ConfigRecord(entries)})
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node_id,
                                    group_id=str(server_round)))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate replies (already validated by the server) into the new global state.

        Returns
        -------
        tuple of (ArrayRecord or None, MetricRecord or None)
            The full new global state and the example-weighted mean train loss; ``(None, None)``
            when no reply carried content.
        """
        updates = [decode_reply(msg) for msg in replies if not msg.has_error()]
        self.client_report = {}
        if not updates:
            return None, None
        new_state = self.aggregate(server_round, dict(self._global), updates)
        total = sum(u.num_examples for u in updates)
        loss = sum(float(u.metrics.get("train-loss", 0.0)) * u.num_examples for u in updates) / total
        self._global = new_state
        return to_record(new_state), MetricRecord({"train-loss": loss, "num-examples": total})

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """fedlora evaluates the global adapter on the server's held-out split: no messages."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        log(INFO, "\t├── Strategy: %s (%s)", self.name, type(self).__name__)
        log(INFO, "\t├── Fraction of clients per round: %.2f", self.cfg.federation.fraction)
        log(INFO, "\t└── Options: %s", self.options or "{}")


def decode_reply(msg: Message) -> ClientUpdate:
    """ClientUpdate from a (validated) train reply."""
    metrics = dict(msg.content["metrics"])
    return ClientUpdate(
        node_id=msg.metadata.src_node_id,
        state=from_record(msg.content["arrays"]),
        num_examples=int(metrics["num-examples"]),
        metrics=metrics,
    )
