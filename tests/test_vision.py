"""Images and vision-language models: data layouts, bad inputs, and federations of a tiny random
ViT and a tiny random CLIP (FLoRA's zero-shot classifier) on the synthetic shapes task."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from fedlora.config import RunConfig
from fedlora.errors import ConfigError, DataError

SHAPES = "synthetic:shapes"


def _png(path, colour=(200, 30, 30), mode="RGB", size=(20, 16)):
    from PIL import Image

    Image.new(mode, size, colour if mode == "RGB" else 128).save(path)
    return path


def _image_cfg(path, task="image_classification", **data):
    name = "synthetic:tiny-vit" if task == "image_classification" else "synthetic:tiny-clip"
    return RunConfig.from_dict(
        {"model": {"name": name, "task": task, "device": "cpu"}, "data": {"path": str(path), **data}}
    )


def _folder(root, classes=("cat", "dog"), per=3):
    for label in classes:
        (root / label).mkdir(parents=True)
        for i in range(per):
            _png(root / label / f"{i}.png", colour=(40 * i, 100, 200) if label == "cat" else (200, 40 * i, 10))
    return root


# ---------------------------------------------------------------------------------------------
# Layouts


@pytest.mark.unit
def test_image_folder_with_and_without_split_folders(tmp_path):
    from fedlora.data import load_task_data

    flat = _folder(tmp_path / "flat")
    data = load_task_data(_image_cfg(flat))
    assert data.labels == ["cat", "dog"] and len(data.train) + len(data.eval) == 6
    split = tmp_path / "split"
    _folder(split / "train")
    _folder(split / "val", per=2)
    data = load_task_data(_image_cfg(split))
    assert len(data.train) == 6 and len(data.eval) == 4
    assert set(data.train.column_names) == {"labels", "image"}
    assert all(cell["path"].startswith(str(split)) for cell in data.train["image"])


@pytest.mark.unit
def test_csv_with_relative_paths_and_parquet_with_bytes(tmp_path):
    import pandas as pd

    from fedlora.data import load_task_data

    (tmp_path / "pics").mkdir()
    rows = [{"file": f"pics/{i}.png", "kind": "ab"[i % 2]} for i in range(6)]
    for i, row in enumerate(rows):
        _png(tmp_path / row["file"], colour=(30 * i, 0, 0))
    pd.DataFrame(rows).to_csv(tmp_path / "train.csv", index=False)
    data = load_task_data(_image_cfg(tmp_path / "train.csv", image_column="file", label_column="kind"))
    assert data.labels == ["a", "b"] and all(c["path"].startswith(str(tmp_path)) for c in data.train["image"])

    # Partitioned by a column of the file (by hospital): each client gets one site's images.
    from fedlora.data import load_partition

    sites = pd.DataFrame([{**row, "site": f"h{i % 2}"} for i, row in enumerate(rows)])
    sites.to_csv(tmp_path / "sites.csv", index=False)
    by_site = _image_cfg(
        tmp_path / "sites.csv", image_column="file", label_column="kind", partitioner="column", partition_column="site"
    )
    parts = [load_partition(by_site.replace(federation=by_site.federation.replace(clients=2)), i, 2) for i in (0, 1)]
    assert sorted(p["site"][0] for p in parts) == ["h0", "h1"] and all(len(set(p["site"])) == 1 for p in parts)

    blobs = [(tmp_path / r["file"]).read_bytes() for r in rows]
    pd.DataFrame({"image": blobs, "label": [r["kind"] for r in rows]}).to_parquet(tmp_path / "b.parquet")
    data = load_task_data(_image_cfg(tmp_path / "b.parquet"))
    assert len(data.train) + len(data.eval) == 6 and data.train["image"][0]["bytes"][:4] == b"\x89PNG"


@pytest.mark.unit
def test_local_dataset_with_an_image_feature_is_not_decoded_at_load(tmp_path):
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image

    from fedlora.data import load_task_data

    files = [str(_png(tmp_path / f"{i}.png", colour=(10 * i, 50, 50))) for i in range(8)]
    features = Features({"picture": Image(), "label": ClassLabel(names=["ant", "bee"])})
    ds = Dataset.from_dict({"picture": files, "label": [i % 2 for i in range(8)]}, features=features)
    DatasetDict({"train": ds, "test": ds.select(range(4))}).save_to_disk(str(tmp_path / "hubcopy"))
    data = load_task_data(_image_cfg(tmp_path / "hubcopy", task="clip", image_column="picture"))
    assert data.labels == ["ant", "bee"] and len(data.eval) == 4  # class names, not ids: CLIP's prompts


@pytest.mark.unit
def test_batches_decode_lazily_grayscale_becomes_rgb_and_a_bad_file_is_skipped(tmp_path, capsys):
    from datasets import Dataset
    from transformers import AutoImageProcessor

    from fedlora.data import collate
    from fedlora.data.images import encode_images, resolve_images
    from fedlora.model.loading import resolve_model_source

    files = [_png(tmp_path / "rgb.png"), _png(tmp_path / "gray.png", mode="L"), _png(tmp_path / "late.png")]
    ds = resolve_images(Dataset.from_dict({"image": [str(f) for f in files]}), "image", None, "test")
    ds = ds.add_column("labels", [0, 1, 0])
    files[2].write_bytes(files[2].read_bytes()[:60])  # truncated after its header was checked
    processor = AutoImageProcessor.from_pretrained(resolve_model_source("synthetic:tiny-vit"))
    batch = collate(encode_images(ds, processor, "image_classification", ["a", "b"], "{label}"), [0, 1, 2], 0, False)
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert batch["labels"].tolist() == [0, 1, 0]  # the bad row is replaced by the next good one
    lines = [line for line in capsys.readouterr().err.splitlines() if "skipped image" in line]
    assert len(lines) == 1 and "late.png" in lines[0]

    # data.augment: a flip and a crop keeping >= 85% of each side, drawn from torch's seeded RNG
    from PIL import Image

    from fedlora.data.images import augmented

    img = Image.new("RGB", (40, 20))
    torch.manual_seed(0)
    first = [augmented(img).size for _ in range(20)]
    torch.manual_seed(0)
    assert first == [augmented(img).size for _ in range(20)]
    assert all(34 <= w <= 40 and 17 <= h <= 20 for w, h in first) and len(set(first)) > 1


# ---------------------------------------------------------------------------------------------
# Bad inputs: one line naming the file (and row) and the key


@pytest.mark.unit
def test_each_bad_input_is_one_line_naming_file_row_and_key(tmp_path):
    import pandas as pd

    from fedlora.data import load_task_data

    (tmp_path / "nope.png").write_text("not an image at all")
    (tmp_path / "cut.png").write_bytes(_png(tmp_path / "ok.png").read_bytes()[:12])
    cases = {
        "nope.png": r"row 2: .*nope\.png is not an image PIL can read.*config key 'data\.image_column'",
        "cut.png": r"row 2: .*cut\.png is not an image.*'data\.image_column'",
        "missing.png": r"row 2: image file not found: .*missing\.png \(config key 'data\.image_column'\)",
    }
    for i, (name, message) in enumerate(cases.items()):
        pd.DataFrame({"image": ["ok.png", name, "ok.png"], "label": ["a", "b", "a"]}).to_csv(tmp_path / f"{i}.csv")
        with pytest.raises(DataError, match=message):
            load_task_data(_image_cfg(tmp_path / f"{i}.csv", eval_path=str(tmp_path / f"{i}.csv")))
    pd.DataFrame({"image": [1, 2], "label": ["a", "b"]}).to_csv(tmp_path / "ints.csv")
    with pytest.raises(DataError, match=r"row 1: 'image' holds a int .*neither a path nor image bytes.*image_column"):
        load_task_data(_image_cfg(tmp_path / "ints.csv"))
    empty = _folder(tmp_path / "folder")
    (empty / "bird").mkdir()
    with pytest.raises(DataError, match=r"data\.path: class folder .*bird has no images"):
        load_task_data(_image_cfg(empty))
    assert "\n" not in str(DataError("x"))


@pytest.mark.unit
def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"'lora\.towers' must hold only text, vision, got 'audio'"):
        RunConfig.from_dict({"lora": {"towers": ["audio"]}})
    with pytest.raises(ConfigError, match=r"'data\.prompt_template' must contain \{label\}"):
        RunConfig.from_dict({"data": {"prompt_template": "a photo"}})
    with pytest.raises(ConfigError, match=r"'data\.tasks' .*cannot be used with model\.task = 'clip'"):
        RunConfig.from_dict({"model": {"task": "clip"}, "data": {"task_column": "site"}})
    with pytest.raises(ConfigError, match=r"'lora\.towers' = \['text'\] must be \['vision'\] with privacy\.mode"):
        RunConfig.from_dict({"model": {"task": "clip"}, "privacy": {"mode": "local", "noise_multiplier": 1.0}})
    with pytest.raises(ConfigError, match=r"'model\.task' must be one of .*image_classification, clip"):
        RunConfig.from_dict({"model": {"task": "vision"}})


@pytest.mark.simulation
def test_cli_exits_2_with_one_line_on_a_bad_image(tmp_path, capsys):
    from fedlora.cli.main import main

    folder = _folder(tmp_path / "imgs")
    (folder / "dog" / "broken.png").write_text("<html>not a png</html>")
    code = main(["simulate", "images", "--out", str(tmp_path / "run"), "--set", f"data.path='{folder}'"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and "broken.png" in err[0] and "data.image_column" in err[0]


# ---------------------------------------------------------------------------------------------
# Federations


def _federation(tmp_path, task, **sets):
    from fedlora.run.progress import Progress
    from fedlora.simulations.runtime import simulate

    cfg = _image_cfg(SHAPES, task=task, max_train_examples=240, max_eval_examples=120, partitioner="iid")
    raw = cfg.to_dict()
    raw.update({"rounds": 2, "seed": 0, "name": task})
    raw["lora"].update({"rank": 4, "alpha": 8})
    raw["federation"].update({"clients": 2, "local_steps": 12, "batch_size": 16, "lr": 0.01})
    for key, value in sets.items():
        section, name = key.split("__")
        raw[section][name] = value
    cfg = RunConfig.from_dict(raw)
    return cfg, simulate(cfg, out=tmp_path / task, progress=Progress(quiet=True), report=False)


def _eval_pixels(cfg, processor, count=24):
    from fedlora.data import load_task_data
    from fedlora.data.images import open_image

    data = load_task_data(cfg)
    cells = data.eval["image"][:count]
    images = [open_image(c["bytes"], c["path"]).convert("RGB") for c in cells]
    return data, images, processor(images=images, return_tensors="pt")["pixel_values"]


def _federation_logits(cfg, run_dir, **inputs):
    from fedlora.run.directory import RunDirectory
    from fedlora.server import prepare

    _, state, _ = RunDirectory(run_dir).load_checkpoint()
    prepared = prepare(cfg)
    host = prepared.host
    with host.lock:
        host.load_state(host.ensure(prepared.spec, seed=cfg.seed), state)
        host.peft_model.eval()
        with torch.no_grad():
            return host.peft_model(**inputs).logits.clone()


@pytest.mark.simulation
def test_vit_federation_learns_and_its_export_reloads_in_peft(tmp_path):
    from peft import PeftModel
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from fedlora.model.loading import resolve_model_source

    cfg, result = _federation(tmp_path, "image_classification")
    majority = 0.25  # four balanced classes
    assert result.rounds[-1]["eval_accuracy"] > majority + 0.3
    source = resolve_model_source(cfg.model.name)
    processor = AutoImageProcessor.from_pretrained(source)
    _, _, pixels = _eval_pixels(cfg, processor)
    ours = _federation_logits(cfg, tmp_path / "image_classification", pixel_values=pixels)
    meta = json.loads((tmp_path / "image_classification" / "adapter" / "fedlora.json").read_text())
    base = AutoModelForImageClassification.from_pretrained(source, num_labels=meta["num_labels"])
    model = PeftModel.from_pretrained(base, str(tmp_path / "image_classification" / "adapter")).eval()
    with torch.no_grad():
        theirs = model(pixel_values=pixels).logits
    assert meta["labels"] == ["circle", "cross", "square", "triangle"]
    assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.simulation
def test_clip_round_0_is_the_base_zero_shot_accuracy_and_the_export_reloads(tmp_path):
    from peft import PeftModel
    from transformers import AutoProcessor, CLIPModel

    from fedlora.model.loading import resolve_model_source

    cfg, result = _federation(tmp_path, "clip", lora__towers=["text", "vision"])
    source = resolve_model_source(cfg.model.name)
    processor = AutoProcessor.from_pretrained(source)
    data, images, pixels = _eval_pixels(cfg, processor, count=len(load_eval(cfg)))
    prompts = processor(text=[f"a photo of a {name}." for name in data.labels], padding=True, return_tensors="pt")
    base = CLIPModel.from_pretrained(source).eval()
    with torch.no_grad():
        zero_shot = base(**prompts, pixel_values=pixels).logits_per_image.argmax(-1)
    expected = int((zero_shot == torch.tensor(data.eval["labels"])).sum()) / len(data.eval)
    assert result.initial["eval_accuracy"] == pytest.approx(expected, abs=1e-9)
    assert result.rounds[-1]["eval_accuracy"] > max(expected, 0.25) + 0.2

    # fedlora evaluate on the same held-out images as an image folder: the federation's numbers
    from fedlora.eval.evaluate import evaluate_adapter

    for row, (cell, label) in enumerate(zip(data.eval["image"], data.eval["labels"])):
        (tmp_path / "held" / data.labels[label]).mkdir(parents=True, exist_ok=True)
        (tmp_path / "held" / data.labels[label] / f"{row:04d}.png").write_bytes(cell["bytes"])
    scored = evaluate_adapter(tmp_path / "clip" / "adapter", tmp_path / "held", base=source, device="cpu")
    assert scored["base_accuracy"] == pytest.approx(result.initial["eval_accuracy"])
    assert scored["accuracy"] == pytest.approx(result.rounds[-1]["eval_accuracy"])

    ours = _federation_logits(cfg, tmp_path / "clip", pixel_values=pixels[:16], **prompts)
    reloaded = PeftModel.from_pretrained(CLIPModel.from_pretrained(source), str(tmp_path / "clip" / "adapter")).eval()
    with torch.no_grad():
        theirs = reloaded(**prompts, pixel_values=pixels[:16]).logits_per_image
    assert torch.allclose(ours, theirs, atol=1e-5)


def load_eval(cfg):
    from fedlora.data import load_task_data

    return load_task_data(cfg).eval


@pytest.mark.unit
def test_lora_targets_follow_the_architecture_and_the_towers():
    from fedlora.model.adapters import AdapterSpec, get_host
    from fedlora.model.loading import load_model

    cfg = _image_cfg(SHAPES, task="clip")
    loaded = load_model(cfg.model, num_labels=4)
    for towers, prefixes in ((["text"], {"text_model"}), (["vision"], {"vision_model"}), (["text", "vision"], None)):
        spec = AdapterSpec.from_config(cfg.lora.replace(towers=towers, rank=2), "clip")
        host = get_host(loaded)
        name = host.ensure(spec)
        modules = {k.split(".lora_")[0] for k in host.shapes(name)}
        assert all(m.endswith(("q_proj", "v_proj")) for m in modules)
        assert {m.split(".")[2] for m in modules} == (prefixes or {"text_model", "vision_model"})
    vit = load_model(_image_cfg(SHAPES).model, num_labels=4)
    name = get_host(vit).ensure(AdapterSpec.from_config(cfg.lora.replace(rank=2), "image_classification"))
    keys = get_host(vit).shapes(name)
    assert any(".classifier." in k and k.endswith(".weight") for k in keys)  # the fresh head trains in full
    # transformers' ViT names its attention projections q_proj/v_proj (query/value before v5)
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in keys if ".lora_" in k} in (
        {"q_proj", "v_proj"},
        {"query", "value"},
    )


@pytest.mark.unit
def test_synthetic_shapes_are_deterministic_and_balanced():
    from fedlora.data.shapes import SHAPES as NAMES
    from fedlora.data.shapes import generate_shapes

    a, b = generate_shapes(40, seed=3), generate_shapes(40, seed=3)
    assert [c["bytes"] for c in a["image"]] == [c["bytes"] for c in b["image"]]
    assert sorted(set(a["label"])) == sorted(NAMES) and a["label"].count("circle") == 10
    from PIL import Image

    img = Image.open(io.BytesIO(a["image"][0]["bytes"]))
    assert img.size == (32, 32) and np.asarray(img).shape == (32, 32, 3)


@pytest.mark.simulation
def test_a_4bit_vit_client_trains_beside_a_full_precision_one(tmp_path):
    pytest.importorskip("bitsandbytes")
    from fedlora.model.loading import load_model

    profiles = [{"name": "q4", "rank": 4, "quantization": "4bit"}, {"name": "fp", "rank": 4, "quantization": "none"}]
    cfg, result = _federation(tmp_path, "image_classification", federation__profiles=profiles)
    assert result.rounds[-1]["clients_ok"] == 2 and result.rounds[-1]["eval_accuracy"] > 0.5
    nodes = json.loads((tmp_path / "image_classification" / "nodes.json").read_text())
    assert sorted(node["quantization"] for node in nodes) == ["4bit", "none"]
    quantized = load_model(cfg.model.replace(quantization="4bit"), num_labels=4, seed=cfg.seed).model
    layers = [m for name, m in quantized.named_modules() if name.endswith("q_proj")]
    assert {type(getattr(m, "base_layer", m).weight).__name__ for m in layers} == {"Params4bit"}
    head = getattr(quantized.classifier, "original_module", quantized.classifier)  # peft may have wrapped it
    assert type(head.weight) is torch.nn.Parameter  # the fresh head stays float


@pytest.mark.unit
def test_a_device_image_folder_loads_with_the_runs_class_ids_and_is_checked_at_launch(tmp_path):
    from fedlora.client.launcher import check_data_option
    from fedlora.data import load_device_data

    folder = _folder(tmp_path / "device", classes=("dog",))  # this device holds one class only
    ds = load_device_data(_image_cfg(SHAPES), folder, ["cat", "dog"], [])
    assert ds["labels"] == [1, 1, 1] and len(ds["image"]) == 3
    other = _folder(tmp_path / "other", classes=("bird",))
    with pytest.raises(DataError, match=r"labels not in this run: bird \(the run's labels: cat, dog\)"):
        load_device_data(_image_cfg(SHAPES), other, ["cat", "dog"], [])
    check_data_option(folder)
    (folder / "dog" / "2.png").write_bytes(b"GIF89a broken")
    with pytest.raises(DataError, match=r"--data .*device: row 3: .*2\.png is not an image"):
        check_data_option(folder)
