"""Checks on every client reply before it can touch the global adapter.

A reply that fails any check is dropped (and logged by the caller); it never raises out of the
round. The checks compare the reply with what was sent to that node: same keys, same shapes,
the run's transport encoding (bytes that decode to the declared shape), finite values, a bounded
size; and every value the server or a strategy reads is checked for type, range and finiteness
before use: the metrics (:func:`check_metrics`, then the strategy's own
:meth:`~fedlora.strategies.LoRAStrategy.check_reply`), the ``INFO`` record (:func:`check_info`),
personalized strategies' evaluate replies (:func:`check_eval_metrics`). Example counts that are
well-formed but implausible are capped, not dropped (:func:`example_cap`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, Message
from flwr.common.constant import ErrorCode

from fedlora.model.adapters import exact_on_wire, is_lora_a
from fedlora.strategies import NodeInfo
from fedlora.wire import protocol as P
from fedlora.wire.transport import Wire, WireError, arrays_of, decode

#: Longest list a metric value may be (Flower's MetricRecord allows lists of numbers).
MAX_METRIC_LIST = 1024
#: Largest whole number a metric may carry (a reply's counts are capped far lower, by
#: ``robustness.max_examples``; this only keeps the arithmetic on them exact).
MAX_METRIC_INT = 2**53


class ReplyError(ValueError):
    """Why one reply was rejected (one line)."""


def is_number(value: Any) -> bool:
    """Whether ``value`` is an int or a float, not a bool (a bool is an int to Python)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite(value: Any) -> bool:
    """Whether ``value`` is a finite float or an int within ``MAX_METRIC_INT`` (checked before any
    conversion: ``float(10**400)`` raises)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return abs(value) <= MAX_METRIC_INT
    return isinstance(value, float) and math.isfinite(value)


def budget_stop_epsilons(metrics: Mapping[str, Any]) -> tuple[float, float] | None:
    """(epsilon spent, epsilon the round would reach) of a reply that says its node's privacy
    budget stops it, or None when they are missing or not finite non-negative numbers (the reply
    is then validated, and dropped, as any other)."""
    spent, reached = metrics.get(P.EPSILON), metrics.get(P.EPSILON_NEXT)
    if not all(is_finite(v) and v >= 0 for v in (spent, reached)):
        return None
    return float(spent), float(reached)


def is_count(value: Any, least: int = 0) -> bool:
    """Whether ``value`` is a whole number in ``[least, MAX_METRIC_INT]``."""
    return isinstance(value, int) and not isinstance(value, bool) and least <= value <= MAX_METRIC_INT


def sent_rank(sent: Mapping[str, Any]) -> int | None:
    """The largest LoRA rank among the A factors a node was sent (None when it was sent none)."""
    ranks = [int(tuple(v.shape)[0]) for k, v in sent.items() if is_lora_a(k) and len(tuple(v.shape)) == 2]
    return max(ranks) if ranks else None


def check_metrics(metrics: Mapping[str, Any], *, epsilon: bool = False, max_rank: int | None = None) -> None:
    """Raise :class:`ReplyError` unless every value of a train reply's metrics is one the server
    can use: numbers (or short lists of them) that are finite, and for the keys the server and the
    strategies read (``num-examples``, ``train-loss``, ``train-seconds``, ``epsilon``, ``rank``,
    per-task counts) of the right kind and range.

    Parameters
    ----------
    metrics : mapping
        The reply's ``metrics`` record as plain values.
    epsilon : bool
        The run is under local DP: the reply must state the node's epsilon so far.
    max_rank : int, optional
        The rank the node was sent: a reply's ``rank`` (the rank it trains next) may not exceed it.
    """
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if isinstance(value, list) and len(value) > MAX_METRIC_LIST:
            raise ReplyError(f"metric {key!r} is a list of {len(value)} values (at most {MAX_METRIC_LIST})")
        for v in values:
            if not is_finite(v):
                raise ReplyError(f"metric {key!r} must be a finite number, got {_short(value)}")
    num = metrics.get(P.NUM_EXAMPLES)
    if not is_count(num, 1):
        raise ReplyError(f"{P.NUM_EXAMPLES} must be a positive integer, got {_short(num)}")
    loss = metrics.get(P.TRAIN_LOSS)
    if not is_number(loss):
        raise ReplyError(f"{P.TRAIN_LOSS} must be a finite number, got {_short(loss)}")
    seconds = metrics.get(P.TRAIN_SECONDS, 0.0)
    if not is_number(seconds) or seconds < 0:
        raise ReplyError(f"{P.TRAIN_SECONDS} must be a non-negative number, got {_short(seconds)}")
    eps = metrics.get(P.EPSILON)
    if epsilon and eps is None:
        raise ReplyError(f"reply lacks {P.EPSILON} under privacy.mode = 'local'")
    if eps is not None and (not is_number(eps) or eps < 0):
        raise ReplyError(f"{P.EPSILON} must be a non-negative number, got {_short(eps)}")
    if P.RANK in metrics:
        rank = metrics[P.RANK]
        if not is_count(rank, 1):
            raise ReplyError(f"{P.RANK} must be a positive integer, got {_short(rank)}")
        if max_rank is not None and rank > max_rank:
            raise ReplyError(f"{P.RANK} {rank} exceeds the rank {max_rank} the node was sent")
    # Strategies weight by these (FL-TAC's per-task weights): whole numbers only.
    for task, value in P.task_metrics(dict(metrics), P.NUM_EXAMPLES).items():
        if not is_count(value):
            key = P.task_metric(P.NUM_EXAMPLES, task)
            raise ReplyError(f"{key} must be a non-negative integer, got {_short(value)}")


def check_eval_metrics(metrics: Mapping[str, Any]) -> None:
    """Raise :class:`ReplyError` unless an evaluate reply's metrics (a personalized strategy's
    node evaluating its own model) are finite numbers with a positive whole ``num-examples``."""
    for key, value in metrics.items():
        if not is_finite(value):
            raise ReplyError(f"metric {key!r} must be a finite number, got {_short(value)}")
    if P.NUM_EXAMPLES in metrics and not is_count(metrics[P.NUM_EXAMPLES], 1):
        raise ReplyError(f"{P.NUM_EXAMPLES} must be a positive integer, got {_short(metrics[P.NUM_EXAMPLES])}")


#: Longest base digest a train reply's ``INFO`` may name (a hex digest is 64 characters).
MAX_DIGEST = 128


def check_info(node_id: int, info: Mapping[str, Any]) -> NodeInfo | None:
    """What a train reply's ``INFO`` record says about its node (None when it carries only the
    base digest); :class:`ReplyError` when any of it is malformed (see
    :meth:`~fedlora.strategies.NodeInfo.from_record`) or the digest is not a short string."""
    digest = info.get(P.INFO_BASE_DIGEST)
    if digest is not None and not (isinstance(digest, str) and len(digest) <= MAX_DIGEST):
        raise ReplyError(f"info {P.INFO_BASE_DIGEST} must be a string of at most {MAX_DIGEST} characters")
    if set(info.keys()) <= {P.INFO_BASE_DIGEST}:
        return None
    try:
        return NodeInfo.from_record(node_id, info)
    except (KeyError, TypeError, ValueError) as err:
        raise ReplyError(f"info: {_short(err, 120)}") from None


def example_cap(max_examples: int, reported: int | None) -> int:
    """The most examples one reply may claim: ``robustness.max_examples``, and no more than its
    node reported in its capabilities (``reported``; None or 0 when it did not say)."""
    return min(max_examples, reported) if reported else max_examples


def _short(value: Any, limit: int = 40) -> str:
    """``repr(value)`` cut to ``limit`` characters (a hostile value can be huge)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


