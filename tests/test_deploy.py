"""Deployment end to end: real ``fedlora-server`` and ``fedlora-client`` processes on 127.0.0.1,
over Flower's SuperLink/SuperNode with TLS and node authentication.

One federation (3 authorised clients, 3 rounds of FLoRA on a tiny BERT, int8 transport: the
stateful downlink of the base change and the quantized wire both cross real processes) runs once
for the module; while its
server waits for them, a client with an unauthorised key and one trusting the wrong CA try to
join. Every subprocess has a timeout, and leftovers are stopped by pid, never by name.
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
RUN_TIMEOUT = 240


def _start(args: list[str], cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        args, cwd=cwd, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True
    )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def deployment(tiny_bert, tmp_path_factory):
    """Run the federation once; return what every test below checks."""
    from fedlora.deploy.certs import create_certs

    root = tmp_path_factory.mktemp("deploy")
    cfg = tiny_config(
        tiny_bert,
        strategy="flora",
        sets=("data.partitioner=iid", "name=deployed", "rounds=3", "federation.transport_quantize=int8"),
    )
    preset = root / "preset.toml"
    preset.write_text(tomli_w.dumps(cfg.to_dict()))
    env = _env(root / "flwr-home")
    subprocess.run(
        [str(BIN / "fedlora"), "partition", str(preset), "--out", str(root / "data")],
        cwd=root,
        env=env,
        check=True,
        timeout=120,
        capture_output=True,
    )
    files = create_certs(root / "certs", "localhost", nodes=4)
    authorised = root / "authorised"
    authorised.mkdir()
    for pub in files.node_public_keys[:3]:  # node4 is not authorised
        (authorised / pub.name).write_bytes(pub.read_bytes())
    other = create_certs(root / "other-ca", "localhost", nodes=0)

    port = _free_port()
    server_cmd = [
        str(BIN / "fedlora-server"),
        str(preset),
        "--certs",
        str(root / "certs"),
        "--auth-keys",
        str(authorised),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--out",
        str(root / "runs" / "dep"),
        "--wait-clients",
        "120",
        "--round-timeout",
        "120",
    ]
    started = time.monotonic()
    server = _start(server_cmd, root, env, root / "server.log")
    clients, children, intruders = [], {}, []
    try:
        base = [
            str(BIN / "fedlora-client"),
            "--server",
            f"127.0.0.1:{port}",
            "--data",
            str(root / "data" / "client0.csv"),
            "--max-retries",
            "10",
        ]
        # Before the authorised clients start, the server is certainly up (waiting for them): a
        # run over by then would leave these two retrying against a closed port.
        for args in (
            base + ["--ca", str(files.ca_cert), "--key", str(files.node_keys[3])],
            base + ["--ca", str(other.ca_cert)],
        ):
            intruders.append(
                subprocess.Popen(args, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            )
        outputs = [p.communicate(timeout=120) for p in intruders]
        refused, wrong_ca = (
            subprocess.CompletedProcess(p.args, p.returncode, out, err) for p, (out, err) in zip(intruders, outputs)
        )
        for i in range(3):
            cmd = [
                str(BIN / "fedlora-client"),
                "--server",
                f"127.0.0.1:{port}",
                "--ca",
                str(files.ca_cert),
                "--data",
                str(root / "data" / f"client{i}.csv"),
                "--key",
                str(files.node_keys[i]),
                "--partition-id",
                str(i),
                "--max-wait",
                "60",
            ]
            clients.append(_start(cmd, root, env, root / f"client{i}.log"))
        deadline = time.monotonic() + RUN_TIMEOUT
        while server.poll() is None and time.monotonic() < deadline:  # note every process the clients start
            for proc in clients:
                children[proc.pid] = children.get(proc.pid, set()) | _descendants(proc.pid)
            time.sleep(0.5)
        server_rc = server.wait(timeout=max(deadline - time.monotonic(), 1))
        run_seconds = time.monotonic() - started
        # The run is over: the server told every device so, and each ends by itself.
        ended = _until(lambda: all(p.poll() is not None for p in clients), 60)
        for proc in clients:
            if proc.poll() is None:
                children[proc.pid] |= _descendants(proc.pid)
                proc.send_signal(signal.SIGTERM)  # an operator's stop, for a device that did not end
        client_rcs = [proc.wait(timeout=60) for proc in clients]
        time.sleep(1.0)
        leftovers = sorted(p for kids in children.values() for p in kids if process_alive(p))
    finally:
        for proc in intruders:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        for proc in [server, *clients]:
            _stop(proc)
    return {
        "root": root,
        "cfg": cfg,
        "run_dir": root / "runs" / "dep",
        "server_rc": server_rc,
        "server_log": (root / "server.log").read_text(errors="replace"),
        "client_rcs": client_rcs,
        "devices_ended": bool(ended),
        "client_logs": [(root / f"client{i}.log").read_text(errors="replace") for i in range(3)],
        "refused": refused,
        "wrong_ca": wrong_ca,
        "leftovers": leftovers,
        "device_processes": [sorted(children.get(p.pid, set())) for p in clients],
        "seconds": run_seconds,
    }


def test_three_rounds_over_tls_with_node_authentication(deployment):
    d = deployment
    assert d["server_rc"] == 0, d["server_log"]
    rounds = [json.loads(line) for line in (d["run_dir"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert all(r["clients_ok"] == 3 and not r["dropped"] for r in rounds)
    assert "TLS, node authentication" in d["server_log"]
    assert "round 3/3  global adapter" in d["server_log"]
    for log in d["client_logs"]:
        assert "round 3: trained rank 4" in log, log
    # Clients reported what they have: the server knows each one's rank, device and precision,
    # prints the table before round 1 and keeps it in the run directory.
    assert d["server_log"].count("joined: rank 4, none float32 on cpu") == 3
    assert d["server_log"].index("3 node(s):") < d["server_log"].index("round 1/3")
    nodes = json.loads((d["run_dir"] / "nodes.json").read_text())
    assert len(nodes) == 3 and {(n["rank"], n["device"], n["quantization"]) for n in nodes} == {(4, "cpu", "none")}


def test_devices_receive_only_the_new_base_change(deployment):
    """Round 2 sends FLoRA's first merge whole; in round 3 each device (its state kept by its
    SuperNode between messages) receives only round 2's link and replays it to the server's
    digest: the downlink does not grow."""
    rounds = [json.loads(line) for line in (deployment["run_dir"] / "metrics.jsonl").read_text().splitlines()]
    assert rounds[2]["bytes_down"] <= 1.1 * rounds[1]["bytes_down"]
    assert rounds[1]["bytes_down"] > 1.5 * rounds[0]["bytes_down"]  # the base change travelled


def test_each_device_keeps_one_worker(deployment):
    """Every message of the run went to one long-lived worker per device (started once, never
    restarted), which takes the SuperNode's tasks itself: a device runs its SuperNode and its
    worker and no process per message (Flower's SuperExec would start one ``flwr-clientapp`` per
    message, 5 here). The per-round latency this saves is measured by benchmarks/deploy_latency.py."""
    for log in deployment["client_logs"]:
        assert log.count("fedlora-client: worker ready") == 1 and "restarting it" not in log, log
    for pids in deployment["device_processes"]:
        assert len(pids) == 2, pids  # seen every 0.5 s during the run: a 2-s ClientApp process shows


def test_adapter_loads_in_peft(deployment):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    adapter = deployment["run_dir"] / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    meta = json.loads((adapter / "fedlora.json").read_text())
    base = AutoModelForSequenceClassification.from_pretrained(
        deployment["cfg"].model.name, num_labels=len(meta["labels"])
    )
    model = PeftModel.from_pretrained(base, str(adapter))
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[2, 10, 11, 3]])).logits
    assert out.shape == (1, len(meta["labels"])) and torch.isfinite(out).all()


def test_processes_exit_cleanly(deployment):
    assert deployment["server_rc"] == 0
    assert deployment["devices_ended"] and deployment["client_rcs"] == [0, 0, 0], deployment["client_logs"]
    for log in deployment["client_logs"]:
        assert "fedlora-client: the federation is over: run 'deployed' completed 3 rounds" in log, log
        # A normal join and a normal end: no retry noise.
        assert "Connection attempt failed" not in log and "refused this node" not in log, log
    assert deployment["leftovers"] == [], "SuperNode/ClientApp processes outlived their fedlora-client"


def test_unauthorised_key_is_refused(deployment):
    res = deployment["refused"]
    assert res.returncode == 1, res.stdout + res.stderr
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "refused this node" in err[0] and "--auth-keys" in err[0], res.stderr


def test_wrong_ca_cannot_connect(deployment):
    res = deployment["wrong_ca"]
    assert res.returncode == 1
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "does not trust" in err[0] and "--ca" in err[0], res.stderr


def test_same_adapter_as_in_process_simulation(deployment, tmp_path):
    from safetensors.torch import load_file

    from fedlora.simulations.runtime import simulate

    result = simulate(deployment["cfg"], out=tmp_path / "sim", report=False)
    sim = load_file(str(Path(result.adapter_dir) / "adapter_model.safetensors"))
    dep = load_file(str(deployment["run_dir"] / "adapter" / "adapter_model.safetensors"))
    assert sim.keys() == dep.keys()
    for key in sim:
        assert (sim[key] - dep[key]).abs().max().item() < 1e-5, key


# -- bad input: one line, non-zero exit, no hang ---------------------------------------------------


def _run(args: list[str], cwd: Path, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=_env(cwd / "flwr-home"), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def kit(tmp_path_factory, tiny_bert):
    from fedlora.deploy.certs import create_certs

    root = tmp_path_factory.mktemp("badinput")
    cfg = tiny_config(tiny_bert)
    (root / "preset.toml").write_text(tomli_w.dumps(cfg.to_dict()))
    (root / "local.csv").write_text("text,label\nthe storm flooded the coast,weather\nthe team won,sports\n")
    create_certs(root / "certs", "localhost", nodes=1)
    return root


def test_client_gives_up_on_unreachable_server(kit):
    start = time.monotonic()
    res = _run(
        [
            str(BIN / "fedlora-client"),
            "--server",
            f"127.0.0.1:{_free_port()}",
            "--ca",
            "certs/ca.crt",
            "--data",
            "local.csv",
            "--max-retries",
            "2",
        ],
        kit,
    )
    assert res.returncode == 1
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "cannot reach the server" in err[0] and "after 3 attempts" in err[0], res.stderr
    assert time.monotonic() - start < 30  # backoff 1 s, 2 s: bounded


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--ca", "certs/missing.crt", "--data", "local.csv"], "--ca certs/missing.crt: no such file"),
        (["--ca", "certs/ca.crt", "--data", "nope.csv"], "--data nope.csv: no such file"),
        (["--ca", "certs/ca.crt", "--data", "local.csv", "--key", "certs/ca.crt"], "not an unencrypted OpenSSH"),
        (["--data", "local.csv"], "--ca CA_CERT is required"),
        (["--ca", "certs/ca.crt", "--data", "local.csv", "--rank", "0"], "--rank: must be an integer >= 1 or auto"),
    ],
)
def test_client_rejects_bad_input(kit, args, expected):
    res = _run([str(BIN / "fedlora-client"), "--server", "127.0.0.1:9", *args], kit)
    assert res.returncode == 2
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and expected in err[0], res.stderr


def test_client_rejects_bad_server_address(kit):
    res = _run(
        [str(BIN / "fedlora-client"), "--server", "https://x", "--ca", "certs/ca.crt", "--data", "local.csv"], kit
    )
    assert res.returncode == 2 and "--server must be HOST:PORT" in res.stderr


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--certs", "nowhere"], "--certs nowhere: not a folder"),
        (["--certs", "certs", "--set", "strategy.name=nope"], "strategy"),
        (["--certs", "certs", "--set", "model.name=/no/such/model"], "/no/such/model"),
        (["--insecure", "--auth-keys", "certs/nodes"], "--auth-keys needs TLS"),
        ([], "--certs DIR is required"),
    ],
)
def test_server_rejects_bad_input(kit, args, expected):
    out = kit / "runs" / f"bad-{abs(hash(tuple(args)))}"
    res = _run(
        [
            str(BIN / "fedlora-server"),
            "preset.toml",
            "--host",
            "127.0.0.1",
            "--port",
            str(_free_port()),
            "--out",
            str(out),
            *args,
        ],
        kit,
    )
    assert res.returncode == 2, res.stdout + res.stderr
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and expected in err[0], res.stderr
    assert not out.exists()  # a rejected preset leaves no run directory behind


def test_server_rejects_port_in_use(kit):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = _run(
            [
                str(BIN / "fedlora-server"),
                "preset.toml",
                "--certs",
                "certs",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--out",
                str(kit / "runs" / "busy"),
            ],
            kit,
        )
    assert res.returncode == 2 and "cannot listen there" in res.stderr, res.stderr


def test_server_gives_up_when_clients_do_not_come(kit):
    start = time.monotonic()
    res = _run(
        [
            str(BIN / "fedlora-server"),
            "preset.toml",
            "--certs",
            "certs",
            "--host",
            "127.0.0.1",
            "--port",
            str(_free_port()),
            "--out",
            str(kit / "runs" / "lonely"),
            "--wait-clients",
            "3",
        ],
        kit,
        timeout=120,
    )
    assert res.returncode == 1, res.stdout + res.stderr
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "only 0 of 3 clients connected within 3 s" in err[0], res.stdout + res.stderr
    assert time.monotonic() - start < 90


# -- the device's worker process -------------------------------------------------------------------


@pytest.fixture
def silent_server():
    """A port that accepts connections and never answers: fedlora-client --insecure gets past its
    reachability check and starts its worker and SuperNode (which keeps retrying)."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(64)
        yield srv.getsockname()[1]


