"""Privacy that still learns: DP-SGD's step time in micro-batches, and SST-2 accuracy under DP.

One table per mode (``--modes``, default all four), every run a real
``fedlora.simulations.runtime.simulate`` (in process: one base model, clients back to back) on
SST-2 (``DIR/sst2``; ``synthetic:sentiment`` when missing) with all-MiniLM-L6-v2, LoRA rank 8 on
query/value, evaluated on the dev set after every round. The DP and no-DP runs of a table process
the same examples (same clients, rounds, epochs, expected batch); seeds are fixed.

``step``     One client's DP-SGD step of a Poisson batch of expected size ``batch`` computed in
             micro-batches of ``physical`` (``privacy.physical_batch_size``; one noise draw)
             against a plain AdamW step of the same logical batch in one piece (``train_local``),
             interleaved in one process; ``dp_over_plain`` is the median ratio (target <= 2).
``local``    Sample-level DP for every client (``privacy.mode = "local"``), ``clients`` IID
             clients, the recipe of ``simulations/sst2_dp.toml`` (:data:`RECIPE`), fedavg at each
             target epsilon against the same run without DP; ``drop_points`` per epsilon
             (targets: eps 8 within 5 points, eps 3 within 8, eps 1 above the majority by 15).
``ffa``      FFA-LoRA against FedAvg under local DP: each strategy at every lr of ``--lrs`` at
             every epsilon and without DP (the same sweep budget for both), its best lr per
             epsilon, and whether FFA-LoRA's drop from its own no-DP run is smaller (Sun et al.,
             ICLR 2024) -- meaningful only when both no-DP runs and some DP runs learned.
``central``  User-level DP (``privacy.mode = "central"``): SST-2 over ``central_clients``
             simulated clients (a few dozen sentences each), ``central_fraction`` sampled per
             round, delta 1e-3; epsilon and dev accuracy per round.

Each accuracy run records the DP plan the server printed (``privacy_plan.json``: noise, batch,
sampling rate, steps, epsilon, noise-to-signal) beside its accuracies. ``--train-examples``,
``--clients``, ``--rounds``, ``--eval-examples`` scale the runs down for a small machine (the
report records what ran); the defaults are the issue's full setting, tens of minutes per run on
2 CPU cores. ``--quick``: a tiny random BERT and synthetic reviews, seconds, to check every key.

Usage: python benchmarks/privacy.py [--quick] [--modes step,local,ffa,central] [--epsilons 1,3,8]
       [--lrs 0.001,0.003] [--train-examples N] [--clients K] [--rounds R] [--eval-examples M]
       [--data-dir DIR] [--out [F]]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, quiet_libraries, stdout_to_stderr  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
CLAIM = (
    "FFA-LoRA (Sun et al., ICLR 2024): freezing the randomly initialised A and training only B "
    "makes federated LoRA degrade less under DP-SGD than training both factors (FedAvg/FedIT)"
)
FULL = {
    "train_examples": 0,  # the whole SST-2 train split
    "eval_examples": 0,
    "clients": 10,
    "rounds": 5,
    "central_clients": 1000,
    "central_fraction": 0.1,
    "central_rounds": 30,
    "central_delta": 1e-3,
    "central_clip": 0.1,
    "step_batch": 256,
    "step_physical": 32,
}
QUICK = {
    **FULL,
    "train_examples": 120,
    "eval_examples": 40,
    "clients": 2,
    "rounds": 1,
    "central_clients": 20,
    "central_fraction": 0.25,
    "central_rounds": 1,
    "central_delta": 1e-3,
    "step_batch": 32,
    "step_physical": 8,
}
LEARNED_MARGIN = 0.03  # a run learned when it beats the majority class by this (2.5 standard errors)


def recipe() -> dict[str, Any]:
    """The ``--set`` values of ``simulations/sst2_dp.toml`` this benchmark runs with."""
    from fedlora.config import load_config
    from fedlora.simulations import preset_path

    cfg = load_config(preset_path("sst2_dp"))
    return {
        "federation.batch_size": cfg.federation.batch_size,
        "federation.local_epochs": cfg.federation.local_epochs,
        "federation.lr": cfg.federation.lr,
        "privacy.max_grad_norm": cfg.privacy.max_grad_norm,
        "privacy.physical_batch_size": cfg.privacy.physical_batch_size,
        "privacy.delta": cfg.privacy.delta,
        "lora.rank": cfg.lora.rank,
        "model.max_length": cfg.model.max_length,
    }


def base_raw(s: dict[str, Any], model: str, data: dict[str, Any], quick: bool) -> dict[str, Any]:
    """The run every table starts from, before its own ``--set`` values."""
    rec = recipe()
    return {
        "name": "privacy",
        "rounds": s["rounds"],
        "seed": 0,
        "model": {"name": model, "task": "classification", "max_length": 16 if quick else rec["model.max_length"]},
        "lora": {
            "rank": 4 if quick else rec["lora.rank"],
            "alpha": 16,
            "dropout": 0.0,
            "target_modules": ["query", "value"],
        },
        "data": {
            **data,
            "max_train_examples": s["train_examples"],
            "max_eval_examples": s["eval_examples"],
            "partitioner": "iid",
        },
        "federation": {
            "clients": s["clients"],
            "batch_size": 16 if quick else rec["federation.batch_size"],
            "local_epochs": rec["federation.local_epochs"],
            "lr": rec["federation.lr"],
        },
        "privacy": {"physical_batch_size": 4 if quick else rec["privacy.physical_batch_size"]},
        "strategy": {"name": "fedavg"},
    }


def simulated(raw: dict[str, Any], sets: list[str], root: Path, label: str, progress) -> dict[str, Any]:
    """One simulated federation: its accuracy and epsilon per round, its DP plan, its seconds."""
    from fedlora.config import RunConfig, apply_overrides
    from fedlora.simulations.runtime import simulate

    cfg = RunConfig.from_dict(apply_overrides(raw, [f"name=privacy-{label}", *sets]))
    progress.line(f"--- {label}: {' '.join(sets)}")
    start = time.perf_counter()
    result = simulate(cfg, out=root / label, progress=progress, report=False)
    plan_file = Path(result.run_dir) / "privacy_plan.json"
    plan = json.loads(plan_file.read_text()) if plan_file.exists() else None
    eps = [
        max([float(r.get("epsilon", 0.0))] + [float(c.get("epsilon", 0.0)) for c in r.get("clients", [])])
        for r in result.rounds
    ]
    return {
        "sets": sets,
        "initial_eval_accuracy": result.initial.get("eval_accuracy"),
        "eval_accuracy_per_round": [round(float(r["eval_accuracy"]), 4) for r in result.rounds],
        "final_eval_accuracy": round(float(result.rounds[-1]["eval_accuracy"]), 4),
        "epsilon_per_round": [round(e, 4) for e in eps] if cfg.privacy.enabled else None,
        "plan": None
        if plan is None
        else {"can_learn": plan["can_learn"], "rows": plan["rows"][:3], "lines": plan["lines"][:4]},
        "seconds": round(time.perf_counter() - start, 1),
    }


def dp_sets(eps: float | None, mode: str = "local", delta: float | None = None) -> list[str]:
    """The ``--set`` values of a run without DP (``eps`` None) or at target ``eps``."""
    if eps is None:
        return ["privacy.mode='off'"]
    sets = [f"privacy.mode='{mode}'", f"privacy.target_epsilon={eps}"]
    if mode == "central":  # micro-batches are DP-SGD's; central DP clips whole updates
        sets.append("privacy.physical_batch_size=0")
    return sets + ([f"privacy.delta={delta}"] if delta else [])


def local_table(raw, epsilons, root, progress) -> dict[str, Any]:
    runs = {
        "off" if e is None else f"eps{e:g}": simulated(raw, dp_sets(e), root, f"local-{e}", progress)
        for e in [None, *epsilons]
    }
    off = runs["off"]["final_eval_accuracy"]
    return {
        "runs": runs,
        "drop_points": {k: round(100 * (off - r["final_eval_accuracy"]), 2) for k, r in runs.items() if k != "off"},
    }


def ffa_table(raw, epsilons, lrs, root, progress, majority: float, local=None) -> dict[str, Any]:
    """Each of fedavg and ffa at every lr and epsilon; the best lr per (strategy, epsilon). The
    ``local`` table's runs are fedavg at the recipe's lr: reused, not run again (fixed seeds)."""
    sweep: dict[str, dict[str, dict[str, Any]]] = {}
    recipe_lr = raw["federation"]["lr"]
    for strategy in ("fedavg", "ffa"):
        sweep[strategy] = {}
        for e in [None, *epsilons]:
            key = "off" if e is None else f"eps{e:g}"
            for lr in lrs:
                sets = [f"strategy.name={strategy}", f"federation.lr={lr}", *dp_sets(e)]
                same = strategy == "fedavg" and lr == recipe_lr and local is not None and key in local["runs"]
                run = local["runs"][key] if same else simulated(raw, sets, root, f"{strategy}-{key}-{lr:g}", progress)
                sweep[strategy].setdefault(key, {})[f"{lr:g}"] = run
    best = {
        s: {k: max(v.values(), key=lambda r: r["final_eval_accuracy"])["final_eval_accuracy"] for k, v in t.items()}
        for s, t in sweep.items()
    }
    learned = {s: {k: a >= majority + LEARNED_MARGIN for k, a in t.items()} for s, t in best.items()}
    per_eps = {}
    for e in epsilons:
        key = f"eps{e:g}"
        drops = {s: round(100 * (best[s]["off"] - best[s][key]), 2) for s in best}
        per_eps[key] = {"drop_points": drops, "ffa_degrades_less": drops["ffa"] < drops["fedavg"]}
    meaningful = all(learned[s]["off"] for s in learned) and any(
        learned[s][f"eps{e:g}"] for s in learned for e in epsilons
    )
    less = [v["ffa_degrades_less"] for v in per_eps.values()]
    return {
        "claim": CLAIM,
        "sweep": {
            s: {k: {lr: r["final_eval_accuracy"] for lr, r in v.items()} for k, v in t.items()}
            for s, t in sweep.items()
        },
        "best_accuracy": best,
        "learned": learned,
        "per_epsilon": per_eps,
        "meaningful": meaningful,
        "supports_claim": (all(less) if meaningful else None),
        "runs": sweep,
    }


def central_table(raw, s, root, progress) -> dict[str, Any]:
    sets = [
        f"federation.clients={s['central_clients']}",
        f"federation.fraction={s['central_fraction']}",
        f"rounds={s['central_rounds']}",
        f"privacy.clip_norm={s['central_clip']}",
        "federation.local_epochs=1",
    ]
    runs = {
        "off": simulated(raw, sets + dp_sets(None), root, "central-off", progress),
        "eps8": simulated(raw, sets + dp_sets(8.0, "central", s["central_delta"]), root, "central-eps8", progress),
    }
    return {
        "clients": s["central_clients"],
        "fraction": s["central_fraction"],
        "delta": s["central_delta"],
        "runs": runs,
    }


def step_table(model: str, data: dict[str, Any], s: dict[str, Any], repeats: int) -> dict[str, Any]:
    """Micro-batched DP-SGD steps against plain steps of the same logical batch, interleaved."""
    from fedlora.config import LoRAConfig, RunConfig
    from fedlora.data import encode, load_task_data
    from fedlora.model.adapters import AdapterSpec, get_host
    from fedlora.model.loading import load_model
    from fedlora.train.dpsgd import DPSettings
    from fedlora.train.local import train_local

    batch, physical = s["step_batch"], s["step_physical"]
    cfg = RunConfig.from_dict(
        {"model": {"name": model, "max_length": 64}, "data": {**data, "max_train_examples": 8 * batch}}
    )
    task = load_task_data(cfg)
    loaded = load_model(cfg.model, num_labels=2, seed=0)
    enc = encode(task.train, loaded.tokenizer, 64)
    host = get_host(loaded)
    spec = AdapterSpec.from_config(
        LoRAConfig(rank=8, alpha=16, dropout=0.0, target_modules=["query", "value"]), "classification"
    )
    with host.lock:
        name = host.ensure(spec, seed=0)
    params = list(host.params(name).values())
    dp = DPSettings(1.0, 1.0, batch / len(enc), batch, physical_batch_size=physical)
    times: dict[str, list[float]] = {"plain": [], "dp": []}
    for i in range(repeats + 1):
        for kind in ("plain", "dp") if i % 2 == 0 else ("dp", "plain"):
            start = time.perf_counter()
            result = train_local(
                host.peft_model,
                params,
                enc,
                steps=1,
                batch_size=batch,
                lr=1e-3,
                pad_id=loaded.tokenizer.pad_token_id,
                causal=False,
                seed=10 + i,
                dp=dp if kind == "dp" else None,
            )
            if i > 0:  # the first pair warms up (allocations, Opacus's hooks)
                times[kind].append((time.perf_counter() - start) / max(result.examples, 1) * batch)
    ratios = [d / p for p, d in zip(times["plain"], times["dp"])]
    return {
        "batch": batch,
        "physical_batch_size": physical,
        "repeats": repeats,
        "ms_per_logical_step": {k: round(1000 * statistics.median(v), 1) for k, v in times.items()},
        "dp_over_plain": round(statistics.median(ratios), 3),
        "target_dp_over_plain": 2.0,
        "meets_target": statistics.median(ratios) <= 2.0,
    }


#: ``--modes sweep``: the small sweep simulations/sst2_dp.toml's recipe came from (its comment has
#: the table). 2 IID clients x 2,000 SST-2 sentences, one round of 2 local epochs, expected batch
#: 500 in micro-batches of 50 (8 noisy steps per client), 500 dev sentences; local DP at epsilon 3.
SWEEP_BASE = [
    "data.max_train_examples=4000",
    "data.max_eval_examples=500",
    "federation.clients=2",
    "rounds=1",
    "federation.local_epochs=2",
    "federation.batch_size=500",
    "privacy.physical_batch_size=50",
    "lora.rank=8",
    "privacy.max_grad_norm=1.0",
]
SWEEP = {
    "off, lr 5e-3": ["privacy.mode='off'", "federation.lr=0.005"],
    "eps 3, lr 5e-3": [*dp_sets(3.0), "federation.lr=0.005"],
    "eps 3, lr 2e-3": [*dp_sets(3.0), "federation.lr=0.002"],
    "eps 3, lr 1e-3, 1 client x 4000, 4 epochs": [
        *dp_sets(3.0),
        "federation.lr=0.001",
        "federation.clients=1",
        "federation.local_epochs=4",
    ],
}


def sweep_table(raw, root, progress) -> dict[str, Any]:
    """The runs of :data:`SWEEP` (on top of :data:`SWEEP_BASE`)."""
    runs = {
        k: simulated(raw, SWEEP_BASE + sets, root, f"sweep-{i}", progress) for i, (k, sets) in enumerate(SWEEP.items())
    }
    return {"base": SWEEP_BASE, "runs": runs}


def majority(raw: dict[str, Any]) -> float:
    from fedlora.config import RunConfig
    from fedlora.data import load_task_data

    labels = load_task_data(RunConfig.from_dict(raw)).eval["labels"]
    return max(Counter(labels).values()) / max(len(labels), 1)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, synthetic reviews, seconds")
    parser.add_argument("--modes", default="step,local,ffa,central", help="comma-separated tables to run (also: sweep)")
    parser.add_argument("--epsilons", default=None, help="target epsilons (default 1,3,8; quick: 3)")
    parser.add_argument(
        "--lrs", default=None, help="the ffa table's lr sweep (default: the recipe's lr and a third of it)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed step pairs (default 3; quick 1)")
    for key in ("train_examples", "eval_examples", "clients", "rounds", "central_clients", "central_rounds"):
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=None, help=f"override {key}")
    parser.add_argument(
        "--data-dir", default=os.environ.get("FEDLORA_BENCH_DATA", str(REPO.parent / "shared" / "data"))
    )
    parser.add_argument("--out", nargs="?", const=str(REPO / "benchmarks" / "results" / "privacy.json"))
    return parser.parse_args()


def main() -> int:
    args = parse()
    quiet_libraries()
    import torch

    from fedlora.data.synthetic import write_tiny_bert
    from fedlora.run.progress import Progress

    torch.set_num_threads(1)
    s = dict(QUICK if args.quick else FULL)
    for key in ("train_examples", "eval_examples", "clients", "rounds", "central_clients", "central_rounds"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    modes = args.modes.split(",")
    epsilons = [float(e) for e in (args.epsilons or ("3" if args.quick else "1,3,8")).split(",")]
    lr = recipe()["federation.lr"]
    lrs = [float(x) for x in args.lrs.split(",")] if args.lrs else [lr] if args.quick else [lr, lr / 3]
    sst2 = Path(args.data_dir) / "sst2"
    data = (
        {"path": str(sst2), "text_column": "sentence", "label_column": "label"}
        if sst2.is_dir() and not args.quick
        else {"path": "synthetic:sentiment"}
    )
    report: dict[str, Any] = {
        "benchmark": "privacy",
        "quick": args.quick,
        "settings": s,
        "recipe": recipe(),
        "data": data["path"],
    }
    progress = Progress(quiet=args.quick, stream=sys.stderr)
    started = time.perf_counter()
    with stdout_to_stderr(), tempfile.TemporaryDirectory(prefix="fedlora-privacy-") as tmp:
        root = Path(tmp)
        model = write_tiny_bert(root / "tiny-bert") if args.quick else MINILM
        raw = base_raw(s, model, data, args.quick)
        report["majority_class_accuracy"] = round(majority(raw), 4)
        if "step" in modes:
            report["step_time"] = step_table(model, data, s, args.repeats or (1 if args.quick else 3))
        if "local" in modes:
            report["local"] = local_table(raw, epsilons, root, progress)
        if "ffa" in modes:
            report["ffa_vs_fedavg"] = ffa_table(
                raw, epsilons, lrs, root, progress, report["majority_class_accuracy"], report.get("local")
            )
        if "sweep" in modes:
            report["sweep"] = sweep_table(raw, root, progress)
        if "central" in modes:
            report["central"] = central_table(raw, s, root, progress)
    report["seconds"] = round(time.perf_counter() - started, 1)
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
