"""A fedlora strategy inside a plain Flower app, driven by Flower's own ``Strategy.start``.

fedlora's strategies are Flower message-API strategies (:class:`~fedlora.strategies.LoRAStrategy`
subclasses ``flwr.serverapp.strategy.Strategy``), but alone they rely on what fedlora's round loop
(:mod:`fedlora.server.rounds`) does around them: it puts the run (its configuration, class and
task names) into every message, because that is how fedlora's ClientApp learns what to train;
it validates every reply against what its node was sent and decodes uploads sent relative to it;
it queries nodes before the first train message of strategies that shape payloads by node.
:class:`FlowerStrategy` does the same inside Flower's ``Strategy.start``, so a Flower user's own
ServerApp can run any registered strategy against fedlora's ClientApp
(``fedlora.client.entry:app``)::

    from fedlora.server import create_flower_strategy

    @app.main()
    def main(grid, context):
        strategy = create_flower_strategy("fedavg", run_config=context.run_config)
        result = strategy.start(grid=grid, initial_arrays=strategy.initial_arrays(), num_rounds=3,
                                evaluate_fn=strategy.evaluate_global)
        strategy.export(result.arrays, "adapter")

``examples/flower-app/`` is such a Flower App, run with ``flwr run``. What fedlora's own round
loop adds beyond this (metrics.jsonl, checkpoints and ``--resume``, central DP, update clipping,
the capability table) stays with ``fedlora simulate`` and ``fedlora-server``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping
from logging import WARNING
from pathlib import Path
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from fedlora.config import RunConfig, apply_overrides
from fedlora.errors import ConfigError, RunFailed
from fedlora.model.adapters import from_record, to_record
from fedlora.run.export import export_views
from fedlora.strategies import LoRAStrategy, NodeDirectory, create
from fedlora.strategies.robust import first_non_finite
from fedlora.wire import protocol as P
from fedlora.wire.transport import Wire, decode_update

from .evaluation import evaluate_state
from .intake import cap_claims, screen_reply, unpack_sent
from .server_app import Prepared, prepare
from .validation import ReplyError, budget_stop_epsilons, check_eval_metrics, error_text

__all__ = ["RUN_CONFIG_PREFIX", "FlowerStrategy", "config_from_run_config", "create_flower_strategy"]

#: Flower run-config keys under this prefix are fedlora configuration keys: ``fedlora.lora.rank``
#: is ``lora.rank`` (``[tool.flwr.app.config]`` tables flatten to such dotted keys).
RUN_CONFIG_PREFIX = "fedlora."


def config_from_run_config(
    run_config: Mapping[str, Any], base: RunConfig | Mapping[str, Any] | None = None
) -> RunConfig:
    """The fedlora configuration a Flower run config describes: ``base`` (fedlora's defaults when
    None) with every ``fedlora.<key>`` entry applied as ``--set <key>=<value>`` would be (a string
    is read as TOML when it is one, so ``"['query', 'value']"`` is a list). Other keys are the
    app's own and ignored. Raises ConfigError naming the first key that is unknown or invalid."""
    raw = base.to_dict() if isinstance(base, RunConfig) else dict(base or {})
    sets = []
    for key, value in run_config.items():
        if key.startswith(RUN_CONFIG_PREFIX):
            text = value if isinstance(value, str) else json.dumps(value)
            sets.append(f"{key[len(RUN_CONFIG_PREFIX) :]}={text}")
    return RunConfig.from_dict(apply_overrides(raw, sets))


def create_flower_strategy(
    name: str | None = None,
    *,
    run_config: Mapping[str, Any] | None = None,
    config: RunConfig | Mapping[str, Any] | None = None,
) -> FlowerStrategy:
    """A registered fedlora strategy, ready for Flower's ``Strategy.start``.

    Parameters
    ----------
    name : str, optional
        The strategy (``strategy.name``): ``fedavg``, ``ffa``, ``hetlora``, ... Default: the
        configuration's.
    run_config : mapping, optional
        Flower's ``context.run_config``: its ``fedlora.<key>`` entries set fedlora configuration
        keys (:func:`config_from_run_config`).
    config : RunConfig or mapping, optional
        The configuration those entries apply to (a preset read with
        :func:`fedlora.config.read_preset`, say); fedlora's defaults when None.

    The model and the server's held-out data are loaded and checked here (the clients bring
    their own data: their partition in Flower's simulation, their own file on a device).
    """
    cfg = config_from_run_config(run_config or {}, config)
    if name is not None:
        cfg = RunConfig.from_dict(apply_overrides(cfg.to_dict(), [f"strategy.name={name}"]))
    FlowerStrategy.check(cfg)  # before anything is loaded
    return FlowerStrategy(prepare(cfg, check_partitions=False))


