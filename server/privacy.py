"""The server side of differential privacy: user-level DP around a strategy, and the ledger.

:class:`CentralDP` (``[privacy] mode = "central"``) wraps a strategy's aggregation the way
Flower's ``DifferentialPrivacyServerSideFixedClipping`` wraps a strategy, but it cannot be that
wrapper: Flower's needs identical array keys in both directions (FFA-LoRA sends B only while
the global state holds A too; DP-DyLoRA sends a truncated slice), weights updates by example
count (the sensitivity of the noise assumes equal weights) and computes no epsilon. Here each
reply's update (what it trained minus what it was sent, in the strategy's own representation)
is clipped to ``clip_norm``, the clipped updates are averaged with equal weights over the
sampled nodes, noise of std ``noise_multiplier * clip_norm / sampled`` is added to that mean,
and only then does the strategy see anything: one update, the released mean, through
:meth:`~fedlora.strategies.LoRAStrategy.aggregate_updates`. An Opacus RDP accountant over
rounds at the node sampling rate gives the federation's epsilon.

:class:`PrivacyBook` is the run's ledger for metrics.jsonl: per round, each node's epsilon so
far (local DP) or the federation's (central DP), at ``privacy.delta``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Message, MetricRecord

from fedlora.config import RunConfig
from fedlora.files import atomic_write_bytes
from fedlora.model.adapters import is_base_delta, is_lora_a, is_lora_b
from fedlora.privacy.accounting import PrivacyLedger, guarantee, noise_for_target
from fedlora.privacy.central import noisy_mean
from fedlora.privacy.plan import PlanRow, central_row, format_plan, local_row
from fedlora.strategies import ClientUpdate, LoRAStrategy
from fedlora.strategies.base import NodeInfo, decode_reply
from fedlora.train.local import steps_for
from fedlora.wire import protocol as P

#: Central DP's accountant: RDP over rounds (the sampled-Gaussian mechanism at the node rate).
CENTRAL_ACCOUNTANT = "rdp"


def expected_sampled(cfg: RunConfig) -> int:
    """Nodes sampled per round in a federation of ``federation.clients`` (as the strategy samples)."""
    fed = cfg.federation
    return max(1, min(fed.clients, math.floor(fed.fraction * fed.clients + 0.5)))


class CentralDP:
    """User-level DP (DP-FedAvg with fixed clipping) around ``strategy``'s aggregation.

    Parameters
    ----------
    cfg : RunConfig
        The run; ``cfg.privacy`` holds ``clip_norm``, ``noise_multiplier`` or
        ``target_epsilon``, ``delta``.
    strategy : LoRAStrategy
        A strategy whose aggregate of one update is that update (``central_dp_refusal`` empty).
    """

    def __init__(self, cfg: RunConfig, strategy: LoRAStrategy) -> None:
        self.cfg = cfg
        self.strategy = strategy
        p = cfg.privacy
        self.clip_norm = p.clip_norm
        rate = expected_sampled(cfg) / cfg.federation.clients
        if p.noise_multiplier is not None:
            self.noise_multiplier = float(p.noise_multiplier)
        else:
            self.noise_multiplier = noise_for_target(
                float(p.target_epsilon), p.delta, rate, cfg.rounds, CENTRAL_ACCOUNTANT
            )
        self.ledger = PrivacyLedger()
        self.last: dict[str, Any] = {}

    def epsilon(self) -> float:
        return self.ledger.epsilon(self.cfg.privacy.delta, CENTRAL_ACCOUNTANT)

    def noise_generator(self, server_round: int) -> torch.Generator:
        """The source of ``server_round``'s noise (seeded per round: a run is reproducible)."""
        return torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + server_round * 7_919 + 17)

    def aggregate_train(
        self, server_round: int, replies: list[Message], sent: dict[int, dict[str, torch.Tensor]], population: int
    ) -> tuple[ArrayRecord | None, MetricRecord | None, dict[int, dict[str, Any]]]:
        """Release the round's noisy mean update and let the strategy apply it.

        Parameters
        ----------
        server_round : int
            The round (seeds the noise).
        replies : list of Message
            The validated replies.
        sent : dict of int to dict
            What every sampled node was sent, float32 (all the same payload).
        population : int
            Nodes connected this round (the sampling rate is ``len(sent) / population``).

        Returns
        -------
        (ArrayRecord or None, MetricRecord or None, dict)
            The new global state and train metrics (as ``aggregate_train``), and per-node facts
            (the update's norm before clipping, whether it was clipped).
        """
        sampled = len(sent)
        if sampled == 0:
            return None, None, {}
        # Each round is one run of the sampled Gaussian mechanism, whether or not replies came.
        self.ledger.step(self.noise_multiplier, min(1.0, sampled / max(population, sampled)), 1)
        updates = [decode_reply(m) for m in replies]
        common = self._common_payload(sent)
        facts: dict[int, dict[str, Any]] = {}
        if not updates:
            return None, None, facts
        deltas = [{k: u.state[k] - common[k] for k in common} for u in updates]
        gen = self.noise_generator(server_round)
        mean, norms, std = noisy_mean(
            deltas, clip_norm=self.clip_norm, noise_multiplier=self.noise_multiplier, sampled=sampled, generator=gen
        )
        for u, norm in zip(updates, norms):
            facts[u.node_id] = {"update_norm": round(norm, 6), "clipped": bool(norm > self.clip_norm)}
        released = {k: common[k] + mean[k] for k in common}
        total = sum(u.num_examples for u in updates)
        loss = sum(float(u.metrics.get(P.TRAIN_LOSS, 0.0)) * u.num_examples for u in updates) / total
        arrays, _ = self.strategy.aggregate_updates(
            server_round,
            [
                ClientUpdate(
                    node_id=updates[0].node_id, state=released, num_examples=total, metrics={P.TRAIN_LOSS: loss}
                )
            ],
        )
        self.last = {"noise_std": std, "clip_norm": self.clip_norm, "clipped": sum(n > self.clip_norm for n in norms)}
        return arrays, MetricRecord({P.TRAIN_LOSS: loss, P.NUM_EXAMPLES: total}), facts

    @staticmethod
    def _common_payload(sent: dict[int, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The one payload every sampled node was sent (adapter tensors only)."""
        payloads = list(sent.values())
        first = {k: v for k, v in payloads[0].items() if not is_base_delta(k)}
        for other in payloads[1:]:
            if {k for k in other if not is_base_delta(k)} != set(first) or any(
                not torch.equal(other[k], first[k]) for k in first
            ):
                raise RuntimeError("central DP needs one payload for every sampled node; this strategy sent several")
        return first

    def state_dict(self) -> dict[str, Any]:
        return {"ledger": self.ledger.state_dict(), "noise_multiplier": self.noise_multiplier}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ledger = PrivacyLedger.from_state(state.get("ledger"))
        self.noise_multiplier = float(state.get("noise_multiplier", self.noise_multiplier))


class PrivacyBook:
    """The run's privacy ledger as metrics.jsonl shows it.

    Local DP: each node's latest reported epsilon (sample level); the run's guarantee is the
    largest of them. Central DP: the federation's epsilon (user level) from :class:`CentralDP`.
    """

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.node_epsilon: dict[int, float] = {}

    @property
    def mode(self) -> str:
        return self.cfg.privacy.mode

    def round_fields(self, central: CentralDP | None) -> dict[str, Any]:
        """``epsilon``, ``delta``, ``privacy_unit`` and the guarantee for this round's record."""
        if self.mode == "off":
            return {}
        eps = central.epsilon() if central is not None else max(self.node_epsilon.values(), default=0.0)
        out: dict[str, Any] = {
            "epsilon": eps,
            "delta": self.cfg.privacy.delta,
            "privacy_unit": "user" if self.mode == "central" else "sample",
            "privacy": guarantee(self.mode, eps, self.cfg.privacy.delta),
        }
        if central is not None:
            out.update({"noise_multiplier": central.noise_multiplier, **central.last})
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"node_epsilon": {str(k): v for k, v in self.node_epsilon.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.node_epsilon = {int(k): float(v) for k, v in (state.get("node_epsilon") or {}).items()}


# -- the DP plan, before round 1 ----------------------------------------------------------------

#: The run directory's record of the plan (:func:`announce_plan`).
PLAN_FILE = "privacy_plan.json"


def trained_dim(payload: Mapping[str, torch.Tensor], rank: int) -> int:
    """Coordinates a node of LoRA ``rank`` trains of ``payload`` (what the strategy sends it):
    each LoRA factor at that rank (A is r x in, B is out x r), every other tensor (a head) whole;
    a base-model delta is not trained. A strategy's node-kept tensors (FedSA's B) are not sent, so
    not counted."""
    total = 0
    for key, value in payload.items():
        if is_base_delta(key):
            continue
        if is_lora_a(key) and value.dim() == 2:
            total += min(rank, value.shape[0]) * value.shape[1]
        elif is_lora_b(key) and value.dim() == 2:
            total += value.shape[0] * min(rank, value.shape[1])
        else:
            total += value.numel()
    return int(total)


def plan_rows(
    cfg: RunConfig,
    nodes: list[NodeInfo],
    payload: Callable[[int], Mapping[str, torch.Tensor]],
    name: Callable[[int], str] | None = None,
) -> list[PlanRow]:
    """The run's DP plan (:mod:`fedlora.privacy.plan`) from what the nodes reported.

    Parameters
    ----------
    cfg : RunConfig
        The run (``privacy.mode`` local or central).
    nodes : list of NodeInfo
        Every node's reported rank and examples (local: one row each, in this order).
    payload : callable
        A node id's tensors to train (``strategy.payload(node, state)``).
    name : callable, optional
        A node id's name in the plan (default ``node <id>``).
    """
    fed = cfg.federation
    if cfg.privacy.mode == "central":
        dim = max((trained_dim(payload(n.node_id), n.rank) for n in nodes), default=0)
        return [central_row(cfg.privacy, fed.clients, expected_sampled(cfg), cfg.rounds, dim)]
    rows = []
    for n in nodes:
        steps = steps_for(n.num_examples, fed.batch_size, fed.local_steps, fed.local_epochs)
        who = name(n.node_id) if name is not None else f"node {n.node_id}"
        dim = trained_dim(payload(n.node_id), n.rank)
        rows.append(local_row(cfg.privacy, who, n.num_examples, fed.batch_size, steps, cfg.rounds, dim))
    return rows


def announce_plan(cfg: RunConfig, rows: list[PlanRow], run_dir: Path | None, line: Callable[[str], None]) -> None:
    """Print the plan (one line per party, the "cannot learn" warning when the rule says so) and
    record it as ``privacy_plan.json`` in ``run_dir`` (when given)."""
    text = format_plan(rows, cfg.privacy.mode)
    for entry in text:
        line(entry)
    if run_dir is not None:
        record = {
            "mode": cfg.privacy.mode,
            "delta": cfg.privacy.delta,
            "accountant": cfg.privacy.accountant if cfg.privacy.mode == "local" else CENTRAL_ACCOUNTANT,
            "rows": [r.to_dict() for r in rows],
            "can_learn": all(r.can_learn for r in rows),
            "lines": text,
        }
        atomic_write_bytes(Path(run_dir) / PLAN_FILE, (json.dumps(record, indent=1) + "\n").encode())
