"""Does the federated adapter get close to centralised fine-tuning? Real data, one run.

SST-2 (GLUE sentiment; train.tsv / dev.tsv from ``--data-dir``): LoRA rank 8 on query/value of
all-MiniLM-L6-v2, trained

* centralised: fedlora with one client holding all the training data (the same loop, the same
  number of examples per round as the whole federation sees);
* federated: 10 clients, IID and Dirichlet(0.5) over labels, every strategy;

and evaluated on the dev set after every round. Targets: IID federated >= 97% of centralised,
Dirichlet(0.5) >= 93% (final round). FL-TAC runs on SST-2 + AG News as two tasks, against a
centralised run on the same two-task data (per-task accuracy). HetLoRA uses client profiles of
ranks 2, 4 and 8 under the rank-8 global adapter, so every run has the same largest adapter.
FedSA-LoRA's main metric is personalized (each client on a held-out part of its own data), so
its row compares the shared part on the dev set (``global_eval_accuracy``) and reports the
personalized accuracy beside it.

Usage: python benchmarks/quality.py [--quick] [--data-dir DIR] [--strategies a,b|all] [--out F]
The default full run (fedavg and ffa, 4 rounds of 8 local steps) fits in 10 minutes on 2 CPU
cores; ``--strategies all`` compares every strategy (about 25 minutes there).
``--quick`` runs a few steps on the offline synthetic task (it checks the code runs, not
quality); the full run reads ``DIR/sst2`` and ``DIR/ag_news`` (default ``../shared/data``
beside the repository, or ``$FEDLORA_BENCH_DATA``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _run(name: str, sets: list[str], root: Path) -> dict:
    from fedlora.cli import load_run_config
    from fedlora.runlog import Progress
    from fedlora.simulations.runtime import simulate

    cfg = load_run_config("quickstart", sets + [f"name={name}"])
    start = time.perf_counter()
    result = simulate(cfg, out=root / name, progress=Progress(quiet=True))
    per_round = [{k: v for k, v in r.items() if k.startswith(("eval_", "global_eval_"))} for r in result.rounds]
    return {"initial": result.initial, "rounds": per_round, "seconds": round(time.perf_counter() - start, 1)}


def _final(run: dict, key: str = "eval_accuracy") -> float:
    return float(run["rounds"][-1].get(key, float("nan")))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny budget on synthetic data: only checks it runs")
    parser.add_argument(
        "--data-dir", default=os.environ.get("FEDLORA_BENCH_DATA", str(REPO.parent / "shared" / "data"))
    )
    parser.add_argument(
        "--strategies",
        default="fedavg,ffa",
        help="comma-separated strategies, or 'all' (default fedavg,ffa: the run that fits in 10 "
        "minutes on 2 cores; every strategy takes about 25)",
    )
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.002)
    parser.add_argument(
        "--out",
        nargs="?",
        const=str(Path(__file__).resolve().parent / "results" / "quality.json"),
        help="also write the JSON here (no path: benchmarks/results/quality.json)",
    )
    args = parser.parse_args()

    from _common import emit

    from fedlora.cli import _quiet_libraries
    from fedlora.strategies import STRATEGIES

    _quiet_libraries()
    names = sorted(STRATEGIES) if args.quick or args.strategies == "all" else args.strategies.split(",")
    unknown = sorted(set(names) - set(STRATEGIES))
    if unknown:
        print(
            f"quality.py: error: unknown strategies {', '.join(unknown)} (known: {', '.join(sorted(STRATEGIES))})",
            file=sys.stderr,
        )
        return 2
    with_fltac = "fltac" in names
    names = [n for n in names if n != "fltac"]
    clients = 10
    rounds, steps, batch = (1, 1, 8) if args.quick else (args.rounds, args.local_steps, 16)
    if args.quick:
        data = ["data.path=synthetic:topics", "data.max_train_examples=200", "data.max_eval_examples=40"]
        tasks = (
            "data.tasks=[{name='topics',path='synthetic:topics',max_train_examples=100,max_eval_examples=20},"
            "{name='sentiment',path='synthetic:sentiment',max_train_examples=100,max_eval_examples=20}]"
        )
    else:
        sst2, news = Path(args.data_dir) / "sst2", Path(args.data_dir) / "ag_news"
        for folder in (sst2, news):
            if not folder.is_dir():
                print(f"quality.py: error: {folder} not found (pass --data-dir or use --quick)", file=sys.stderr)
                return 2
        data = [
            f"data.path={sst2}",
            "data.text_column=sentence",
            "data.label_column=label",
            "data.max_eval_examples=436",
        ]
        tasks = (
            f"data.tasks=[{{name='sst2',path='{sst2}',text_column='sentence',max_train_examples=8000,"
            f"max_eval_examples=436}},{{name='agnews',path='{news}',text_column='content',"
            f"max_train_examples=8000,max_eval_examples=436}}]"
        )
    common = data + [
        f"rounds={rounds}",
        f"federation.batch_size={batch}",
        f"federation.lr={args.lr}",
        "model.max_length=32",
        "lora.dropout=0.0",
    ]
    fed = [f"federation.clients={clients}", f"federation.local_steps={steps}"]
    # One client doing every client's steps: the same examples per round as the federation.
    central = ["federation.clients=1", f"federation.local_steps={clients * steps}", "data.partitioner=iid"]

    report: dict = {
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "rank": 8,
        "targets": ["query", "value"],
        "data": "synthetic (quick)" if args.quick else "SST-2 train -> 436 dev examples (seeded half of dev)",
        "lr": args.lr,
        "max_length": 32,
        "clients": clients,
        "rounds": rounds,
        "local_steps": steps,
        "batch_size": batch,
        "examples_per_round": clients * steps * batch,
        "targets_ratio": {"iid": 0.97, "dirichlet_0.5": 0.93},
        "runs": {},
        "ratios": {},
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = _run("centralised", common + central, root)
        report["runs"]["centralised"] = base
        for strategy in names:
            extra = [f"strategy.name={strategy}"]
            if strategy == "hetlora":
                extra.append("federation.profiles=[{name='small',rank=2},{name='medium',rank=4},{name='large',rank=8}]")
            key = "global_eval_accuracy" if strategy == "fedsa" else "eval_accuracy"
            for split, part in (
                ("iid", ["data.partitioner=iid"]),
                ("dirichlet_0.5", ["data.partitioner=dirichlet", "data.dirichlet_alpha=0.5"]),
            ):
                run = _run(f"{strategy}-{split}", common + fed + part + extra, root)
                report["runs"][f"{strategy}/{split}"] = run
                ratio = _final(run, key) / _final(base)
                report["ratios"][f"{strategy}/{split}"] = {
                    "ratio": round(ratio, 4),
                    "meets_target": ratio >= report["targets_ratio"][split],
                    "metric": key,
                }
        if with_fltac:
            two = [tasks, "data.partition_column=task", "data.max_train_examples=0", "data.max_eval_examples=0"]
            tac_common = [
                c
                for c in common
                if not c.startswith(
                    ("data.path", "data.text_column", "data.label_column", "data.max_eval_examples", "data.max_train")
                )
            ]
            base2 = _run("centralised-2tasks", tac_common + two + central, root)
            report["runs"]["centralised/2tasks"] = base2
            for split, alpha in (("iid", "100.0"), ("dirichlet_0.5", "0.5")):
                run = _run(
                    f"fltac-{split}",
                    tac_common
                    + two
                    + fed
                    + ["strategy.name=fltac", "data.partitioner=dirichlet", f"data.dirichlet_alpha={alpha}"],
                    root,
                )
                report["runs"][f"fltac/{split}"] = run
                ratio = _final(run) / _final(base2)
                report["ratios"][f"fltac/{split}"] = {
                    "ratio": round(ratio, 4),
                    "metric": "eval_accuracy (mean of tasks)",
                    "meets_target": ratio >= report["targets_ratio"][split],
                    "note": "tasks split over clients by Dirichlet over the task column",
                }
    report["seconds"] = round(time.perf_counter() - started, 1)
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
