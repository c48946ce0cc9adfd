"""Deployment security and process hygiene: what a device can reach on ``fedlora-server``'s port,
and what is left when ``fedlora-server`` or ``fedlora-client`` is SIGKILLed.

One server (TLS, node authentication, no clients, a long ``--wait-clients``) is started for the
module; an outsider process holding only ``ca.crt`` (which every device gets) then tries, on the
server's one port, each thing issue 15 saw a device do: register its own node key, start its own
run, read the run's logs, stop the run. Every subprocess has a timeout; leftovers are stopped by
pid, never by name.
"""

from __future__ import annotations

import json
import os
import signal
import socket
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
START_TIMEOUT = 180

# The outsider: Flower's own protobuf requests, sent as Flower's HTTP client sends them.
OUTSIDER = r"""
import json, sys, httpx
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.proto import control_pb2, fleet_pb2
from flwr.supercore.primitives.asymmetric import public_key_to_bytes

url, ca = sys.argv[1], sys.argv[2]
key = public_key_to_bytes(ec.generate_private_key(ec.SECP384R1()).public_key())
calls = {
    "register-node": ("/v1/control/register-node", control_pb2.RegisterNodeRequest(public_key=key, name="intruder")),
    "start-run": ("/v1/control/start-run", control_pb2.StartRunRequest()),
    "list-runs": ("/v1/control/list-runs", control_pb2.ListRunsRequest()),
    "stream-logs": ("/v1/control/stream-logs", control_pb2.StreamLogsRequest(run_id=1)),
    "stop-run": ("/v1/control/stop-run", control_pb2.StopRunRequest(run_id=1)),
    "list-nodes": ("/v1/control/list-nodes", control_pb2.ListNodesRequest()),
    "fleet-register-node": ("/v1/fleet/register-node", fleet_pb2.RegisterNodeFleetRequest(public_key=key)),
    "acquire-task": ("/v1/runtime/acquire-task", None),
    "escape": ("/v1/fleet/../control/stop-run", control_pb2.StopRunRequest(run_id=1)),
    "docs": ("/docs", None),
}
out = {}
with httpx.Client(base_url=url, verify=ca, timeout=30) as client:
    for name, (path, msg) in calls.items():
        body = msg.SerializeToString() if msg is not None else b""
        res = client.post(path, content=body, headers={"Content-Type": "application/protobuf"})
        out[name] = [res.status_code, res.text[:200]]
print(json.dumps(out))
"""


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.fixture(scope="module")
def guarded(tiny_bert, tmp_path_factory):
    """A fedlora-server (TLS + --auth-keys) waiting for clients; the outsider's answers; then a
    SIGKILL of the server and which of its processes outlived it."""
    from fedlora.deploy.certs import create_certs

    root = tmp_path_factory.mktemp("guarded")
    cfg = tiny_config(tiny_bert, sets=("name=guarded",))
    (root / "preset.toml").write_text(tomli_w.dumps(cfg.to_dict()))
    files = create_certs(root / "certs", "localhost", nodes=1)
    keys = root / "keys"
    keys.mkdir()
    for pub in files.node_public_keys:
        (keys / pub.name).write_bytes(pub.read_bytes())
    port = _free_port()
    env = _env(root / "flwr-home")
    cmd = [
        str(BIN / "fedlora-server"),
        "preset.toml",
        "--certs",
        "certs",
        "--auth-keys",
        "keys",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--out",
        str(root / "runs" / "guarded"),
        "--wait-clients",
        "400",
    ]
    log = root / "server.log"
    server = subprocess.Popen(
        cmd, cwd=root, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True
    )
    family: set[int] = set()
    try:
        assert _until(
            lambda: "submitted" in log.read_text(errors="replace") or server.poll() is not None, START_TIMEOUT
        )
        assert server.poll() is None, log.read_text(errors="replace")
        outsider = subprocess.run(
            [sys.executable, "-c", OUTSIDER, f"https://localhost:{port}", str(files.ca_cert)],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert outsider.returncode == 0, outsider.stderr
        answers = json.loads(outsider.stdout)
        # Devices the server refuses are told why at once (default --max-wait: 600 s).
        (root / "mine.csv").write_text("text,label\nthe match ended,sports\n")
        device = [str(BIN / "fedlora-client"), "--server", f"127.0.0.1:{port}", "--data", "mine.csv", "--no-worker"]
        refused = {}
        for name, extra in (("no-key", ["--ca", str(files.ca_cert)]), ("insecure", ["--insecure"])):
            began = time.monotonic()
            res = subprocess.run(device + extra, cwd=root, env=env, capture_output=True, text=True, timeout=120)
            refused[name] = (res, time.monotonic() - began)
        time.sleep(1.0)
        still_running = server.poll() is None
        # The run was submitted, so the SuperLink has started its SuperExec and the ServerApp.
        family = _until(lambda: _descendants(server.pid) if len(_descendants(server.pid)) >= 3 else set(), 60)
        names = {pid: _cmdline(pid) for pid in family}
        os.kill(server.pid, signal.SIGKILL)
        server.wait(timeout=10)
        leftovers = _until(lambda: not [p for p in family if process_alive(p)], 30) or [
            names[p] for p in family if process_alive(p)
        ]
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
        _kill_all(family)
    return {
        "answers": answers,
        "refused": refused,
        "still_running": still_running,
        "names": names,
        "leftovers": [] if leftovers is True else leftovers,
        "log": log.read_text(errors="replace"),
        "superlink_log": (root / "runs" / "guarded" / "superlink.log").read_text(errors="replace"),
    }


@pytest.mark.parametrize("action", ["register-node", "start-run", "stream-logs", "stop-run"])
def test_outsider_is_refused_on_the_control_plane(guarded, action):
    status, text = guarded["answers"][action]
    assert status == 403 and "only the Fleet API" in text, (action, status, text)


@pytest.mark.parametrize("action", ["list-runs", "list-nodes", "acquire-task", "escape", "docs"])
def test_nothing_but_the_fleet_api_is_served(guarded, action):
    status, _ = guarded["answers"][action]
    assert status in (403, 404), (action, status)


def test_fleet_registration_is_closed_with_node_authentication(guarded):
    """The Fleet API is reachable (the gateway forwards it) but registering a key there is refused
    by the SuperLink itself when --auth-keys is on."""
    status, text = guarded["answers"]["fleet-register-node"]
    assert 400 <= status < 500 and "only the Fleet API" not in text, (status, text)


def test_run_survives_the_outsider(guarded):
    assert guarded["still_running"], guarded["log"]
    assert "intruder" not in guarded["superlink_log"]


def test_superlink_is_on_loopback_only(guarded):
    superlink = [c for c in guarded["names"].values() if "flower-superlink" in c]
    assert len(superlink) == 1, guarded["names"]
    assert "--host 127.0.0.1" in superlink[0], superlink


def test_sigkill_of_the_server_leaves_no_children(guarded):
    assert any("flower-superexec" in c for c in guarded["names"].values()), guarded["names"]
    assert guarded["leftovers"] == [], "outlived a SIGKILLed fedlora-server"


def test_sigkill_of_the_client_leaves_no_children(tmp_path):
    """fedlora-client against a port that accepts and never answers: its worker and SuperNode
    start (the SuperNode keeps retrying); a SIGKILL of fedlora-client must take both along."""
    data = tmp_path / "local.csv"
    data.write_text("text,label\nthe storm flooded the coast,weather\nthe team won,sports\n")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        cmd = [
            str(BIN / "fedlora-client"),
            "--server",
            f"127.0.0.1:{silent.getsockname()[1]}",
            "--insecure",
            "--data",
            str(data),
            "--max-wait",
            "120",
        ]
        proc = subprocess.Popen(
            cmd,
            cwd=tmp_path,
            env=_env(tmp_path / "flwr-home"),
            stdout=open(tmp_path / "out", "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        family: set[int] = set()
        try:

            def started() -> bool:
                kids = {p: _cmdline(p) for p in _descendants(proc.pid)}
                family.update(kids)
                return any("flower-supernode" in c for c in kids.values()) and any(
                    "fedlora.client.worker" in c for c in kids.values()
                )

            assert _until(started, 90), (tmp_path / "out").read_text()
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            left = _until(lambda: not [p for p in family if process_alive(p)], 20)
            assert left is True, [_cmdline(p) for p in family if process_alive(p)]
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            _kill_all(family)


@pytest.mark.parametrize(
    ("device", "reason"),
    [("no-key", "requires node authentication; pass --key"), ("insecure", "uses TLS; drop --insecure")],
)
def test_refused_device_is_told_why_at_once(guarded, device, reason):
    """A device without --key on an authenticating server, or an --insecure one against TLS, gets
    one line naming the fix within seconds, not "Exit Code: 305" after --max-wait."""
    res, seconds = guarded["refused"][device]
    assert res.returncode == 1, res.stdout + res.stderr
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and reason in err[0], res.stderr
    assert "Exit Code" not in res.stdout + res.stderr
    assert seconds < 45, seconds
