"""Reading local data in every format, multi-task data, partitioning across clients, and
per-task evaluation."""

from __future__ import annotations

import json
from collections import Counter
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from fedlora.config import RunConfig, TaskSource, has_tasks, load_config
from fedlora.data import Encoded, load_partition, load_task_data, partition_sizes_ok, split_by_task, subset
from fedlora.data.synthetic import generate_sentiment, generate_topics
from fedlora.errors import ConfigError, DataError
from fedlora.train.local import evaluate

pytestmark = pytest.mark.unit


def _cfg(path, **data):
    return RunConfig.from_dict({"data": {"path": str(path), **data}, "federation": {"clients": 4}})


def _rows(n=60):
    return generate_topics(n, seed=3)


def test_synthetic_task_is_deterministic_and_balanced():
    a, b = generate_topics(400, seed=1), generate_topics(400, seed=1)
    assert a == b
    counts = Counter(a["label"])
    assert len(counts) == 4 and min(counts.values()) > 60


@pytest.mark.parametrize("fmt", ["csv", "tsv", "json", "jsonl", "parquet"])
def test_local_formats(tmp_path, fmt):
    frame = pd.DataFrame({"sentence": _rows()["text"], "y": _rows()["label"]})
    path = tmp_path / f"train.{fmt}"
    if fmt == "csv":
        frame.to_csv(path, index=False)
    elif fmt == "tsv":
        frame.to_csv(path, sep="\t", index=False)
    elif fmt == "json":
        path.write_text(json.dumps(frame.to_dict(orient="records")))
    elif fmt == "jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path)
    data = load_task_data(_cfg(path, text_column="sentence", label_column="y", eval_fraction=0.25))
    assert len(data.train) + len(data.eval) == 60
    assert data.labels == sorted(set(_rows()["label"]))
    assert set(data.train.column_names) == {"text", "labels"}


def test_directory_with_train_and_dev(tmp_path):
    pd.DataFrame({"label": [0, 1] * 20, "sentence": ["good film", "bad film"] * 20}).to_csv(
        tmp_path / "train.tsv", sep="\t", index=False
    )
    pd.DataFrame({"label": [1, 0], "sentence": ["awful", "great"]}).to_csv(tmp_path / "dev.tsv", sep="\t", index=False)
    data = load_task_data(_cfg(tmp_path, text_column="sentence"))
    assert len(data.train) == 40 and len(data.eval) == 2 and data.labels == ["0", "1"]


def test_missing_file_and_column_are_named(tmp_path):
    with pytest.raises(DataError, match="file not found: .*nope.csv"):
        load_task_data(_cfg(tmp_path / "nope.csv"))
    path = tmp_path / "d.csv"
    pd.DataFrame({"text": ["a", "b"], "label": [0, 1]}).to_csv(path, index=False)
    with pytest.raises(DataError) as err:
        load_task_data(_cfg(path, label_column="sentiment"))
    assert "sentiment" in str(err.value) and "d.csv" in str(err.value) and "data.label_column" in str(err.value)


def test_more_clients_than_examples(tmp_path):
    path = tmp_path / "small.csv"
    pd.DataFrame({"text": ["a b", "c d"] * 4, "label": [0, 1] * 4}).to_csv(path, index=False)
    cfg = RunConfig.from_dict({"data": {"path": str(path), "eval_fraction": 0.25}, "federation": {"clients": 7}})
    with pytest.raises(DataError, match="federation.clients"):
        partition_sizes_ok(cfg, load_task_data(cfg))


def _partition_labels(cfg):
    n = cfg.federation.clients
    return [list(load_partition(cfg, i, n)["labels"]) for i in range(n)]


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_each_example_in_exactly_one_client(partitioner):
    cfg = RunConfig.from_dict(
        {"data": {"partitioner": partitioner, "max_train_examples": 600}, "federation": {"clients": 6}}
    )
    data = load_task_data(cfg)
    texts = []
    for i in range(6):
        part = load_partition(cfg, i, 6)
        texts += [f"{t}|{lab}" for t, lab in zip(part["text"], part["labels"])]
    pool = [f"{t}|{lab}" for t, lab in zip(data.train["text"], data.train["labels"])]
    assert Counter(texts) == Counter(pool)


