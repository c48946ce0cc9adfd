"""Deployment on a bad day: a device SIGKILLed mid-round, a server host SIGKILLed and resumed.

Two federations of real ``fedlora-server`` / ``fedlora-client`` processes on 127.0.0.1 (TLS,
node authentication, FedAvg on a tiny BERT, each client on its own partition):

* ``client_killed``: one device is SIGKILLed right after it trained round 1, so round 2 is sent
  to a node that cannot answer; once the server has named it, the device is started again and
  must be sampled again by the last round.
* ``server_killed``: the server is SIGKILLed after round 2's checkpoint and started again with
  ``--resume``; the devices reconnect by themselves, the run ends, and its adapter equals the
  uninterrupted in-process simulation's to float tolerance.

In both, every device ends by itself with exit 0 and "the federation is over". Every subprocess
has a timeout; leftovers are stopped by pid, never by name.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli_w
from conftest import descendants as _descendants
from conftest import flower_env as _env
from conftest import free_port as _free_port
from conftest import kill_all as _kill_all
from conftest import process_alive, tiny_config
from conftest import until as _until

pytestmark = pytest.mark.deployment

BIN = Path(sys.executable).parent
#: Flower marks a SIGKILLed node offline after 2 missed 30 s heartbeats: the round waits that long.
RUN_TIMEOUT = 300


class Federation:
    """A server and three devices in ``root``, with their logs, started and stopped by pid."""

    def __init__(self, root: Path, preset: Path, certs, rounds: int):
        self.root, self.preset, self.certs, self.rounds = root, preset, certs, rounds
        self.env = _env(root / "flwr-home")
        self.port = _free_port()
        self.server: subprocess.Popen | None = None
        self.clients: dict[int, subprocess.Popen] = {}
        self.pids: set[int] = set()
        self.starts = 0

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start_server(self, *extra: str) -> None:
        self.starts += 1
        cmd = [
            str(BIN / "fedlora-server"),
            str(self.preset),
            "--certs",
            str(self.root / "certs"),
            "--auth-keys",
            str(self.root / "keys"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--out",
            str(self.root / "runs" / "run"),
            "--wait-clients",
            "120",
            "--round-timeout",
            "150",
            *extra,
        ]
        out = open(self.root / f"server{self.starts}.log", "wb")
        self.server = subprocess.Popen(
            cmd, cwd=self.root, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.pids.add(self.server.pid)

    def start_client(self, i: int, log: str | None = None) -> None:
        cmd = [
            str(BIN / "fedlora-client"),
            "--server",
            f"127.0.0.1:{self.port}",
            "--ca",
            str(self.certs.ca_cert),
            "--key",
            str(self.certs.node_keys[i]),
            "--data",
            str(self.root / "data" / f"client{i}.csv"),
            "--partition-id",
            str(i),
            "--max-wait",
            "120",
        ]
        out = open(self.root / f"{log or f'client{i}'}.log", "wb")
        self.clients[i] = subprocess.Popen(
            cmd, cwd=self.root, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.pids.add(self.clients[i].pid)

    def note_children(self) -> None:
        for proc in [self.server, *self.clients.values()]:
            if proc is not None and proc.poll() is None:
                self.pids |= _descendants(proc.pid)

    def wait_for(self, predicate, timeout: float) -> bool:
        def check():
            self.note_children()
            return predicate()

        return bool(_until(check, timeout, poll=0.3))

    def stop(self) -> None:
        for proc in [self.server, *self.clients.values()]:
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        _kill_all(self.pids)


@pytest.fixture(scope="module")
def kit(tiny_bert, tmp_path_factory):
    """Preset, partitions, certificates and keys shared by both federations."""
    from fedlora.deploy.certs import create_certs

    root = tmp_path_factory.mktemp("recovery")
    cfg = tiny_config(tiny_bert, sets=("data.partitioner=iid", "name=recovery", "rounds=4"))
    preset = root / "preset.toml"
    preset.write_text(tomli_w.dumps(cfg.to_dict()))
    subprocess.run(
        [str(BIN / "fedlora"), "partition", str(preset), "--out", str(root / "data")],
        cwd=root,
        env=_env(root / "flwr-home"),
        check=True,
        timeout=120,
        capture_output=True,
    )
    certs = create_certs(root / "certs", "localhost", nodes=3)
    (root / "keys").mkdir()
    for pub in certs.node_public_keys:
        (root / "keys" / pub.name).write_bytes(pub.read_bytes())
    return root, preset, certs, cfg


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return ""


def _federation(kit, name: str, rounds: int) -> Federation:
    root, preset, certs, _ = kit
    here = root / name
    here.mkdir()
    for item in ("data", "certs", "keys"):
        (here / item).symlink_to(root / item)
    return Federation(here, preset, certs, rounds)


def _finish(fed: Federation) -> dict:
    """Wait for the server and then for every device to end by itself; what the tests read."""
    deadline = time.monotonic() + RUN_TIMEOUT
    fed.wait_for(lambda: fed.server.poll() is not None, max(deadline - time.monotonic(), 1))
    server_rc = fed.server.wait(timeout=10)
    ended = fed.wait_for(lambda: all(p.poll() is not None for p in fed.clients.values()), 60)
    rcs = {i: p.poll() for i, p in fed.clients.items()}
    return {"server_rc": server_rc, "devices_ended": ended, "client_rcs": rcs}


#: Rounds of the client-crash federation: after the round that names the killed device, enough
#: rounds (about 4 s each with the worker taking its SuperNode's tasks) for the restarted device
#: to start, join and be sampled in the last one.
KILLED_ROUNDS = 7


@pytest.fixture(scope="module")
def client_killed(kit):
    fed = _federation(kit, "client-killed", KILLED_ROUNDS)
    try:
        fed.start_server("--set", f"rounds={KILLED_ROUNDS}")
        for i in range(3):
            fed.start_client(i)
        # Device 2 trains round 1 and is SIGKILLed: round 2 is sent to a node that cannot answer.
        assert fed.wait_for(lambda: "round 1: trained" in fed.log("client2"), RUN_TIMEOUT), fed.log("server1")
        os.kill(fed.clients[2].pid, signal.SIGKILL)
        fed.clients[2].wait(timeout=10)
        named = fed.wait_for(lambda: "DROPPED" in fed.log("server1") or fed.server.poll() is not None, RUN_TIMEOUT)
        fed.start_client(2, log="client2-again")
        result = _finish(fed)
        return {**result, "named": named, "server_log": fed.log("server1"), "fed": fed}
    finally:
        fed.stop()


def test_killed_client_is_named_as_gone(client_killed):
    """Killed as it finished training round 1 (its reply sent or not, a race the test leaves to
    chance), the device is named as gone in round 1 or 2, once Flower stops hearing it; the
    round then goes on with the other two."""
    d = client_killed
    assert d["server_rc"] == 0, d["server_log"]
    dropped = [ln for ln in d["server_log"].splitlines() if "DROPPED" in ln]
    early = (f"round 1/{KILLED_ROUNDS}", f"round 2/{KILLED_ROUNDS}")
    assert len(dropped) == 1 and dropped[0].startswith(early), d["server_log"]
    assert "stopped answering mid-round" in dropped[0], dropped[0]
    assert "not sent a message" not in d["server_log"] and "round timeout" not in d["server_log"]
    rounds = [json.loads(ln) for ln in (d["fed"].root / "runs/run/metrics.jsonl").read_text().splitlines()]
    hit = int(dropped[0].split("/")[0].split()[-1])
    assert rounds[hit - 1]["clients_ok"] == 2 and rounds[hit - 1]["dropped"][0]["reason"].startswith(
        "the node stopped answering"
    ), rounds[hit - 1]


def test_restarted_client_is_sampled_again(client_killed):
    d = client_killed
    rounds = [json.loads(ln) for ln in (d["fed"].root / "runs/run/metrics.jsonl").read_text().splitlines()]
    assert rounds[-1]["round"] == KILLED_ROUNDS and rounds[-1]["clients_ok"] == 3, rounds
    again = d["fed"].log("client2-again")
    assert f"round {KILLED_ROUNDS}: trained" in again, again


def test_devices_end_by_themselves_after_a_client_crash(client_killed):
    d = client_killed
    assert d["devices_ended"] and d["client_rcs"] == {0: 0, 1: 0, 2: 0}, d["client_rcs"]
    for name in ("client0", "client1", "client2-again"):
        log = d["fed"].log(name)
        assert f"fedlora-client: the federation is over: run 'recovery' completed {KILLED_ROUNDS} rounds" in log, log


@pytest.fixture(scope="module")
def server_killed(kit):
    fed = _federation(kit, "server-killed", 4)
    try:
        fed.start_server()
        for i in range(3):
            fed.start_client(i)
        checkpoint = fed.root / "runs" / "run" / "checkpoints" / "round_0002.json"
        assert fed.wait_for(lambda: checkpoint.exists() or fed.server.poll() is not None, RUN_TIMEOUT)
        assert fed.server.poll() is None, fed.log("server1")
        family = _descendants(fed.server.pid)
        os.kill(fed.server.pid, signal.SIGKILL)  # the server host goes down
        fed.server.wait(timeout=10)
        names = {p: _cmdline(p) for p in family}
        gone = _until(lambda: not any(process_alive(p) for p in family), 60) or [
            names[p] for p in family if process_alive(p)
        ]
        fed.start_server("--resume")
        result = _finish(fed)
        logs = {i: fed.log(f"client{i}") for i in range(3)}
        return {**result, "server_gone": gone, "logs": logs, "server_log": fed.log("server2"), "fed": fed}
    finally:
        fed.stop()


def test_resumed_server_gets_its_devices_back(server_killed):
    d = server_killed
    assert d["server_gone"] is True, f"the SIGKILLed server's processes outlived it: {d['server_gone']}"
    assert d["server_rc"] == 0, d["server_log"]
    assert "resuming recovery after round 2/4" in d["server_log"], d["server_log"]
    rounds = [json.loads(ln) for ln in (d["fed"].root / "runs/run/metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4] and all(r["clients_ok"] == 3 for r in rounds), rounds
    for log in d["logs"].values():
        assert "lost the connection to the server; reconnecting" in log and "round 4: trained" in log, log
        assert "Connection attempt failed" not in log and "refused this node" not in log, log


def test_devices_end_by_themselves_after_the_resume(server_killed):
    d = server_killed
    assert d["devices_ended"] and d["client_rcs"] == {0: 0, 1: 0, 2: 0}, d["logs"]
    for log in d["logs"].values():
        assert "fedlora-client: the federation is over: run 'recovery' completed 4 rounds" in log, log


def test_resumed_adapter_equals_the_uninterrupted_run(server_killed, kit, tmp_path):
    from safetensors.torch import load_file

    from fedlora.simulations.runtime import simulate

    result = simulate(kit[3], out=tmp_path / "sim", report=False)
    sim = load_file(str(Path(result.adapter_dir) / "adapter_model.safetensors"))
    dep = load_file(str(server_killed["fed"].root / "runs" / "run" / "adapter" / "adapter_model.safetensors"))
    assert sim.keys() == dep.keys()
    for key in sim:
        assert (sim[key] - dep[key]).abs().max().item() < 1e-5, key
