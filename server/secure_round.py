"""A round of the round loop under secure aggregation: the stages of :mod:`.secagg` over the Grid.

:class:`SecureRound` takes the round's train messages (what :meth:`LoRAStrategy.configure_train`
built, unchanged), runs the four stages of SecAgg+ with them, and hands the strategy one update:
what every node was sent plus the unmasked weighted mean of the survivors' updates, through
:meth:`~fedlora.strategies.LoRAStrategy.aggregate_updates` (as central DP hands over its noisy
mean). Nothing of any one client reaches the strategy, metrics.jsonl or a checkpoint: a node's
entry holds its bytes, its training time and why it dropped, never its loss, example count or
update norm.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedlora.config import RunConfig
from fedlora.errors import ConfigError, RunFailed
from fedlora.model.adapters import from_record
from fedlora.privacy.central import (
    central_noise_std,
    distributed_noise_std,
    effective_multiplier,
    mean_release,
    noisy_release,
    skellam_excess,
)
from fedlora.run.progress import Progress
from fedlora.strategies import ClientUpdate, LoRAStrategy
from fedlora.wire import protocol as P
from fedlora.wire import secagg as S
from fedlora.wire.transport import message_bytes

from .intake import RoundBook, collect
from .privacy import CentralDP, expected_sampled
from .secagg import Protocol, RoundSkipped, SecAggError
from .validation import NODE_GONE


class SecureRound:
    """Secure aggregation for a run's rounds (``secure_aggregation.mode = "secagg+"``).

    Parameters
    ----------
    cfg : RunConfig
        The run (``[secure_aggregation]``, the round timeout, the seed).
    grid : Grid
        Where the nodes are.
    strategy : LoRAStrategy
        A strategy that serves secure aggregation (``secure_aggregation_refusal`` empty).
    progress : Progress
        Receives a line per dropped node and per stage that skips the round.
    central : CentralDP, optional
        User-level DP (``privacy.mode = "central"``): each client clips its update to
        ``privacy.clip_norm`` and weighs 1; the server adds the noise to the unmasked sum, or
        with ``privacy.noise = "distributed"`` the clients add it, each its share, and the
        server adds none.
    """

    def __init__(
        self, cfg: RunConfig, grid: Grid, strategy: LoRAStrategy, progress: Progress, central: CentralDP | None = None
    ) -> None:
        self.cfg, self.grid, self.strategy, self.progress, self.central = cfg, grid, strategy, progress, central
        self.settings = cfg.secure_aggregation
        #: What the last round's record says of it (no per-client value).
        self.last: dict[str, Any] = {}
        self._server_s = 0.0
        if self.sum_noise_std > 0:
            check_noise_fits(cfg, self.sum_noise_std)

    @property
    def sum_noise_std(self) -> float:
        """Distributed DP: the std the unmasked sum must carry (``z C``, with the noise multiplier
        the ledger counts, restored on resume); 0 when the server adds the noise."""
        if self.central is None or self.cfg.privacy.noise != "distributed":
            return 0.0
        return self.central.noise_multiplier * self.central.clip_norm

    def aggregate(
        self, server_round: int, messages: list[Message], book: RoundBook, state: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], float | None]:
        """(new global state, weighted train loss) after the round's stages; the state unchanged
        (and None) when the round is skipped."""
        if not messages:
            return state, None
        try:
            reference = CentralDP._common_payload(book.reference)  # the one payload every node was sent
        except RuntimeError:
            raise RunFailed(
                f"secure aggregation needs one payload for every node of a round; strategy "
                f"'{self.strategy.name}' sent several (set its secure_aggregation_refusal)"
            ) from None
        spec = S.layout(reference)
        if self.central is not None:  # each round is one run of the sampled Gaussian mechanism, replies or not
            population = max(len(list(self.grid.get_node_ids())), len(messages))
            self.central.ledger.step(self.central.noise_multiplier, len(messages) / population, 1)
        result = self.run(server_round, messages, book, S.length(spec))
        if result is None:
            return state, None
        if self.central is not None:
            mean = self.noisy_mean(server_round, result, spec, len(messages))
        else:
            mean = S.unflatten(result.mean_update, spec)
        released = {k: reference[k] + mean[k] for k in reference}
        update = ClientUpdate(
            node_id=book.valid[0].metadata.src_node_id,
            state=released,
            num_examples=max(1, round(result.total_weight * self.settings.max_weight)),
            metrics={P.TRAIN_LOSS: result.loss},
        )
        arrays, _ = self.strategy.aggregate_updates(server_round, [update])
        loss = result.loss if self.sum_noise_std == 0 else None  # distributed DP: the clients keep their losses
        return (from_record(arrays) if arrays is not None else state), loss

    def noisy_mean(self, server_round: int, result: S.DecodedSum, spec: S.Layout, sampled: int) -> dict:
        """Central DP's release from the unmasked sum of clipped updates: the sum over the
        ``sampled`` nodes plus the noise :class:`CentralDP` draws (the same draws as without
        secure aggregation); under distributed DP the sum over ``sampled`` alone, the clients'
        noise being in it already (the server draws none)."""
        central = self.central
        assert central is not None
        totals = S.unflatten(result.mean_update * result.total_weight, spec, torch.float64)
        std = central_noise_std(central.noise_multiplier, central.clip_norm, sampled)
        central.last = {"noise_std": std, "clip_norm": central.clip_norm, "noise": self.cfg.privacy.noise}
        if self.sum_noise_std == 0:
            return noisy_release(totals, sampled, std, central.noise_generator(server_round))
        central.last["distributed_noise"] = self.distributed_facts(S.length(spec) - S.EXTRAS)
        return mean_release(totals, sampled)

    def distributed_facts(self, dim: int) -> dict[str, Any]:
        """What the round's record says of the distributed noise (no per-client value): how many
        survivors added a share, for how many each share is made, each share's std, the noise
        multiplier the sum carries, and the Skellam's Renyi excess over the Gaussian per round."""
        central, sa, facts = self.central, self.settings, self.last["secure_aggregation"]
        assert central is not None
        z, clip, made_for = central.noise_multiplier, central.clip_norm, facts["threshold"]
        return {
            "clients": facts["survivors"],
            "calibrated_for": made_for,
            "client_std": distributed_noise_std(z, clip, made_for),
            "effective_noise_multiplier": effective_multiplier(z, facts["survivors"], made_for),
            "skellam_rdp_excess": skellam_excess(z, clip, dim, sa.clipping_range, sa.quantization_bits),
        }

    def run(self, server_round: int, messages: list[Message], book: RoundBook, length: int) -> S.DecodedSum | None:
        """The four stages; the decoded sum, or None when the round is skipped (said in one line)."""
        where = f"round {server_round}/{self.cfg.rounds}"
        nodes = [m.metadata.dst_node_id for m in messages]
        self._server_s = 0.0
        proto: Protocol | None = None
        try:
            clip = self.central.clip_norm if self.central is not None else 0.0
            proto = self._timed(
                lambda: Protocol(server_round, nodes, self.settings, length, self.cfg.seed, clip, self.sum_noise_std)
            )
            keyed = self.stage(proto, S.ADVERTISE, nodes, lambda _: proto.advertise(), proto.take_keys, book)
            proto.require(keyed, "nodes sent keys")
            shared = self.stage(proto, S.SHARE_KEYS, sorted(keyed), proto.share_keys, proto.take_shares, book)
            proto.require(shared, "nodes shared keys")
            train = {m.metadata.dst_node_id: m for m in messages}
            masked = self.stage(
                proto, S.MASKED_INPUT, sorted(shared), proto.masked_input, proto.take_masked, book, train
            )
            proto.after_masking()
            book.valid = [train[n] for n in nodes if n in masked]  # counted as the round's usable replies
            self.stage(proto, S.UNMASK, sorted(masked), proto.unmask, proto.take_unmask, book)
            result = self._timed(proto.result)
        except RoundSkipped as why:
            self.progress.line(f"{where}  secure aggregation: round skipped: {why}; nothing aggregated")
            book.valid = []
            self.last = {"secure_aggregation": {"skipped": str(why)}}
            return None
        self.last = {
            "secure_aggregation": {
                "survivors": len(proto.masked),
                "dropped_after_masking": len(proto.dead),
                "neighbours": proto.num_shares,
                "threshold": proto.threshold,
                # Under distributed DP the clients keep it (no noise covers it): None.
                "clipped_fraction": round(result.clipped_fraction, 6) if self.sum_noise_std == 0 else None,
                "server_seconds": round(self._server_s, 4),
            }
        }
        return result

    def _timed(self, work: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        try:
            return work()
        finally:
            self._server_s += time.perf_counter() - started

    def stage(
        self,
        proto: Protocol,
        stage: str,
        nodes: list[int],
        entries: Callable[[int], dict[str, Any]],
        take: Callable[[int, Message], None],
        book: RoundBook,
        train: dict[int, Message] | None = None,
    ) -> set[int]:
        """Send ``stage`` to ``nodes`` (in their train messages, for masked-input), check each reply
        with ``take``; the nodes whose reply passed. The others are dropped, each named."""
        messages = []
        for node in nodes:
            record = ConfigRecord(self._timed(lambda node=node: entries(node)))
            entry = book.entry(node)
            if train is not None:
                message = train[node]
                entry["bytes_down"] -= message_bytes(message)  # counted again below, with the record
                message.content[S.RECORD] = record
            else:
                content = RecordDict({S.RECORD: record})
                message = Message(
                    content=content, dst_node_id=node, message_type=MessageType.TRAIN, group_id=str(proto.server_round)
                )
            entry["bytes_down"] += message_bytes(message)
            messages.append(message)
        timeout = self.cfg.federation.round_timeout if train is not None else self.settings.timeout
        gone: set[int] = set()
        passed: set[int] = set()
        for reply in collect(self.grid, messages, timeout, gone=gone):
            node = reply.metadata.src_node_id
            if node not in nodes or node in passed:
                continue
            entry = book.entry(node)
            entry["bytes_up"] = entry.get("bytes_up", 0) + message_bytes(reply)
            if train is not None and not reply.has_error() and P.METRICS in reply.content.metric_records:
                entry["seconds"] = round(float(reply.content[P.METRICS].get(P.TRAIN_SECONDS, 0.0)), 4)
            try:
                self._timed(lambda node=node, reply=reply: take(node, reply))
            except SecAggError as err:
                self._drop(book, proto, node, str(err))
                continue
            passed.add(node)
        replied = {r for r in nodes if r in passed or "dropped" in book.entry(r)}
        for node in nodes:
            if node not in replied:
                why = NODE_GONE if node in gone else f"no reply to secure aggregation {stage} before the timeout"
                self._drop(book, proto, node, why, "gone" if node in gone else "timeout")
        return passed

    def _drop(self, book: RoundBook, proto: Protocol, node: int, reason: str, short: str | None = None) -> None:
        book.drop(node, reason, short)
        self.progress.line(f"round {proto.server_round}/{self.cfg.rounds}  node {node}  DROPPED: {reason}")

    def round_fields(self) -> dict[str, Any]:
        """The last round's secure-aggregation facts for metrics.jsonl."""
        return dict(self.last)


def check_noise_fits(cfg: RunConfig, sum_noise_std: float) -> None:
    """ConfigError naming ``secure_aggregation.modulus_bits`` when the field cannot hold the sum of
    ``federation.clients`` summands with their distributed noise (each made for the threshold of
    a round of the expected size), before round 1 rather than a skipped round each time."""
    sa = cfg.secure_aggregation
    field = S.FieldSpec(sa.clipping_range, sa.quantization_bits, sa.modulus_bits, sa.max_weight)
    _, threshold = sa.round_threshold(expected_sampled(cfg))
    clients = cfg.federation.clients
    levels = S.noise_levels(distributed_noise_std(sum_noise_std, 1.0, threshold), field)
    if levels > S.MAX_NOISE_LEVELS:
        raise ConfigError(
            f"config key 'secure_aggregation.quantization_bits' = {sa.quantization_bits} makes each client's "
            f"distributed noise {levels:.3g} levels, more than the {S.MAX_NOISE_LEVELS:g} it can draw; lower it"
        )
    if not S.holds_noise(clients, levels, field):
        need = math.ceil(math.log2(clients * field.target + 2 * S.noise_reach(clients, levels))) + 1
        raise ConfigError(
            f"config key 'secure_aggregation.modulus_bits' = {sa.modulus_bits} cannot hold the sum of {clients} "
            f"clients with their distributed noise (std {levels:.3g} levels each); raise it to {need}, or lower "
            "secure_aggregation.quantization_bits"
        )
