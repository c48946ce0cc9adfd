"""Deployment end to end: real ``fedlora-server`` and ``fedlora-client`` processes on 127.0.0.1,
over Flower's SuperLink/SuperNode with TLS and node authentication.

One federation (3 authorised clients, 2 rounds of a tiny BERT) runs once for the module; while it
runs, a client with an unauthorised key and one trusting the wrong CA try to join. Every
subprocess has a timeout, and leftovers are stopped by pid, never by name.
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
from conftest import tiny_config

BIN = Path(sys.executable).parent
RUN_TIMEOUT = 240


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["FLWR_HOME"] = str(home)  # Flower installs the run's app bundle here, not in ~/.flwr
    env["PATH"] = str(BIN) + os.pathsep + env.get("PATH", "")
    return env


def _start(args: list[str], cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        args, cwd=cwd, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True
    )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        try:
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture(scope="module")
def deployment(tiny_bert, tmp_path_factory):
    """Run the federation once; return what every test below checks."""
    from fedlora.certs import create_certs

    root = tmp_path_factory.mktemp("deploy")
    cfg = tiny_config(tiny_bert, sets=("data.partitioner=iid", "name=deployed"))
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
    clients, children = [], {}
    try:
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
        base = [
            str(BIN / "fedlora-client"),
            "--server",
            f"127.0.0.1:{port}",
            "--data",
            str(root / "data" / "client0.csv"),
            "--max-retries",
            "10",
        ]
        refused = subprocess.run(
            base + ["--ca", str(files.ca_cert), "--key", str(files.node_keys[3])],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        wrong_ca = subprocess.run(
            base + ["--ca", str(other.ca_cert)], cwd=root, env=env, capture_output=True, text=True, timeout=120
        )
        for proc in clients:
            children[proc.pid] = _descendants(proc.pid)
        server_rc = server.wait(timeout=RUN_TIMEOUT)
        run_seconds = time.monotonic() - started
        for proc in clients:  # the run is over: stop the devices as an operator would
            children[proc.pid] |= _descendants(proc.pid)
            proc.send_signal(signal.SIGTERM)
        client_rcs = [proc.wait(timeout=60) for proc in clients]
        time.sleep(1.0)
        leftovers = sorted(p for kids in children.values() for p in kids if _alive(p))
    finally:
        for proc in [server, *clients]:
            _stop(proc)
    return {
        "root": root,
        "cfg": cfg,
        "run_dir": root / "runs" / "dep",
        "server_rc": server_rc,
        "server_log": (root / "server.log").read_text(errors="replace"),
        "client_rcs": client_rcs,
        "client_logs": [(root / f"client{i}.log").read_text(errors="replace") for i in range(3)],
        "refused": refused,
        "wrong_ca": wrong_ca,
        "leftovers": leftovers,
        "seconds": run_seconds,
    }


def test_two_rounds_over_tls_with_node_authentication(deployment):
    d = deployment
    assert d["server_rc"] == 0, d["server_log"]
    rounds = [json.loads(line) for line in (d["run_dir"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["clients_ok"] == 3 and not r["dropped"] for r in rounds)
    assert "TLS, node authentication" in d["server_log"]
    assert "round 2/2  global adapter" in d["server_log"]
    for log in d["client_logs"]:
        assert "round 2: trained rank 4" in log, log
    # Clients reported what they have: the server knows each one's rank, device and examples.
    assert d["server_log"].count("joined: rank 4, cpu") == 3


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
    assert deployment["client_rcs"] == [0, 0, 0], deployment["client_logs"]
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
    from fedlora.certs import create_certs

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
        (["--ca", "certs/ca.crt", "--data", "local.csv", "--rank", "0"], "--rank must be >= 1"),
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