#: What each Flower error code means for a fedlora round, in the operator's words.
#: Why a node that left mid-round is dropped (Flower marks it offline after 2 missed 30 s heartbeats).
NODE_GONE = (
    "the node stopped answering mid-round (no heartbeat: its fedlora-client was stopped, crashed or lost "
    "the network); it is sampled again once it reconnects"
)
_ERROR_MEANING = {
    ErrorCode.NODE_UNAVAILABLE: NODE_GONE,
    # The SuperLink withdrew the message: in practice its node left the federation mid-round.
    ErrorCode.MESSAGE_UNAVAILABLE: NODE_GONE,
    ErrorCode.REPLY_MESSAGE_UNAVAILABLE: "the node's reply expired before the server read it",
    ErrorCode.CLIENT_APP_CRASHED: "the node's ClientApp process crashed (see the device's own output)",
    ErrorCode.LOAD_CLIENT_APP_EXCEPTION: "the node could not load fedlora's ClientApp (is fedlora installed there?)",
}
#: How Flower writes an exception a ClientApp raised: ``<class 'module.Name'>:<'message'>``.
_RAISED = re.compile(r"<class '(?:[\w.]*\.)?(\w+)'>:<['\"](.*)['\"]>", re.S)


def error_text(reply: Message) -> str:
    """One line saying why ``reply`` is an error: a node that went away is named as such (not as a
    timeout), an exception the node raised as ``Name: message`` (not Flower's repr)."""
    error = reply.error
    if error.code in _ERROR_MEANING:
        return _ERROR_MEANING[error.code]
    reason = str(error.reason or "")
    raised = _RAISED.fullmatch(reason.strip())
    if raised:
        name, message = raised.groups()
        lines = message.strip().splitlines()
        return f"the node failed: {name}: {lines[0] if lines else ''}"[:500]
    first = reason.strip().splitlines()[0] if reason.strip() else f"error code {error.code}"
    return f"client error: {first}"[:500]


