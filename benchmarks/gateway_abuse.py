"""The fleet port under abuse: what an outsider costs a running ``fedlora-server`` (issue 31).

The setup: ``fedlora-server`` with TLS and node authentication (``--auth-keys``, 3 enrolled
keys) and 3 ``fedlora-client`` devices on 127.0.0.1, the tests' tiny BERT on the synthetic task
(as ``benchmarks/deploy_latency.py``), training while an outsider holding no key attacks the
fleet port. Two attacks, one after the other, once round 1 has been logged:

``big_bodies``
    ``ATTACKERS`` (3) concurrent TLS ``POST /v1/fleet/pull-messages`` declaring ``BODY_MB``
    (900) MB each, the body sent as fast as the socket takes it. Measured: each one's status and
    seconds to its answer, the bytes it got to send first, and the peak rise of the RSS of the
    server's whole process tree (launcher with its gateway, SuperLink, SuperExec, ServerApp) over
    its level just before. Targets: each answered 4xx within 5 s, RSS rise <= 300 MB.
``half_open``
    ``FLOOD`` (3,000) TLS connections that complete the handshake, send half a request line and
    stop, from 30 loopback addresses (127.0.0.2-31: a distributed outsider, so the total cap is
    what holds them, not only the per-address one). Measured: the peak RSS rise of the tree, the
    gateway process's threads, seconds until the server has closed every one of them, and a
    fresh request's latency while they sit and after they are gone. Targets: RSS rise <= 200
    MB, <= 100 threads, all dropped within 60 s, each probe answered within 1 s.

Then the federation must finish: ``deployment`` has the server's exit status and the clients
per round (all 3 every round is the target). ``--quick`` shrinks the attacks (3 x 64 MB, 300
connections) and the run, and keeps every key.

Usage: python benchmarks/gateway_abuse.py [--quick] [--out [results.json]]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, quiet_libraries  # noqa: E402
from deploy_latency import Timestamped, free_port, run_config  # noqa: E402

BIN = Path(sys.executable).parent
CLIENTS = 3
ATTACKERS = 3
TARGETS = {"big_answer_s": 5.0, "big_rss_mb": 300.0, "flood_rss_mb": 200.0, "flood_threads": 100, "drop_s": 60.0}
PROBE_S = 1.0
FLOOD_SCRIPT = r"""
import json, socket, ssl, sys, time
port, ca, n, sources = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ctx = ssl.create_default_context(cafile=ca)
socks, failed = [], 0
for i in range(n):
    try:
        raw = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(f"127.0.0.{2 + i % sources}", 0))
        s = ctx.wrap_socket(raw, server_hostname="localhost")
        s.sendall(b"POST /v1/fleet/pull-mes")
        s.setblocking(False)
        socks.append(s)
    except OSError:
        failed += 1
print(json.dumps({"opened": len(socks), "failed": failed}), flush=True)
began, open_ = time.monotonic(), set(range(len(socks)))
while open_ and time.monotonic() - began < float(sys.argv[5]):
    for i in list(open_):
        try:
            if socks[i].recv(1) == b"":
                open_.discard(i)
        except (ssl.SSLWantReadError, BlockingIOError):
            pass
        except OSError:
            open_.discard(i)
    time.sleep(0.2)
took = round(time.monotonic() - began, 1) if not open_ else None
print(json.dumps({"all_dropped_s": took, "left": len(open_)}), flush=True)
for s in socks:
    s.close()
