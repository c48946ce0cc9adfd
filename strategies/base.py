"""The server half of every fedlora strategy: a Flower message-API ``Strategy`` over LoRA factors.

A strategy is one module holding both halves: a subclass of :class:`LoRAStrategy` (what each
node is sent, how replies combine: pure functions over tensors, tested alone) and a subclass of
:class:`~fedlora.strategies.hooks.ClientHooks` (what the node does around local training), tied
together by :attr:`LoRAStrategy.client_hooks` and registered once by name
(:func:`fedlora.strategies.register`). Options are a pydantic model
(:class:`~fedlora.strategies.options.StrategyOptions`) named by :attr:`LoRAStrategy.options_class`.

What the round loop (:mod:`fedlora.server.server_app`) gives a strategy: the run, the global
adapter's shape and the task names in the constructor, plus :class:`NodeDirectory`, where the
loop records what every node said about itself (its ``INFO`` record: rank, device, memory,
examples, tasks). What it gets back: the messages of :meth:`LoRAStrategy.configure_train` (the
tensors sent to a node are in its message), the new global state of
:meth:`LoRAStrategy.aggregate_train`, and :meth:`LoRAStrategy.round_metrics` /
:meth:`LoRAStrategy.client_facts` about the last aggregation. Message keys are the constants
of :mod:`fedlora.wire.protocol`.

The global state is a flat ``dict[str, Tensor]`` keyed as in :mod:`fedlora.model.adapters`; the
update of a target module is ``(alpha / r) * B @ A``. Base-delta factors
(``<module>.base_delta_A/B``, ``D = B @ A``) in what a node is sent are folded into its frozen
weights, never trained nor sent back.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from logging import INFO as LOG_INFO
from typing import Any, ClassVar

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedlora.config import RunConfig
from fedlora.errors import ConfigError
from fedlora.model.adapters import (
    AdapterHost,
    AdapterSpec,
    exact_on_wire,
    from_record,
    is_base_delta,
    module_of,
    to_record,
)
from fedlora.train.local import round_lr
from fedlora.wire import protocol as P
from fedlora.wire.protocol import TASK_SEP, split_task_key, task_key

from .basechain import BaseChain
from .hooks import ClientHooks
from .options import StrategyOptions
from .robust import Reducer, reducer
from .server_opt import ServerOptimizer

__all__ = [
    "TASK_SEP",
    "ClientUpdate",
    "GlobalView",
    "LoRAStrategy",
    "NodeDirectory",
    "NodeInfo",
    "decode_reply",
    "split_base_delta",
    "split_task_key",
    "task_key",
]


@dataclass
class NodeInfo:
    """What a node said about itself (its ``INFO`` record: a query reply's or a train reply's).

    Attributes
    ----------
    node_id : int
        The node.
    rank : int
        The LoRA rank it trains (its device profile, ``fedlora-client --rank``, or ``lora.rank``).
    device : str
        ``cpu``, ``cuda:0``, ...
    memory_gb : float
        Memory the device reports (0 when unknown).
    num_examples : int
        Its training examples.
    tasks : dict of str to int
        Examples per task (multi-task data), else empty.
    quantization : str
        The base-model precision it trains on (``none``, ``8bit``, ``4bit``).
    dtype : str
        Its compute dtype.
    chosen : dict
        What ``fedlora-client --quantization/--rank auto`` measured and chose (empty otherwise).
    """

    node_id: int
    rank: int
    device: str = "cpu"
    memory_gb: float = 0.0
    num_examples: int = 0
    tasks: dict[str, int] = field(default_factory=dict)
    quantization: str = "none"
    dtype: str = "float32"
    chosen: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_record(cls, node_id: int, info: Mapping[str, Any]) -> NodeInfo:
        """Parse an ``INFO`` record; ValueError naming the entry when it is malformed.

        Every value is checked before it is kept (a node's word shapes payloads and weights):
        ``rank`` a whole number in ``[1, MAX_INFO_RANK]`` (strategies cap it at ``lora.rank``),
        counts whole and in ``[0, MAX_INFO_COUNT]``, memory finite and non-negative, strings
        short and printable, ``tasks`` and ``chosen`` bounded JSON objects.
        """
        rank = info[P.INFO_RANK]
        if not _whole(rank, 1, MAX_INFO_RANK):
            raise ValueError(f"{P.INFO_RANK} must be a whole number in [1, {MAX_INFO_RANK}], got {rank!r:.40}")
        memory = info.get(P.INFO_MEMORY_GB, 0.0)
        if not isinstance(memory, (int, float)) or isinstance(memory, bool) or not 0 <= memory <= MAX_INFO_MEMORY_GB:
            raise ValueError(f"{P.INFO_MEMORY_GB} must be a number in [0, {MAX_INFO_MEMORY_GB:g}], got {memory!r:.40}")
        num = info.get(P.INFO_NUM_EXAMPLES, 0)
        if not _whole(num, 0, MAX_INFO_COUNT):
            raise ValueError(f"{P.INFO_NUM_EXAMPLES} must be a whole number in [0, {MAX_INFO_COUNT}], got {num!r:.40}")
        tasks = _json_object(info, P.INFO_TASKS)
        if len(tasks) > MAX_INFO_TASKS or not all(_label(k) and _whole(v, 0, MAX_INFO_COUNT) for k, v in tasks.items()):
            raise ValueError(f"{P.INFO_TASKS} must map at most {MAX_INFO_TASKS} task names to example counts")
        texts = {key: info.get(key, default) for key, default in _INFO_TEXTS.items()}
        for key, text in texts.items():
            if not _label(text):
                raise ValueError(f"{key} must be a printable string of at most {MAX_INFO_TEXT} characters")
        return cls(
            node_id=node_id,
            rank=rank,
            device=texts[P.INFO_DEVICE],
            memory_gb=float(memory),
            num_examples=num,
            tasks=dict(tasks),
            quantization=texts[P.INFO_QUANTIZATION],
            dtype=texts[P.INFO_DTYPE],
            chosen=_json_object(info, P.INFO_CHOSEN),
        )


#: Bounds on what a node may say about itself (``INFO``): far above any real device, low enough
#: that nothing downstream (payload shapes, weights, the capability table) is at risk.
MAX_INFO_RANK = 4096
MAX_INFO_MEMORY_GB = 1e9
MAX_INFO_COUNT = 10**12
MAX_INFO_TASKS = 256
MAX_INFO_TEXT = 64
MAX_INFO_JSON = 4096
_INFO_TEXTS = {P.INFO_DEVICE: "cpu", P.INFO_QUANTIZATION: "none", P.INFO_DTYPE: "float32"}


def _whole(value: Any, least: int, most: int) -> bool:
    """Whether ``value`` is an int (not a bool) in ``[least, most]``."""
    return isinstance(value, int) and not isinstance(value, bool) and least <= value <= most


def _label(value: Any) -> bool:
    """Whether ``value`` is a short printable string (it lands in progress lines and tables)."""
    return isinstance(value, str) and len(value) <= MAX_INFO_TEXT and value.isprintable()


def _json_object(info: Mapping[str, Any], key: str) -> dict[str, Any]:
    """The JSON object under ``key`` (``{}`` when absent); ValueError unless it is a string of at
    most :data:`MAX_INFO_JSON` characters holding a finite JSON object."""
    text = info.get(key, "{}")
    if not isinstance(text, str) or len(text) > MAX_INFO_JSON:
        raise ValueError(f"{key} must be a JSON object of at most {MAX_INFO_JSON} characters")

    def refuse(constant: str) -> None:
        raise ValueError(f"{key} holds {constant}")

    try:
        value = json.loads(text, parse_constant=refuse)
    except RecursionError:  # nesting deep enough to exhaust the parser's stack
        raise ValueError(f"{key} is nested too deeply") from None
    if not isinstance(value, dict):
        raise ValueError(f"{key} is not a JSON object")
    return value


class NodeDirectory:
    """What every node of the run said about itself, kept by the server's round loop and read
    by the strategy it is given to (heterogeneous strategies shape payloads by it)."""

    def __init__(self) -> None:
        self._nodes: dict[int, NodeInfo] = {}

    def record(self, node_id: int, info: Mapping[str, Any]) -> NodeInfo | None:
        """Keep what ``node_id`` reported; None (and nothing kept) for a malformed record."""
        try:
            self._nodes[node_id] = NodeInfo.from_record(node_id, info)
        except (KeyError, TypeError, ValueError):
            return None
        return self._nodes[node_id]

    def get(self, node_id: int) -> NodeInfo | None:
        return self._nodes.get(node_id)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._nodes

    def __len__(self) -> int:
        return len(self._nodes)

    def all(self) -> list[NodeInfo]:
        """Every node that reported, by node id."""
        return [self._nodes[n] for n in sorted(self._nodes)]

    def unknown(self, node_ids: Iterable[int]) -> list[int]:
        """The nodes among ``node_ids`` that have not reported yet, sorted."""
        return sorted(n for n in node_ids if n not in self._nodes)


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
        LoRA factors and trained head, keyed as in :mod:`fedlora.model.adapters`.
    base_delta : dict of str to (Tensor, Tensor)
        Per target module, factors ``(B_d, A_d)`` of a delta folded into the frozen weight:
        the model is ``W0 + B_d @ A_d + scaling * B @ A``.
    """

    name: str
    spec: AdapterSpec
    state: dict[str, torch.Tensor]
    base_delta: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def split_base_delta(
    state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(adapter tensors, {module: (B_d, A_d)}) from a state that may hold base-delta factors."""
    adapter = {k: v for k, v in state.items() if not is_base_delta(k)}
    deltas: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key in state:
        if is_base_delta(key) and key.endswith("_A"):
            module = module_of(key)
            deltas[module] = (state[f"{module}.base_delta_B"], state[key])
    return adapter, deltas


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
    """Federated LoRA over Flower's message API (the server half of a strategy).

    Parameters
    ----------
    cfg : RunConfig
        The run: federation settings (fraction, local steps, lr, transport dtype), seed, LoRA
        settings, and ``cfg.strategy.options``, parsed into :attr:`options_class`.
    spec : AdapterSpec
        The global adapter's shape (rank, alpha, target modules).
    tasks : sequence of str
        Task names of multi-task data, in order (empty otherwise).
    nodes : NodeDirectory, optional
        Where the round loop records what nodes report; a fresh, empty one by default.
    """

    name: ClassVar[str] = ""
    #: The strategy's options (``[strategy]`` keys besides ``name``).
    options_class: ClassVar[type[StrategyOptions]] = StrategyOptions
    #: The client half: what a node does around local training.
    client_hooks: ClassVar[type[ClientHooks]] = ClientHooks
    #: Whether clients may train different ranks (device profiles); others need all at lora.rank.
    heterogeneous_ranks: ClassVar[bool] = False
    #: Whether the strategy rewrites the frozen base weights (SVD init, merges): needs float weights.
    needs_float_base: ClassVar[bool] = False
    #: Whether each client ends with its own model (evaluated on the clients: configure_evaluate).
    personalized: ClassVar[bool] = False
    #: Whether what a node is sent depends on what it reported (its rank, its tasks), so the
    #: server must query a node before its first train message.
    needs_node_info: ClassVar[bool] = False
    #: Why the strategy cannot run under user-level (central) DP, or "" when it can. Central DP
    #: releases one noisy mean of clipped updates; a strategy whose aggregate is that mean, over
    #: one payload sent to every node, can take it as a single update (:meth:`aggregate_updates`).
    central_dp_refusal: ClassVar[str] = ""
    #: The ``robustness.aggregator`` values the strategy's math allows: a coordinate-wise median
    #: or trimmed mean needs an aggregate that is a mean of same-shape tensors, taken through
    #: :meth:`average`. ``update_clip`` works on the replies before any strategy sees them.
    robust_aggregators: ClassVar[tuple[str, ...]] = ("mean",)
    #: Why ``strategy.server_optimizer`` (FedOpt on the round's aggregate) is not defined for the
    #: strategy, or "" when it is. It needs the change the aggregation makes to a tensor the server
    #: keeps from round to round to be an update of that tensor (a pseudo-gradient).
    server_optimizer_refusal: ClassVar[str] = ""

    def __init__(
        self, cfg: RunConfig, spec: AdapterSpec, *, tasks: Sequence[str] = (), nodes: NodeDirectory | None = None
    ) -> None:
        self.cfg = cfg
        self.spec = spec
        self.options = self.parse_options(cfg.strategy.options)
        #: Task names of multi-task data, in order.
        self.tasks: list[str] = list(tasks)
        self.nodes = nodes if nodes is not None else NodeDirectory()
        self._global: dict[str, torch.Tensor] = {}
        self._client_facts: dict[int, dict[str, Any]] = {}
        #: The base change's links and what each node holds (strategies that fold into the base).
        self.chain = BaseChain()
        #: What each node of the current round was sent, float32, base change aside: the server
        #: adds a node's decoded upload to it on a lossy wire (:func:`fedlora.wire.transport.decode_update`).
        self.sent: dict[int, dict[str, torch.Tensor]] = {}
        #: FedOpt on each round's aggregate (``strategy.server_optimizer``; ``none``: the aggregate as is).
        self.server_opt = ServerOptimizer(
            self.options.server_optimizer,
            self.options.server_lr,
            momentum=self.options.server_momentum,
            beta1=self.options.beta1,
            beta2=self.options.beta2,
            tau=self.options.tau,
        )

    @classmethod
    def parse_options(cls, raw: Mapping[str, Any]) -> Any:
        """``[strategy]`` options as :attr:`options_class`; ConfigError naming ``strategy.<key>``."""
        return cls.options_class.from_dict(raw, cls.name)

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
        options = cls.parse_options(cfg.strategy.options)
        if options.server_optimizer != "none" and cls.server_optimizer_refusal:
            raise ConfigError(
                f"config key 'strategy.server_optimizer': strategy '{cls.name}' cannot take a server optimizer: "
                f"{cls.server_optimizer_refusal}; use server_optimizer = 'none'"
            )
        if cls.needs_float_base:
            asked = [("model.quantization", cfg.model.quantization)] + [
                (f"federation.profiles[{i}].quantization", p.quantization)
                for i, p in enumerate(cfg.federation.profiles)
            ]
            for key, quantization in asked:
                if quantization not in ("", "none"):
                    raise ConfigError(
                        f"config key '{key}': strategy '{cls.name}' folds updates into the frozen base weights, "
                        f"which cannot be done exactly on a {quantization} base; use quantization = 'none'"
                    )
        if cfg.privacy.mode == "central" and cls.central_dp_refusal:
            raise ConfigError(
                f"config key 'privacy.mode': strategy '{cls.name}' cannot run under central (user-level) DP: "
                f"{cls.central_dp_refusal}; use privacy.mode = 'local' or fedavg, ffa, federa, fedsa, dpdylora"
            )
        aggregator = cfg.robustness.aggregator
        if aggregator not in cls.robust_aggregators:
            raise ConfigError(
                f"config key 'robustness.aggregator': strategy '{cls.name}' cannot aggregate by {aggregator!r} "
                f"(it allows {', '.join(cls.robust_aggregators)}); use update_clip to bound hostile updates instead"
            )
        if aggregator != "mean" and cfg.privacy.mode == "central":
            raise ConfigError(
                "config key 'robustness.aggregator': central DP releases one noisy mean of clipped updates; "
                "use aggregator = 'mean' (its clip already bounds every node)"
            )
        ranks = {p.rank for p in cfg.federation.profiles}
        if not cls.heterogeneous_ranks and ranks - {cfg.lora.rank}:
            raise ConfigError(
                f"config key 'federation.profiles': strategy '{cls.name}' trains every client at lora.rank = "
                f"{cfg.lora.rank}; profiles with ranks {sorted(ranks)} need a heterogeneous-rank strategy "
                "(hetlora, flora)"
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

    def client_facts(self) -> dict[int, dict[str, Any]]:
        """Per-node facts from the last aggregation (weights, ranks, clusters), merged into
        metrics.jsonl's client entries."""
        return self._client_facts

    def payload(self, node_id: int, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors node ``node_id`` receives, installs and trains this round."""
        return dict(state)

    def client_config(self, node_id: int, server_round: int) -> dict[str, Any]:
        """Extra ConfigRecord entries for node ``node_id`` (read by :attr:`client_hooks`)."""
        return {}

    def check_reply(self, node_id: int, metrics: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> None:
        """Raise ValueError (one line) when a train reply that passed the server's checks carries
        a value this strategy would read and cannot use (as Flower's strategies check their own
        replies). The server has already checked shapes, finiteness, and that every metric is a
        finite number with ``num-examples`` positive, ``rank`` within what was sent and per-task
        counts whole and non-negative; the reply is dropped and named when this raises.

        Parameters
        ----------
        node_id : int
            The replying node.
        metrics : mapping
            The reply's metrics as plain values.
        state : mapping of str to Tensor
            The reply's decoded tensors (the keys the node was sent).
        """

    def aggregate(
        self, server_round: int, state: dict[str, torch.Tensor], updates: list[ClientUpdate]
    ) -> dict[str, torch.Tensor]:
        """New global state from the current one and the round's validated updates."""
        raise NotImplementedError

    def average(self, mean: Reducer) -> Reducer:
        """The average to take of same-shape tensors: the strategy's weighted ``mean``, or the
        coordinate-wise median / trimmed mean that ``robustness.aggregator`` names."""
        rob = self.cfg.robustness
        return reducer(rob.aggregator, rob.trim_fraction, mean)

    def state_dict(self) -> dict[str, Any]:
        """Strategy state beyond the global tensors, JSON-serialisable (for checkpoints)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` on resume."""

    def tensor_state(self) -> dict[str, torch.Tensor]:
        """Strategy state held in tensors (the server optimizer's moments), for checkpoints; empty
        when there is none."""
        return self.server_opt.state_dict()

    def load_tensor_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore :meth:`tensor_state` on resume (empty: nothing saved, start afresh)."""
        self.server_opt.load_state_dict(state)

    def server_step(
        self, old: Mapping[str, torch.Tensor], aggregated: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """``aggregated`` after the server optimizer's step, taken on the tensors where a
        pseudo-gradient is defined: kept by the server before and after, at the same shape, not
        base-delta factors (folded into frozen weights, not trained). ``none`` returns
        ``aggregated`` untouched."""
        if not self.server_opt.active:
            return aggregated
        keys = [
            k
            for k, v in aggregated.items()
            if not is_base_delta(k) and k in old and tuple(old[k].shape) == tuple(v.shape) and v.is_floating_point()
        ]
        out = dict(aggregated)
        out.update(self.server_opt.step({k: old[k] for k in keys}, {k: aggregated[k] for k in keys}))
        return out

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
        """The round settings every strategy sends (local budget, lr, rank, seed, dtype)."""
        fed = self.cfg.federation
        spec = self.node_spec(node_id)
        return {
            P.SERVER_ROUND: server_round,
            P.RANK: spec.rank,
            P.ALPHA: float(spec.alpha),
            P.LOCAL_STEPS: fed.local_steps,
            P.LOCAL_EPOCHS: float(fed.local_epochs),
            P.BATCH_SIZE: fed.batch_size,
            P.LR: round_lr(fed.lr, server_round, self.cfg.rounds, fed.lr_schedule, fed.lr_min),
            P.PROXIMAL_MU: float(fed.proximal_mu),
            # The client mixes in its partition id (or node id), so seeds differ per client yet
            # do not depend on the node ids a runtime happens to assign.
            P.SEED: self.cfg.seed * 1_000_003 + server_round * 10_007,
            P.TRANSPORT_DTYPE: fed.transport_dtype,
            P.TRANSPORT_QUANTIZE: fed.transport_quantize,
            P.ERROR_FEEDBACK: bool(fed.error_feedback),
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

        Returns
        -------
        list of Message
            What was sent: node ``m.metadata.dst_node_id`` was sent ``m.content[ARRAYS]``.
        """
        self._global = from_record(arrays)
        fed = self.cfg.federation
        messages = []
        self.sent = {}
        # Nodes whose payload is the very same tensors share one serialized record.
        records: dict[tuple, ArrayRecord] = {}
        for node_id in self.sample(grid, server_round):
            entries = dict(config)
            entries.update(self.base_client_config(node_id, server_round))
            entries.update(self.client_config(node_id, server_round))
            # A node that holds an earlier base change gets only the links since (basechain).
            payload, base_entries = self.chain.downlink(node_id, self.payload(node_id, self._global))
            entries.update(base_entries)
            self.sent[node_id] = {k: v for k, v in payload.items() if not exact_on_wire(k)}
            signature = tuple((k, id(v)) for k, v in sorted(payload.items()))
            if signature not in records:
                records[signature] = to_record(payload, fed.transport_dtype, fed.transport_quantize, packed=True)
            content = RecordDict({P.ARRAYS: records[signature], P.CONFIG: ConfigRecord(entries)})
            messages.append(
                Message(
                    content=content, message_type=MessageType.TRAIN, dst_node_id=node_id, group_id=str(server_round)
                )
            )
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
        return self.aggregate_updates(server_round, [decode_reply(msg) for msg in replies if not msg.has_error()])

    def aggregate_updates(
        self, server_round: int, updates: list[ClientUpdate]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """:meth:`aggregate_train` after decoding: the new global state from ``updates`` (central
        DP hands over one update, the noisy mean of the clipped ones)."""
        self._client_facts = {}
        if not updates:
            return None, None
        old = dict(self._global)
        new_state = self.server_step(old, self.aggregate(server_round, dict(old), updates))
        total = sum(u.num_examples for u in updates)
        loss = sum(float(u.metrics.get(P.TRAIN_LOSS, 0.0)) * u.num_examples for u in updates) / total
        self._global = new_state
        return to_record(new_state), MetricRecord({P.TRAIN_LOSS: loss, P.NUM_EXAMPLES: total})

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """fedlora evaluates the global adapter on the server's held-out split: no messages."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        log(LOG_INFO, "\t├── Strategy: %s (%s)", self.name, type(self).__name__)
        log(LOG_INFO, "\t├── Fraction of clients per round: %.2f", self.cfg.federation.fraction)
        log(LOG_INFO, "\t├── Server optimizer: %s", self.server_opt.summary())
        log(LOG_INFO, "\t└── Options: %s", self.options.to_dict() or "{}")


def decode_reply(msg: Message) -> ClientUpdate:
    """ClientUpdate from a (validated) train reply."""
    metrics = dict(msg.content[P.METRICS])
    return ClientUpdate(
        node_id=msg.metadata.src_node_id,
        state=from_record(msg.content[P.ARRAYS]),
        num_examples=int(metrics[P.NUM_EXAMPLES]),
        metrics=metrics,
    )