def test_dirichlet_skew_is_visible():
    def skew(partitioner, alpha=0.5):
        cfg = RunConfig.from_dict(
            {
                "data": {"partitioner": partitioner, "dirichlet_alpha": alpha, "max_train_examples": 800},
                "federation": {"clients": 8},
            }
        )
        # mean over clients of the share of its most common label
        shares = [Counter(p).most_common(1)[0][1] / len(p) for p in _partition_labels(cfg) if p]
        return sum(shares) / len(shares)

    iid, dirichlet = skew("iid"), skew("dirichlet", 0.3)
    assert iid < 0.45  # 4 balanced topics: about 0.25-0.35 per client
    assert dirichlet > iid + 0.2


def test_column_partitioner(tmp_path):
    rows = _rows(80)
    frame = pd.DataFrame(
        {"text": rows["text"], "label": rows["label"], "task": ["a" if i % 2 else "b" for i in range(80)]}
    )
    path = tmp_path / "tasks.csv"
    frame.to_csv(path, index=False)
    cfg = RunConfig.from_dict(
        {"data": {"path": str(path), "partitioner": "column", "partition_column": "task"}, "federation": {"clients": 4}}
    )
    parts = [load_partition(cfg, i, 4) for i in range(4)]
    for part in parts:
        assert len(set(part["task"])) == 1
    assert {p["task"][0] for p in parts} == {"a", "b"}


# ---------------------------------------------------------------------------------------------
# Multi-task data: several sources tagged as tasks, or a task column


def _two_task_files(tmp_path):
    """Two csv files whose label values overlap (0/1 in both), with their own column names."""
    pd.DataFrame({"sentence": ["good film", "bad film"] * 10, "y": [1, 0] * 10}).to_csv(tmp_path / "a.csv", index=False)
    pd.DataFrame({"text": ["goal scored", "rain fell", "chip made"] * 6, "label": [0, 1, 2] * 6}).to_csv(
        tmp_path / "b.csv", index=False
    )
    pd.DataFrame({"text": ["rain fell", "chip made"], "label": [1, 2]}).to_csv(tmp_path / "b_dev.csv", index=False)
    return [
        {"name": "sst", "path": str(tmp_path / "a.csv"), "text_column": "sentence", "label_column": "y"},
        {"name": "news", "path": str(tmp_path / "b.csv"), "eval_path": str(tmp_path / "b_dev.csv")},
    ]


def test_tasks_from_two_files_get_qualified_labels(tmp_path):
    cfg = _cfg("unused", tasks=_two_task_files(tmp_path), eval_fraction=0.2)
    data = load_task_data(cfg)
    assert data.tasks == ["sst", "news"]
    assert data.labels == ["sst:0", "sst:1", "news:0", "news:1", "news:2"]
    assert data.task_labels == {"sst": [0, 1], "news": [2, 3, 4]}
    assert set(data.train.column_names) == {"text", "labels", "task", "task_id"}
    assert len(data.train) == 16 + 18 and len(data.eval) == 4 + 2  # sst: 20% held out; news: its own file
    for ds in (data.train, data.eval):
        for row in ds:
            assert data.tasks[row["task_id"]] == row["task"]
            assert row["labels"] in data.task_labels[row["task"]]
    # the same label value in two tasks is two classes
    news_rain = [r["labels"] for r in data.eval if r["text"] == "rain fell"]
    assert [data.labels[i] for i in news_rain] == ["news:1"]


def test_task_column(tmp_path):
    path = tmp_path / "mixed.csv"
    pd.DataFrame(
        {"text": ["a b", "c d", "e f", "g h"] * 10, "label": [0, 1, 0, 1] * 10, "domain": ["x", "x", "w", "w"] * 10}
    ).to_csv(path, index=False)
    data = load_task_data(_cfg(path, task_column="domain", eval_fraction=0.25))
    assert data.tasks == ["w", "x"]  # sorted task values
    assert data.labels == ["w:0", "w:1", "x:0", "x:1"] and data.task_labels == {"w": [0, 1], "x": [2, 3]}
    assert {"task", "task_id"} <= set(data.eval.column_names)
    assert set(data.train["task"]) == {"w", "x"}


