"""Reading local data in every format, and partitioning across clients."""

from __future__ import annotations

import json
from collections import Counter

import pandas as pd
import pytest

from fedlora.config import RunConfig
from fedlora.data import load_partition, load_task_data, partition_sizes_ok
from fedlora.errors import DataError
from fedlora.synthetic import generate_topics


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
        tmp_path / "train.tsv", sep="\t", index=False)
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
    cfg = RunConfig.from_dict({"data": {"partitioner": partitioner, "max_train_examples": 600},
                               "federation": {"clients": 6}})
    data = load_task_data(cfg)
    texts = []
    for i in range(6):
        part = load_partition(cfg, i, 6)
        texts += [f"{t}|{lab}" for t, lab in zip(part["text"], part["labels"])]
    pool = [f"{t}|{lab}" for t, lab in zip(data.train["text"], data.train["labels"])]
    assert Counter(texts) == Counter(pool)


def test_dirichlet_skew_is_visible():
    def skew(partitioner, alpha=0.5):
        cfg = RunConfig.from_dict({"data": {"partitioner": partitioner, "dirichlet_alpha": alpha,
                                            "max_train_examples": 800}, "federation": {"clients": 8}})
        # mean over clients of the share of its most common label
        shares = [Counter(p).most_common(1)[0][1] / len(p) for p in _partition_labels(cfg) if p]
        return sum(shares) / len(shares)

    iid, dirichlet = skew("iid"), skew("dirichlet", 0.3)
    assert iid < 0.45  # 4 balanced topics: about 0.25-0.35 per client
    assert dirichlet > iid + 0.2


def test_column_partitioner(tmp_path):
    rows = _rows(80)
    frame = pd.DataFrame({"text": rows["text"], "label": rows["label"],
                          "task": ["a" if i % 2 else "b" for i in range(80)]})
    path = tmp_path / "tasks.csv"
    frame.to_csv(path, index=False)
    cfg = RunConfig.from_dict({"data": {"path": str(path), "partitioner": "column", "partition_column": "task"},
                               "federation": {"clients": 4}})
    parts = [load_partition(cfg, i, 4) for i in range(4)]
    for part in parts:
        assert len(set(part["task"])) == 1
    assert {p["task"][0] for p in parts} == {"a", "b"}
