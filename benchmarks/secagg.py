"""The cost of secure aggregation (SecAgg+) per round: client compute, bytes per client, server time.

For 10, 50 and 100 clients on all-MiniLM-L6-v2's adapter shapes (LoRA rank 8 on query and value
in its six layers, A 8 x 384 and B 384 x 8, plus the 4-class head: 75,268 numbers, what fedavg
sends), one round of fedlora's real protocol runs: the server's
:class:`~fedlora.server.secagg.Protocol` and every client's stage functions
(:mod:`fedlora.client.secagg`) exchange the very Messages they exchange over Flower, only local
training left out (each client's update is a random vector). Against it, the same round without
secure aggregation: each client's train message and reply (the float32 tensors, packed) and the
server's decoding plus ``weighted_mean``. Everything on one thread.

Per client count, two graphs: ``secagg`` (every client a neighbour of every other: Bell et al.'s
SecAgg, the default ``num_shares``) and ``secagg+`` (a ring of ``2 ceil(log2 n) + 1`` neighbours,
SecAgg+'s logarithmic one). Reported per round:

* ``client_seconds``: a client's own work in all four stages (key pairs, Shamir shares, encryption,
  quantization, masks), the mean over clients; ``plain_client_seconds`` encodes its upload.
* ``bytes_up`` / ``bytes_down`` per client (Flower's message bytes, :func:`message_bytes`) and the
  ratio to the plain round's; the key material is the part above the field vector.
* ``server_seconds``: the server's checks, forwarding and unmasking (with no dropout and with 10 %
  of the clients dropped after sharing their keys, whose pairwise masks must be rebuilt);
  ``plain_server_seconds``: decoding the replies and averaging them.

Targets (issue 25): bytes per client <= 2 x plain plus O(neighbours) key material; server time for
100 clients < 5 s. Training, which dominates a real round, is the same in both and left out. The
run config a real message carries (the run as JSON, the same in both) is left out of the bytes.

Usage: python benchmarks/secagg.py [--quick] [--out results.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, quiet_libraries, stdout_to_stderr  # noqa: E402

TARGET_SERVER_100_S = 5.0
TARGET_BYTES_RATIO = 2.0


def adapter(seed: int) -> dict:
    """MiniLM's fedavg payload (random values: the cost depends on shapes alone)."""
    import torch
    from aggregation import random_adapter

    return random_adapter(torch.Generator().manual_seed(seed), 8)


def plain_round(n: int, payload: dict) -> dict:
    """The same round without secure aggregation: bytes and times of the plain path."""
    import torch
    from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

    from fedlora.model.adapters import from_record, to_record
    from fedlora.strategies.fedavg import weighted_mean
    from fedlora.wire import protocol as P
    from fedlora.wire.transport import message_bytes

    down = Message(
        content=RecordDict({P.ARRAYS: to_record(payload, packed=True), P.CONFIG: ConfigRecord({P.SERVER_ROUND: 1})}),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
    )
    trained = {k: v + 0.01 * torch.randn_like(v) for k, v in payload.items()}
    started = time.perf_counter()
    record = to_record(trained, packed=True)
    client_s = time.perf_counter() - started
    metrics = MetricRecord({P.NUM_EXAMPLES: 50, P.TRAIN_LOSS: 1.0, P.TRAIN_SECONDS: 1.0})
    up = Message(content=RecordDict({P.ARRAYS: record, P.METRICS: metrics}), reply_to=down)
    started = time.perf_counter()
    states = [from_record(record) for _ in range(n)]
    weighted_mean(states, [50.0] * n)
    server_s = time.perf_counter() - started
    return {"client_s": client_s, "server_s": server_s, "up": message_bytes(up), "down": message_bytes(down)}


class Clock:
    """Seconds spent per party: each client's, the server's."""

    def __init__(self) -> None:
        self.client: dict[int, float] = {}
        self.server = 0.0

    def run(self, node: int | None, work):
        started = time.perf_counter()
        try:
            return work()
        finally:
            spent = time.perf_counter() - started
            if node is None:
                self.server += spent
            else:
                self.client[node] = self.client.get(node, 0.0) + spent


