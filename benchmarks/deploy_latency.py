"""Deployment latency: what a round costs a deployed device beyond its training.

The setup: ``fedlora-server`` and 3 ``fedlora-client`` processes on 127.0.0.1, over Flower's
SuperLink/SuperNode with TLS (``fedlora certs``) and node authentication, as
``tests/test_deploy.py`` runs them: a tiny random 2-layer BERT (hidden size 32, the tests'
``tiny_bert``) on the synthetic 4-topic task, FedAvg, rank 4, 2 local steps of batch 8, IID
partitions written with ``fedlora partition``.

The same federation runs twice, one after the other:

``before``
    ``fedlora-client --no-worker``: Flower starts a fresh ClientApp process per message, which
    imports torch/transformers/fedlora and loads the base model every time (the per-message
    path every release before the worker had).
``after``
    the default: each ``fedlora-client`` owns a long-lived worker process
    (:mod:`fedlora.client.worker`) that imports the stack and loads the model once; the
    per-message ClientApp (:mod:`fedlora.client.entry`) imports only Flower and forwards the
    message to it.

What is measured, per round, from the server's ``runs/<name>/metrics.jsonl``: ``seconds`` (the
round's wall time on the server: push, the clients' work, replies, aggregation, server-side
evaluation, checkpoint) and each client's ``seconds`` (its ``train_seconds``, the time in
``train_local``). The devices train in parallel, so the round's training time is the slowest
device's; ``overhead_s`` = round seconds - max client train seconds is what the round costs a
device beyond training. Round 1 is reported apart (``first_round``): it includes the nodes'
capability query and, with the worker, its first model load. ``overhead_s`` of the ``after``
mode is the median over rounds 2..N; the target is ``<= 2 s``. ``before_over_after`` is the
ratio of the two medians (``round_before_over_after``: of the median round times). Without the
worker, ``train_seconds`` also holds a fresh process's first-step warm-up (about 2 s here).

``breakdown_median`` splits the steady rounds (medians over rounds 2..N and devices) with the
devices' SuperNode logs (``--verbose``, timestamped by this script as lines arrive):
``clientapp_start_s`` (SuperNode "Receiving" -> Flower's "Start `flwr-clientapp` process": the
SuperExec's poll, a Python start and Flower's own imports), ``handler_s`` (-> fedlora's
"trained" line: FAB install, task pull, the ClientApp module's import, the handler; without the
worker also torch/transformers and the model load), ``reply_wait_s`` (-> "Sending": the reply
pushed to the SuperNode, which looks for it every 0.5 s), ``send_s`` (-> "Sent successfully"),
``device_s`` (all of it); per round ``receive_spread_s`` (first to last device receiving: the
SuperNodes pull every 3 s when idle, each at its own phase), ``devices_span_s`` (first
"Receiving" to last "Sent") and ``outside_devices_s`` (round seconds minus that span: the
server's push, pull, aggregation, evaluation and checkpoint, and the first device's pull wait).

Usage: python benchmarks/deploy_latency.py [--quick] [--rounds N] [--clients N] [--insecure]
       [--order before,after] [--logs DIR] [--out results.json]
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

BIN = Path(sys.executable).parent
CLIENTS = 3  # default --clients
TARGET_OVERHEAD_S = 2.0
MODES = {"before": ["--no-worker"], "after": []}
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
            self.lines.append((time.monotonic(), re.sub(r"\x1b\[[0-9;]*m", "", raw.rstrip())))
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


def deploy(root: Path, preset: Path, mode: str, insecure: bool, certs: Any, clients_n: int) -> dict[str, Any]:
    """One federation with the clients in ``mode``; its metrics.jsonl rounds and the logs."""
    env = dict(os.environ)
    env["FLWR_HOME"] = str(root / f"flwr-home-{mode}")
    env["PATH"] = str(BIN) + os.pathsep + env.get("PATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    client_env = dict(env)
    port = free_port()
    run_dir = root / "runs" / mode
    server_cmd = [str(BIN / "fedlora-server"), str(preset), "--host", "127.0.0.1", "--port", str(port)]
    server_cmd += ["--out", str(run_dir), "--wait-clients", "120"]
    server_cmd += (
        ["--insecure"] if insecure else ["--certs", str(certs.ca_cert.parent), "--auth-keys", str(root / "auth")]
    )
    server = Timestamped(server_cmd, root, env)
    clients: list[Timestamped] = []
    try:
        for i in range(clients_n):
            cmd = [
                str(BIN / "fedlora-client"),
                "--server",
                f"127.0.0.1:{port}",
                "--data",
                str(root / "data" / f"client{i}.csv"),
            ]
            cmd += ["--partition-id", str(i), "--max-wait", "60", "--verbose"] + MODES[mode]
            cmd += ["--insecure"] if insecure else ["--ca", str(certs.ca_cert), "--key", str(certs.node_keys[i])]
            clients.append(Timestamped(cmd, root, client_env))
        rc = server.proc.wait(timeout=RUN_TIMEOUT)
        server.thread.join(timeout=10)
        for c in clients:
            c.proc.send_signal(signal.SIGTERM)
        client_rcs = [c.proc.wait(timeout=60) for c in clients]
        for c in clients:
            c.thread.join(timeout=10)
    finally:
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


MARKS = {
    "recv": r"Receiving: train message",
    "app_start": r"Start `flwr-clientapp` process",
    "trained": r"fedlora-client: round \d+: trained",
    "sending": r"Sending: train message",
    "sent": r"Sent successfully",
}
PHASES = {  # name: (from mark, to mark)
    "clientapp_start_s": ("recv", "app_start"),
    "handler_s": ("app_start", "trained"),
    "reply_wait_s": ("trained", "sending"),
    "send_s": ("sending", "sent"),
    "device_s": ("recv", "sent"),
}


def device_marks(lines: list[tuple[float, str]]) -> dict[int, dict[str, float]]:
    """{round: {mark: time}} of one device's train messages, from its SuperNode log."""
    marks: dict[int, dict[str, float]] = {}
    current = None
    for t, line in lines:
        if m := re.search(r"\[RUN \d+, ROUND (\d+)\]", line):
            current = int(m.group(1))
            continue
        if current is None:
            continue
        for name, pattern in MARKS.items():
            if name not in marks.setdefault(current, {}) and re.search(pattern, line):
                if name == "recv" or "recv" in marks[current]:
                    marks[current][name] = t
    return marks