def _reply_records(reply: Message, max_bytes: int) -> tuple[dict[str, Array], Any]:
    """The reply's arrays and metrics record; :class:`ReplyError` for an error reply, a missing
    record, more than ``max_bytes`` of arrays or arrays the wire cannot read."""
    if reply.has_error():
        raise ReplyError(error_text(reply))
    content = reply.content
    if P.ARRAYS not in content.array_records:
        raise ReplyError(f"reply has no {P.ARRAYS!r} record")
    if P.METRICS not in content.metric_records:
        raise ReplyError(f"reply has no {P.METRICS!r} record")
    record = content.array_records[P.ARRAYS]
    size = record.count_bytes()
    if size > max_bytes:
        raise ReplyError(f"reply of {size} bytes exceeds the limit of {max_bytes}")
    try:
        return arrays_of(record), content.metric_records[P.METRICS]
    except WireError as err:
        raise ReplyError(str(err)) from None


def _decoded(key: str, got: Array, want: Array, wire: Wire) -> torch.Tensor:
    """One returned tensor decoded to float32, if it has the shape it was sent with, the run's
    transport encoding and only finite values; :class:`ReplyError` naming ``key`` otherwise."""
    if tuple(got.shape) != tuple(want.shape):
        raise ReplyError(f"{key}: shape {tuple(got.shape)} != assigned {tuple(want.shape)}")
    if got.dtype != wire.dtype or got.stype != wire.stype():
        raise ReplyError(f"{key}: dtype {got.dtype} ({got.stype}) != the run's transport {wire.dtype} ({wire.stype()})")
    try:
        values = decode(got)
    except WireError as err:
        raise ReplyError(f"{key}: {err}") from None
    if not torch.isfinite(values).all():
        raise ReplyError(f"{key}: non-finite values")
    return values


def validate_reply(
    reply: Message, sent: ArrayRecord | Mapping[str, Array], *, wire: Wire, max_bytes: int, epsilon: bool = False
) -> dict[str, torch.Tensor]:
    """The reply's tensors, decoded to float32; :class:`ReplyError` if ``reply`` is not a
    well-formed answer to ``sent``.

    Parameters
    ----------
    reply : Message
        The node's reply to a train message.
    sent : ArrayRecord or mapping of str to Array
        The tensors that were sent to that node, a packed record or its arrays unpacked (the
        reply must mirror the keys and shapes of all but the base-delta factors).
    wire : Wire
        The run's transport (dtype and quantizer): every array must be encoded that way, and
        its bytes must decode to the declared shape (the payload is checked, not its label).
    max_bytes : int
        Upper bound on the reply's serialized arrays.
    epsilon : bool
        The run is under local DP: the reply must state the node's epsilon so far.
    """
    arrays, metrics = _reply_records(reply, max_bytes)
    if isinstance(sent, ArrayRecord):
        sent = arrays_of(sent)
    # Base-delta factors (and their links) are folded into the client's frozen weights, never sent back.
    expected = [k for k in sent.keys() if not exact_on_wire(k)]
    missing = sorted(set(expected) - set(arrays.keys()))
    extra = sorted(set(arrays.keys()) - set(expected))
    if missing:
        raise ReplyError(f"reply lacks {len(missing)} tensor(s), e.g. {missing[0]}")
    if extra:
        raise ReplyError(f"reply has {len(extra)} unexpected tensor(s), e.g. {extra[0]}")
    decoded = {key: _decoded(key, arrays[key], sent[key], wire) for key in expected}
    check_metrics(dict(metrics), epsilon=epsilon, max_rank=sent_rank(sent))
    return decoded