def secure_round(n: int, payload: dict, shares: int | None, lost: int, plain_down) -> dict:
    """One round of the real protocol among ``n`` clients (``lost`` drop after sharing keys)."""
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

    from fedlora.client import secagg as C
    from fedlora.config import SecureAggregationConfig
    from fedlora.server.secagg import Protocol
    from fedlora.wire import protocol as P
    from fedlora.wire import secagg as S
    from fedlora.wire.transport import message_bytes

    spec = S.layout(payload)
    nodes = list(range(1, n + 1))
    clock, up, down = Clock(), dict.fromkeys(nodes, 0), dict.fromkeys(nodes, 0)
    settings = SecureAggregationConfig(mode="secagg+", num_shares=shares)
    proto = clock.run(None, lambda: Protocol(1, nodes, settings, S.length(spec), seed=n))
    secrets, rng = {}, np.random.default_rng(n)

    def exchange(node, entries, answer, take, train: bool = False) -> None:
        record = ConfigRecord(clock.run(None, lambda: entries(node)))
        content = RecordDict({S.RECORD: record})
        if train:  # the masked input rides on the round's train message
            content = RecordDict({**dict(plain_down.content.items()), S.RECORD: record})
        ask = Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN)
        down[node] += message_bytes(ask)
        got, vector = clock.run(node, lambda: answer(node, record))
        body = RecordDict({S.RECORD: ConfigRecord({**got, S.STAGE: record[S.STAGE], S.SESSION: record[S.SESSION]})})
        if vector is not None:
            body[P.ARRAYS] = ArrayRecord({S.MASKED: Array(vector)})
            body[P.METRICS] = MetricRecord({P.TRAIN_SECONDS: 1.0})
        reply = Message(content=body, reply_to=ask)
        up[node] += message_bytes(reply)
        clock.run(None, lambda: take(node, reply))

    def keys(node, record):
        secrets[node], entries = C.advertise(record, node)
        return entries, None

    def masked(node, record):
        partners = C.receive_shares(secrets[node], record)
        delta = rng.normal(0, 0.01, S.length(spec) - S.EXTRAS)
        return {}, C.masked_vector(secrets[node], partners, delta, 50, 1.0, np.random.default_rng(node))

    for node in nodes:
        exchange(node, lambda _: proto.advertise(), keys, proto.take_keys)
    for node in nodes:
        exchange(node, proto.share_keys, lambda node, r: (C.share_keys(secrets[node], r), None), proto.take_shares)
    gone = set(nodes[:lost])
    for node in nodes:
        exchange(node, proto.masked_input, masked, (lambda *_: None) if node in gone else proto.take_masked, True)
    clock.run(None, proto.after_masking)
    for node in sorted(proto.masked):
        exchange(node, proto.unmask, lambda node, r: (C.unmask(secrets[node], r), None), proto.take_unmask)
    clock.run(None, proto.result)
    return summary(clock, up, down, proto, S.length(spec) * proto.field.wire_dtype.itemsize)


def summary(clock: Clock, up: dict, down: dict, proto, vector_bytes: int) -> dict:
    """A secure round's figures: per client means, the server's total."""
    return {
        "client_seconds": statistics.mean(clock.client.values()),
        "server_seconds": clock.server,
        "bytes_up": statistics.mean(up.values()),
        "bytes_down": statistics.mean(down.values()),
        "vector_bytes": vector_bytes,
        "neighbours": proto.num_shares,
        "threshold": proto.threshold,
    }


