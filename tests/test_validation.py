"""A bad client reply is rejected with a reason; it never reaches aggregation."""

from __future__ import annotations

import pytest
import torch
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict
from flwr.app.metadata import Metadata

from fedlora.model.adapters import to_record
from fedlora.server import ReplyError, validate_reply
from fedlora.wire.transport import Wire

pytestmark = pytest.mark.unit

SENT = to_record({"m.q.lora_A.weight": torch.ones(2, 4), "m.q.lora_B.weight": torch.zeros(4, 2)})


def _reply(arrays=None, metrics=None, error=None) -> Message:
    meta = Metadata(
        run_id=1,
        message_id="m",
        src_node_id=5,
        dst_node_id=0,
        reply_to_message_id="x",
        group_id="1",
        created_at=0.0,
        ttl=100.0,
        message_type="train",
    )
    if error is not None:
        return Message(error, metadata=meta)
    content = RecordDict(
        {
            "arrays": arrays if arrays is not None else SENT,
            "metrics": MetricRecord(metrics if metrics is not None else {"num-examples": 10, "train-loss": 0.5}),
        }
    )
    return Message(content, metadata=meta)


def _check(msg):
    validate_reply(msg, SENT, wire=Wire(), max_bytes=10_000)


def test_good_reply_passes():
    _check(_reply())


def test_base_delta_factors_are_sent_but_not_returned():
    sent = to_record(
        {
            "m.q.lora_A.weight": torch.ones(2, 4),
            "m.q.lora_B.weight": torch.zeros(4, 2),
            "m.q.base_delta_A": torch.ones(3, 4),
            "m.q.base_delta_B": torch.ones(4, 3),
        }
    )
    validate_reply(_reply(), sent, wire=Wire(), max_bytes=10_000)
    echoed = to_record(
        {
            "m.q.lora_A.weight": torch.ones(2, 4),
            "m.q.lora_B.weight": torch.zeros(4, 2),
            "m.q.base_delta_A": torch.ones(3, 4),
            "m.q.base_delta_B": torch.ones(4, 3),
        }
    )
    with pytest.raises(ReplyError, match="unexpected"):
        validate_reply(_reply(echoed), sent, wire=Wire(), max_bytes=10_000)


@pytest.mark.parametrize(
    ("arrays", "metrics", "reason"),
    [
        (to_record({"m.q.lora_A.weight": torch.ones(2, 4)}), None, "lacks"),
        (
            to_record(
                {
                    "m.q.lora_A.weight": torch.ones(2, 4),
                    "m.q.lora_B.weight": torch.zeros(4, 2),
                    "m.k.lora_B.weight": torch.zeros(4, 2),
                }
            ),
            None,
            "unexpected",
        ),
        (to_record({"m.q.lora_A.weight": torch.ones(3, 4), "m.q.lora_B.weight": torch.zeros(4, 2)}), None, "shape"),
        (
            to_record({"m.q.lora_A.weight": torch.full((2, 4), float("nan")), "m.q.lora_B.weight": torch.zeros(4, 2)}),
            None,
            "non-finite",
        ),
        (
            to_record({"m.q.lora_A.weight": torch.ones(2, 4), "m.q.lora_B.weight": torch.zeros(4, 2)}, "float16"),
            None,
            "dtype",
        ),
        (
            to_record({"m.q.lora_A.weight": torch.ones(2, 1000), "m.q.lora_B.weight": torch.zeros(1000, 2)}),
            None,
            "exceeds",
        ),
        (None, {"num-examples": 0, "train-loss": 0.5}, "num-examples"),
        (None, {"num-examples": 3, "train-loss": float("inf")}, "train-loss"),
        (None, {"train-loss": 0.5}, "num-examples"),
        (None, {"num-examples": 3, "train-loss": 0.5, "rank": 0}, "rank"),
        (None, {"num-examples": 3, "train-loss": 0.5, "rank": 2.5}, "rank"),
        (None, {"num-examples": 3, "train-loss": 0.5, "num-examples::sst2": -1}, "num-examples::sst2"),
    ],
)
def test_bad_replies_are_rejected(arrays, metrics, reason):
    with pytest.raises(ReplyError, match=reason):
        _check(_reply(arrays, metrics))


def test_undecodable_bytes():
    good = SENT["m.q.lora_A.weight"]
    broken = ArrayRecord(
        {
            "m.q.lora_A.weight": Array(dtype="float32", shape=good.shape, stype=good.stype, data=b"garbage"),
            "m.q.lora_B.weight": SENT["m.q.lora_B.weight"],
        }
    )
    with pytest.raises(ReplyError, match="undecodable"):
        _check(_reply(broken))


def test_error_reply():
    with pytest.raises(ReplyError, match="client error: boom"):
        _check(_reply(error=Error(code=0, reason="boom")))
