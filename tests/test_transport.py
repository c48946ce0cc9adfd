"""Compressed transport (int8 / NF4 / bfloat16) and the stateful downlink of the base change."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedlora.errors import ConfigError
from fedlora.model.adapters import delta_keys, from_record, to_record
from fedlora.run.progress import Progress
from fedlora.simulations.runtime import simulate
from fedlora.strategies.basechain import BaseChain, base_digest, fold, resolve
from fedlora.wire import protocol as P
from fedlora.wire.transport import (
    PACKED,
    Wire,
    WireError,
    arrays_of,
    decode,
    decode_update,
    encode,
    encode_update,
    error_bound,
    pack,
    unpack,
)

pytestmark = pytest.mark.unit

SHAPES = [(8, 384), (384, 8), (2,), (3, 5), (1000,), (7, 300)]


@pytest.mark.parametrize("quantize", ["int8", "nf4"])
@pytest.mark.parametrize("shape", SHAPES)
def test_reconstruction_within_the_absmax_bound(quantize, shape):
    torch.manual_seed(0)
    x = torch.randn(shape) * 0.05
    x.view(-1)[: x.numel() // 3] = 0.0  # an all-zero block must come back as zeros
    y = decode(encode(x, "float32", quantize))
    bound = error_bound(x, quantize)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert bool(((x - y).abs() <= bound * (1 + 1e-5) + 1e-12).all())
    assert torch.equal(y.view(-1)[: x.numel() // 3], torch.zeros(x.numel() // 3))
    # The bound is what absmax rounding promises: half a step of the code times the block's absmax.
    half_step = 1 / 254 if quantize == "int8" else 0.5 * (1 - 0.6961928009986877)
    assert float(bound.max()) == pytest.approx(float(x.abs().max()) * half_step, rel=1e-5)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_float_dtypes_round_to_their_precision(dtype):
    x = torch.randn(16, 24)
    y = decode(encode(x, dtype))
    assert torch.equal(y, x.to(getattr(torch, dtype)).to(torch.float32))
    assert torch.equal(decode(encode(x)), x)  # float32 is exact


def test_sizes_per_encoding():
    x = torch.randn(8, 384)
    f32 = len(encode(x).data)
    assert len(encode(x, "float32", "int8").data) <= 0.255 * f32
    assert len(encode(x, "float32", "nf4").data) <= 0.141 * f32
    assert len(encode(x, "bfloat16").data) == x.numel() * 2


@pytest.mark.parametrize(
    ("array", "reason"),
    [
        # a numpy payload whose bytes are another shape than declared
        (Array(dtype="float32", shape=(4, 4), stype="numpy.ndarray", data=Array(np.zeros((2, 2), "f4")).data), "shape"),
        # float64 bytes declared float32 (1e300 would become inf)
        (Array(dtype="float32", shape=(2,), stype="numpy.ndarray", data=Array(np.full(2, 1e300)).data), "float64"),
        (Array(dtype="float32", shape=(8, 8), stype="fedlora.int8", data=b"\0" * 10), "bytes for 64 int8"),
        (Array(dtype="float32", shape=(8, 8), stype="fedlora.nf4", data=b"\0" * 100), "bytes for 64 nf4"),
        (Array(dtype="float32", shape=(2,), stype="fedlora.zip", data=b"\0" * 8), "unknown encoding"),
        (Array(dtype="int64", shape=(2,), stype="fedlora.int8", data=b"\0" * 8), "unknown dtype"),
        (Array(dtype="bfloat16", shape=(3,), stype="fedlora.bfloat16", data=b"\0" * 4), "bfloat16"),
    ],
)
def test_decode_refuses_bytes_that_do_not_fit_the_header(array, reason):
    with pytest.raises(WireError, match=reason):
        decode(array)


def test_non_finite_scales_are_refused():
    good = encode(torch.ones(4), "float32", "int8")
    data = np.float32(np.inf).tobytes() + good.data[4:]
    with pytest.raises(WireError, match="non-finite"):
        decode(Array(dtype="float32", shape=(4,), stype="fedlora.int8", data=data))


def test_packed_record_round_trip_and_tampering():
    state = {"m.q.lora_A.weight": torch.randn(2, 4), "m.q.lora_B.weight": torch.randn(4, 2)}
    record = to_record(state, "float32", "int8", packed=True)
    assert list(record.keys()) == [PACKED]
    back = from_record(record)
    assert set(back) == set(state)
    packed = record[PACKED]
    with pytest.raises(WireError, match="bytes after"):
        unpack(Array(dtype="uint8", shape=(1,), stype=PACKED, data=packed.data + b"x"))
    with pytest.raises(WireError):
        unpack(Array(dtype="uint8", shape=(1,), stype=PACKED, data=packed.data[:-3]))
    with pytest.raises(WireError, match="packed index"):
        unpack(Array(dtype="uint8", shape=(1,), stype=PACKED, data=b"\xff\xff\xff\x7f" + packed.data[4:]))
    # an index that claims one array twice, or a negative size
    for index in ([["k", "float32", [1], "numpy.ndarray", 0]] * 2, [["k", "float32", [1], "numpy.ndarray", -1]]):
        import struct
        import zlib

        head = zlib.compress(json.dumps(index).encode())
        with pytest.raises(WireError, match="malformed"):
            unpack(Array(dtype="uint8", shape=(1,), stype=PACKED, data=struct.pack("<I", len(head)) + head))
    assert set(arrays_of(to_record(state))) == set(state)  # unpacked records read the same way


def test_uplink_sends_what_changed_and_the_server_adds_it_to_what_it_sent():
    torch.manual_seed(1)
    sent = {"a": torch.randn(8, 64), "b": torch.randn(64, 8)}
    wire = Wire("float32", "int8")
    received = {k: decode(encode(v, "float32", "int8")) for k, v in sent.items()}  # downlink rounding
    update = {k: 1e-3 * torch.randn_like(v) for k, v in sent.items()}
    trained = {k: received[k] + update[k] for k in sent}
    trained["pruned"] = torch.randn(3, 3)  # a tensor that was not sent goes as its values
    record, _ = encode_update(trained, received, wire)
    server = decode_update(from_record(record), sent, wire)
    for k in sent:
        # The downlink's rounding is gone; what is left is the upload's, bounded by the update's absmax.
        assert bool(((server[k] - (sent[k] + update[k])).abs() <= error_bound(update[k], "int8") * 1.0001).all())
    assert torch.allclose(server["pruned"], trained["pruned"], atol=float(error_bound(trained["pruned"], "int8").max()))
    plain, _ = encode_update(trained, received, Wire())
    assert all(torch.equal(v, trained[k]) for k, v in decode_update(from_record(plain), sent, Wire()).items())


def test_error_feedback_keeps_the_rounding_from_accumulating():
    """The same small update sent 50 times: with error feedback the sum of what arrived is off by
    at most one rounding step; without it the per-round rounding errors add up."""
    torch.manual_seed(2)
    wire = Wire("float32", "nf4")
    received = {"a": torch.zeros(4, 64)}
    update = {"a": torch.randn(4, 64) * 1e-3}
    totals = {}
    for feedback in (False, True):
        residual: dict | None = {} if feedback else None
        total = torch.zeros(4, 64)
        for _ in range(50):
            record, new = encode_update(update, received, wire, residual)
            total += decode_update(from_record(record), received, wire)["a"]
            residual = new if feedback else None
        totals[feedback] = (total - 50 * update["a"]).abs().max().item()
    step = float(error_bound(update["a"], "nf4").max())
    assert totals[True] <= 2 * step
    assert totals[False] > 10 * step


def test_config_checks_transport_keys(make_config, tiny_bert):
    with pytest.raises(ConfigError, match="federation.transport_quantize"):
        make_config(tiny_bert, sets=("federation.transport_quantize=int4",))
    with pytest.raises(ConfigError, match="federation.error_feedback"):
        make_config(tiny_bert, sets=("federation.error_feedback=true",))
    cfg = make_config(tiny_bert, sets=("federation.transport_dtype=bfloat16", "federation.transport_quantize=nf4"))
    assert cfg.federation.transport_quantize == "nf4"


# -- the stateful downlink -----------------------------------------------------------------------


def _increment(seed: int, modules=("m1", "m2"), rank: int = 3) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {m: (torch.randn(12, rank, generator=gen), torch.randn(rank, 10, generator=gen)) for m in modules}


def _server_rounds(n: int):
    """A server that folds ``n`` rounds; the base after each round."""
    chain, state, history = BaseChain(), {}, [{}]
    for k in range(n):
        new = fold(state, _increment(k))
        chain.advance(state, _increment(k), new)
        state = new
        history.append(state)
    return chain, history


def _message(chain: BaseChain, node: int, state: dict):
    payload, entries = chain.downlink(node, {**state, "m1.lora_A.weight": torch.zeros(2, 10)})
    return from_record(to_record(payload, packed=True)), ConfigRecord(entries)


def test_a_node_that_skipped_rounds_replays_the_links_bit_exactly():
    chain, history = _server_rounds(2)
    node_state = RecordDict()
    received, config = _message(chain, 7, history[2])  # unknown node: the whole base
    assert P.BASE_FROM not in config
    got = resolve({k: v for k, v in received.items() if "base_delta" in k}, config, node_state)
    chain.ack(7, base_digest(got))
    # three more rounds without node 7, then it comes back
    for k in range(2, 5):
        new = fold(history[-1], _increment(k))
        chain.advance(history[-1], _increment(k), new)
        history.append(new)
    received, config = _message(chain, 7, history[5])
    assert config[P.BASE_FROM] == base_digest(history[2])
    assert not any(k.endswith(("base_delta_A", "base_delta_B")) for k in received)  # links only
    got = resolve({k: v for k, v in received.items() if "base_delta" in k}, config, node_state)
    assert set(got) == set(history[5]) and all(torch.equal(got[k], history[5][k]) for k in got)
    # Nothing new since: no base tensors at all.
    chain.ack(7, base_digest(got))
    received, config = _message(chain, 7, history[5])
    assert config[P.BASE_FROM] == config[P.BASE_DIGEST] and not [k for k in received if "base_delta" in k]
    assert all(torch.equal(v, history[5][k]) for k, v in resolve({}, config, node_state).items())


def test_a_node_that_lost_its_base_fails_in_one_line_and_then_gets_it_whole():
    chain, history = _server_rounds(3)
    chain.ack(3, base_digest(history[2]))
    received, config = _message(chain, 3, history[3])
    with pytest.raises(ValueError, match="base change out of date: this node holds none"):
        resolve({k: v for k, v in received.items() if "base_delta" in k}, config, RecordDict())
    chain.forget(3)
    received, config = _message(chain, 3, history[3])
    assert P.BASE_FROM not in config
    got = resolve({k: v for k, v in received.items() if "base_delta" in k}, config, RecordDict())
    assert all(torch.equal(got[k], history[3][k]) for k in history[3])


def test_a_tampered_base_is_refused():
    chain, history = _server_rounds(1)
    received, config = _message(chain, 1, history[1])
    key = delta_keys("m1")[0]
    received[key] = received[key] + 1e-7
    with pytest.raises(ValueError, match="digest"):
        resolve({k: v for k, v in received.items() if "base_delta" in k}, config, RecordDict())


def test_links_are_dropped_once_they_outweigh_the_base():
    chain, history = _server_rounds(40)
    full = sum(v.numel() for v in history[-1].values())
    assert sum(sum(t.numel() for t in link.values()) for _, _, link in chain.links) <= full
    chain.ack(9, base_digest(history[1]))  # too far behind: the whole base
    _, config = _message(chain, 9, history[-1])
    assert P.BASE_FROM not in config


@pytest.mark.simulation
@pytest.mark.parametrize("strategy", ["flora", "fedex"])
def test_downlink_stays_flat_and_skipping_nodes_stay_in_step(tmp_path, tiny_bert, make_config, strategy):
    """fraction 1: round 5's downlink <= 1.1 x round 2's. fraction < 1: a node that skipped rounds
    replays the links it missed; any mismatch with the server's base would drop its reply."""
    cfg = make_config(tiny_bert, strategy=strategy, sets=("rounds=5",))
    rounds = simulate(cfg, out=tmp_path / "all", progress=Progress(quiet=True)).rounds
    assert rounds[4]["bytes_down"] <= 1.1 * rounds[1]["bytes_down"]
    cfg = make_config(
        tiny_bert,
        strategy=strategy,
        sets=("rounds=6", "federation.clients=4", "federation.fraction=0.5", "federation.transport_quantize=int8"),
    )
    rounds = simulate(cfg, out=tmp_path / "some", progress=Progress(quiet=True)).rounds
    assert all(r["clients_ok"] == 2 and not r["dropped"] for r in rounds)


@pytest.mark.simulation
def test_a_quantized_reply_that_lies_about_its_bytes_is_dropped(tmp_path, tiny_bert, make_config, monkeypatch):
    """A node whose int8 payload is cut short is dropped by name; the others still aggregate."""
    import fedlora.client.client_app as client_app

    real = client_app.upload
    calls = {"n": 0}

    def short(out, received, config, state):
        record = real(out, received, config, state)
        calls["n"] += 1
        if calls["n"] != 1:
            return record
        arrays = arrays_of(record)
        key = sorted(arrays)[0]
        a = arrays[key]
        arrays[key] = Array(dtype=a.dtype, shape=a.shape, stype=a.stype, data=a.data[:-1])
        return ArrayRecord({PACKED: pack(arrays)})

    monkeypatch.setattr(client_app, "upload", short)
    cfg = make_config(tiny_bert, sets=("rounds=1", "federation.transport_quantize=int8"))
    record = simulate(cfg, out=tmp_path / "r", progress=Progress(quiet=True)).rounds[0]
    assert record["clients_ok"] == 2
    assert "bytes for" in record["dropped"][0]["reason"]