class FlowerStrategy(Strategy):
    """A fedlora strategy (:attr:`strategy`) as a Flower ``Strategy`` for ``Strategy.start``.

    Each method wraps the strategy's own: :meth:`configure_train` and :meth:`configure_evaluate`
    add the run's entries to the config (Flower's ``train_config`` / ``evaluate_config`` entries
    are kept beside them) and, for strategies that need it, query nodes not heard from;
    :meth:`aggregate_train` validates each reply against what its node was sent (as fedlora's
    round loop does: keys, shapes, dtype, finite values, size, metrics, the strategy's own
    ``check_reply``), drops a bad one with a warning naming why (:attr:`dropped`), decodes uploads
    sent relative to what the node received, and aggregates the rest in sampling order.

    Parameters
    ----------
    prepared : Prepared
        The checked configuration, server data, model and adapter shape
        (:func:`~fedlora.server.server_app.prepare`).
    """

    def __init__(self, prepared: Prepared) -> None:
        self.check(prepared.cfg)
        cfg = prepared.cfg
        self._cfg = cfg
        self.prepared = prepared
        self.nodes = NodeDirectory()
        #: The fedlora strategy itself (its pure math, payloads, client config, state).
        self.strategy: LoRAStrategy = create(
            cfg, prepared.spec, tasks=list(prepared.data.tasks or []), nodes=self.nodes
        )
        self.wire = Wire(cfg.federation.transport_dtype, cfg.federation.transport_quantize)
        self.run_uid = uuid.uuid4().hex
        #: Per round, ``{"node_id", "reason"}`` of each reply that was dropped.
        self.dropped: dict[int, list[dict[str, Any]]] = {}
        self._sent: dict[int, dict[str, Array]] = {}

    @staticmethod
    def check(cfg: RunConfig) -> None:
        """ConfigError for what only fedlora's own round loop does (central DP, update clipping)."""
        if cfg.privacy.mode == "central":
            raise ConfigError(
                "config key 'privacy.mode': central DP runs in fedlora's own round loop (fedlora simulate, "
                "fedlora-server), not in Flower's Strategy.start; use privacy.mode = 'local' or 'off'"
            )
        if cfg.robustness.update_clip != "none":
            raise ConfigError(
                "config key 'robustness.update_clip': update clipping runs in fedlora's own round loop "
                "(fedlora simulate, fedlora-server), not in Flower's Strategy.start; use update_clip = 'none'"
            )
        if cfg.secure_aggregation.enabled:
            raise ConfigError(
                "config key 'secure_aggregation.mode': secure aggregation's stages run in fedlora's own round loop "
                "(fedlora simulate, fedlora-server), not in Flower's Strategy.start; use mode = 'off'"
            )

    @property
    def cfg(self) -> RunConfig:
        """The run, with ``rounds`` as :meth:`start` was asked to run."""
        return self._cfg

    def shared(self) -> dict[str, Any]:
        """What every message carries for fedlora's ClientApp: the run, its classes and tasks."""
        data = self.prepared.data
        return {
            P.RUN: self.cfg.to_json(),
            P.LABELS: json.dumps(data.labels),
            P.RUN_TASKS: json.dumps(list(data.tasks or [])),
            P.RUN_UID: self.run_uid,
        }

    # -- what a Flower ServerApp calls -------------------------------------------------------------

    def initial_arrays(self) -> ArrayRecord:
        """The round-0 global adapter: peft's seeded init, made the strategy's (FFA's frozen A,
        FeDeRA's SVD start, ...)."""
        host, spec, seed = self.prepared.host, self.prepared.spec, self.cfg.seed
        with host.lock:
            name = host.ensure(spec, seed=seed)
            state = host.initial_state(name, seed)
        return to_record(self.strategy.initialize(state, host))

    def evaluate_global(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """The global state on the server's held-out split (``eval_accuracy``, ``eval_loss``, ...):
        pass it as ``Strategy.start(evaluate_fn=...)``."""
        return MetricRecord(evaluate_state(self.prepared, from_record(arrays), self.strategy))

    def export(self, arrays: ArrayRecord, out_dir: str | Path) -> list[Path]:
        """Write the global adapter(s) of ``arrays`` in peft's format (base deltas folded in; one
        sub-folder per task for per-task strategies); ``PeftModel.from_pretrained`` loads each."""
        prepared = self.prepared
        views = self.strategy.views(from_record(arrays))
        return export_views(prepared.host, views, out_dir, self.cfg, prepared.data.labels, prepared.data.task_labels)

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord | None = None,
        num_rounds: int | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Result:
        """Flower's ``Strategy.start``; ``initial_arrays`` defaults to :meth:`initial_arrays` and
        ``num_rounds`` to the configuration's ``rounds``. The strategy plans for the rounds it runs
        (its learning-rate schedule, the last round's exports), so ``rounds`` follows ``num_rounds``."""
        num_rounds = self.cfg.rounds if num_rounds is None else int(num_rounds)
        if num_rounds != self.cfg.rounds:
            self._cfg = self.cfg.replace(rounds=num_rounds)
            self.strategy.settings = self.strategy.settings.replace(rounds=num_rounds)
        arrays = self.initial_arrays() if initial_arrays is None else initial_arrays
        return super().start(grid, arrays, num_rounds, *args, **kwargs)

    # -- Flower's Strategy ---------------------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.strategy.needs_node_info:
            self.query_new_nodes(grid)
        config = ConfigRecord({**self.shared(), **dict(config)})
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self._sent = unpack_sent(messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        dropped = self.dropped.setdefault(server_round, [])
        valid, seen = [], set()
        for reply in replies:
            node = reply.metadata.src_node_id
            seen.add(node)
            try:
                if self.accept(reply):
                    valid.append(reply)
            except ReplyError as err:
                self.strategy.chain.forget(node)  # what it holds is unknown: the whole base next time
                dropped.append({"node_id": node, "reason": str(err)})
                log(WARNING, "round %s: reply of node %s dropped: %s", server_round, node, err)
        dropped += [{"node_id": n, "reason": "no reply before the timeout"} for n in self._sent if n not in seen]
        order = {node: i for i, node in enumerate(self._sent)}  # float sums depend on order
        valid.sort(key=lambda reply: order.get(reply.metadata.src_node_id, len(order)))
        arrays, metrics = self.strategy.aggregate_train(server_round, valid)
        bad = first_non_finite(from_record(arrays)) if arrays is not None else None
        if bad is not None:  # it would go to every node, whose replies would all be dropped
            raise RunFailed(f"round {server_round}: the aggregated global adapter is not finite (tensor {bad})")
        if metrics is not None:
            extra = {k: v for k, v in self.strategy.round_metrics().items() if _plain_number(v)}
            metrics = MetricRecord(
                {**dict(metrics), **extra, "clients-ok": len(valid), "clients-dropped": len(dropped)}
            )
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config = ConfigRecord({**self.shared(), **dict(config)})
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        good = []
        for reply in replies:
            if reply.has_error() or P.METRICS not in reply.content.metric_records:
                continue
            try:
                check_eval_metrics(dict(reply.content.metric_records[P.METRICS]))
            except ReplyError as err:
                log(
                    WARNING,
                    "round %s: evaluate reply of node %s dropped: %s",
                    server_round,
                    reply.metadata.src_node_id,
                    err,
                )
                continue
            good.append(reply)
        return self.strategy.aggregate_evaluate(server_round, good)

    def summary(self) -> None:
        self.strategy.summary()

    # -- the round loop's chores -------------------------------------------------------------------

    def query_new_nodes(self, grid: Grid) -> None:
        """Ask nodes not heard from for their capabilities (rank, device, examples, tasks): the
        strategy shapes their payloads by them. A node that does not answer is asked again."""
        messages = [
            Message(
                content=RecordDict({P.CONFIG: ConfigRecord(self.shared())}),
                message_type=MessageType.QUERY,
                dst_node_id=node,
                group_id="query",
            )
            for node in self.nodes.unknown(grid.get_node_ids())
        ]
        if not messages:
            return
        for reply in grid.send_and_receive(messages, timeout=self.cfg.federation.round_timeout):
            info = None if reply.has_error() else reply.content.config_records.get(P.INFO)
            if info is not None:
                self.nodes.record(reply.metadata.src_node_id, info)

    def accept(self, reply: Message) -> bool:
        """Check one train reply against what its node was sent and decode it in place; False for
        a node whose privacy budget stopped it (it trained nothing), :class:`ReplyError` when it
        cannot be used."""
        node = reply.metadata.src_node_id
        if reply.has_error():
            raise ReplyError(error_text(reply))
        local_dp = self.cfg.privacy.mode == "local"
        metrics_record = reply.content.metric_records.get(P.METRICS)
        if node in self._sent and local_dp and metrics_record is not None and metrics_record.get(P.BUDGET_STOP):
            if budget_stop_epsilons(dict(metrics_record)) is not None:
                return False
        max_bytes = int(self.cfg.federation.max_reply_mb * 1024 * 1024)
        decoded, metrics, info, reported = screen_reply(
            reply, self._sent, self.strategy, self.wire, max_bytes, local_dp
        )
        known = self.nodes.get(node)
        cap_claims(self.cfg.robustness.max_examples, known, reply, metrics, {})
        if known is None and reported is not None:
            self.nodes.record(node, info)
        self.strategy.chain.ack(node, info.get(P.INFO_BASE_DIGEST) if info is not None else None)
        reference = self.strategy.sent.get(node, {})
        reply.content[P.ARRAYS] = to_record(decode_update(decoded, reference, self.wire))
        return True


def _plain_number(value: Any) -> bool:
    """Whether ``value`` fits a MetricRecord as it is (an int or float, not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