def _workers(pid: int) -> set[int]:
    found = set()
    for child in _descendants(pid):
        try:
            if "fedlora.client.worker" in Path(f"/proc/{child}/cmdline").read_text():
                found.add(child)
        except OSError:
            pass
    return found


def _client_on(kit: Path, port: int, name: str) -> subprocess.Popen:
    cmd = [str(BIN / "fedlora-client"), "--server", f"127.0.0.1:{port}", "--insecure", "--data", "local.csv"]
    return subprocess.Popen(
        cmd + ["--max-wait", "120"],
        cwd=kit,
        env=_env(kit / "flwr-home"),
        stdout=open(kit / f"{name}.out", "wb"),
        stderr=open(kit / f"{name}.err", "wb"),
        start_new_session=True,
    )


def test_worker_ends_when_the_client_is_killed(kit, silent_server):
    """A SIGKILL of fedlora-client gives its worker no chance to be stopped: it must notice."""
    proc = _client_on(kit, silent_server, "killed")
    family: set[int] = set()
    try:
        workers = _until(lambda: _workers(proc.pid), 60)
        assert workers, (kit / "killed.out").read_text()
        family = _descendants(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert _until(lambda: not any(process_alive(w) for w in workers), 10), "the worker outlived fedlora-client"
    finally:
        _stop(proc)
        _kill_all(family)  # the orphaned SuperNode (its own session) and its SuperExec


def test_dead_worker_is_restarted_then_given_up(kit, silent_server):
    from fedlora.client.device import WORKER_RESTARTS

    proc = _client_on(kit, silent_server, "restarts")
    family: set[int] = set()
    killed: set[int] = set()
    try:
        for _ in range(WORKER_RESTARTS + 1):
            fresh = _until(lambda seen=frozenset(killed): _workers(proc.pid) - seen, 60)
            assert fresh, (kit / "restarts.out").read_text()
            family |= _descendants(proc.pid)
            for pid in fresh:
                os.kill(pid, signal.SIGKILL)
            killed |= fresh
        assert proc.wait(timeout=60) == 1
    finally:
        _stop(proc)
        _kill_all(family)
    out = (kit / "restarts.out").read_text()
    assert f"the worker process stopped (signal 9); restarting it (1/{WORKER_RESTARTS})" in out, out
    err = (kit / "restarts.err").read_text().strip().splitlines()
    assert len(err) == 1 and f"after {WORKER_RESTARTS} restarts; giving up" in err[0], err
    assert not _until(lambda: [p for p in family if process_alive(p)], 10), "processes outlived fedlora-client"
