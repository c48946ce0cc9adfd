"""Peak memory of the in-process simulation with 2, 10 and 100 clients.

Each size runs in a fresh Python process (this script with ``--child N``), so one size's peak
cannot carry over into another's: ``fedlora.simulations.runtime.simulate`` of all-MiniLM-L6-v2
classification, LoRA rank 8 on query/value, 1 round of FedAvg, one local step of batch 8 per
client, 16 held-out examples, the synthetic 4-topic task (2,400 training examples, split IID so
every one of 100 clients gets 24). The child reports ``ru_maxrss`` (the kernel's peak resident
set size of the process) once before the run, after its imports (``imports_peak_rss_mb``), and
once after it (``peak_rss_mb``); what the run itself added is the difference.

One process serves every virtual client from one cached base model, so clients should cost
only their partitions, tokens and ``Context``s: the target is ``peak(100) / peak(2) <= 1.3``.

``--quick`` keeps the three sizes (and every key) but shrinks the data and batches (200 short
examples, batch 2): it only checks that the code runs.

Usage: python benchmarks/memory.py [--quick] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, peak_rss_mb, quiet_libraries, stdout_to_stderr  # noqa: E402

SIZES = (2, 10, 100)
TARGET_RATIO = 1.3
CHILD_TIMEOUT_S = 480


def overrides(clients: int, quick: bool) -> list[str]:
    """Config overrides on the quickstart preset for one size."""
    sets = [
        f"name=memory-{clients}",
        "rounds=1",
        f"federation.clients={clients}",
        "federation.local_steps=1",
        "federation.batch_size=2" if quick else "federation.batch_size=8",
        "data.partitioner=iid",
        "data.max_train_examples=200" if quick else "data.max_train_examples=2400",
        "data.max_eval_examples=8" if quick else "data.max_eval_examples=16",
        "lora.rank=8",
        "lora.target_modules=['query','value']",
        "strategy.name=fedavg",
    ]
    if quick:
        sets.append("model.max_length=16")
    return sets


def child(clients: int, quick: bool) -> dict:
    """Run one simulation in this process and report its peak memory."""
    from fedlora.cli.common import load_run_config
    from fedlora.run.progress import Progress
    from fedlora.simulations.runtime import simulate

    sets = overrides(clients, quick)
    cfg = load_run_config("quickstart", sets)
    before = peak_rss_mb()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = simulate(cfg, out=Path(tmp) / "run", backend="inprocess", progress=Progress(quiet=True))
    seconds = time.perf_counter() - start
    clients_ok = result.rounds[-1]["clients_ok"] if result.rounds else 0
    return {
        "clients": clients,
        "clients_ok": int(clients_ok),
        "imports_peak_rss_mb": before,
        "peak_rss_mb": peak_rss_mb(),
        "run_s": round(seconds, 2),
        "overrides": sets,
    }


def measure(clients: int, quick: bool) -> dict:
    """Run :func:`child` in a fresh interpreter and parse its one-line JSON answer."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(clients)] + (["--quick"] if quick else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    if proc.returncode != 0:
        raise RuntimeError(f"{clients} clients: child exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny data and batches: only checks that it runs")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument(
        "--out",
        nargs="?",
        const=str(Path(__file__).resolve().parent / "results" / "memory.json"),
        help="also write the JSON here (no path: benchmarks/results/memory.json)",
    )
    args = parser.parse_args()
    quiet_libraries()
    if args.child is not None:
        with stdout_to_stderr():
            answer = child(args.child, args.quick)
        print(json.dumps(answer), flush=True)
        return 0

    with stdout_to_stderr():
        sizes = {str(n): measure(n, args.quick) for n in SIZES}
    peaks = {n: sizes[n]["peak_rss_mb"] for n in sizes}
    ratio = peaks[str(SIZES[-1])] / peaks[str(SIZES[0])]
    grown = sizes[str(SIZES[-1])]["peak_rss_mb"] - sizes[str(SIZES[0])]["peak_rss_mb"]
    report = {
        "benchmark": "memory",
        "quick": args.quick,
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "rank": 8,
        "target_modules": ["query", "value"],
        "rounds": 1,
        "local_steps": 1,
        "measure": "ru_maxrss of a fresh process per size (peak resident set size, MiB)",
        "sizes": sizes,
        "peak_rss_mb": peaks,
        "ratio_100_over_2": round(ratio, 4),
        "mb_per_extra_client": round(grown / (SIZES[-1] - SIZES[0]), 3),
        "target_ratio_100_over_2": TARGET_RATIO,
        "ratio_target_met": ratio <= TARGET_RATIO,
    }
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
