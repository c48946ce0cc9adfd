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

import time
from collections.abc import Callable
from typing import Any

import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedlora.config import RunConfig
from fedlora.errors import RunFailed
from fedlora.model.adapters import from_record
from fedlora.privacy.central import central_noise_std, noisy_release
from fedlora.run.progress import Progress
from fedlora.strategies import ClientUpdate, LoRAStrategy
from fedlora.wire import protocol as P
from fedlora.wire import secagg as S
from fedlora.wire.transport import message_bytes

from .intake import RoundBook, collect
from .privacy import CentralDP
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
        ``privacy.clip_norm`` and weighs 1; the server adds the noise to the unmasked sum.
    """

    def __init__(
        self, cfg: RunConfig, grid: Grid, strategy: LoRAStrategy, progress: Progress, central: CentralDP | None = None
    ) -> None:
        self.cfg, self.grid, self.strategy, self.progress, self.central = cfg, grid, strategy, progress, central
        self.settings = cfg.secure_aggregation
        #: What the last round's record says of it (no per-client value).
        self.last: dict[str, Any] = {}
        self._server_s = 0.0

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
        return (from_record(arrays) if arrays is not None else state), result.loss

    def noisy_mean(self, server_round: int, result: S.DecodedSum, spec: S.Layout, sampled: int) -> dict:
        """Central DP's release from the unmasked sum of clipped updates: the sum over the
        ``sampled`` nodes plus the noise :class:`CentralDP` draws (the same draws as without
        secure aggregation)."""
        central = self.central
        assert central is not None
        totals = S.unflatten(result.mean_update * result.total_weight, spec, torch.float64)
        std = central_noise_std(central.noise_multiplier, central.clip_norm, sampled)
        central.last = {"noise_std": std, "clip_norm": central.clip_norm}
        return noisy_release(totals, sampled, std, central.noise_generator(server_round))

    def run(self, server_round: int, messages: list[Message], book: RoundBook, length: int) -> S.DecodedSum | None:
        """The four stages; the decoded sum, or None when the round is skipped (said in one line)."""
        where = f"round {server_round}/{self.cfg.rounds}"
        nodes = [m.metadata.dst_node_id for m in messages]
        self._server_s = 0.0
        proto: Protocol | None = None
        try:
            clip = self.central.clip_norm if self.central is not None else 0.0
            proto = self._timed(lambda: Protocol(server_round, nodes, self.settings, length, self.cfg.seed, clip))
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
                "clipped_fraction": round(result.clipped_fraction, 6),
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