"""


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def status_field(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class Sampler:
    """The tree's RSS (MB) and the launcher's threads, sampled every 0.1 s in a thread."""

    def __init__(self, pid: int):
        self.pid = pid
        self.samples: list[tuple[float, float, int]] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = sum(status_field(p, "VmRSS") for p in tree(self.pid)) / 1024
            self.samples.append((time.monotonic(), rss, status_field(self.pid, "Threads")))
            time.sleep(0.1)

    def level(self, seconds: float = 1.0) -> float:
        time.sleep(seconds)
        recent = [s[1] for s in self.samples[-int(seconds * 10) :]]
        return sorted(recent)[len(recent) // 2]

    def peak_since(self, t0: float) -> tuple[float, int]:
        window = [s for s in self.samples if s[0] >= t0] or self.samples[-1:]
        return max(s[1] for s in window), max(s[2] for s in window)

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(2)


def tls_socket(port: int, ca: Path) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return ssl.create_default_context(cafile=str(ca)).wrap_socket(raw, server_hostname="localhost")


def big_body(port: int, ca: Path, megabytes: int, out: dict[str, Any]) -> None:
    """Declare ``megabytes`` MB and send zeros until the server answers (or 65 s pass)."""
    began = time.monotonic()
    sent = 0
    try:
        sock = tls_socket(port, ca)
        head = f"POST /v1/fleet/pull-messages HTTP/1.1\r\nHost: x\r\nContent-Length: {megabytes << 20}\r\n\r\n"
        sock.sendall(head.encode())
        sock.settimeout(0.0)
        chunk = b"\0" * (1 << 20)
        answer = b""
        while time.monotonic() - began < 65 and sent < megabytes << 20:
            try:
                answer = sock.recv(4096)
                break
            except (ssl.SSLWantReadError, BlockingIOError):
                pass
            try:
                sent += sock.send(chunk)
            except (ssl.SSLWantWriteError, BlockingIOError):
                time.sleep(0.001)
            except OSError:  # closed after answering: the answer may still be waiting unread
                sock.settimeout(2.0)
                answer = sock.recv(4096)
                break
        out["status"] = int(answer.split()[1]) if answer.startswith(b"HTTP/") else None
    except OSError as err:
        out["status"] = None
        out["error"] = type(err).__name__
    out["answer_s"] = round(time.monotonic() - began, 3)
    out["sent_mb"] = round(sent / 2**20, 1)


def probe(port: int, ca: Path) -> dict[str, Any]:
    """A fresh TLS connection and an unauthenticated Fleet call: its status and latency."""
    began = time.monotonic()
    try:
        with tls_socket(port, ca) as sock:
            sock.sendall(b"POST /v1/fleet/pull-messages HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
            answer = sock.recv(4096)
        status = int(answer.split()[1]) if answer.startswith(b"HTTP/") else None
    except OSError as err:
        status = type(err).__name__
    return {"status": status, "seconds": round(time.monotonic() - began, 3)}


def attack_big(port: int, ca: Path, sampler: Sampler, megabytes: int) -> dict[str, Any]:
    base = sampler.level()
    t0 = time.monotonic()
    results: list[dict[str, Any]] = [{} for _ in range(ATTACKERS)]
    threads = [threading.Thread(target=big_body, args=(port, ca, megabytes, r)) for r in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(1.0)
    peak, _ = sampler.peak_since(t0)
    return {
        "declared_mb": megabytes,
        "requests": results,
        "rss_before_mb": round(base),
        "rss_rise_mb": round(peak - base),
    }


def attack_flood(port: int, ca: Path, sampler: Sampler, n: int) -> dict[str, Any]:
    base = sampler.level()
    t0 = time.monotonic()
    flood = subprocess.Popen(
        [sys.executable, "-c", FLOOD_SCRIPT, str(port), str(ca), str(n), "30", "90"],
        stdout=subprocess.PIPE,
        text=True,
    )
    opened = json.loads(flood.stdout.readline())
    during = probe(port, ca)
    dropped = json.loads(flood.stdout.readline())
    flood.wait(30)
    after = probe(port, ca)
    peak, threads = sampler.peak_since(t0)
    return {
        "connections": n,
        **opened,
        **dropped,
        "probe_during": during,
        "probe_after": after,
        "rss_before_mb": round(base),
        "rss_rise_mb": round(peak - base),
        "gateway_process_threads": threads,
    }


def verdict(big: dict[str, Any], flood: dict[str, Any], deployment: dict[str, Any]) -> dict[str, bool]:
    answered = all(
        r.get("status") is not None and 400 <= r["status"] < 500 and r["answer_s"] <= TARGETS["big_answer_s"]
        for r in big["requests"]
    )
    probes = [flood["probe_during"], flood["probe_after"]]
    return {
        "big_bodies_answered_4xx_within_5s": answered,
        "big_bodies_rss_rise_le_300mb": big["rss_rise_mb"] <= TARGETS["big_rss_mb"],
        "flood_rss_rise_le_200mb": flood["rss_rise_mb"] <= TARGETS["flood_rss_mb"],
        "flood_threads_le_100": flood["gateway_process_threads"] <= TARGETS["flood_threads"],
        "flood_all_dropped_within_60s": flood["all_dropped_s"] is not None
        and flood["all_dropped_s"] <= TARGETS["drop_s"],
        "probes_answered_within_1s": all(isinstance(p["status"], int) and p["seconds"] <= PROBE_S for p in probes),
        "deployment_finished": deployment["server_rc"] == 0
        and all(n == CLIENTS for n in deployment["clients_per_round"]),
    }


def start(root: Path, preset: Path, certs: Any) -> tuple[Timestamped, list[Timestamped], int, Path]:
    env = dict(os.environ, FLWR_HOME=str(root / "flwr-home"), PYTHONUNBUFFERED="1")
    env["PATH"] = str(BIN) + os.pathsep + env.get("PATH", "")
    port = free_port()
    run_dir = root / "runs" / "abuse"
    cmd = [str(BIN / "fedlora-server"), str(preset), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--out", str(run_dir), "--wait-clients", "120", "--certs", str(certs.ca_cert.parent)]
    cmd += ["--auth-keys", str(root / "auth")]
    server = Timestamped(cmd, root, env)
    clients = []
    for i in range(CLIENTS):
        c = [
            str(BIN / "fedlora-client"),
            "--server",
            f"127.0.0.1:{port}",
            "--data",
            str(root / "data" / f"client{i}.csv"),
        ]
        c += [
            "--partition-id",
            str(i),
            "--max-wait",
            "120",
            "--ca",
            str(certs.ca_cert),
            "--key",
            str(certs.node_keys[i]),
        ]
        clients.append(Timestamped(c, root, env))
    return server, clients, port, run_dir


def run(root: Path, quick: bool) -> dict[str, Any]:
    import tomli_w

    from fedlora.data import write_partitions
    from fedlora.data.synthetic import write_tiny_bert
    from fedlora.deploy.certs import create_certs

    cfg = run_config(write_tiny_bert(root / "tiny-bert"), 8 if quick else 30, CLIENTS)
    preset = root / "preset.toml"
    preset.write_text(tomli_w.dumps(cfg.to_dict()))
    write_partitions(cfg, root / "data", CLIENTS)
    certs = create_certs(root / "certs", "localhost", nodes=CLIENTS)
    (root / "auth").mkdir()
    for pub in certs.node_public_keys:
        (root / "auth" / pub.name).write_bytes(pub.read_bytes())
    server, clients, port, run_dir = start(root, preset, certs)
    sampler = Sampler(server.proc.pid)
    try:
        deadline = time.monotonic() + 300
        while "round 1" not in server.text() and server.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        if "round 1" not in server.text():
            raise RuntimeError(f"the federation did not start:\n{server.text()[-3000:]}")
        big = attack_big(port, certs.ca_cert, sampler, 64 if quick else 900)
        flood = attack_flood(port, certs.ca_cert, sampler, 300 if quick else 3000)
        rc = server.proc.wait(timeout=900)
    finally:
        sampler.stop()
        for p in [server, *clients]:
            p.kill()
    rounds = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    refusals = [line for line in server.text().splitlines() if "fleet port refused" in line]
    deployment = {
        "server_rc": rc,
        "rounds": len(rounds),
        "clients_per_round": [len(r["clients"]) for r in rounds],
        "refusal_log_lines": refusals,
    }
    return {"big_bodies": big, "half_open": flood, "deployment": deployment}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 x 64 MB and 300 connections: only checks that it runs")
    parser.add_argument(
        "--out",
        nargs="?",
        const=str(Path(__file__).resolve().parent / "results" / "gateway_abuse.json"),
        help="also write the JSON here (no path: benchmarks/results/gateway_abuse.json)",
    )
    args = parser.parse_args()
    quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="fedlora-gateway-abuse-") as tmp:
        results = run(Path(tmp), args.quick)
    report = {
        "benchmark": "gateway_abuse",
        "quick": args.quick,
        "setup": {"clients": CLIENTS, "tls": True, "node_auth": True, "attackers": ATTACKERS, "cpus": os.cpu_count()},
        **results,
        "targets": TARGETS,
        "targets_met": verdict(results["big_bodies"], results["half_open"], results["deployment"]),
    }
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
