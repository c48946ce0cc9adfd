"""What differential privacy costs: DP-SGD's client step time, and SST-2 accuracy under local DP.

(1) Step time. One client's local training (``fedlora.train.local.train_local``) on
    all-MiniLM-L6-v2 sequence classification with a LoRA adapter (rank 8, alpha 16, no
    dropout, on query and value, plus the fresh head) built by
    ``fedlora.model.adapters.get_host(load_model(...)).ensure(spec)``: batch 16, max_length 64,
    SST-2 training sentences (``DIR/sst2``; the offline ``synthetic:sentiment`` task when that
    folder is missing; ``step_time.data`` says which). Plain AdamW steps against DP-SGD steps
    (Opacus per-example gradients, clipping to 1.0, noise multiplier 1.0, Poisson sampling at
    16/len(data), so batches are 16 examples on average). The two are timed in the same
    process, interleaved: after one untimed warm-up block of each, ``--repeats`` pairs of one
    plain block and one DP block of ``--block`` steps, alternating which goes first, so drifts
    in the shared machine's speed hit both. ``ms_per_step`` is the median over every step but
    the first of each block (the first also pays for the optimizer and, under DP, for wrapping
    the model with Opacus; ``block_ms_per_step`` includes it); ``dp_over_plain`` is the median
    over the pairs of the ratio of their blocks' steady per-step medians.

(2) Accuracy. ``fedlora.simulations.runtime.simulate`` (in-process) on SST-2: 6,000 training
    sentences split IID over 10 clients (600 each), evaluated on the whole dev set (872), the
    same settings for every run (4 rounds, 8 local steps of batch 32, lr 2e-3, max_length 48,
    LoRA rank 8 on query/value). Every strategy runs once with ``privacy.mode = "off"`` and
    once per target epsilon (1, 3, 8) with ``privacy.mode = "local"``: DP-SGD on every client,
    sample-level (epsilon, 1e-5)-DP for each client's data, clipping 1.0, RDP accountant, the
    noise multiplier planned by each client for its 32 steps at sampling rate 32/600. Per run:
    final dev accuracy, the epsilon reached (the largest over the clients, last round),
    seconds. ``drop_points`` is each strategy's no-DP accuracy minus its DP accuracy, in
    accuracy points; ``ffa_vs_fedavg`` checks FFA-LoRA's claim (Sun et al., ICLR 2024) that
    freezing A makes LoRA degrade less under DP than FedAvg over A and B (FedIT). One seed
    per run: with 872 dev examples one accuracy has a standard error of about 1.2 points.
    ``learned`` says which runs beat both the majority class and the untrained model by 3
    points; the comparison is ``meaningful`` only when both no-DP runs and some DP run learned
    (a smaller drop from a baseline that learned nothing, or between DP runs that all answer
    the majority class, says nothing about the claim), and ``supports_claim`` is null otherwise.

Strategies not registered in ``fedlora.strategies.STRATEGIES`` when the script starts are
skipped and listed under ``skipped``; ``--resume-from`` a previous report with the same
settings reuses its runs (and its step times) and runs only what it lacks.

``--quick``: a tiny random BERT built on the spot, the synthetic sentiment task, fedavg at
epsilon 3 and off, a few steps: it checks the code runs and every key is there, not the numbers.

Usage: python benchmarks/privacy.py [--quick] [--data-dir DIR] [--strategies a,b]
       [--epsilons 1,3,8] [--repeats N] [--block N] [--resume-from F] [--out [F]]
"""

from __future__ import annotations

import argparse
import json
import math
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
    "clients": 10,
    "rounds": 4,
    "local_steps": 8,
    "batch_size": 32,
    "lr": 0.002,
    "max_length": 48,
    "max_train_examples": 6000,
    "max_eval_examples": 0,
    "rank": 8,
    "alpha": 16,
    "target_modules": ["query", "value"],
    "partitioner": "iid",
    "delta": 1e-5,
    "max_grad_norm": 1.0,
    "accountant": "rdp",
    "seed": 0,
}
QUICK = {
    **FULL,
    "clients": 3,
    "rounds": 2,
    "local_steps": 2,
    "batch_size": 8,
    "lr": 0.01,
    "max_length": 16,
    "max_train_examples": 150,
    "max_eval_examples": 40,
    "rank": 4,
    "alpha": 8,
}
#: A run "learned" when its final dev accuracy beats the majority class by this much (about 2.5
#: standard errors of an accuracy on 872 examples).
LEARNED_MARGIN = 0.03
TIMING = {"batch_size": 16, "max_length": 64, "noise_multiplier": 1.0, "max_grad_norm": 1.0, "lr": 0.002}


