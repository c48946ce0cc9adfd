"""Cross-device scale: what a simulated federation costs as the number of clients N grows while
the clients sampled per round stay fixed.

The work: a tiny random BERT (2 layers, hidden 32, written to a temporary folder and read by the
real loading code), sequence classification on the synthetic 4-topic task, LoRA rank 4 on query
and value, 20 clients sampled per round (``federation.fraction = 20 / N``), 3 rounds, one local
step of batch 8 per client, 40 held-out examples, for fedavg and fedsa (whose clients keep their
own B and evaluate their own model: ``evaluation.clients = "trained"``, the default).

Every (N, strategy) runs in a fresh Python process (this script with ``--child``), so one size's
peak memory cannot carry over into another's. The pool of training examples is the same for
every N (``POOL``, at least one per client at the largest N, split IID): the sizes then differ in
their clients alone, not in how much data they read. Each child reports:

* ``peak_rss_mb``: the process's peak resident set (``ru_maxrss``), imports and data included;
* ``start_s``: from the call of ``simulate`` to the first round (checks, data, model, the
  round-0 evaluation, the nodes' capabilities);
* ``round_s``: the median round, as metrics.jsonl times it;
* ``overhead_per_client_round_ms``: per client trained, what a round spent outside the clients'
  training (``(round seconds - sum of the clients' train seconds) / clients``, median over rounds).

Targets (issue 28): ``peak_rss_mb(1,000,000) <= 2 x peak_rss_mb(2)``; ``start_s`` and ``round_s``
within 1.5 x of N = 1,000 at every N; overhead per client-round <= 5 ms.

``--quick`` (CI): N = 2 and 5,000, 2 rounds, a pool of at least 2,000: it checks that the code
runs and every key is there.

Usage: python benchmarks/scale.py [--quick] [--sizes 2,1000,...] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, peak_rss_mb, quiet_libraries, stdout_to_stderr  # noqa: E402

SIZES = (2, 1_000, 10_000, 100_000, 1_000_000)
QUICK_SIZES = (2, 5_000)
STRATEGIES = ("fedavg", "fedsa")
SAMPLED = 20
POOL = 20_000
QUICK_POOL = 2_000
CHILD_TIMEOUT_S = 1800
TARGETS = {"rss_ratio_max": 2.0, "time_ratio_vs_1000_max": 1.5, "overhead_ms_max": 5.0}


def overrides(clients: int, strategy: str, quick: bool) -> list[str]:
    """The run's config overrides for one size."""
    return [
        f"name=scale-{strategy}-{clients}",
        f"rounds={2 if quick else 3}",
        f"strategy.name={strategy}",
        f"federation.clients={clients}",
        f"federation.fraction={min(1.0, SAMPLED / clients)}",
        "federation.local_steps=1",
        "federation.batch_size=8",
        "federation.lr=0.01",
        "data.path=synthetic:topics",
        "data.partitioner=iid",
        f"data.max_train_examples={max(clients, QUICK_POOL if quick else POOL)}",
        "data.max_eval_examples=40",
        "model.task=classification",
        "model.max_length=16",
        "lora.rank=4",
        "lora.alpha=8",
        "lora.dropout=0.0",
        "lora.target_modules=['query','value']",
    ]


