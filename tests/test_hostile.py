"""Hostile and broken replies (issue 15, items 2, 3, 5): every value a client sends is checked
before anything uses it; a bad reply is dropped and named, never the run; claimed example counts
are capped; the metrics file stays strict JSON.

The fuzz test drives the real server loop (:class:`RoundLoop` over an :class:`InProcessGrid` of
real ClientApps): every honest reply of a round is followed by many corrupted copies of it (shape,
dtype and byte lies, NaN/Inf/overflow, wrong types and ranges in metrics and INFO, bad ranks and
task counts, missing records, client errors), all pushed through ``RoundLoop.check_reply``; the
round's aggregate must equal, bit for bit, that of a twin loop that saw only the honest replies.
"""

from __future__ import annotations

import json
import math
import random
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedlora.run.directory import RunDirectory, finite_json
from fedlora.run.progress import Progress
from fedlora.server.rounds import RoundBook, RoundLoop, collect
from fedlora.server.validation import ReplyError, check_eval_metrics, check_info, check_metrics, example_cap
from fedlora.strategies import NodeDirectory, NodeInfo
from fedlora.wire import protocol as P
from fedlora.wire.transport import arrays_of

pytestmark = pytest.mark.unit

PROFILES = "federation.profiles=[{name='phone',rank=1},{name='tablet',rank=2},{name='laptop',rank=4}]"
TWO_TASKS = (
    "data.max_train_examples=0",
    "data.max_eval_examples=0",
    "data.partition_column=task",
    "data.dirichlet_alpha=0.3",
    "data.tasks=[{name='topics',path='synthetic:topics',max_train_examples=60,max_eval_examples=16},"
    "{name='sentiment',path='synthetic:sentiment',max_train_examples=60,max_eval_examples=16}]",
)
FUZZ_RUNS = {"fedavg": (), "hetlora": (PROFILES,), "fltac": TWO_TASKS, "fedsa": ()}
#: Corrupted copies pushed after each honest reply (4 strategies x 2 rounds x 3 nodes x 22 = 528).
PER_REPLY = 22


class Lines(Progress):
    """A quiet Progress that keeps its lines."""

    def __init__(self) -> None:
        super().__init__(quiet=True)
        self.lines: list[str] = []

    def line(self, text: str) -> None:
        self.lines.append(text)


# -- building replies ----------------------------------------------------------------------------


def reply_of(to: Message, arrays: Any = None, metrics: Any = None, info: Any = None) -> Message:
    """A reply to ``to`` holding the given records (None: left out)."""
    content = RecordDict()
    if arrays is not None:
        content[P.ARRAYS] = arrays
    if metrics is not None:
        content[P.METRICS] = metrics
    if info is not None:
        content[P.INFO] = info
    return Message(content=content, reply_to=to)


def parts(reply: Message) -> tuple[dict[str, Array], dict[str, Any], dict[str, Any]]:
    """(arrays by key, metrics, info) of an honest reply, as fresh plain copies."""
    info = dict(reply.content.config_records[P.INFO]) if P.INFO in reply.content.config_records else {}
    return dict(arrays_of(reply.content[P.ARRAYS])), dict(reply.content[P.METRICS]), info


def with_array(arrays: dict[str, Array], key: str, array: Array) -> ArrayRecord:
    return ArrayRecord({**arrays, key: array})


def raw(like: Array, data: bytes, *, dtype: str | None = None, shape: tuple | None = None) -> Array:
    return Array(dtype=dtype or like.dtype, shape=shape or tuple(like.shape), stype=like.stype, data=data)