# ---------------------------------------------------------------------------------------------
# model and data


def data_section(sst2: Path | None) -> dict[str, Any]:
    """The ``[data]`` table for SST-2 in ``sst2`` (train.tsv, dev.tsv), else synthetic sentiment."""
    if sst2 is not None:
        return {"path": str(sst2), "text_column": "sentence", "label_column": "label"}
    return {"path": "synthetic:sentiment"}


def base_raw(settings: dict[str, Any], model: str, data: dict[str, Any]) -> dict[str, Any]:
    """The run configuration every accuracy run shares (before strategy and privacy)."""
    return {
        "name": "privacy",
        "rounds": settings["rounds"],
        "seed": settings["seed"],
        "model": {"name": model, "task": "classification", "max_length": settings["max_length"]},
        "lora": {
            "rank": settings["rank"],
            "alpha": settings["alpha"],
            "dropout": 0.0,
            "target_modules": list(settings["target_modules"]),
        },
        "data": {
            **data,
            "max_train_examples": settings["max_train_examples"],
            "max_eval_examples": settings["max_eval_examples"],
            "partitioner": settings["partitioner"],
        },
        "federation": {
            "clients": settings["clients"],
            "local_steps": settings["local_steps"],
            "batch_size": settings["batch_size"],
            "lr": settings["lr"],
        },
        "strategy": {"name": "fedavg"},
    }


# ---------------------------------------------------------------------------------------------
# (1) step time, plain against DP-SGD, interleaved


def step_times(model: str, data: dict[str, Any], block: int, repeats: int, train_examples: int) -> dict[str, Any]:
    """Time ``repeats`` pairs of plain and DP-SGD blocks of ``block`` steps (see the module doc)."""
    import gc

    from fedlora.config import LoRAConfig, RunConfig
    from fedlora.data import encode, load_task_data
    from fedlora.model.adapters import AdapterSpec, get_host
    from fedlora.model.loading import load_model
    from fedlora.train.dpsgd import DPSettings
    from fedlora.train.local import train_local

    cfg = RunConfig.from_dict(
        {
            "model": {"name": model, "task": "classification", "max_length": TIMING["max_length"]},
            "data": {**data, "max_train_examples": train_examples, "partitioner": "iid"},
        }
    )
    task = load_task_data(cfg)
    loaded = load_model(cfg.model, num_labels=max(len(task.labels), 2), seed=0)
    encoded = encode(task.train, loaded.tokenizer, TIMING["max_length"])
    host = get_host(loaded)
    spec = AdapterSpec.from_config(
        LoRAConfig(rank=8, alpha=16, dropout=0.0, target_modules=["query", "value"]), "classification"
    )
    with host.lock:
        name = host.ensure(spec, seed=0)
    params = list(host.params(name).values())
    batch = TIMING["batch_size"]
    dp = DPSettings(
        noise_multiplier=TIMING["noise_multiplier"],
        max_grad_norm=TIMING["max_grad_norm"],
        sample_rate=batch / len(encoded),
        expected_batch_size=batch,
    )

    def run_block(kind: str, seed: int) -> dict[str, Any]:
        stamps: list[float] = []
        gc.collect()  # one block's garbage must not be collected on the other's clock
        start = time.perf_counter()
        result = train_local(
            host.peft_model,
            params,
            encoded,
            steps=block,
            batch_size=batch,
            lr=TIMING["lr"],
            pad_id=loaded.tokenizer.pad_token_id,
            causal=False,
            seed=seed,
            on_step=lambda step, loss: stamps.append(time.perf_counter()),
            dp=dp if kind == "dp" else None,
        )
        total = time.perf_counter() - start
        steady = [b - a for a, b in zip(stamps, stamps[1:])]
        return {"total_s": total, "first_s": stamps[0] - start, "steady_s": steady, "examples": result.examples}

    run_block("plain", 1)  # warm-up: first-call allocations, Opacus imports and hooks
    run_block("dp", 1)
    blocks: dict[str, list[dict[str, Any]]] = {"plain": [], "dp": []}
    for i in range(repeats):
        for kind in ("plain", "dp") if i % 2 == 0 else ("dp", "plain"):
            blocks[kind].append(run_block(kind, 100 + i))

    def ms(values: list[float]) -> float:
        return round(1000 * statistics.median(values), 2)

    steady = {k: [s for b in v for s in b["steady_s"]] for k, v in blocks.items()}
    pair_ratios = [
        statistics.median(d["steady_s"]) / statistics.median(p["steady_s"])
        for p, d in zip(blocks["plain"], blocks["dp"])
    ]
    import torch

    return {
        "model": model,
        "data": data["path"] if data["path"].startswith("synthetic:") else "SST-2 train.tsv",
        "data_path": data["path"],
        "train_examples": len(encoded),
        "batch_size": batch,
        "max_length": TIMING["max_length"],
        "lora": {"rank": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["query", "value"], "head_trained": True},
        "trained_tensors": len(params),
        "trained_parameters": int(sum(p.numel() for p in params)),
        "dp_settings": {
            "noise_multiplier": dp.noise_multiplier,
            "max_grad_norm": dp.max_grad_norm,
            "sample_rate": round(dp.sample_rate, 6),
            "expected_batch_size": dp.expected_batch_size,
        },
        "torch_threads": torch.get_num_threads(),
        "block_steps": block,
        "repeats": repeats,
        "ms_per_step": {"plain": ms(steady["plain"]), "dp": ms(steady["dp"])},
        "block_ms_per_step": {k: ms([b["total_s"] / block for b in v]) for k, v in blocks.items()},
        "first_step_ms": {k: ms([b["first_s"] for b in v]) for k, v in blocks.items()},
        "dp_over_plain": round(statistics.median(pair_ratios), 4),
        "dp_over_plain_pairs": [round(r, 4) for r in pair_ratios],
        "dp_over_plain_fastest": round(min(steady["dp"]) / min(steady["plain"]), 4),
        "mean_batch_examples": {
            k: round(sum(b["examples"] for b in v) / (block * len(v)), 2) for k, v in blocks.items()
        },
    }