def child(clients: int, strategy: str, quick: bool) -> dict:
    """One run in this process; its timings and peak memory."""
    import torch

    torch.set_num_threads(1)
    from fedlora.config import RunConfig, apply_overrides
    from fedlora.data.synthetic import write_tiny_bert
    from fedlora.run.progress import Progress
    from fedlora.simulations.runtime import simulate

    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_bert(Path(tmp) / "tiny-bert")
        sets = overrides(clients, strategy, quick) + [f"model.name={model}"]
        cfg = RunConfig.from_dict(apply_overrides({}, sets))
        start = time.perf_counter()
        result = simulate(cfg, out=Path(tmp) / "run", backend="inprocess", progress=Progress(quiet=True), report=False)
        total = time.perf_counter() - start
        node_files = sorted((Path(tmp) / "run" / "checkpoints").glob("*.nodes.pb"))
        node_bytes = sum(p.stat().st_size for p in node_files)
    rounds = result.rounds
    round_s = [float(r["seconds"]) for r in rounds]
    overhead = [
        (float(r["seconds"]) - sum(float(c.get("seconds", 0.0)) for c in r["clients"])) / max(1, r["clients_ok"])
        for r in rounds
    ]
    return {
        "clients": clients,
        "strategy": strategy,
        "sampled_per_round": int(rounds[-1]["clients_sampled"]),
        "clients_ok": [int(r["clients_ok"]) for r in rounds],
        "peak_rss_mb": peak_rss_mb(),
        "start_s": round(total - sum(round_s) - result.seconds.get("end", 0.0), 3),
        "round_s": round(statistics.median(round_s), 3),
        "rounds_s": round_s,
        "end_s": round(result.seconds.get("end", 0.0), 3),
        "overhead_per_client_round_ms": round(1000 * statistics.median(overhead), 2),
        "node_state_bytes_on_disk": node_bytes,
        "final_eval_accuracy": rounds[-1].get("eval_accuracy"),
    }


def run_child(clients: int, strategy: str, quick: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", str(clients), "--strategy", strategy] + (["--quick"] if quick else [])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    if out.returncode != 0:
        raise SystemExit(f"child N={clients} {strategy} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def verdict(rows: list[dict], sizes: tuple[int, ...]) -> dict:
    """The targets, per strategy, from the rows (ratios to N = 2 and N = 1,000 where measured)."""
    out = {}
    for strategy in STRATEGIES:
        by_n = {r["clients"]: r for r in rows if r["strategy"] == strategy}
        small, ref, big = by_n.get(min(sizes)), by_n.get(1_000), by_n.get(max(sizes))
        entry = {"rss_largest_over_smallest": round(big["peak_rss_mb"] / small["peak_rss_mb"], 3)}
        if ref is not None:
            entry["start_over_1000"] = {n: round(r["start_s"] / ref["start_s"], 3) for n, r in by_n.items()}
            entry["round_over_1000"] = {n: round(r["round_s"] / ref["round_s"], 3) for n, r in by_n.items()}
        entry["max_overhead_ms"] = max(r["overhead_per_client_round_ms"] for r in by_n.values())
        entry["targets_met"] = bool(
            entry["rss_largest_over_smallest"] <= TARGETS["rss_ratio_max"]
            and entry["max_overhead_ms"] <= TARGETS["overhead_ms_max"]
            and all(v <= TARGETS["time_ratio_vs_1000_max"] for v in entry.get("start_over_1000", {}).values())
            and all(v <= TARGETS["time_ratio_vs_1000_max"] for v in entry.get("round_over_1000", {}).values())
        )
        out[strategy] = entry
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sizes", help="comma-separated N (default: 2,1000,10000,100000,1000000)")
    parser.add_argument("--out")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default="fedavg", help=argparse.SUPPRESS)
    args = parser.parse_args()
    quiet_libraries()
    if args.child is not None:
        with stdout_to_stderr():
            row = child(args.child, args.strategy, args.quick)
        print(json.dumps(row))
        return
    sizes = tuple(int(x) for x in args.sizes.split(",")) if args.sizes else QUICK_SIZES if args.quick else SIZES
    rows = [run_child(n, s, args.quick) for s in STRATEGIES for n in sizes]
    report = {
        "setup": {
            "model": "tiny random BERT (2 layers, hidden 32)",
            "sampled_per_round": SAMPLED,
            "rounds": 2 if args.quick else 3,
            "pool_examples": f"max(N, {QUICK_POOL if args.quick else POOL})",
            "local_steps": 1,
            "batch_size": 8,
            "sizes": list(sizes),
            "quick": args.quick,
        },
        "runs": rows,
        "targets": TARGETS,
        "verdict": verdict(rows, sizes),
    }
    emit(report, args.out)


if __name__ == "__main__":
    main()
