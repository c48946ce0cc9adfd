"""The one label encoder shared by the pooled data and a device's file."""

from __future__ import annotations

import pytest
from datasets import Dataset

from fedlora.data import LabelEncoder, labels_from_training, tasks_from_column
from fedlora.errors import DataError

pytestmark = pytest.mark.unit


def test_a_device_holding_some_classes_gets_the_runs_ids():
    encoder = LabelEncoder(["cooking", "sports", "technology", "weather"], [])
    ds = Dataset.from_dict({"text": ["a", "b", "c"], "label": ["weather", "sports", "weather"]})
    out = encoder.encode(ds, "data file local.csv")
    assert list(out["labels"]) == [3, 1, 3]
    assert "label" not in out.column_names and "task_id" not in out.column_names


def test_an_unknown_label_is_named_with_the_runs_labels():
    encoder = LabelEncoder(["cooking", "sports"], [])
    ds = Dataset.from_dict({"text": ["a", "b"], "label": ["movies", "sports"]})
    with pytest.raises(DataError) as err:
        encoder.encode(ds, "data file local.csv")
    assert str(err.value) == "data file local.csv: labels not in this run: movies (the run's labels: cooking, sports)"


def test_an_unknown_label_of_the_held_out_set_was_not_seen_in_training():
    encoder = LabelEncoder(["0", "1"], [], from_training=True)
    ds = Dataset.from_dict({"text": ["a", "b", "c"], "label": ["2", "1", "7"]})
    with pytest.raises(DataError) as err:
        encoder.encode(ds, "evaluation data")
    assert str(err.value) == "evaluation data: labels not seen in training: 2, 7"


def test_multi_task_names_are_qualified_so_equal_values_of_two_tasks_differ():
    labels = ["news:1", "news:2", "sst2:0", "sst2:1"]
    encoder = LabelEncoder(labels, ["news", "sst2"])
    ds = Dataset.from_dict({"text": ["a", "b", "c"], "label": ["1", "1", "2"], "task": ["sst2", "news", "news"]})
    out = encoder.encode(ds, "data file local.csv")
    assert list(out["labels"]) == [3, 0, 1] and list(out["task_id"]) == [1, 0, 0]
    # "sst2:2" is no class of the run although "2" is one of news's.
    bad = Dataset.from_dict({"text": ["a"], "label": ["2"], "task": ["sst2"]})
    with pytest.raises(DataError, match="labels not in this run: sst2:2 "):
        encoder.encode(bad, "data file local.csv")


def test_an_unknown_task_is_named_before_any_label():
    encoder = LabelEncoder(["a:x", "a:y"], ["a"])
    ds = Dataset.from_dict({"text": ["t"], "label": ["z"], "task": ["b"]})
    with pytest.raises(DataError) as err:
        encoder.encode(ds, "data file local.csv")
    assert str(err.value) == "data file local.csv: tasks not in this run: b (the run's tasks: a)"


def test_without_classes_only_task_ids_are_encoded():
    ds = Dataset.from_dict({"text": ["a", "b"], "task": ["q", "p"], "label": ["kept", "kept"]})
    out = LabelEncoder(None, ["p", "q"]).encode(ds, "data file local.csv")
    assert list(out["task_id"]) == [1, 0] and list(out["label"]) == ["kept", "kept"]


def test_names_derived_from_training_sort_numerically_and_group_by_task():
    train = Dataset.from_dict({"label": ["10", "2", "b", "a", "2"], "task": ["y", "y", "x", "x", "y"]})
    labels, task_labels = labels_from_training(train, ["x", "y"], "src", "label")
    assert labels == ["x:a", "x:b", "y:2", "y:10"] and task_labels == {"x": [0, 1], "y": [2, 3]}
    single, none = labels_from_training(train, [], "src", "label")
    assert single == ["2", "10", "a", "b"] and none == {}
    with pytest.raises(DataError, match="task 'z' has fewer than 2 distinct labels"):
        labels_from_training(Dataset.from_dict({"label": ["1"], "task": ["z"]}), ["z"], "src", "label")


def test_tasks_from_a_column_must_cover_the_held_out_set():
    train = Dataset.from_dict({"task": ["2", "10", "2"]})
    train, evals, tasks = tasks_from_column(train, Dataset.from_dict({"task": ["10"]}))
    assert tasks == ["2", "10"] and list(evals["task"]) == ["10"]
    with pytest.raises(DataError) as err:
        tasks_from_column(Dataset.from_dict({"task": ["a"]}), Dataset.from_dict({"task": ["c", "b"]}))
    assert str(err.value) == "evaluation data: tasks (data.task_column) not seen in training: b, c"


def test_tasks_with_int_and_string_labels_combine(tmp_path):
    """SST-2 labels its rows 0/1, AG News by name: one run takes both (labels qualified by task)."""
    import pandas as pd

    from fedlora.config import RunConfig
    from fedlora.data import load_task_data

    pd.DataFrame({"text": [f"a{i}" for i in range(20)], "label": [i % 2 for i in range(20)]}).to_csv(
        tmp_path / "ints.csv", index=False
    )
    pd.DataFrame({"text": [f"b{i}" for i in range(20)], "label": ["x", "y"] * 10}).to_csv(
        tmp_path / "names.csv", index=False
    )
    cfg = RunConfig.from_dict(
        {
            "name": "mixed-labels",
            "data": {
                "tasks": [
                    {"name": "ints", "path": str(tmp_path / "ints.csv")},
                    {"name": "names", "path": str(tmp_path / "names.csv")},
                ]
            },
        }
    )
    data = load_task_data(cfg)
    assert data.labels == ["ints:0", "ints:1", "names:x", "names:y"]
    assert sorted(set(data.train["labels"])) == [0, 1, 2, 3]
