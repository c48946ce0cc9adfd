"""Federated LoRA on images: bytes and accuracy per round, which CLIP tower to adapt, LoRA vs full fine-tuning.

On the synthetic shapes task (``synthetic:shapes``: four coloured shapes on noise, generated
in memory, seed 0) with the tiny random ViT and the tiny random CLIP of the image quickstart
(``synthetic:tiny-vit``, ``synthetic:tiny-clip``; random weights, so the numbers say what the
federation teaches, not what a pretrained model knows), in one process:

* ``strategies``: fedavg / ffa / hetlora (client ranks 2 and 4 under a rank-4 global adapter)
  on each model: the mean bytes down and up per client and the held-out accuracy, per round.
* ``towers``: CLIP (FedAvg) with LoRA on the text tower (FLoRA's choice), the vision tower, or
  both: accuracy per round, bytes per client and trainable tensors.
* ``step_time``: one optimizer step (forward, backward, AdamW) of LoRA vs full fine-tuning of
  the same model on the same batch, as a ratio measured here; the full run adds a ViT of
  ViT-Tiny's width and depth (192 x 12 layers, 224 x 224 images), where the ratio means more.

Usage: python benchmarks/vision.py [--quick] [--rounds N] [--out [results.json]]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

MODELS = {"vit": ("synthetic:tiny-vit", "image_classification"), "clip": ("synthetic:tiny-clip", "clip")}
STRATEGIES = ("fedavg", "ffa", "hetlora")
TOWERS = {"text": ["text"], "vision": ["vision"], "both": ["text", "vision"]}


def run_cell(model: str, strategy: str, towers: list[str], size: dict, out: Path) -> dict:
    """One federation: per-round bytes per client and accuracy, its round-0 accuracy and seconds."""
    from fedlora.config import RunConfig
    from fedlora.run.progress import Progress
    from fedlora.simulations.runtime import simulate

    name, task = MODELS[model]
    federation = {"clients": size["clients"], "local_steps": size["steps"], "batch_size": 16, "lr": 0.01}
    if strategy == "hetlora":
        federation["profiles"] = [{"name": "small", "rank": 2}, {"name": "large", "rank": 4}]
    lora = {"rank": 4, "alpha": 8, **({"towers": towers} if task == "clip" else {})}
    data = {"path": "synthetic:shapes", "max_train_examples": size["train"], "max_eval_examples": size["eval"]}
    cfg = RunConfig.from_dict(
        {
            "name": f"vision-{model}-{strategy}",
            "rounds": size["rounds"],
            "model": {"name": name, "task": task, "device": "cpu"},
            "lora": lora,
            "data": {**data, "partitioner": "dirichlet", "dirichlet_alpha": 1.0},
            "federation": federation,
            "strategy": {"name": strategy},
        }
    )
    start = time.perf_counter()
    result = simulate(cfg, out=out, progress=Progress(quiet=True), report=False)
    rounds = []
    for record in result.rounds:
        ok = [c for c in record["clients"] if "bytes_up" in c]
        rounds.append(
            {
                "round": record["round"],
                "bytes_down_per_client": round(sum(c["bytes_down"] for c in ok) / max(len(ok), 1)),
                "bytes_up_per_client": round(sum(c["bytes_up"] for c in ok) / max(len(ok), 1)),
                "eval_accuracy": record.get("eval_accuracy"),
            }
        )
    return {
        "initial_accuracy": result.initial.get("eval_accuracy"),
        "rounds": rounds,
        "final_accuracy": rounds[-1]["eval_accuracy"],
        "seconds": round(time.perf_counter() - start, 2),
    }


def _step_seconds(model, params, batch: dict, steps: int) -> float:
    """Median seconds of one AdamW step of ``params`` (after one warm-up step)."""
    import statistics

    import torch

    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_time(label: str, build, batch: dict, steps: int) -> dict:
    """LoRA (rank 8 on the attention's query and value, the head in full) vs full fine-tuning of
    a model ``build()`` makes, on ``batch``; ratios LoRA / full."""
    import torch
    from peft import LoraConfig, get_peft_model

    from fedlora.model.vision import default_targets

    torch.manual_seed(0)
    full = build()
    full_params = list(full.parameters())
    full_s = _step_seconds(full, full_params, batch, steps)
    torch.manual_seed(0)
    base = build()
    for p in base.parameters():
        p.requires_grad_(False)
    task = "clip" if "clip" in label else "image_classification"
    targets = default_targets(base, task, ("text", "vision"))
    lora = get_peft_model(
        base,
        LoraConfig(
            r=8, lora_alpha=16, target_modules=targets, modules_to_save=["classifier"] if task != "clip" else None
        ),
    )
    lora_params = [p for p in lora.parameters() if p.requires_grad]
    lora_s = _step_seconds(lora, lora_params, batch, steps)
    count = sum(p.numel() for p in full_params)
    trained = sum(p.numel() for p in lora_params)
    return {
        "model": label,
        "batch": int(batch["pixel_values"].shape[0]),
        "full_step_seconds": round(full_s, 5),
        "lora_step_seconds": round(lora_s, 5),
        "lora_over_full_time": round(lora_s / full_s, 3),
        "full_trainable_params": int(count),
        "lora_trainable_params": int(trained),
        "lora_over_full_trainable": round(trained / count, 5),
    }


def step_times(quick: bool) -> list[dict]:
    """:func:`step_time` on the tiny ViT and CLIP (and, unless ``quick``, a ViT-Tiny-sized ViT)."""
    import torch
    from transformers import AutoModel, AutoModelForImageClassification, AutoProcessor, ViTConfig

    from fedlora.model.loading import resolve_model_source
    from fedlora.model.vision import PromptClassifier

    vit_dir, clip_dir = resolve_model_source(MODELS["vit"][0]), resolve_model_source(MODELS["clip"][0])
    labels = torch.tensor([0, 1, 2, 3] * 4)
    pixels = torch.randn(16, 3, 32, 32)
    out = [
        step_time(
            "tiny-vit",
            lambda: AutoModelForImageClassification.from_pretrained(vit_dir, num_labels=4),
            {"pixel_values": pixels, "labels": labels},
            3 if quick else 20,
        )
    ]
    prompts = AutoProcessor.from_pretrained(clip_dir)(
        text=[f"a photo of a {n}." for n in ("circle", "cross", "square", "triangle")],
        padding=True,
        return_tensors="pt",
    )
    batch = {"pixel_values": pixels, "labels": labels, **prompts}
    out.append(
        step_time("tiny-clip", lambda: PromptClassifier(AutoModel.from_pretrained(clip_dir)), batch, 3 if quick else 20)
    )
    if not quick:
        config = ViTConfig(
            hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768, num_labels=4
        )
        big = {"pixel_values": torch.randn(8, 3, 224, 224), "labels": labels[:8]}
        out.append(
            step_time(
                "vit-tiny-size (192 x 12, 224 px)", lambda: AutoModelForImageClassification.from_config(config), big, 5
            )
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 round, 2 clients, 1 local step: checks that it runs")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument(
        "--out",
        nargs="?",
        const=str(Path(__file__).resolve().parent / "results" / "vision.json"),
        help="also write the JSON here (no path: benchmarks/results/vision.json)",
    )
    args = parser.parse_args()

    from _common import emit, quiet_libraries, stdout_to_stderr

    quiet_libraries()
    import torch

    torch.set_num_threads(1)
    size = (
        {"rounds": 1, "clients": 2, "steps": 1, "train": 48, "eval": 32}
        if args.quick
        else {"rounds": args.rounds, "clients": 4, "steps": 15, "train": 800, "eval": 200}
    )
    report: dict = {
        "benchmark": "vision",
        "quick": args.quick,
        "task": "synthetic:shapes (4 classes, balanced: majority 0.25)",
        "models": {k: v[0] for k, v in MODELS.items()},
        "note": "tiny models with RANDOM weights: accuracy is what the federation taught them",
        "size": size,
        "strategies": {},
        "towers": {},
    }
    started = time.perf_counter()
    with stdout_to_stderr(), tempfile.TemporaryDirectory() as tmp:
        for model in MODELS:
            for strategy in STRATEGIES:
                entry = run_cell(model, strategy, TOWERS["text"], size, Path(tmp) / f"{model}-{strategy}")
                report["strategies"].setdefault(model, {})[strategy] = entry
                print(f"{model} {strategy}: accuracy {entry['final_accuracy']}", file=sys.stderr, flush=True)
        report["towers"]["text"] = report["strategies"]["clip"]["fedavg"]  # the same run: FedAvg, text tower
        for tower, towers in TOWERS.items():
            if tower == "text":
                continue
            entry = run_cell("clip", "fedavg", towers, size, Path(tmp) / f"clip-{tower}")
            report["towers"][tower] = entry
            print(f"clip towers {tower}: accuracy {entry['final_accuracy']}", file=sys.stderr, flush=True)
        report["step_time"] = step_times(args.quick)
    report["seconds"] = round(time.perf_counter() - started, 1)
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
