"""Config loading and validation: every mistake names its key."""

from __future__ import annotations

import pytest

from fedlora.config import RunConfig, apply_overrides, load_config, parse_override
from fedlora.errors import ConfigError
from fedlora.simulations import list_presets, preset_path

pytestmark = pytest.mark.unit


def test_every_packaged_preset_is_valid():
    assert {"quickstart", "sst2", "hetlora", "fltac", "sst2_agnews"} <= set(list_presets())
    for name in list_presets():
        cfg = load_config(preset_path(name))
        assert cfg.name and cfg.rounds >= 1


def test_strategy_presets_say_what_the_issue_asks():
    het = load_config(preset_path("hetlora"))
    assert het.strategy.name == "hetlora" and sorted(p.rank for p in het.federation.profiles) == [4, 8, 16]
    assert het.lora.rank == 16
    tac = load_config(preset_path("fltac"))
    assert tac.strategy.name == "fltac" and [t.path for t in tac.data.tasks] == [
        "synthetic:topics",
        "synthetic:sentiment",
    ]
    assert tac.data.partition_column == "task"
    real = load_config(preset_path("sst2_agnews"))
    assert [t.name for t in real.data.tasks] == ["sst2", "agnews"]


def test_quickstart_preset_matches_the_issue():
    cfg = load_config(preset_path("quickstart"))
    assert cfg.federation.clients == 8 and cfg.rounds == 3
    assert cfg.data.partitioner == "dirichlet"
    assert cfg.model.name == "sentence-transformers/all-MiniLM-L6-v2"


def test_overrides_parse_toml_values():
    assert parse_override("rounds=5") == (["rounds"], 5)
    assert parse_override("federation.lr=0.01") == (["federation", "lr"], 0.01)
    assert parse_override("lora.target_modules=['query','key']") == (["lora", "target_modules"], ["query", "key"])
    assert parse_override("data.path=some/file.csv") == (["data", "path"], "some/file.csv")
    cfg = load_config(preset_path("quickstart"), ["rounds=5", "lora.rank=16", "lora.target_modules=query,key"])
    assert cfg.rounds == 5 and cfg.lora.rank == 16 and cfg.lora.target_modules == ["query", "key"]


def test_resolved_config_round_trips():
    cfg = load_config(preset_path("quickstart"), ["strategy.name=ffa", "strategy.a_seed=3"])
    again = RunConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.strategy.options == {"a_seed": 3}


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("lora.rnk=4", "lora.rnk"),
        ("colour=1", "colour"),
        ("lora.rank=0", "lora.rank"),
        ("lora.rank='eight'", "lora.rank"),
        ("federation.clients=0", "federation.clients"),
        ("federation.fraction=1.5", "federation.fraction"),
        ("federation.lr=true", "federation.lr"),
        ("data.partitioner='shards'", "data.partitioner"),
        ("model.task='translation'", "model.task"),
        ("federation.transport_dtype='int4'", "federation.transport_dtype"),
        ("rounds=0", "rounds"),
        ("name='a b'", "name"),
    ],
)
def test_bad_values_name_the_key(override, names):
    with pytest.raises(ConfigError) as err:
        load_config(preset_path("quickstart"), [override])
    assert names in str(err.value)
    assert "\n" not in str(err.value)


def test_table_expected():
    with pytest.raises(ConfigError, match="'lora' must be a table"):
        RunConfig.from_dict(apply_overrides({}, ["lora=3"]))


def test_missing_preset_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="preset not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = = 3\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)


def test_an_unknown_key_is_refused_naming_it():
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict({"federation": {"clientz": 3}})
    assert str(err.value).startswith("unknown config key 'federation.clientz' (known: batch_size, clients,")
    with pytest.raises(ConfigError, match=r"unknown config key 'federation\.profiles\[1\]\.rnk'"):
        RunConfig.from_dict({"federation": {"profiles": [{"rank": 2}, {"rnk": 2}]}})


def test_a_config_built_directly_is_validated():
    from fedlora.config import DataConfig, LoRAConfig, ModelConfig

    with pytest.raises(ConfigError, match=r"^config key 'data\.format' must be one of text, instruction, chat"):
        DataConfig(format="yaml")
    with pytest.raises(ConfigError, match=r"^config key 'lora\.rank' must be >= 1, got 0$"):
        LoRAConfig(rank=0)
    with pytest.raises(ConfigError, match=r"^config key 'lora\.alpha' must be a finite number, got inf$"):
        LoRAConfig(alpha=float("inf"))
    with pytest.raises(ConfigError, match=r"^unknown config key 'model\.nme'"):
        ModelConfig(nme="x")
    model = ModelConfig()
    with pytest.raises(ConfigError, match=r"^config key 'model\.device' must be auto, cpu"):
        model.replace(device="tpu")
    with pytest.raises(ConfigError, match=r"^config key 'model\.max_length' must be >= 2, got 1$"):
        model.max_length = 1
    assert model.replace(quantization="4bit").quantization == "4bit" and model.quantization == "none"


def _properties(schema: dict, node: dict, prefix: str) -> dict[str, dict]:
    """Every leaf key of a JSON schema (nested objects and arrays of objects walked), by dotted name."""
    out = {}
    for name, prop in node.get("properties", {}).items():
        ref = prop.get("$ref") or (prop.get("items") or {}).get("$ref")
        if ref:
            inner = schema["$defs"][ref.rsplit("/", 1)[-1]]
            # pydantic leaves out a table's description where it repeats its model's docstring
            out[prefix + name] = {"description": inner.get("description"), **prop}
            out.update(_properties(schema, inner, f"{prefix}{name}{'[i]' if 'items' in prop else ''}."))
        else:
            out[prefix + name] = prop
    return out


def test_the_json_schema_lists_every_key_with_a_description():
    schema = RunConfig.model_json_schema()
    keys = _properties(schema, schema, "")
    for dotted in ("lora.rank", "data.tasks[i].name", "federation.profiles[i].memory_gb", "privacy.delta", "seed"):
        assert dotted in keys, dotted
    assert len(keys) > 70
    undescribed = [k for k, prop in keys.items() if not prop.get("description")]
    assert not undescribed, f"keys without a description: {undescribed}"
    assert keys["model.quantization"]["enum"] == ["none", "4bit", "8bit"]
    assert keys["lora.dropout"]["minimum"] == 0 and keys["lora.dropout"]["exclusiveMaximum"] == 1


def test_the_keys_a_resume_may_change_are_read_from_the_schema():
    from fedlora.config.model import resumable_keys
    from fedlora.run.directory import RESUME_MUTABLE

    assert RESUME_MUTABLE == resumable_keys(RunConfig)
    assert set(RESUME_MUTABLE) == {
        "rounds",
        "model.device",
        "federation.round_timeout",
        "federation.max_reply_mb",
        "simulation.devices",
        # who evaluates and exports its own model: not what the federation trains
        "evaluation.clients",
        "evaluation.fraction",
        "evaluation.final_all_up_to",
        "evaluation.export_clients",
    }
