"""The server half of every fedlora strategy: a Flower message-API ``Strategy`` over LoRA factors.

A strategy is one module holding both halves: a subclass of :class:`LoRAStrategy` (what each
node is sent, how replies combine: pure functions over tensors, tested alone) and a subclass of
:class:`~fedlora.strategies.hooks.ClientHooks` (what the node does around local training), tied
together by :attr:`LoRAStrategy.client_hooks` and registered once by name
(:func:`fedlora.strategies.register`). Options are a pydantic model
(:class:`~fedlora.strategies.options.StrategyOptions`) named by :attr:`LoRAStrategy.options_class`.

What the round loop (:mod:`fedlora.server.server_app`) gives a strategy: its own settings
(:class:`~fedlora.strategies.settings.StrategySettings`: the seed, the rounds, the federation and
robustness sections and its parsed options, never the whole run), the global adapter's shape
and the task names in the constructor, plus :class:`NodeDirectory`, where the
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

import math
import random
from abc import abstractmethod
from collections.abc import Collection, Iterable, Mapping, Sequence
from logging import INFO as LOG_INFO
from typing import Any, ClassVar

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedlora.config import RunConfig
from fedlora.model.adapters import (
    AdapterHost,
    AdapterSpec,
    exact_on_wire,
    from_record,
    is_base_delta,
    to_record,
)
from fedlora.train.local import round_lr
from fedlora.wire import protocol as P
from fedlora.wire.protocol import TASK_SEP, split_task_key, task_key

from .basechain import BaseChain
from .checks import check_run
from .hooks import ClientHooks
from .options import StrategyOptions
from .records import ClientUpdate, GlobalView, NodeDirectory, NodeInfo, decode_reply, split_base_delta
from .robust import Reducer, reducer
from .server_opt import ServerOptimizer
from .settings import StrategySettings

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


class LoRAStrategy(Strategy):
    """Federated LoRA over Flower's message API (the server half of a strategy).

    Parameters
    ----------
    settings : StrategySettings
        What the strategy reads of the run (:class:`~fedlora.strategies.settings.StrategySettings`):
        seed, rounds, the federation and robustness sections, and its ``[strategy]`` options
        parsed into :attr:`options_class`.
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
    #: Why the strategy cannot train under local DP-SGD (the rest of the sentence after its name,
    #: ending with what to use instead), or "" when it can.
    local_dp_refusal: ClassVar[str] = ""
    #: The ``robustness.aggregator`` values the strategy's math allows: a coordinate-wise median
    #: or trimmed mean needs an aggregate that is a mean of same-shape tensors, taken through
    #: :meth:`average`. ``update_clip`` works on the replies before any strategy sees them.
    robust_aggregators: ClassVar[tuple[str, ...]] = ("mean",)
    #: Why ``strategy.server_optimizer`` (FedOpt on the round's aggregate) is not defined for the
    #: strategy, or "" when it is. It needs the change the aggregation makes to a tensor the server
    #: keeps from round to round to be an update of that tensor (a pseudo-gradient).
    server_optimizer_refusal: ClassVar[str] = ""
    #: Why the strategy cannot run under secure aggregation (``[secure_aggregation]``), or "" when it
    #: can. The server then learns only the sum of the clients' weighted updates to one payload, so
    #: the aggregate must be that weighted mean (:mod:`fedlora.server.secagg`); a strategy is refused
    #: until it says so.
    secure_aggregation_refusal: ClassVar[str] = (
        "it does not declare its aggregate a weighted mean of the updates to one payload"
    )
    #: Whether clients may train on different base models (``federation.profiles[i].model``,
    #: ``fedlora-client --model``): only when nothing that crosses the network depends on the base.
    heterogeneous_models: ClassVar[bool] = False

    def __init__(
        self,
        settings: StrategySettings,
        spec: AdapterSpec,
        *,
        tasks: Sequence[str] = (),
        nodes: NodeDirectory | None = None,
    ) -> None:
        #: What the strategy reads of the run (seed, rounds, federation, robustness, options).
        self.settings = settings
        self.spec = spec
        self.options = settings.options
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
        check_run(cls, cfg)

    @classmethod
    def model_head(cls, cfg: RunConfig) -> Any:
        """What the strategy puts in place of the model's classification head before the adapter is
        built (:func:`fedlora.model.loading.load_model`'s ``head``), or None (the default: the
        model's own head)."""
        return None

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

    @abstractmethod
    def aggregate(
        self, server_round: int, state: dict[str, torch.Tensor], updates: list[ClientUpdate]
    ) -> dict[str, torch.Tensor]:
        """New global state from the current one and the round's validated updates.

        The one method every strategy must write (the registry refuses a class without it):
        ``state`` is the global state the round's nodes were sent (keyed as in
        :mod:`fedlora.model.adapters`), ``updates`` their validated replies, in node order.
        """

    def average(self, mean: Reducer) -> Reducer:
        """The average to take of same-shape tensors: the strategy's weighted ``mean``, or the
        coordinate-wise median / trimmed mean that ``robustness.aggregator`` names."""
        rob = self.settings.robustness
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

    def draw(self, grid: Grid, server_round: int) -> list[int]:
        """Seeded draw of ``round(fraction * N)`` nodes (at least one), reproducible per round.

        O(nodes drawn) on the in-process grid, whose node ids are a ``range`` (already sorted;
        ``random.sample`` indexes it without building a list), so a million clients cost nothing.
        """
        nodes = grid.get_node_ids()
        nodes = nodes if isinstance(nodes, range) else sorted(nodes)
        if not nodes:
            return []
        count = max(1, math.floor(self.settings.federation.fraction * len(nodes) + 0.5))
        rng = random.Random(self.settings.seed * 100_003 + server_round)
        return sorted(rng.sample(nodes, min(count, len(nodes))))

    def sample(self, grid: Grid, server_round: int) -> list[int]:
        """The nodes that train in ``server_round``: :meth:`draw`'s (a strategy may leave out the ones
        it cannot serve, by what they reported: the server asks the drawn ones just before)."""
        return self.draw(grid, server_round)

    def base_client_config(self, node_id: int, server_round: int) -> dict[str, Any]:
        """The round settings every strategy sends (local budget, lr, rank, seed, dtype)."""
        fed = self.settings.federation
        spec = self.node_spec(node_id)
        return {
            P.SERVER_ROUND: server_round,
            P.RANK: spec.rank,
            P.ALPHA: float(spec.alpha),
            P.LOCAL_STEPS: fed.local_steps,
            P.LOCAL_EPOCHS: float(fed.local_epochs),
            P.BATCH_SIZE: fed.batch_size,
            P.LR: round_lr(fed.lr, server_round, self.settings.rounds, fed.lr_schedule, fed.lr_min),
            P.PROXIMAL_MU: float(fed.proximal_mu),
            # The client mixes in its partition id (or node id), so seeds differ per client yet
            # do not depend on the node ids a runtime happens to assign.
            P.SEED: self.settings.seed * 1_000_003 + server_round * 10_007,
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
        fed = self.settings.federation
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
        self,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        grid: Grid,
        *,
        nodes: Sequence[int] | None = None,
        export: Collection[int] = (),
    ) -> Iterable[Message]:
        """fedlora evaluates the global adapter on the server's held-out split: no messages.

        A personalized strategy sends one message to each of ``nodes`` (the server picks them:
        :func:`fedlora.server.personal.evaluation_nodes`; None: every node), asking those in
        ``export`` to write their own adapter too.
        """
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        log(LOG_INFO, "\t├── Strategy: %s (%s)", self.name, type(self).__name__)
        log(LOG_INFO, "\t├── Fraction of clients per round: %.2f", self.settings.federation.fraction)
        log(LOG_INFO, "\t├── Server optimizer: %s", self.server_opt.summary())
        log(LOG_INFO, "\t└── Options: %s", self.options.to_dict() or "{}")
