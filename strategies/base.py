"""The base of every fedlora strategy: a Flower message-API ``Strategy`` over LoRA factors.

Protocol between a strategy and the ClientApp (both sides read this):

* Down (message type ``train``): ``content["arrays"]`` holds exactly the tensors the client
  must install *and train*; ``content["config"]`` holds the round's settings (``rank``,
  ``local-steps``, ``lr``, ...). Adapter tensors that were not sent are reset by the client from
  the config (``a-seed``: FFA-LoRA's shared frozen A) and stay frozen.
* Up: ``content["arrays"]`` with the same keys and shapes as were sent, trained;
  ``content["metrics"]`` with ``num-examples``, ``train-loss`` and ``train-seconds``.

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

from fedlora.adapters import AdapterSpec, from_record, to_record
from fedlora.config import RunConfig
from fedlora.errors import ConfigError


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

    def __init__(self, cfg: RunConfig, spec: AdapterSpec) -> None:
        self.cfg = cfg
        self.spec = spec
        self.options = self._parse_options(cfg.strategy.options)
        self._global: dict[str, torch.Tensor] = {}
        self.last_sent: dict[int, ArrayRecord] = {}

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

    def initialize(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Turn the freshly initialised adapter into the round-0 global state."""
        return state

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
            "rank": self.spec.rank,
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