def measure(n: int, graph: str, payload: dict, plain: dict, plain_down) -> dict:
    """One client count and graph: the secure round (and one with 10 % dropped), as ratios to plain."""
    # A complete graph: num_shares at least the round (odd, as the configuration wants it).
    shares = n | 1 if graph == "secagg" else None
    full = secure_round(n, payload, shares, 0, plain_down)
    dropped = secure_round(n, payload, shares, max(1, n // 10), plain_down)
    return {
        **{k: round(v, 5) if isinstance(v, float) else v for k, v in full.items()},
        "server_seconds_10pct_dropout": round(dropped["server_seconds"], 5),
        "client_seconds_ratio": round(full["client_seconds"] / plain["client_s"], 2),
        "bytes_up_ratio": round(full["bytes_up"] / plain["up"], 4),
        "bytes_down_ratio": round(full["bytes_down"] / plain["down"], 4),
        # above the masked field vector itself: the public keys, the encrypted shares, the seed shares
        "key_bytes_up": round(full["bytes_up"] - full["vector_bytes"], 1),
        "server_seconds_ratio": round(full["server_seconds"] / plain["server_s"], 2),
    }


def figures(results: dict) -> dict:
    """The headline numbers, flat (``secagg+_100_server_seconds``), for the docs' tables."""
    keys = ("server_seconds", "server_seconds_10pct_dropout", "client_seconds", "bytes_up_ratio", "bytes_down_ratio")
    return {f"{graph}_{n}_{k}": r[k] for graph, runs in results.items() for n, r in runs.items() for k in keys}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="6 clients only (CI): every code path, small")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    quiet_libraries()
    with stdout_to_stderr():
        import torch
        from flwr.app import ConfigRecord, Message, MessageType, RecordDict
        from flwr.common.constant import SUPERLINK_NODE_ID
        from flwr.supercore.task_identity import TaskIdentity

        from fedlora.model.adapters import to_record
        from fedlora.wire import protocol as P

        torch.set_num_threads(1)
        # Message() stamps its sender from what a Flower runtime sets; here there is none.
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
        payload = adapter(0)
        if args.quick:  # two of the twelve modules and the head: every code path, a sixth of the bytes
            payload = {k: v for i, (k, v) in enumerate(sorted(payload.items())) if i < 4 or "classifier" in k}
        plain_down = Message(
            content=RecordDict(
                {P.ARRAYS: to_record(payload, packed=True), P.CONFIG: ConfigRecord({P.SERVER_ROUND: 1})}
            ),
            dst_node_id=1,
            message_type=MessageType.TRAIN,
        )
        # The complete graph's cost grows as n^3 (every client shares with every other, and each
        # share is rebuilt from half of them): measured up to 50 clients; SecAgg+'s ring to 100.
        runs = [(6, "secagg"), (6, "secagg+")] if args.quick else [(10, "secagg"), (50, "secagg")]
        runs += [] if args.quick else [(n, "secagg+") for n in (10, 50, 100)]
        results: dict = {"secagg": {}, "secagg+": {}}
        plain = {}
        for n, graph in runs:
            plain[n] = plain.get(n) or plain_round(n, payload)
            results[graph][str(n)] = measure(n, graph, payload, plain[n], plain_down)
    biggest = max(int(n) for n in results["secagg+"])
    ring = results["secagg+"][str(biggest)]
    report = {
        "benchmark": "secagg",
        "quick": args.quick,
        "coordinates": sum(int(v.numel()) for v in payload.values()),
        "threads": torch.get_num_threads(),
        **figures(results),
        "plain": {str(n): {k: round(v, 6) for k, v in p.items()} for n, p in plain.items()},
        "results": results,
        "targets": {"bytes_up_ratio": TARGET_BYTES_RATIO, "server_seconds_100_clients": TARGET_SERVER_100_S},
        "met": {
            "bytes_up_ratio": all(
                r["bytes_up_ratio"] <= TARGET_BYTES_RATIO for g in results.values() for r in g.values()
            ),
            "server_seconds_100_clients": ring["server_seconds"] < TARGET_SERVER_100_S if biggest >= 100 else None,
        },
        "notes": "training left out (the same in both); bytes without the run config every message carries",
    }
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