def corruptions(rng: random.Random, reply: Message, to: Message, strategy: str) -> list[tuple[str, Message]]:
    """Every kind of corruption of ``reply`` (a reply to ``to``), as ``(name, message)``: the test
    samples among them. Each must be dropped."""
    arrays, metrics, info = parts(reply)
    keys = sorted(arrays)
    key = rng.choice(keys)
    honest = arrays[key]
    values = honest.numpy()
    shape = tuple(values.shape)
    out: list[tuple[str, Message]] = []

    def arr(name: str, record: ArrayRecord) -> None:
        out.append((name, reply_of(to, record, MetricRecord(metrics), ConfigRecord(info))))

    def met(name: str, **changes: Any) -> None:
        m = {k: v for k, v in metrics.items() if k not in changes or changes[k] is not None}
        m.update({k: v for k, v in changes.items() if v is not None})
        out.append((name, reply_of(to, ArrayRecord(arrays), MetricRecord(m), ConfigRecord(info))))

    def inf(name: str, **changes: Any) -> None:
        i = {**info, **changes}
        out.append((name, reply_of(to, ArrayRecord(arrays), MetricRecord(metrics), ConfigRecord(i))))

    # Tensors: shape, dtype and byte lies, non-finite values, missing and extra keys.
    wrong = (shape[0] + rng.randint(1, 3), *shape[1:])
    arr("declared shape wrong", with_array(arrays, key, Array(np.zeros(wrong, dtype=values.dtype))))
    arr("transposed", with_array(arrays, key, Array(np.ascontiguousarray(values.T))))
    small = np.zeros((max(1, values.size // 2),), dtype=values.dtype)
    arr("bytes of another shape", with_array(arrays, key, raw(honest, Array(small).data)))
    arr("truncated bytes", with_array(arrays, key, raw(honest, honest.data[: rng.randint(0, len(honest.data) - 1)])))
    arr("junk bytes", with_array(arrays, key, raw(honest, rng.randbytes(rng.randint(1, 300)))))
    huge64 = np.full(shape, 1e300, dtype=np.float64)
    arr("float64 1e300", with_array(arrays, key, Array(huge64)))
    arr("float64 labelled float32", with_array(arrays, key, raw(honest, Array(huge64).data)))
    arr("float16", with_array(arrays, key, Array(values.astype(np.float16))))
    arr("int64", with_array(arrays, key, Array(np.ones(shape, dtype=np.int64))))
    for bad in (math.nan, math.inf, -math.inf):
        poisoned = values.copy()
        poisoned.flat[rng.randrange(poisoned.size)] = bad
        arr(f"{bad} in tensor", with_array(arrays, key, Array(poisoned)))
    arr("missing tensor", ArrayRecord({k: v for k, v in arrays.items() if k != key}))
    arr("extra tensor", with_array(arrays, key + ".extra", honest))
    arr("empty arrays", ArrayRecord())
    # Records missing, client error.
    out.append(("no arrays", reply_of(to, None, MetricRecord(metrics), ConfigRecord(info))))
    out.append(("no metrics", reply_of(to, ArrayRecord(arrays), None, ConfigRecord(info))))
    out.append(("client error", Message(Error(code=0, reason="boom"), reply_to=to)))
    # Metrics: wrong types, ranges, non-finite values, absurd counts.
    for bad in (0, -1, -(2**63), 2**63 - 1, 2**64, 10**400, 3.5, math.nan, [1, 2]):
        met(f"num-examples {bad!r}", **{P.NUM_EXAMPLES: bad})
    met("num-examples missing", **{P.NUM_EXAMPLES: None})
    for bad in (math.nan, math.inf, -math.inf, [0.1, 0.2], 1e400):
        met(f"train-loss {bad!r}", **{P.TRAIN_LOSS: bad})
    met("train-loss missing", **{P.TRAIN_LOSS: None})
    for bad in ([1.0, 2.0], -1.0, math.nan, math.inf, [1, 2, 3]):
        met(f"train-seconds {bad!r}", **{P.TRAIN_SECONDS: bad})
    for bad in (0, -1, 2**40, 2.0, [1, 2], 2**63 - 1, 99):
        met(f"rank {bad!r}", **{P.RANK: bad})
    for bad in (math.nan, -math.inf, [math.nan], list(range(2000))):
        met(f"extra metric {str(bad)[:20]}", **{"extra": bad})
    for bad in (math.nan, -1.0, [1.0], math.inf):
        met(f"epsilon {bad!r}", **{P.EPSILON: bad})
    if strategy == "fltac":
        for task in P.task_metrics(metrics, P.NUM_EXAMPLES):
            for bad in (0, -3, 2.5, [1], 2**63 - 1):
                met(f"{task} count {bad!r}", **{P.task_metric(P.NUM_EXAMPLES, task): bad})
    # INFO: what the node says about itself, garbage of every kind.
    for bad in (-1, 0, 10**9, 10**400, "4", 2.0, [4]):
        inf(f"info rank {bad!r}", **{P.INFO_RANK: bad})
    nested = "[" * 100_000 + "]" * 100_000
    for bad in ("[1]", nested, '{"a": -1}', '{"a": [1]}', '{"a": 1.5}', "not json", '{"a": NaN}', "x" * 10_000, 7):
        inf(f"info tasks {bad[:12] if isinstance(bad, str) else bad!r}", **{P.INFO_TASKS: bad})
    for bad in (math.nan, -1.0, math.inf, 10**400, "8"):
        inf(f"info memory {bad!r}", **{P.INFO_MEMORY_GB: bad})
    for bad in (-1, 2**63 - 1, 1.5, "10"):
        inf(f"info num-examples {bad!r}", **{P.INFO_NUM_EXAMPLES: bad})
    for bad in ("cuda:0\nround 9/9  global adapter", "x" * 500, 5):
        inf("info device", **{P.INFO_DEVICE: bad})
    for bad in (nested, '{"auto": Infinity}', "[]"):
        inf(f"info chosen {bad[:12]}", **{P.INFO_CHOSEN: bad})
    for bad in (["a"], "d" * 1000, 12):
        inf(f"info base digest {str(bad)[:12]}", **{P.INFO_BASE_DIGEST: bad})
    return out


# -- the fuzz test ---------------------------------------------------------------------------------


def twin_loops(tmp_path, tiny_bert, strategy: str):
    """(cfg, grid, loop under attack, its lines, honest twin loop, states), each loop started and
    its nodes queried, over one grid of real ClientApps."""
    from conftest import tiny_config
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    from fedlora.client import app as client_app
    from fedlora.server import prepare
    from fedlora.simulations.grid import InProcessGrid

    sets = ("federation.clients=3", "federation.local_steps=1", "federation.batch_size=4", *FUZZ_RUNS[strategy])
    cfg = tiny_config(tiny_bert, strategy=strategy, sets=sets)
    prepared = prepare(cfg)
    grid = InProcessGrid(client_app, cfg.federation.clients)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, grid.run.run_id, SUPERLINK_NODE_ID
    lines = Lines()
    attacked = RoundLoop(grid, prepared, RunDirectory(tmp_path / f"{strategy}-a"), lines)
    twin = RoundLoop(grid, prepared, RunDirectory(tmp_path / f"{strategy}-b"), Lines())
    states = []
    for loop in (attacked, twin):
        state, _, _ = loop.start(resume=False)
        loop.query_new_nodes()
        states.append(state)
    return cfg, grid, attacked, lines, twin, states


@pytest.mark.simulation
@pytest.mark.parametrize("strategy", sorted(FUZZ_RUNS))
def test_fuzzed_replies_are_dropped_and_honest_ones_aggregate_bit_exact(tmp_path, tiny_bert, strategy):
    cfg, grid, attacked, lines, twin, (state_a, state_b) = twin_loops(tmp_path, tiny_bert, strategy)
    rng = random.Random(f"fuzz-{strategy}")
    corrupted = 0
    for server_round in (1, 2):
        messages_a = attacked.configure(server_round, state_a)
        messages_b = twin.configure(server_round, state_b)
        book_a = RoundBook.of(messages_a, dict(attacked.strategy.sent))
        book_b = RoundBook.of(messages_b, dict(twin.strategy.sent))
        replies = collect(grid, messages_a, 120)  # real training on the real clients
        assert len(replies) == len(messages_a) > 0
        to_a = {m.metadata.dst_node_id: m for m in messages_a}
        to_b = {m.metadata.dst_node_id: m for m in messages_b}
        for count, reply in enumerate(replies, 1):
            node = reply.metadata.src_node_id
            assert not reply.has_error(), reply.error.reason
            kinds = corruptions(rng, reply, to_a[node], strategy)
            for name, bad in rng.sample(kinds, min(PER_REPLY, len(kinds))):
                before = len(book_a.dropped)
                attacked.check_reply(server_round, bad, count, len(replies), book_a)
                assert len(book_a.dropped) == before + 1, f"{strategy}: corruption {name!r} was accepted"
                reason = book_a.dropped[-1]["reason"]
                assert reason and "\n" not in reason and len(reason) < 300, (name, reason)
                assert lines.lines[-1].endswith(f"DROPPED: {reason}")
                corrupted += 1
            honest_a = reply_of(to_a[node], *[reply.content.get(k) for k in (P.ARRAYS, P.METRICS, P.INFO)])
            honest_b = reply_of(to_b[node], *[reply.content.get(k) for k in (P.ARRAYS, P.METRICS, P.INFO)])
            attacked.check_reply(server_round, honest_a, count, len(replies), book_a)
            twin.check_reply(server_round, honest_b, count, len(replies), book_b)
        assert len(book_a.valid) == len(book_b.valid) == len(replies)
        state_a, loss_a = attacked.aggregate(server_round, state_a, book_a)
        state_b, loss_b = twin.aggregate(server_round, state_b, book_b)
        assert loss_a == loss_b
        assert state_a.keys() == state_b.keys()
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a), f"{strategy}: aggregate differs"
        assert all(torch.isfinite(v).all() for v in state_a.values())
        # The round's record is strict JSON although the book names hundreds of hostile replies.
        attacked.record(server_round, book_a, loss_a, {}, 0.0, _Result())
        text = attacked.run_dir.metrics_path.read_text()
        json.loads(text.splitlines()[-1], parse_constant=_refuse)
    assert corrupted >= 2 * 3 * PER_REPLY - PER_REPLY  # 132 per strategy (528 in all) when all 3 nodes train
    assert strategy != "hetlora" or sorted(attacked.strategy.ranks.values()) == sorted(twin.strategy.ranks.values())


class _Result:
    initial: dict = {}


def _refuse(constant: str) -> None:
    raise AssertionError(f"metrics.jsonl holds a bare {constant}")


# -- example caps ------------------------------------------------------------------------------------


def test_example_cap():
    assert example_cap(1000, None) == 1000
    assert example_cap(1000, 0) == 1000  # a node that said nothing is held to the run's cap
    assert example_cap(1000, 40) == 40
    assert example_cap(10, 40) == 10


@pytest.mark.simulation
def test_claimed_counts_are_capped_at_what_the_node_reported(tmp_path, tiny_bert):
    cfg, grid, attacked, lines, twin, (state, _) = twin_loops(tmp_path, tiny_bert, "fedavg")
    messages = attacked.configure(1, state)
    book = RoundBook.of(messages, dict(attacked.strategy.sent))
    replies = collect(grid, messages, 120)
    liar = replies[0]
    node = liar.metadata.src_node_id
    reported = attacked.nodes.get(node).num_examples
    arrays, metrics, info = parts(liar)
    metrics[P.NUM_EXAMPLES] = 2**50  # whole, finite, absurd: capped, not dropped
    to = {m.metadata.dst_node_id: m for m in messages}
    attacked.check_reply(
        1, reply_of(to[node], ArrayRecord(arrays), MetricRecord(metrics), ConfigRecord(info)), 1, 3, book
    )
    for count, reply in enumerate(replies[1:], 2):
        attacked.check_reply(1, reply, count, 3, book)
    entry = book.clients[node]
    assert entry["num_examples"] == reported and entry["examples_capped_from"] == 2**50
    assert f"examples {reported}" in lines.lines[-3] and "capped from 1,125,899,906,842,624" in lines.lines[-3]
    attacked.aggregate(1, state, book)
    weights = [r.content[P.METRICS][P.NUM_EXAMPLES] for r in book.valid]
    assert max(weights) <= max(attacked.nodes.get(n).num_examples for n in book.sent)


def test_max_examples_caps_every_claim(tmp_path, tiny_bert, monkeypatch):
    from conftest import tiny_config
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    from fedlora.server import prepare

    # Message() stamps its sender from TaskIdentity, which a runtime sets: set here, so the test
    # does not depend on an earlier test having run one.
    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", SUPERLINK_NODE_ID)):
        monkeypatch.setattr(TaskIdentity, attr, value)
    cfg = tiny_config(tiny_bert, sets=("robustness.max_examples=7",))
    loop = RoundLoop(None, prepare(cfg), RunDirectory(tmp_path / "run"), Lines())
    entry: dict[str, Any] = {}
    metrics = {P.NUM_EXAMPLES: 30, P.task_metric(P.NUM_EXAMPLES, "a"): 9}
    reply = Message(content=RecordDict({P.METRICS: MetricRecord(metrics)}), dst_node_id=5, message_type="train")
    assert loop.cap_examples(5, reply, metrics, entry) == 30
    assert reply.content[P.METRICS][P.NUM_EXAMPLES] == metrics[P.NUM_EXAMPLES] == 7
    assert entry == {"examples_capped_from": 30, "task_examples_capped_from": {"a": 9}}


# -- values of every type, checked before use -------------------------------------------------------


GOOD = {P.NUM_EXAMPLES: 10, P.TRAIN_LOSS: 0.5, P.TRAIN_SECONDS: 1.5, P.RANK: 2, P.TRAIN_STEPS: 3}


def test_good_metrics_pass():
    check_metrics(GOOD, max_rank=4)
    check_metrics({**GOOD, P.EPSILON: 0.3, P.task_metric(P.NUM_EXAMPLES, "a"): 0}, epsilon=True)


@pytest.mark.parametrize(
    "changes, names",
    [
        ({P.TRAIN_SECONDS: [1.0]}, P.TRAIN_SECONDS),
        ({P.TRAIN_SECONDS: "3"}, P.TRAIN_SECONDS),
        ({P.NUM_EXAMPLES: True}, P.NUM_EXAMPLES),
        ({P.NUM_EXAMPLES: 2**63 - 1}, P.NUM_EXAMPLES),
        ({P.TRAIN_LOSS: None}, P.TRAIN_LOSS),
        ({P.TRAIN_LOSS: {"a": 1}}, P.TRAIN_LOSS),
        ({P.RANK: 5}, P.RANK),
        ({P.RANK: -1}, P.RANK),
        ({"tasks": [[[[1]]]]}, "tasks"),
        ({P.EPSILON: math.inf}, P.EPSILON),
        ({P.task_metric(P.NUM_EXAMPLES, "a"): -1}, P.task_metric(P.NUM_EXAMPLES, "a")),
    ],
)
def test_bad_metrics_are_named(changes, names):
    with pytest.raises(ReplyError, match=names):
        check_metrics({**GOOD, **changes}, max_rank=4)


def test_local_dp_reply_needs_epsilon():
    with pytest.raises(ReplyError, match=P.EPSILON):
        check_metrics(GOOD, epsilon=True)


def test_eval_metrics():
    check_eval_metrics({"eval_accuracy": 0.5, "eval_loss": 1.0, P.NUM_EXAMPLES: 8})
    for bad in ({"eval_loss": math.nan}, {"eval_accuracy": [0.5]}, {P.NUM_EXAMPLES: 0}, {"eval_loss": "1"}):
        with pytest.raises(ReplyError):
            check_eval_metrics(bad)


INFO = {P.INFO_RANK: 4, P.INFO_DEVICE: "cpu", P.INFO_MEMORY_GB: 7.5, P.INFO_NUM_EXAMPLES: 40, P.INFO_TASKS: '{"a": 3}'}


def test_info_record_is_checked():
    node = NodeInfo.from_record(3, INFO)
    assert (node.rank, node.memory_gb, node.num_examples, node.tasks) == (4, 7.5, 40, {"a": 3})
    assert check_info(3, {P.INFO_BASE_DIGEST: "abc"}) is None
    assert check_info(3, {**INFO, P.INFO_BASE_DIGEST: "abc"}).rank == 4
    bad = [
        {P.INFO_RANK: -1},
        {P.INFO_RANK: True},
        {P.INFO_TASKS: '{"a": -1}'},
        {P.INFO_TASKS: "[" * 50_000 + "]" * 50_000},
        {P.INFO_TASKS: '{"a": [1]}'},
        {P.INFO_MEMORY_GB: math.nan},
        {P.INFO_NUM_EXAMPLES: 2**63 - 1},
        {P.INFO_DEVICE: "cpu\nfake line"},
        {P.INFO_CHOSEN: '{"x": NaN}'},
        {P.INFO_QUANTIZATION: "q" * 65},
    ]
    directory = NodeDirectory()
    for changes in bad:
        with pytest.raises(ValueError):
            NodeInfo.from_record(3, {**INFO, **changes})
        with pytest.raises(ReplyError, match="^info: "):
            check_info(3, {**INFO, **changes})
        assert directory.record(3, {**INFO, **changes}) is None and 3 not in directory
    with pytest.raises(ReplyError, match=P.INFO_BASE_DIGEST):
        check_info(3, {P.INFO_BASE_DIGEST: ["a"]})


def test_hetlora_query_with_negative_rank_is_ignored(tmp_path, tiny_bert):
    from conftest import tiny_config

    from fedlora.server import prepare

    cfg = tiny_config(tiny_bert, strategy="hetlora")
    loop = RoundLoop(None, prepare(cfg), RunDirectory(tmp_path / "run"), Lines())
    loop.record_node(9, ConfigRecord({**INFO, P.INFO_RANK: -1}))
    assert 9 not in loop.nodes
    assert loop.strategy.node_rank(9) == cfg.lora.rank  # an unknown node trains the global rank, no narrow(-1)
    with pytest.raises(ValueError, match="rank must be in"):
        loop.strategy.check_reply(9, {P.RANK: cfg.lora.rank + 1}, {})


def test_fltac_refuses_a_zero_count_for_a_task_it_trained(tmp_path, tiny_bert):
    from conftest import tiny_config

    from fedlora.server import prepare

    cfg = tiny_config(tiny_bert, strategy="fltac", sets=TWO_TASKS)
    loop = RoundLoop(None, prepare(cfg), RunDirectory(tmp_path / "run"), Lines())
    state = {P.task_key("topics", "x.lora_A.weight"): torch.zeros(1)}
    loop.strategy.check_reply(1, {P.task_metric(P.NUM_EXAMPLES, "sentiment"): 0}, state)  # not trained: fine
    with pytest.raises(ValueError, match="topics"):
        loop.strategy.check_reply(1, {P.task_metric(P.NUM_EXAMPLES, "topics"): 0}, state)


# -- strict JSON ------------------------------------------------------------------------------------


def test_metrics_and_json_files_never_hold_nan(tmp_path):
    run = RunDirectory(tmp_path)
    record = {"round": 1, "train_loss": math.nan, "clients": [{"seconds": math.inf, "x": (1.0, -math.inf)}]}
    run.append_metrics(record)
    run.write_json("summary.json", {"final": {"eval_loss": math.nan}})
    line = run.metrics_path.read_text()
    assert json.loads(line, parse_constant=_refuse) == {
        "round": 1,
        "train_loss": None,
        "clients": [{"seconds": None, "x": [1.0, None]}],
    }
    assert json.loads((tmp_path / "summary.json").read_text(), parse_constant=_refuse) == {"final": {"eval_loss": None}}
    assert finite_json({"a": [1, 2.5, math.nan]}) == {"a": [1, 2.5, None]}
    with pytest.raises(TypeError):  # anything not JSON still fails loudly
        run.append_metrics({"x": object()})


# -- query and evaluate replies through the real grid ------------------------------------------------


BAD_INFOS = [
    {**INFO, P.INFO_RANK: -1},
    {**INFO, P.INFO_TASKS: "[" * 100_000},
    {**INFO, P.INFO_TASKS: '{"a": [1, 2]}'},
    {**INFO, P.INFO_MEMORY_GB: math.inf},
    {**INFO, P.INFO_NUM_EXAMPLES: 2**63 - 1},
    {**INFO, P.INFO_DEVICE: "cpu\nround 9/9"},
    {**INFO, P.INFO_CHOSEN: "{" * 5000},
]


def hostile_grid(evaluate=None):
    """An InProcessGrid of len(BAD_INFOS) nodes whose ClientApp answers queries with node i's
    garbage ``INFO`` and evaluate messages with ``evaluate(msg, i)``."""
    from flwr.clientapp import ClientApp
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    from fedlora.simulations.grid import InProcessGrid

    app = ClientApp()

    @app.query()
    def query(msg, context):
        info = BAD_INFOS[int(context.node_config[P.NODE_PARTITION_ID])]
        return Message(content=RecordDict({P.INFO: ConfigRecord(info)}), reply_to=msg)

    @app.evaluate()
    def evaluate_(msg, context):
        return evaluate(msg, int(context.node_config[P.NODE_PARTITION_ID]))

    grid = InProcessGrid(app, len(BAD_INFOS))
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, grid.run.run_id, SUPERLINK_NODE_ID
    return grid


@pytest.mark.simulation
def test_malformed_capabilities_are_named_and_ignored(tmp_path, tiny_bert):
    from conftest import tiny_config

    from fedlora.server import prepare

    cfg = tiny_config(tiny_bert, strategy="hetlora")
    lines = Lines()
    loop = RoundLoop(hostile_grid(), prepare(cfg), RunDirectory(tmp_path / "run"), lines)
    loop.query_new_nodes()
    assert len(loop.nodes) == 0
    named = [line for line in lines.lines if "sent malformed capabilities (ignored): info: " in line]
    assert len(named) == len(BAD_INFOS) and all("\n" not in line for line in named)
    # Unknown nodes train the global rank: hetlora's payloads are built without a negative narrow().
    messages = loop.configure(
        1,
        loop.strategy.initialize(
            dict(
                loop.prepared.host.initial_state(loop.prepared.host.ensure(loop.prepared.spec, seed=cfg.seed), cfg.seed)
            )
        ),
    )
    assert len(messages) == len(BAD_INFOS)


EVAL_REPLIES = [
    {"eval_accuracy": 0.5, "eval_loss": 1.0, P.NUM_EXAMPLES: 10},
    {"eval_accuracy": math.nan, "eval_loss": 1.0, P.NUM_EXAMPLES: 10},
    {"eval_accuracy": [0.9], "eval_loss": 1.0, P.NUM_EXAMPLES: 10},
    {"eval_accuracy": 0.9, "eval_loss": math.inf, P.NUM_EXAMPLES: 10},
    {"eval_accuracy": 0.9, "eval_loss": 1.0, P.NUM_EXAMPLES: 0},
    {"eval_accuracy": 1.0, "eval_loss": 0.0, P.NUM_EXAMPLES: 2**50},  # capped at robustness.max_examples
    {"eval_accuracy": 0.3, "eval_loss": 2.0, P.NUM_EXAMPLES: 10**400},
]


@pytest.mark.simulation
def test_personalized_evaluate_replies_are_checked(tmp_path, tiny_bert):
    from conftest import tiny_config

    from fedlora.server import prepare

    def evaluate(msg, i):
        return Message(content=RecordDict({P.METRICS: MetricRecord(EVAL_REPLIES[i])}), reply_to=msg)

    # Every node evaluates (none trained in this book): each of their replies is checked.
    cfg = tiny_config(tiny_bert, strategy="fedsa", sets=("robustness.max_examples=10", "evaluation.clients=all"))
    lines = Lines()
    grid = hostile_grid(evaluate=evaluate)
    loop = RoundLoop(grid, prepare(cfg), RunDirectory(tmp_path / "run"), lines)
    host = loop.prepared.host
    state = loop.strategy.initialize(host.initial_state(host.ensure(loop.prepared.spec, seed=cfg.seed), cfg.seed))
    book = RoundBook.of([], {})
    metrics = loop.evaluate_on_nodes(1, state, book)
    nodes = sorted(grid.get_node_ids())
    dropped = [n for n in nodes if "eval_dropped" in book.clients.get(n, {})]
    assert dropped == [nodes[i] for i in (1, 2, 3, 4, 6)]
    assert book.clients[nodes[5]]["eval_examples_capped_from"] == 2**50
    # Two nodes count, equally weighted once the claim of 2**50 examples is capped at 10.
    assert metrics["eval_accuracy"] == pytest.approx(0.75) and metrics["eval_loss"] == pytest.approx(0.5)
    assert sum("evaluate  node" in line and "DROPPED" in line for line in lines.lines) == 5