def test_missing_task_column_is_named(tmp_path):
    path = tmp_path / "d.csv"
    pd.DataFrame({"text": ["a", "b"] * 4, "label": [0, 1] * 4}).to_csv(path, index=False)
    with pytest.raises(DataError) as err:
        load_task_data(_cfg(path, task_column="domain"))
    assert "data.task_column" in str(err.value) and "domain" in str(err.value) and "\n" not in str(err.value)


def test_missing_file_in_a_task_names_the_task_key(tmp_path):
    tasks = _two_task_files(tmp_path)
    tasks[1]["path"] = str(tmp_path / "nope.csv")
    with pytest.raises(DataError, match=r"data\.tasks\[1\]\.path: file not found"):
        load_task_data(_cfg("unused", tasks=tasks))


@pytest.mark.parametrize(
    ("tasks", "message"),
    [
        (
            [{"name": "a", "path": "x.csv"}, {"name": "b", "path": "y.csv", "foo": 1}],
            "unknown config key 'data.tasks[1].foo'",
        ),
        ([{"name": "a", "path": "x.csv"}, {"name": "a", "path": "y.csv"}], "'data.tasks[1].name' duplicates"),
        ([{"name": "a", "path": "x.csv"}], "'data.tasks' needs at least 2"),
        ([{"name": "a/b", "path": "x.csv"}, {"name": "c", "path": "y.csv"}], "'data.tasks[0].name' must be"),
        ([{"name": "a", "path": "x.csv"}, {"path": "y.csv"}], "'data.tasks[1].name' is required"),
    ],
)
def test_bad_task_items_are_one_line_config_errors(tasks, message):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict({"data": {"tasks": tasks}})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_tasks_and_task_column_exclude_each_other():
    tasks = [{"name": "a", "path": "x.csv"}, {"name": "b", "path": "y.csv"}]
    with pytest.raises(ConfigError, match="data.task_column"):
        RunConfig.from_dict({"data": {"tasks": tasks, "task_column": "t"}})


def test_tasks_preset_round_trips(tmp_path):
    preset = tmp_path / "mt.toml"
    preset.write_text(
        'name = "mt"\n[data]\npartition_column = "task"\n'
        '[[data.tasks]]\nname = "topics"\npath = "synthetic:topics"\nmax_train_examples = 40\n'
        '[[data.tasks]]\nname = "sentiment"\npath = "synthetic:sentiment"\n'
    )
    cfg = load_config(preset)
    assert has_tasks(cfg.data) and [t.name for t in cfg.data.tasks] == ["topics", "sentiment"]
    assert isinstance(cfg.data.tasks[0], TaskSource) and cfg.data.tasks[0].max_train_examples == 40
    again = RunConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg and again.to_json() == cfg.to_json()
    assert not has_tasks(RunConfig().data)


def _synthetic_tasks(**data):
    tasks = [
        {"name": "topics", "path": "synthetic:topics", "max_train_examples": 200, "max_eval_examples": 20},
        {"name": "sentiment", "path": "synthetic:sentiment", "max_train_examples": 200, "max_eval_examples": 20},
    ]
    return {"data": {"tasks": tasks, **data}}


def test_dirichlet_over_tasks_gives_some_clients_one_task():
    raw = _synthetic_tasks(partitioner="dirichlet", dirichlet_alpha=0.1, partition_column="task")
    cfg = RunConfig.from_dict({**raw, "seed": 0, "federation": {"clients": 4}})
    data = load_task_data(cfg)
    assert data.tasks == ["topics", "sentiment"] and len(data.labels) == 6
    parts = [load_partition(cfg, i, 4) for i in range(4)]
    mixes = [set(p["task"]) for p in parts]
    assert any(len(m) == 1 for m in mixes) and any(len(m) == 2 for m in mixes), mixes
    assert sum(len(p) for p in parts) == len(data.train)


def test_column_partitioner_over_tasks():
    cfg = RunConfig.from_dict(
        {**_synthetic_tasks(partitioner="column", partition_column="task"), "federation": {"clients": 2}}
    )
    parts = [load_partition(cfg, i, 2) for i in range(2)]
    assert sorted(p["task"][0] for p in parts) == ["sentiment", "topics"]
    assert all(len(set(p["task"])) == 1 for p in parts)


