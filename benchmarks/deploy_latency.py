"""Deployment latency: what a round costs a deployed device beyond its training.

The setup: ``fedlora-server`` and 3 ``fedlora-client`` processes on 127.0.0.1, over Flower's
SuperLink/SuperNode with TLS (``fedlora certs``) and node authentication, as
``tests/test_deploy.py`` runs them: a tiny random 2-layer BERT (hidden size 32, the tests'
``tiny_bert``) on the synthetic 4-topic task, FedAvg, rank 4, 2 local steps of batch 8, IID
partitions written with ``fedlora partition``.

The same federation runs once per mode, one after the other:

``before``
    ``fedlora-client --no-worker``: Flower's SuperExec starts a fresh ClientApp process per
    message, which imports torch/transformers/fedlora and loads the base model every time.
``forward``
    ``FEDLORA_CLIENT_WORKER=forward``: a long-lived worker holds the model; the per-message
    ``flwr-clientapp`` process imports only Flower and forwards the message to it (the path
    before the worker took the tasks itself).
``after``
    the default: the SuperNode runs with ``--isolation process`` and the worker takes its
    tasks itself over Flower's Runtime API (:mod:`fedlora.client.executor`): no process per
    message.

What is measured, per round, from the server's ``runs/<name>/metrics.jsonl``: ``seconds`` (the
round's wall time on the server: push, the clients' work, replies, aggregation, server-side
evaluation) and each client's ``seconds`` (its ``train_seconds``, the time in ``train_local``).
The devices train in parallel, so ``overhead_s`` = round seconds - max client train seconds is
what the round costs beyond training. Round 1 is reported apart (``first_round``: the nodes'
capability query and the first model load). ``overhead_s`` is the median over rounds 2..N; the
target is ``<= 2 s``. ``<mode>_over_after`` is the ratio of the medians
(``round_<mode>_over_after``: of the median round times).

``breakdown_median`` splits the steady rounds with the devices' output (``--verbose``, stamped
as it arrives), the worker's own marks and the moment each round's line reached
metrics.jsonl (:mod:`_deploy_timeline` names every phase): per device, and along each round's
critical path (the device that replied last), whose parts add up to the round's seconds
(``critical_path_mean`` exactly, ``critical_path`` as medians); ``since_previous_reply_s`` shows
the SuperNode's 3-s pull sleep.

Usage: python benchmarks/deploy_latency.py [--quick] [--rounds N] [--clients N] [--insecure]
       [--order before,forward,after] [--logs DIR] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, quiet_libraries  # noqa: E402
from _deploy_timeline import breakdown, timeline  # noqa: E402

BIN = Path(sys.executable).parent
CLIENTS = 3  # default --clients
TARGET_OVERHEAD_S = 2.0
#: mode: (fedlora-client arguments, its environment's additions)
MODES: dict[str, tuple[list[str], dict[str, str]]] = {
    "before": (["--no-worker"], {}),
    "forward": ([], {"FEDLORA_CLIENT_WORKER": "forward"}),
    "after": ([], {}),
}
RUN_TIMEOUT = 900


def run_config(model_dir: str, rounds: int, clients: int):
    """The tests' ``tiny_config`` (IID partitions) with ``rounds`` rounds and ``clients`` clients."""
    from fedlora.config import RunConfig

    return RunConfig.from_dict(
        {
            "name": "deploy-latency",
            "rounds": rounds,
            "seed": 0,
            "model": {"name": model_dir, "task": "classification", "max_length": 16},
            "lora": {"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["query", "value"]},
            "data": {
                "path": "synthetic:topics",
                "max_train_examples": 150,
                "max_eval_examples": 40,
                "partitioner": "iid",
            },
            "federation": {"clients": clients, "local_steps": 2, "batch_size": 8, "lr": 0.01, "round_timeout": 180},
            "strategy": {"name": "fedavg"},
        }
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Timestamped:
    """A child process whose output lines are kept with the monotonic time they arrived."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str]):
        self.proc = subprocess.Popen(
            args,
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        self.lines: list[tuple[float, str]] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for raw in iter(self.proc.stdout.readline, ""):
            self.lines.append((time.time(), re.sub(r"\x1b\[[0-9;]*m", "", raw.rstrip())))
        self.proc.stdout.close()

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)


class MetricsWatch:
    """When each round's line reached ``metrics.jsonl`` (wall clock, looked at every 10 ms): the
    server's own end of a round, to the millisecond, where its printed lines come in batches."""

    def __init__(self, path: Path):
        self.path = path
        self.ends: dict[int, float] = {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        seen = 0
        while not self.done.wait(0.01):
            try:
                lines = [line for line in self.path.read_text().splitlines() if line.strip()]
            except OSError:
                continue
            now = time.time()
            for line in lines[seen:]:
                try:
                    self.ends.setdefault(int(json.loads(line)["round"]), now)
                except (ValueError, KeyError):
                    break  # a line still being written: read it again next time
                seen += 1

    def stop(self) -> dict[int, float]:
        self.done.set()
        self.thread.join(timeout=5)
        return self.ends


def client_command(root: Path, port: int, i: int, mode: str, insecure: bool, certs: Any) -> list[str]:
    cmd = [
        str(BIN / "fedlora-client"),
        "--server",
        f"127.0.0.1:{port}",
        "--data",
        str(root / "data" / f"client{i}.csv"),
    ]
    cmd += ["--partition-id", str(i), "--max-wait", "60", "--verbose"] + MODES[mode][0]
    cmd += ["--insecure"] if insecure else ["--ca", str(certs.ca_cert), "--key", str(certs.node_keys[i])]
    return cmd


def deploy(root: Path, preset: Path, mode: str, insecure: bool, certs: Any, clients_n: int) -> dict[str, Any]:
    """One federation with the clients in ``mode``; its metrics.jsonl rounds and the logs."""
    env = dict(os.environ)
    env["FLWR_HOME"] = str(root / f"flwr-home-{mode}")
    env["PATH"] = str(BIN) + os.pathsep + env.get("PATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    client_env = {**env, **MODES[mode][1]}
    port = free_port()
    run_dir = root / "runs" / mode
    server_cmd = [str(BIN / "fedlora-server"), str(preset), "--host", "127.0.0.1", "--port", str(port)]
    server_cmd += ["--out", str(run_dir), "--wait-clients", "120"]
    server_cmd += (
        ["--insecure"] if insecure else ["--certs", str(certs.ca_cert.parent), "--auth-keys", str(root / "auth")]
    )
    server = Timestamped(server_cmd, root, env)
    watch = MetricsWatch(run_dir / "metrics.jsonl")
    clients: list[Timestamped] = []
    try:
        for i in range(clients_n):
            clients.append(Timestamped(client_command(root, port, i, mode, insecure, certs), root, client_env))
        rc = server.proc.wait(timeout=RUN_TIMEOUT)
        server.thread.join(timeout=10)
        for c in clients:
            c.proc.send_signal(signal.SIGTERM)
        client_rcs = [c.proc.wait(timeout=60) for c in clients]
        for c in clients:
            c.thread.join(timeout=10)
    finally:
        ends = watch.stop()
        for p in [server, *clients]:
            p.kill()
    if rc != 0:
        raise RuntimeError(f"{mode}: fedlora-server exited {rc}:\n{server.text()[-4000:]}")
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    superlink_log = (
        (run_dir / "superlink.log").read_text(errors="replace") if (run_dir / "superlink.log").exists() else ""
    )
    return {
        "rounds": rounds,
        "round_ends": ends,
        "server": server.lines,
        "clients": [c.lines for c in clients],
        "client_rcs": client_rcs,
        "superlink_log": superlink_log,
    }


def write_logs(folder: Path, mode: str, run: dict[str, Any], t0: float) -> None:
    """Every output line with its arrival time (seconds since the mode started)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, lines in [("server", run["server"]), *((f"client{i}", c) for i, c in enumerate(run["clients"]))]:
        text = "".join(f"{t - t0:9.3f} {line}\n" for t, line in lines)
        (folder / f"{mode}-{name}.log").write_text(text)
    (folder / f"{mode}-superlink.log").write_text(run["superlink_log"])


def round_rows(rounds: list[dict[str, Any]]) -> list[dict[str, float]]:
    rows = []
    for r in rounds:
        train = [float(c.get("seconds", 0.0)) for c in r["clients"]]
        rows.append(
            {
                "round": int(r["round"]),
                "round_s": round(float(r["seconds"]), 3),
                "train_max_s": round(max(train), 3),
                "train_mean_s": round(statistics.fmean(train), 3),
                "overhead_s": round(float(r["seconds"]) - max(train), 3),
            }
        )
    return rows


def summarize(run: dict[str, Any]) -> dict[str, Any]:
    rows = round_rows(run["rounds"])
    steady = [r for r in rows if r["round"] >= 2] or rows
    tl = timeline(run, rows)
    return {
        "overhead_s": round(statistics.median(r["overhead_s"] for r in steady), 3),
        "round_s": round(statistics.median(r["round_s"] for r in steady), 3),
        "train_max_s": round(statistics.median(r["train_max_s"] for r in steady), 3),
        "first_round": rows[0],
        "rounds": rows,
        "breakdown_median": breakdown(tl) if tl else {},
        "timeline": [{k: v for k, v in r.items() if k not in ("round_start", "round_end")} for r in tl],
        "client_rcs": run["client_rcs"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds: only checks that it runs")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per federation (default 6, quick 2)")
    parser.add_argument("--clients", type=int, default=CLIENTS, help=f"devices (default {CLIENTS})")
    parser.add_argument("--insecure", action="store_true", help="no TLS / node authentication")
    parser.add_argument("--order", help="modes to run, in order (default before,forward,after; quick before,after)")
    parser.add_argument("--logs", help="folder for the server's and clients' timestamped output")
    parser.add_argument(
        "--out",
        nargs="?",
        const=str(Path(__file__).resolve().parent / "results" / "deploy_latency.json"),
        help="also write the JSON here (no path: benchmarks/results/deploy_latency.json)",
    )
    args = parser.parse_args()
    quiet_libraries()
    rounds = args.rounds or (2 if args.quick else 6)
    order = args.order or ("before,after" if args.quick else "before,forward,after")
    modes = [m.strip() for m in order.split(",") if m.strip()]
    if not set(modes) <= set(MODES):
        parser.error(f"--order: modes are {', '.join(MODES)}")
    import tomli_w

    from fedlora.data import write_partitions
    from fedlora.data.synthetic import write_tiny_bert
    from fedlora.deploy.certs import create_certs

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fedlora-deploy-latency-") as tmp:
        root = Path(tmp)
        cfg = run_config(write_tiny_bert(root / "tiny-bert"), rounds, args.clients)
        preset = root / "preset.toml"
        preset.write_text(tomli_w.dumps(cfg.to_dict()))
        write_partitions(cfg, root / "data", args.clients)
        certs = None
        if not args.insecure:
            certs = create_certs(root / "certs", "localhost", nodes=args.clients)
            (root / "auth").mkdir()
            for pub in certs.node_public_keys:
                (root / "auth" / pub.name).write_bytes(pub.read_bytes())
        for mode in modes:
            started = time.time()
            run = deploy(root, preset, mode, args.insecure, certs, args.clients)
            if args.logs:
                write_logs(Path(args.logs), mode, run, started)
            results[mode] = {**summarize(run), "wall_s": round(time.time() - started, 1)}
    report: dict[str, Any] = {
        "setup": {
            "clients": args.clients,
            "rounds": rounds,
            "tls": not args.insecure,
            "node_auth": not args.insecure,
            "model": "tiny random BERT (2 layers, hidden 32)",
            "strategy": "fedavg",
            "local_steps": 2,
            "batch_size": 8,
            "cpus": os.cpu_count(),
            "overhead": "round seconds - max client train seconds, median over rounds 2..N",
        },
        **results,
        "target_overhead_s": TARGET_OVERHEAD_S,
    }
    if "after" in results:
        report["target_met"] = bool(results["after"]["overhead_s"] <= TARGET_OVERHEAD_S)
    for mode in ("before", "forward"):
        if mode in results and "after" in results:
            report[f"{mode}_over_after"] = round(
                results[mode]["overhead_s"] / max(results["after"]["overhead_s"], 1e-9), 2
            )
            report[f"round_{mode}_over_after"] = round(
                results[mode]["round_s"] / max(results["after"]["round_s"], 1e-9), 2
            )
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
