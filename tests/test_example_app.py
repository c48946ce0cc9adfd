"""``examples/flower-app`` (a plain Flower App: its own ServerApp runs a fedlora strategy with
Flower's ``Strategy.start``, fedlora's ClientApp on the nodes) runs with ``flwr run`` on Flower's
simulation engine (Ray), the way its README says, on a tiny model for 2 rounds."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import flower_env, free_port, peft_logits, until

pytestmark = [pytest.mark.simulation, pytest.mark.ray]

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "flower-app"
#: The connection the test's own SuperLink is reached by (Flower's config file under FLWR_HOME).
CONNECTION = "fedlora-test"


@pytest.fixture
def superlink(tmp_path):
    """A simulation SuperLink on a free loopback port (no app dependencies installed per run),
    named as the default connection in a Flower home of this test; (env, log) for ``flwr``."""
    home = tmp_path / "flwr-home"
    home.mkdir()
    port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    env = flower_env(home)
    env.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_DEDUP_LOGS": "0"})
    log = tmp_path / "superlink.log"
    cmd = ["flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess"]
    cmd += ["--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert until(lambda: _healthy(port) or proc.poll() is not None, 60) and proc.poll() is None, log.read_text()
        yield env, log
    finally:
        # Its own session: the ServerApp and simulation processes it started go with it.
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _healthy(port: int) -> bool:
    """Whether the SuperLink on ``port`` serves (its HTTP API's health endpoint answers)."""
    import httpx

    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=0.5).is_success
    except httpx.HTTPError:
        return False


def test_flwr_run_example_app(tmp_path, tiny_bert, superlink):
    env, log = superlink
    app = tmp_path / "app"
    shutil.copytree(EXAMPLE, app, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "out"
    run_config = " ".join(
        [
            "num-server-rounds=2",
            f"out-dir='{out}'",
            f"fedlora.model.name='{tiny_bert}'",
            "fedlora.model.max_length=16",
            "fedlora.lora.rank=4",
            "fedlora.lora.alpha=8",
            "fedlora.data.max_train_examples=150",
            "fedlora.data.max_eval_examples=40",
            "fedlora.federation.local_steps=2",
            "fedlora.federation.batch_size=8",
        ]
    )
    federation = "num-supernodes=3 client-resources-num-cpus=1 init-args-num-cpus=1"
    cmd = ["flwr", "run", str(app), "--stream", "--run-config", run_config, "--federation-config", federation]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    logs = done.stdout + done.stderr
    assert done.returncode == 0, logs[-4000:] + log.read_text()[-2000:]
    assert (out / "result.json").exists(), logs[-4000:]
    result = json.loads((out / "result.json").read_text())
    assert sorted(result["train"]) == ["1", "2"]
    assert all(m["clients-ok"] == 3 for m in result["train"].values()), result
    assert sorted(result["evaluate"]) == ["0", "1", "2"] and "eval_accuracy" in result["evaluate"]["2"]
    assert "Starting FlowerStrategy strategy" in logs and "[ROUND 2/2]" in logs  # Flower's own loop ran
    import torch

    adapter = Path(result["adapters"][0])
    logits = peft_logits(tiny_bert, "classification", adapter, torch.tensor([[2, 5, 9, 11, 3]]))
    assert torch.isfinite(logits).all()