# ---------------------------------------------------------------------------------------------
# (2) accuracy under local DP


def run_key(strategy: str, eps: float | None) -> str:
    return f"{strategy}/{'off' if eps is None else f'eps{eps:g}'}"


def accuracy_run(
    raw: dict[str, Any], settings: dict[str, Any], strategy: str, eps: float | None, root: Path, progress
) -> dict:
    """One simulated federation; its final accuracy, epsilon reached and seconds."""
    from fedlora.config import RunConfig, apply_overrides
    from fedlora.simulations.runtime import simulate

    label = "off" if eps is None else f"eps{eps:g}"
    sets = [f"name=privacy-{strategy}-{label}", f"strategy.name={strategy}"]
    if eps is not None:
        sets += [
            "privacy.mode='local'",
            f"privacy.target_epsilon={float(eps)}",
            f"privacy.delta={settings['delta']}",
            f"privacy.max_grad_norm={settings['max_grad_norm']}",
            f"privacy.accountant='{settings['accountant']}'",
        ]
    cfg = RunConfig.from_dict(apply_overrides(raw, sets))
    progress.line(f"--- {run_key(strategy, eps)}")
    start = time.perf_counter()
    result = simulate(cfg, out=root / f"{strategy}-{label}", progress=progress, report=False)
    seconds = time.perf_counter() - start
    last = result.rounds[-1]
    reached = None
    if eps is not None:
        per_client = [float(c["epsilon"]) for c in last.get("clients", []) if "epsilon" in c]
        reached = max([float(last.get("epsilon", 0.0)), *per_client])
    return {
        "strategy": strategy,
        "privacy_mode": "off" if eps is None else "local",
        "target_epsilon": eps,
        "final_eval_accuracy": float(last["eval_accuracy"]),
        "epsilon": reached,
        "seconds": round(seconds, 1),
        "initial_eval_accuracy": result.initial.get("eval_accuracy"),
        "eval_accuracy_per_round": [round(float(r["eval_accuracy"]), 4) for r in result.rounds],
        "train_loss_per_round": [
            None if r.get("train_loss") is None else round(float(r["train_loss"]), 4) for r in result.rounds
        ],
        "clients_ok_last_round": int(last.get("clients_ok", 0)),
    }