def timeline(run: dict[str, Any], rows: list[dict[str, float]]) -> list[dict[str, Any]]:
    """Steady rounds (2..N) from the devices' logs: each device's phases, and what the round
    spent outside the devices (the server's work, the SuperNodes' pull interval)."""
    per_device = [device_marks(lines) for lines in run["clients"]]
    out = []
    for row in rows:
        rnd = row["round"]
        if rnd < 2:
            continue
        marks = [d.get(rnd, {}) for d in per_device]
        if not all(all(k in m for k in MARKS) for m in marks):
            continue
        devices = [{name: round(m[b] - m[a], 3) for name, (a, b) in PHASES.items()} for m in marks]
        span = max(m["sent"] for m in marks) - min(m["recv"] for m in marks)
        out.append(
            {
                "round": rnd,
                "devices": devices,
                "receive_spread_s": round(max(m["recv"] for m in marks) - min(m["recv"] for m in marks), 3),
                "devices_span_s": round(span, 3),
                "outside_devices_s": round(row["round_s"] - span, 3),
            }
        )
    return out


def summarize(run: dict[str, Any]) -> dict[str, Any]:
    rows = round_rows(run["rounds"])
    steady = [r for r in rows if r["round"] >= 2] or rows
    tl = timeline(run, rows)

    def med(values: list[float]) -> float | None:
        return round(statistics.median(values), 3) if values else None

    breakdown = {name: med([d[name] for r in tl for d in r["devices"]]) for name in PHASES}
    for key in ("receive_spread_s", "devices_span_s", "outside_devices_s"):
        breakdown[key] = med([r[key] for r in tl])
    return {
        "overhead_s": round(statistics.median(r["overhead_s"] for r in steady), 3),
        "round_s": round(statistics.median(r["round_s"] for r in steady), 3),
        "train_max_s": round(statistics.median(r["train_max_s"] for r in steady), 3),
        "first_round": rows[0],
        "rounds": rows,
        "breakdown_median": breakdown,
        "timeline": tl,
        "client_rcs": run["client_rcs"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds: only checks that it runs")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per federation (default 6, quick 2)")
    parser.add_argument("--clients", type=int, default=CLIENTS, help=f"devices (default {CLIENTS})")
    parser.add_argument("--insecure", action="store_true", help="no TLS / node authentication")
    parser.add_argument("--order", default="before,after", help="modes to run, in order (default before,after)")
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
    modes = [m.strip() for m in args.order.split(",") if m.strip()]
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
            started = time.monotonic()
            run = deploy(root, preset, mode, args.insecure, certs, args.clients)
            if args.logs:
                write_logs(Path(args.logs), mode, run, started)
            results[mode] = {**summarize(run), "wall_s": round(time.monotonic() - started, 1)}
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
    if "before" in results and "after" in results:
        report["before_over_after"] = round(
            results["before"]["overhead_s"] / max(results["after"]["overhead_s"], 1e-9), 2
        )
        report["round_before_over_after"] = round(
            results["before"]["round_s"] / max(results["after"]["round_s"], 1e-9), 2
        )
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
