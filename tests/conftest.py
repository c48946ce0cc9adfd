"""Shared fixtures: tiny random BERT and GPT-2 saved to disk (so the real loading code runs),
and small run configurations over the synthetic task."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on 2 cores: one torch thread each, or they fight over the cores. Processes a
    # test starts (fedlora simulate, servers, devices) inherit it, so the thread count, and with
    # it every float sum, is the same in a test and in the processes it compares against.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    """A 2-layer random BERT encoder (no head: the classifier starts fresh, as for MiniLM)."""
    from fedlora.data.synthetic import write_tiny_bert

    return write_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> str:
    """A 2-layer random GPT-2 causal LM sharing the tiny word-piece tokenizer."""
    from fedlora.data.synthetic import write_tiny_gpt2

    return write_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not count): for tests that check leftovers."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def tiny_config(model_dir: str, *, task: str = "classification", strategy: str = "fedavg", sets: tuple[str, ...] = ()):
    """A 3-client, 2-round run on the synthetic task, small enough for seconds per run."""
    from fedlora.config import RunConfig, apply_overrides

    raw = {
        "name": f"tiny-{task}-{strategy}",
        "rounds": 2,
        "seed": 0,
        "model": {"name": model_dir, "task": task, "max_length": 16},
        "lora": {
            "rank": 4,
            "alpha": 8,
            "dropout": 0.0,
            "target_modules": ["query", "value"] if task == "classification" else ["c_attn"],
        },
        "data": {
            "path": "synthetic:topics",
            "max_train_examples": 150,
            "max_eval_examples": 40,
            "partitioner": "dirichlet" if task == "classification" else "iid",
        },
        "federation": {"clients": 3, "local_steps": 2, "batch_size": 8, "lr": 0.01},
        "strategy": {"name": strategy},
    }
    raw = apply_overrides(raw, list(sets))
    return RunConfig.from_dict(raw)


@pytest.fixture
def make_config():
    return tiny_config


def federation_logits(cfg, run_dir, input_ids):
    """Logits of the federation's final global adapter, as the server holds it."""
    import torch

    from fedlora.run.directory import RunDirectory
    from fedlora.server import prepare

    _, state, _ = RunDirectory(run_dir).load_checkpoint()
    prepared = prepare(cfg)
    host = prepared.host
    with host.lock:
        name = host.ensure(prepared.spec, seed=cfg.seed)
        host.load_state(name, state)
        host.peft_model.eval()
        with torch.no_grad():
            return host.peft_model(input_ids=input_ids).logits.clone()


def peft_logits(model_dir, task, adapter_dir, input_ids):
    """Logits of a fresh base model with the exported adapter, loaded the way a user would."""
    import json

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    meta = json.loads((adapter_dir / "fedlora.json").read_text())
    if task == "classification":
        base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=meta["num_labels"])
    else:
        base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def free_port() -> int:
    """A free TCP port on loopback (deployment tests)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def flower_env(home: Path) -> dict[str, str]:
    """The environment a deployment test runs fedlora's commands in: this venv's tools first,
    and Flower's home (where it installs a run's app bundle) under ``home``, not ~/.flwr."""
    import sys

    env = dict(os.environ)
    env["FLWR_HOME"] = str(home)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (from /proc), for tests that check what a launcher leaves."""
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


def until(predicate, timeout: float, poll: float = 0.1):
    """``predicate()``'s first truthy value within ``timeout`` seconds (its last value otherwise)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(poll)
    return predicate()


PROFILES = "federation.profiles=[{name='phone',rank=1},{name='tablet',rank=2},{name='laptop',rank=4}]"
#: Every registered strategy with the --set overrides it needs to run on the tiny task.
STRATEGY_RUNS = {
    "fedavg": (),
    "ffa": (),
    "federa": (),
    "fedsa": (),
    "dpdylora": (),
    "hetlora": (PROFILES, "strategy.prune_threshold=0.5"),
    "flora": (PROFILES,),
    "fedex": (PROFILES,),
    "fltac": (
        "data.max_train_examples=0",
        "data.max_eval_examples=0",
        "data.partition_column=task",
        "data.dirichlet_alpha=0.3",
        "data.tasks=[{name='topics',path='synthetic:topics',max_train_examples=90,max_eval_examples=30},"
        "{name='sentiment',path='synthetic:sentiment',max_train_examples=90,max_eval_examples=30}]",
    ),
}


def kill_all(pids) -> None:
    """SIGKILL whichever of ``pids`` still run (a test's cleanup of what a launcher left)."""
    import signal

    for pid in pids:
        if process_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


#: The test tiers (pyproject.toml registers them): every test has exactly one, so `pytest -m unit`
#: is the fast loop and `-m "unit or simulation"` everything without server processes.
TIERS = ("unit", "simulation", "deployment", "slow")


@pytest.hookimpl(tryfirst=True)
@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups it adds
def pytest_collection_modifyitems(config, items):
    """Give every test exactly one tier, or stop: a tier marked on a test (or its class) overrides
    its module's ``pytestmark``, so ``-m`` selects it by that tier only; a test with none is an
    error naming it, so a new test cannot slip out of the tiers. Runs before ``-m`` deselects.

    Under ``pytest -n 2 --dist loadgroup`` (the README's test command) the deployment tests go
    to one worker, one after another: they start servers and devices that poll on timers, and
    two federations of processes at once on 2 cores would turn their waits into flaky timeouts.
    """
    untiered = []
    for item in items:
        tiers = [mark.name for mark in item.iter_markers() if mark.name in TIERS]  # closest first
        if not tiers:
            untiered.append(item.nodeid)
        elif len(set(tiers)) > 1:
            _keep_tier(item, tiers[0])
        if tiers and tiers[0] == "deployment":
            item.add_marker(pytest.mark.xdist_group("deployment"))
    if untiered:
        shown = "\n  ".join(untiered[:20]) + (f"\n  ... and {len(untiered) - 20} more" if len(untiered) > 20 else "")
        tiers = ", ".join(TIERS)
        raise pytest.UsageError(f"{len(untiered)} test(s) have no tier marker ({tiers}; tests/conftest.py):\n  {shown}")


def _keep_tier(item, tier: str) -> None:
    """Hide the outer tier markers of ``item`` (an override) from ``-m`` and every other reader."""
    markers = item.iter_markers

    def iter_markers(name=None):
        return (mark for mark in markers(name) if mark.name == tier or mark.name not in TIERS)

    item.iter_markers = iter_markers