def planned_noise(settings: dict[str, Any], eps: float) -> dict[str, float]:
    """The noise multiplier a client with an equal IID share plans for ``eps`` (as it does)."""
    from fedlora.privacy.accounting import planned_local_noise, sample_rate_for

    examples = settings["max_train_examples"] // settings["clients"]
    q = sample_rate_for(settings["batch_size"], examples)
    sigma = planned_local_noise(
        eps, settings["delta"], q, settings["local_steps"], settings["rounds"], settings["accountant"]
    )
    return {"noise_multiplier": round(sigma, 4), "sample_rate": round(q, 6), "client_examples": examples}


def learned(run: dict, majority: float) -> bool:
    """Whether a run learned: its final dev accuracy beats both always answering the majority
    class and the untrained model it started from by LEARNED_MARGIN."""
    floor = max(majority, float(run.get("initial_eval_accuracy") or 0.0))
    return run["final_eval_accuracy"] >= floor + LEARNED_MARGIN


def summarise(runs: dict[str, dict], strategies: list[str], epsilons: list[float], majority: float) -> dict[str, Any]:
    """Drops from no-DP per strategy and epsilon, which runs learned, the FFA-vs-FedAvg verdict."""
    drops: dict[str, dict[str, float]] = {}
    for strategy in strategies:
        off = runs.get(run_key(strategy, None))
        if off is None:
            continue
        drops[strategy] = {}
        for eps in epsilons:
            run = runs.get(run_key(strategy, eps))
            if run is not None:
                drops[strategy][f"{eps:g}"] = round(100 * (off["final_eval_accuracy"] - run["final_eval_accuracy"]), 2)
    learned_runs = {key: learned(run, majority) for key, run in runs.items()}
    verdict: dict[str, Any] = {"claim": CLAIM, "per_epsilon": {}, "ffa_degrades_less_at_every_epsilon": None}
    if "fedavg" in drops and "ffa" in drops:
        for key in sorted(set(drops["fedavg"]) & set(drops["ffa"]), key=float):
            fedavg_acc = runs[run_key("fedavg", float(key))]["final_eval_accuracy"]
            ffa_acc = runs[run_key("ffa", float(key))]["final_eval_accuracy"]
            advantage = round(drops["fedavg"][key] - drops["ffa"][key], 2)
            verdict["per_epsilon"][key] = {
                "fedavg_drop_points": drops["fedavg"][key],
                "ffa_drop_points": drops["ffa"][key],
                "ffa_degrades_less": drops["ffa"][key] < drops["fedavg"][key],
                "ffa_advantage_points": advantage,
                "ffa_minus_fedavg_accuracy_points": round(100 * (ffa_acc - fedavg_acc), 2),
            }
        rows = verdict["per_epsilon"].values()
        if rows:
            less = [r["ffa_degrades_less"] for r in rows]
            verdict["ffa_degrades_less_at_every_epsilon"] = all(less)
            parts = ", ".join(
                f"eps {k}: {'less' if r['ffa_degrades_less'] else 'not less'} "
                f"(FFA drop {r['ffa_drop_points']:+.2f} vs FedAvg {r['fedavg_drop_points']:+.2f} points, "
                f"advantage {r['ffa_advantage_points']:+.2f})"
                for k, r in verdict["per_epsilon"].items()
            )
            if all(less):
                head = "FFA-LoRA degrades less than FedAvg under DP at every epsilon here"
            elif any(less):
                head = "mixed: FFA-LoRA degrades less than FedAvg at some epsilons only"
            else:
                head = "FFA-LoRA does not degrade less than FedAvg under DP at any epsilon here"
            text = f"{head}: {parts}. One seed each; ~1.2 points is one standard error of a dev accuracy."
            # A smaller drop means nothing when there was nothing to lose, or when no DP run learned.
            idle = [s for s in ("fedavg", "ffa") if not learned_runs[run_key(s, None)]]
            dp_learned = [
                k
                for k, ok in learned_runs.items()
                if ok and k.startswith(("fedavg/", "ffa/")) and not k.endswith("/off")
            ]
            verdict["no_dp_baselines_learned"] = {s: learned_runs[run_key(s, None)] for s in ("fedavg", "ffa")}
            verdict["dp_runs_learned"] = dp_learned
            verdict["meaningful"] = not idle and bool(dp_learned)
            verdict["supports_claim"] = all(less) if verdict["meaningful"] else None
            caveats = []
            if idle:
                caveats.append(
                    f"without DP {' and '.join(idle)} did not learn (final accuracy within "
                    f"{100 * LEARNED_MARGIN:g} points of the majority class {majority:.4f} or of the untrained "
                    f"model), so {'its' if len(idle) == 1 else 'their'} drop under DP is bounded by what "
                    f"{'it' if len(idle) == 1 else 'they'} never gained"
                )
            if not dp_learned:
                caveats.append(
                    "no DP run of fedavg or ffa learned at any epsilon (final accuracies: "
                    + ", ".join(
                        sorted(
                            {
                                f"{runs[run_key(s, e)]['final_eval_accuracy']:.4f}"
                                for s in ("fedavg", "ffa")
                                for e in epsilons
                                if run_key(s, e) in runs
                            }
                        )
                    )
                    + "), so the drops only measure how much each no-DP run had learned"
                )
            if caveats:
                text = "Not a test of the claim here: " + "; ".join(caveats) + ". The arithmetic alone: " + text
            verdict["verdict"] = text
    else:
        verdict["verdict"] = "not measured (needs both fedavg and ffa)"
    return {
        "majority_class_accuracy": round(majority, 4),
        "learned_margin": LEARNED_MARGIN,
        "learned": learned_runs,
        "drop_points": drops,
        "ffa_vs_fedavg": verdict,
    }


