"""Deployments of issue 25 and issue 26: real ``fedlora-server`` and ``fedlora-client`` processes
on 127.0.0.1 over TLS, as in tests/test_deploy.py (its launch helpers).

One federation, run once for the module (a deployment's start-up is most of its time): one round
of the tiny random ViT on three devices, each holding an image folder
(``fedlora-client --data <folder>``), with node authentication and SecAgg+. One device is killed
(its ``fedlora-client``, SuperNode and worker, SIGKILL) once it has sent its masked input.

* Secure aggregation across devices (issue 25): its input stays in the sum (its self mask is
  rebuilt from its neighbours' seed shares), the round aggregates and the run finishes.
* Images on devices (issue 26): every device trains on its folder and the adapter exports.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import tomli_w
from conftest import descendants, flower_env, free_port, kill_all, until
from test_deploy import BIN, _start, _stop

pytestmark = pytest.mark.deployment

#: The longest a federation here may take before the test gives up on it.
RUN_TIMEOUT = 180


def _federation(
    root: Path,
    cfg,
    datas: list[Path],
    *,
    auth: bool,
    watch: Callable[[list[subprocess.Popen], list[Path]], None] | None = None,
    verbose: tuple[int, ...] = (),
) -> dict:
    """Run ``cfg`` with one device per folder or file of ``datas`` (TLS; node authentication when
    ``auth``); ``watch(clients, logs)`` is called while the server runs. What the tests check."""
    from fedlora.deploy.certs import create_certs

    preset = root / "preset.toml"
    preset.write_text(tomli_w.dumps(cfg.to_dict()))
    env = flower_env(root / "flwr-home")
    files = create_certs(root / "certs", "localhost", nodes=len(datas) if auth else 0)
    port = free_port()
    server_cmd = [str(BIN / "fedlora-server"), str(preset), "--certs", str(root / "certs"), "--host", "127.0.0.1"]
    server_cmd += ["--port", str(port), "--out", str(root / "run"), "--wait-clients", "90", "--round-timeout", "90"]
    if auth:
        (root / "authorised").mkdir()
        for pub in files.node_public_keys:
            (root / "authorised" / pub.name).write_bytes(pub.read_bytes())
        server_cmd += ["--auth-keys", str(root / "authorised")]
    server = _start(server_cmd, root, env, root / "server.log")
    clients, logs, family = [], [root / f"client{i}.log" for i in range(len(datas))], set()
    try:
        for i, data in enumerate(datas):
            cmd = [str(BIN / "fedlora-client"), "--server", f"127.0.0.1:{port}", "--ca", str(files.ca_cert)]
            cmd += ["--data", str(data), "--partition-id", str(i), "--max-wait", "30"]
            cmd += (["--key", str(files.node_keys[i])] if auth else []) + (["--verbose"] if i in verbose else [])
            clients.append(_start(cmd, root, env, logs[i]))
        deadline = time.monotonic() + RUN_TIMEOUT
        while server.poll() is None and time.monotonic() < deadline:
            for proc in clients:
                family |= descendants(proc.pid)
            if watch is not None:
                watch(clients, logs)
            time.sleep(0.1)
        server_rc = server.wait(timeout=max(deadline - time.monotonic(), 1))
        until(lambda: all(p.poll() is not None for p in clients), 30)
        client_rcs = [proc.poll() for proc in clients]
    finally:
        for proc in [server, *clients]:
            _stop(proc)
        kill_all(family)
    rounds = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    return {
        "server_rc": server_rc,
        "server_log": (root / "server.log").read_text(errors="replace"),
        "client_rcs": client_rcs,
        "client_logs": [log.read_text(errors="replace") for log in logs],
        "rounds": rounds,
        "run_dir": root / "run",
    }


class KillAfterMaskedInput:
    """Kills the device whose log is ``logs[victim]`` (the client, its SuperNode, its worker) as
    soon as it has sent its reply to the masked-input stage: the round-1 training line, then
    Flower's "Sent successfully" after it (the device runs with --verbose). The other devices
    train ten times as many steps, so the server cannot have sent the unmask stage yet (checked:
    neither had finished training when the kill came)."""

    def __init__(self, victim: int) -> None:
        self.victim = victim
        self.killed_at: float | None = None
        self.node_id = ""
        self.others_training = False

    def __call__(self, clients: list[subprocess.Popen], logs: list[Path]) -> None:
        if self.killed_at is not None or not logs[self.victim].exists():
            return
        log = logs[self.victim].read_text(errors="replace")
        trained = log.find("round 1: trained")
        if trained < 0 or "Sent successfully" not in log[trained:]:
            return
        proc = clients[self.victim]
        kill_all([proc.pid, *descendants(proc.pid)])
        self.killed_at = time.monotonic()
        self.node_id = log.split("connected as node ", 1)[1].split(";", 1)[0].strip()
        others = [path.read_text(errors="replace") for i, path in enumerate(logs) if i != self.victim]
        # Had another device trained already, the server might have asked the victim to unmask.
        self.others_training = all("round 1: trained" not in text for text in others)


def _image_folder(root: Path, rows: int, seed: int) -> Path:
    """``root/<label>/<i>.png``: ``rows`` synthetic shapes (all four classes)."""
    from fedlora.data.shapes import generate_shapes

    shapes = generate_shapes(rows, seed=seed)
    for i, (cell, label) in enumerate(zip(shapes["image"], shapes["label"])):
        (root / label).mkdir(parents=True, exist_ok=True)
        (root / label / f"{i:03d}.png").write_bytes(cell["bytes"])
    return root


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> dict:
    """One round of the tiny random ViT on three devices, each holding an image folder, over TLS
    with node authentication and SecAgg+; device 0 is killed after it sent its masked input.
    Device 0 holds 4 images (1 step an epoch), the others 80 (10): they are still training when
    it has sent its input, so the server cannot have asked it to unmask yet."""
    from fedlora.config import RunConfig

    root = tmp_path_factory.mktemp("secure-images")
    raw = {
        "name": "secure-images",
        "rounds": 1,
        "model": {"name": "synthetic:tiny-vit", "task": "image_classification", "device": "cpu"},
        "lora": {"rank": 4, "alpha": 8},
        "data": {"path": "synthetic:shapes", "max_train_examples": 40, "max_eval_examples": 24},
        "federation": {"clients": 3, "local_epochs": 25, "batch_size": 8},
        # the unmask stage waits this long for the killed device
        "secure_aggregation": {"mode": "secagg+", "timeout": 8.0},
    }
    cfg = RunConfig.from_dict(raw)
    folders = [_image_folder(root / f"device{i}", n, seed=10 + i) for i, n in enumerate((4, 80, 80))]
    killer = KillAfterMaskedInput(victim=0)
    result = _federation(root, cfg, folders, auth=True, watch=killer, verbose=(0,))
    return {**result, "cfg": cfg, "killer": killer}


def test_secure_round_over_tls_and_node_auth_survives_a_device_killed_after_masking(federation):
    """Issue 25: the killed device's input arrived, so it is in the sum (its self mask rebuilt from
    its neighbours' seed shares); it is named as dropped at unmask; the round aggregates all
    three inputs and the run finishes."""
    d, killer = federation, federation["killer"]
    assert killer.killed_at is not None, d["client_logs"][0]
    assert killer.others_training, "the other devices had trained before the kill: the race this test avoids"
    assert d["server_rc"] == 0, d["server_log"]
    assert "TLS, node authentication" in d["server_log"]
    (record,) = d["rounds"]
    sa = record["secure_aggregation"]
    assert sa["survivors"] == 3 and sa["dropped_after_masking"] == 0, record
    assert record["clients_ok"] == 3 and record["train_loss"] is not None
    assert [str(x["node_id"]) for x in record["dropped"]] == [killer.node_id], record["dropped"]
    assert "unmask" in record["dropped"][0]["reason"]
    for client in record["clients"]:  # nothing individual is logged, as in simulation
        assert set(client) <= {"node_id", "bytes_down", "bytes_up", "seconds", "dropped"}, client
    for rc, log in list(zip(d["client_rcs"], d["client_logs"]))[1:]:
        assert rc == 0 and "the federation is over" in log, log


def test_devices_holding_image_folders_train_and_the_adapter_exports(federation):
    """Issue 26: each device trained the round on its own image folder (``--data <folder>``), and
    the adapter exports and loads on the base image classifier."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageClassification

    from fedlora.model.loading import resolve_model_source

    d = federation
    for log, images in zip(d["client_logs"], (4, 80, 80)):
        assert f"round 1: trained rank 4 on {images} examples" in log, log
    assert d["server_log"].count("joined: rank 4, none float32 on cpu") == 3, d["server_log"]
    adapter = d["run_dir"] / "adapter"
    meta = json.loads((adapter / "fedlora.json").read_text())
    assert meta["labels"] == ["circle", "cross", "square", "triangle"]
    source = resolve_model_source(d["cfg"].model.name)
    base = AutoModelForImageClassification.from_pretrained(source, num_labels=meta["num_labels"])
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        logits = model(pixel_values=torch.zeros(1, 3, 32, 32)).logits
    assert logits.shape == (1, 4) and torch.isfinite(logits).all()
