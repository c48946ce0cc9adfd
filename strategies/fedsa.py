"""FedSA-LoRA: share A, keep B on the client.

Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated Learning", ICLR 2025
(arXiv 2410.01463). The paper finds that A factors learn what clients have in common and B
factors what is specific to each; so only A (and a trained head) is sent, averaged and sent
back, while each client keeps its own B across rounds. B never crosses the network, in either
direction.

The result is a personalized model per client: ``W0 + scaling * B_k @ A`` with peft's
``scaling = alpha / r`` for every client. Clients keep B in
Flower's per-node ``Context.state`` (which persists across rounds in simulation and on a
deployed SuperNode). Evaluation is therefore federated: after each round every node evaluates
its own model (the new shared A, its own B) on its held-out data and the server reports the
mean (``eval_*``) next to the shared part alone on the server's split (``global_eval_*``, B
zero). The run's ``adapter/`` is the shared part (A, head, B zero); on the last round each
simulated client writes its personalized adapter to ``clients/<partition>/adapter/`` (a
deployed client writes it on its own device), each loadable with ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedlora.model.adapters import is_lora_b, to_record
from fedlora.wire import protocol as P

from .base import ClientUpdate, LoRAStrategy
from .fedavg import weighted_mean
from .hooks import ClientHooks, NodeStore
from .registry import register


def shared_part(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What FedSA-LoRA sends: every tensor except the B factors."""
    return {k: v for k, v in state.items() if not is_lora_b(k)}


def mean_metrics(metrics: list[Mapping[str, Any]], weights: list[float]) -> dict[str, float]:
    """Weighted mean of the numeric ``eval_*`` entries of each node's evaluation."""
    total = float(sum(weights))
    keys = sorted({k for m in metrics for k in m if k.startswith("eval_")})
    out = {}
    for key in keys:
        pairs = [(float(m[key]), w) for m, w in zip(metrics, weights) if key in m]
        if pairs:
            out[key] = sum(v * w for v, w in pairs) / sum(w for _, w in pairs) if total > 0 else 0.0
    return out


class FedSAClient(ClientHooks):
    """Client half: every B factor is the node's own, kept in its ``Context.state`` across
    rounds (peft's zero init the first time), trained with the received A, never sent."""

    def kept(self, shapes, received, store: NodeStore) -> dict[str, torch.Tensor]:
        stored = store.load()
        keys = [k for k in shapes if is_lora_b(k) and k not in received]
        return {
            k: stored[k] if k in stored and tuple(stored[k].shape) == tuple(shapes[k]) else torch.zeros(shapes[k])
            for k in keys
        }

    def keep(self, store: NodeStore, kept: dict[str, torch.Tensor]) -> None:
        if kept:
            store.save(kept)


@register
class FedSALoRA(LoRAStrategy):
    """``fedsa``: A (and head) averaged; every client keeps its own B; personalized evaluation."""

    name = "fedsa"
    #: Secure aggregation serves it: the shared A (and head) is the weighted mean of the replies: the masked sum gives
    #: it exactly.
    secure_aggregation_refusal = ""
    personalized = True
    client_hooks = FedSAClient
    #: The shared A (and head) is averaged coordinate-wise: any coordinate-wise reducer fits.
    robust_aggregators = ("mean", "trimmed_mean", "median")
    #: The server steps on what it holds, the shared A (and head); the nodes' private B never reaches
    #: it (its copy stays at zero: zero pseudo-gradient, left exactly as it is).
    server_optimizer_refusal = ""

    def payload(self, node_id: int, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return shared_part(state)

    def aggregate(
        self, server_round: int, state: dict[str, torch.Tensor], updates: list[ClientUpdate]
    ) -> dict[str, torch.Tensor]:
        state.update(self.average(weighted_mean)([u.state for u in updates], [u.num_examples for u in updates]))
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
        """Each of ``nodes`` (default: every node, exporting on the last round) evaluates its
        personalized model; those in ``export`` also write it."""
        from fedlora.model.adapters import from_record

        fed = self.settings.federation
        record = to_record(shared_part(from_record(arrays)), fed.transport_dtype, fed.transport_quantize, packed=True)
        if nodes is None:
            nodes = sorted(grid.get_node_ids())
            export = nodes if server_round == self.settings.rounds else ()
        export = set(export)
        messages = []
        for node_id in nodes:
            entries = dict(config)
            entries.update(self.base_client_config(node_id, server_round))
            entries.update(self.client_config(node_id, server_round))
            entries[P.EXPORT] = node_id in export
            content = RecordDict({P.ARRAYS: record, P.CONFIG: ConfigRecord(entries)})
            messages.append(
                Message(
                    content=content,
                    message_type=MessageType.EVALUATE,
                    dst_node_id=node_id,
                    group_id=f"eval-{server_round}",
                )
            )
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        metrics, weights = [], []
        for reply in replies:
            if reply.has_error() or P.METRICS not in reply.content.metric_records:
                continue
            m = {
                k: v
                for k, v in dict(reply.content.metric_records[P.METRICS]).items()
                if isinstance(v, (int, float)) and math.isfinite(v)
            }  # a faulty node's NaN is left out
            metrics.append(m)
            weights.append(float(m.get(P.NUM_EXAMPLES, 1)))
        if not metrics:
            return None
        return MetricRecord(mean_metrics(metrics, weights))