def test_synthetic_sentiment_is_deterministic_and_loads():
    a, b = generate_sentiment(300, seed=2), generate_sentiment(300, seed=2)
    assert a == b and a != generate_sentiment(300, seed=3) and set(a) == set(generate_topics(1))
    counts = Counter(a["label"])
    assert set(counts) == {"negative", "positive"} and min(counts.values()) > 100
    data = load_task_data(_cfg("synthetic:sentiment", max_train_examples=50, max_eval_examples=10))
    assert data.labels == ["negative", "positive"] and len(data.train) == 50 and len(data.eval) == 10
    with pytest.raises(DataError, match="synthetic:sentiment, synthetic:topics"):
        load_task_data(_cfg("synthetic:weather"))


def test_encoded_subset_and_split_by_task():
    enc = Encoded(input_ids=[[1], [2], [3], [4]], labels=[0, 2, 1, 3], task_ids=[0, 1, 0, 1])
    parts = split_by_task(enc)
    assert list(parts) == [0, 1]
    assert parts[1] == Encoded(input_ids=[[2], [4]], labels=[2, 3], task_ids=[1, 1])
    assert subset(enc, [3, 0]).labels == [3, 0] and len(enc) == 4  # enc itself unchanged
    with pytest.raises(ValueError):
        split_by_task(Encoded(input_ids=[[1]], labels=[0]))


class _LookupModel(torch.nn.Module):
    """Logits are a fixed row per first token id: predictable, so masking's effect is exact."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.tensor(table, dtype=torch.float)

    def forward(self, input_ids, attention_mask, labels):
        logits = self.table[input_ids[:, 0]]
        return SimpleNamespace(logits=logits, loss=torch.nn.functional.cross_entropy(logits, labels))


def test_evaluate_masks_each_row_to_its_task_labels():
    # Labels 0-1 are task "a", 2-4 task "b". Token 0 prefers label 2 overall but label 0 within a;
    # token 1 prefers label 1 overall but label 4 within b.
    model = _LookupModel([[3.0, 1.0, 5.0, 0.0, 0.0], [0.0, 5.0, 1.0, 0.0, 3.0]])
    enc = Encoded(input_ids=[[0], [0], [1], [1], [1]], labels=[0, 1, 4, 2, 4], task_ids=[0, 0, 1, 1, 1])
    plain = evaluate(model, enc, batch_size=2, pad_id=0, causal=False)
    assert plain["eval_accuracy"] == 0.0 and set(plain) == {"eval_loss", "eval_accuracy"}
    masked = evaluate(
        model, enc, batch_size=2, pad_id=0, causal=False, task_labels={0: [0, 1], 1: [2, 3, 4]}, task_names=["a", "b"]
    )
    assert masked["eval_accuracy"] == pytest.approx(3 / 5)
    assert masked["eval_accuracy/a"] == pytest.approx(1 / 2) and masked["eval_accuracy/b"] == pytest.approx(2 / 3)
    assert masked["eval_loss"] == pytest.approx(plain["eval_loss"])


def test_device_data_uses_the_runs_label_ids(tmp_path, tiny_bert):
    """A device holding only some classes still maps each to the server's id; unknown ones are named."""
    from conftest import tiny_config

    from fedlora.data import load_device_data
    from fedlora.errors import DataError

    cfg = tiny_config(tiny_bert)
    labels = ["cooking", "sports", "technology", "weather"]
    path = tmp_path / "local.csv"
    path.write_text("text,label\nthe storm came,weather\nthe match ended,sports\n")
    ds = load_device_data(cfg, path, labels, [])
    assert list(ds["labels"]) == [3, 1] and list(ds["text"]) == ["the storm came", "the match ended"]
    path.write_text("text,label\nthe film ended,movies\n")
    with pytest.raises(DataError, match="labels not in this run: movies"):
        load_device_data(cfg, path, labels, [])
    path.write_text("sentence,label\nx,weather\n")
    with pytest.raises(DataError, match="no column 'text'"):
        load_device_data(cfg, path, labels, [])
