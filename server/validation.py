"""Checks on every client reply before it can touch the global adapter.

A reply that fails any check is dropped (and logged by the caller); it never raises out of the
round. The checks compare the reply with what was sent to that node: same keys, same shapes,
the run's transport encoding (bytes that decode to the declared shape), finite values, a
plausible example count, a bounded size.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message

from fedlora import protocol as P
from fedlora.adapters import exact_on_wire
from fedlora.transport import Wire, WireError, arrays_of, decode


class ReplyError(ValueError):
    """Why one reply was rejected (one line)."""


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
    if reply.has_error():
        raise ReplyError(f"client error: {reply.error.reason}")
    content = reply.content
    if P.ARRAYS not in content.array_records:
        raise ReplyError(f"reply has no {P.ARRAYS!r} record")
    if P.METRICS not in content.metric_records:
        raise ReplyError(f"reply has no {P.METRICS!r} record")
    record = content.array_records[P.ARRAYS]
    metrics = content.metric_records[P.METRICS]
    size = record.count_bytes()
    if size > max_bytes:
        raise ReplyError(f"reply of {size} bytes exceeds the limit of {max_bytes}")
    try:
        arrays = arrays_of(record)
    except WireError as err:
        raise ReplyError(str(err)) from None
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
    decoded = {}
    for key in expected:
        got, want = arrays[key], sent[key]
        if tuple(got.shape) != tuple(want.shape):
            raise ReplyError(f"{key}: shape {tuple(got.shape)} != assigned {tuple(want.shape)}")
        if got.dtype != wire.dtype or got.stype != wire.stype():
            raise ReplyError(
                f"{key}: dtype {got.dtype} ({got.stype}) != the run's transport {wire.dtype} ({wire.stype()})"
            )
        try:
            values = decode(got)
        except WireError as err:
            raise ReplyError(f"{key}: {err}") from None
        if not torch.isfinite(values).all():
            raise ReplyError(f"{key}: non-finite values")
        decoded[key] = values
    num = metrics.get(P.NUM_EXAMPLES)
    if not isinstance(num, int) or isinstance(num, bool) or num <= 0:
        raise ReplyError(f"{P.NUM_EXAMPLES} must be a positive integer, got {num!r}")
    loss = metrics.get(P.TRAIN_LOSS)
    if not isinstance(loss, (int, float)) or not np.isfinite(loss):
        raise ReplyError(f"{P.TRAIN_LOSS} must be a finite number, got {loss!r}")
    eps = metrics.get(P.EPSILON)
    if epsilon and eps is None:
        raise ReplyError(f"reply lacks {P.EPSILON} under privacy.mode = 'local'")
    if eps is not None and (not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0):
        raise ReplyError(f"{P.EPSILON} must be a non-negative number, got {eps!r}")
    # Strategies act on these (HetLoRA's next rank, FL-TAC's per-task weights): whole numbers only.
    per_task = [P.task_metric(P.NUM_EXAMPLES, t) for t in P.task_metrics(dict(metrics), P.NUM_EXAMPLES)]
    for key in [P.RANK] + per_task:
        if key in metrics:
            value = metrics[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < (1 if key == P.RANK else 0):
                raise ReplyError(
                    f"{key} must be a {'positive' if key == P.RANK else 'non-negative'} integer, got {value!r}"
                )
    return decoded