# ---------------------------------------------------------------------------------------------


def build_report(ctx: dict[str, Any], step: dict | None, runs: dict[str, dict], seconds: float) -> dict[str, Any]:
    """The report from what has been measured so far (also the checkpoint ``--resume-from`` reads)."""
    wanted, epsilons, settings = ctx["wanted"], ctx["epsilons"], ctx["settings"]
    done = sorted({r["strategy"] for r in runs.values()}, key=lambda s: (wanted + [s]).index(s))
    skipped = {s: why for s, why in ctx["skipped"].items() if s not in done}
    report: dict[str, Any] = {
        "benchmark": "privacy",
        "quick": ctx["quick"],
        "settings": settings,
        "step_time": step,
        "accuracy_data": ctx["accuracy_data"],
        "eval_examples": ctx["eval_examples"],
        "strategies": done,
        "skipped": skipped,
        "target_epsilons": epsilons,
        "planned_noise": {f"{e:g}": planned_noise(settings, e) for e in epsilons},
        "runs": runs,
        "accuracy": {
            s: {k.split("/")[1]: round(r["final_eval_accuracy"], 4) for k, r in runs.items() if r["strategy"] == s}
            for s in done
        },
        "epsilon_reached": {
            s: {
                k.split("/")[1]: r["epsilon"]
                for k, r in runs.items()
                if r["strategy"] == s and r["epsilon"] is not None
            }
            for s in done
        },
        **summarise(runs, done, epsilons, ctx["majority_class_accuracy"]),
        "runs_seconds": round(sum(r["seconds"] for r in runs.values()), 1),
        "seconds": round(seconds, 1),
    }
    if any(math.isnan(r["final_eval_accuracy"]) for r in runs.values()):
        report["note"] = "a run has no accuracy"
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, synthetic data, 1 strategy, 1 epsilon")
    parser.add_argument(
        "--data-dir", default=os.environ.get("FEDLORA_BENCH_DATA", str(REPO.parent / "shared" / "data"))
    )
    parser.add_argument("--strategies", default=None, help="comma-separated (default fedavg,ffa,dpdylora)")
    parser.add_argument("--epsilons", default=None, help="comma-separated target epsilons (default 1,3,8)")
    parser.add_argument("--repeats", type=int, default=None, help="timed plain/DP block pairs (default 7)")
    parser.add_argument("--block", type=int, default=None, help="steps per timed block (default 10)")
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads (1 or 2; the machine is shared, default 2)"
    )
    parser.add_argument("--skip-accuracy", action="store_true", help="step times only")
    parser.add_argument("--skip-step-time", action="store_true", help="accuracy runs only")
    parser.add_argument(
        "--resume-from",
        default=None,
        help="a previous (or partial: the report is written after every run) report with the same "
        "settings: reuse its runs, and its step times unless they are measured again",
    )
    parser.add_argument(
        "--out",
        nargs="?",
        const=str(Path(__file__).resolve().parent / "results" / "privacy.json"),
        help="also write the JSON here (no path: benchmarks/results/privacy.json); written after every run too",
    )
    args = parser.parse_args()
    quiet_libraries()

    import torch

    torch.set_num_threads(max(1, min(2, args.threads)))  # the machine is shared: 2 threads at most

    from fedlora.config import RunConfig
    from fedlora.data import load_task_data
    from fedlora.data.synthetic import write_tiny_bert
    from fedlora.process import process_state
    from fedlora.run.progress import Progress
    from fedlora.strategies import STRATEGIES

    quick = args.quick
    settings = QUICK if quick else FULL
    wanted = (args.strategies or ("fedavg" if quick else "fedavg,ffa,dpdylora")).split(",")
    epsilons = [float(e) for e in (args.epsilons or ("3" if quick else "1,3,8")).split(",")]
    repeats = args.repeats or (2 if quick else 7)
    block = args.block or (3 if quick else 10)
    strategies = [s for s in wanted if s in STRATEGIES]
    sst2 = Path(args.data_dir) / "sst2"
    use_sst2 = not quick and sst2.is_dir()
    data = data_section(sst2 if use_sst2 else None)

    previous: dict[str, Any] = {}
    if args.resume_from and Path(args.resume_from).is_file():
        previous = json.loads(Path(args.resume_from).read_text())
        if previous.get("settings") != json.loads(json.dumps(settings)) or previous.get("quick") != quick:
            print("privacy.py: error: --resume-from report has other settings", file=sys.stderr)
            return 2
    ctx: dict[str, Any] = {
        "quick": quick,
        "settings": settings,
        "wanted": wanted,
        "epsilons": epsilons,
        "skipped": {
            s: "not registered in fedlora.strategies.STRATEGIES when this ran" for s in wanted if s not in STRATEGIES
        },
        "accuracy_data": (
            f"SST-2 ({sst2}): {settings['max_train_examples']} training sentences, IID over "
            f"{settings['clients']} clients; the whole dev set"
            if use_sst2
            else "synthetic:sentiment" + (" (quick)" if quick else " (SST-2 folder not found)")
        ),
    }

    started = time.perf_counter()
    earlier = float(previous.get("seconds", 0.0))
    progress = Progress(quiet=quick, stream=sys.stderr)
    step = previous.get("step_time")
    runs: dict[str, dict] = dict(previous.get("runs", {}))
    with stdout_to_stderr(), tempfile.TemporaryDirectory(prefix="fedlora-privacy-") as tmp:
        root = Path(tmp)
        model = write_tiny_bert(root / "tiny-bert") if quick else MINILM
        raw = base_raw(settings, model, data)
        evals = load_task_data(RunConfig.from_dict(raw)).eval
        ctx["eval_examples"] = len(evals)
        counts = Counter(evals["labels"])
        ctx["majority_class_accuracy"] = max(counts.values()) / max(len(evals), 1)
        if not args.skip_step_time:
            step = step_times(model, data, block, repeats, 200 if quick else 2000)
            progress.line(f"step time: {json.dumps(step['ms_per_step'])} ms, dp/plain {step['dp_over_plain']}")
        process_state().clear()  # the accuracy runs start from a fresh model and data store
        if not args.skip_accuracy:
            for strategy in strategies:
                for eps in [None, *epsilons]:
                    key = run_key(strategy, eps)
                    if key in runs:
                        continue
                    runs[key] = accuracy_run(raw, settings, strategy, eps, root, progress)
                    runs[key]["torch_threads"] = torch.get_num_threads()
                    r = runs[key]
                    progress.line(
                        f"=== {key}: accuracy {r['final_eval_accuracy']:.4f} epsilon {r['epsilon']} {r['seconds']}s"
                    )
                    if args.out:  # a checkpoint: --resume-from it continues an interrupted benchmark
                        partial = build_report(ctx, step, runs, earlier + time.perf_counter() - started)
                        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                        Path(args.out).write_text(json.dumps(partial, indent=2) + "\n")
    measured = not (args.skip_step_time and args.skip_accuracy)  # a rebuild of the report costs no time
    emit(build_report(ctx, step, runs, earlier + (time.perf_counter() - started if measured else 0.0)), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
