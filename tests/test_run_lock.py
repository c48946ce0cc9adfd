"""One run directory, one writer (issue 31, point 7): every run holds an exclusive OS lock on its
folder (``fedlora.run.lock``), so a second run on it, ``--resume`` included, exits 2 naming the
holder's pid and writes nothing there, and a SIGKILLed holder leaves the folder free at once.

Real processes throughout: the lock is the kernel's, so only another process can be refused by it.
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
from conftest import flower_env, free_port

import fedlora.run.lock as runlock
from fedlora.cli.deploy import server_main
from fedlora.errors import FedLoraError
from fedlora.run.directory import RunDirectory
from fedlora.run.lock import LOCK_NAME

pytestmark = pytest.mark.unit

BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

#: Opens a run directory once per mode given ("fresh", "resume"), printing "ok" or the error; with
#: "hold" last, keeps the last one open until killed.
OPENER = """
import sys, time
from fedlora.errors import FedLoraError
from fedlora.run.directory import RunDirectory
folder, *modes = sys.argv[1:]
for mode in modes:
    if mode == "hold":
        time.sleep(600)
    try:
        run = RunDirectory.open(folder, resume=mode == "resume")
    except FedLoraError as err:
        print("error:", err, flush=True)
        continue
    print("ok", flush=True)
    if "hold" not in modes:
        run.close()
"""


def open_elsewhere(folder: Path, *modes: str) -> list[str]:
    """What another process gets opening ``folder`` once per mode."""
    res = subprocess.run(
        [sys.executable, "-c", OPENER, str(folder), *modes], env=ENV, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    return res.stdout.splitlines()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_held_folder_is_refused_naming_the_holder_and_free_after_release(tmp_path):
    folder = tmp_path / "run"
    run = RunDirectory.open(folder, resume=False)
    (folder / "config.toml").write_text('name = "x"\n')  # resumable, and no longer empty
    before = snapshot(folder)
    assert before[LOCK_NAME] == f"{os.getpid()}\n".encode()
    lines = open_elsewhere(folder, "resume", "fresh")
    expected = f"error: run directory {folder} is in use by pid {os.getpid()} (another fedlora run writes there)"
    assert len(lines) == 2 and all(line.startswith(expected) for line in lines), lines
    assert snapshot(folder) == before  # the refused run wrote and removed nothing

    run.close()
    assert not (folder / LOCK_NAME).exists() and (folder / "config.toml").is_file()
    assert open_elsewhere(folder, "resume") == ["ok"]


def test_a_sigkilled_holder_leaves_the_folder_free_at_once(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.toml").write_text('name = "x"\n')
    holder = subprocess.Popen(
        [sys.executable, "-c", OPENER, str(folder), "resume", "hold"], env=ENV, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "ok"
        with pytest.raises(FedLoraError, match=rf"is in use by pid {holder.pid} "):
            RunDirectory.open(folder, resume=True)
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        holder.kill()
        holder.wait()
    assert (folder / LOCK_NAME).is_file()  # left by the dead holder: no obstacle, the kernel dropped its lock
    with RunDirectory.open(folder, resume=True) as run:
        assert run.lock is not None and (folder / LOCK_NAME).read_text() == f"{os.getpid()}\n"


def test_the_lock_leaves_no_trace_and_changes_no_other_check(tmp_path, monkeypatch):
    nested = tmp_path / "runs" / "new"
    with RunDirectory.open(nested, resume=False):
        assert [p.name for p in nested.iterdir()] == [LOCK_NAME]
    assert not (tmp_path / "runs").exists()  # made only to hold the lock: gone with it

    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / LOCK_NAME).write_text("999999\n")  # a crashed run's lock file alone is an empty folder
    RunDirectory.open(stale, resume=False).close()

    used = tmp_path / "used"
    used.mkdir()
    (used / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(FedLoraError, match="already exists; pick another with --out DIR or continue it with --resume"):
        RunDirectory.open(used, resume=False)
    with pytest.raises(FedLoraError, match="--resume: no checkpoint under"):
        RunDirectory.open(used, resume=True)
    assert sorted(p.name for p in used.iterdir()) == ["metrics.jsonl"]
    assert RunDirectory(used).discard_unfinished() is False and used.is_dir()  # never locked: not ours to remove

    monkeypatch.setattr(runlock, "fcntl", None)  # a platform without flock: no lock, no crash
    with RunDirectory.open(tmp_path / "bare", resume=False) as run:
        assert run.lock is not None and not run.lock.held and not (tmp_path / "bare" / LOCK_NAME).exists()


@pytest.mark.simulation
def test_a_second_simulate_resume_beside_a_live_run_exits_2_naming_it(tmp_path, tiny_bert, make_config):
    """The issue's case: ``--resume`` started while the first run is still writing the folder."""
    preset = tmp_path / "p.toml"
    preset.write_text(tomli_w.dumps(make_config(tiny_bert, sets=("rounds=200",)).to_dict()))
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "fedlora.cli", "simulate", str(preset), "--out", str(out), "--quiet"]
    first = subprocess.Popen(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / "round_0001.json").exists():
            assert first.poll() is None and time.monotonic() < deadline, "the first run ended before its first round"
            time.sleep(0.05)
        started = time.monotonic()
        second = subprocess.run([*argv, "--resume"], env=ENV, capture_output=True, text=True, timeout=120)
        took = time.monotonic() - started
        assert first.poll() is None, "the first run ended before the second was refused"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    err = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(err) == 1, second.stderr
    assert err[0].startswith(f"fedlora: error: run directory {out} is in use by pid {first.pid} "), err
    # Python, torch and the CLI's libraries load first (about 5 s idle, more beside a busy run on 2 cores).
    assert took < 45, f"refused after {took:.1f} s"
    rounds = [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rounds == list(range(1, len(rounds) + 1)), rounds  # one writer: each round once
    assert len(list(out.glob("events.out.tfevents.*"))) == 1
    RunDirectory.open(out, resume=True).close()  # the SIGKILLed run's lock went with it


@pytest.mark.deployment
def test_fedlora_server_refuses_a_held_folder_before_starting_a_superlink(tmp_path, tiny_bert, make_config, capsys):
    preset = tmp_path / "p.toml"
    preset.write_text(tomli_w.dumps(make_config(tiny_bert).to_dict()))
    out = tmp_path / "run"
    with RunDirectory.open(out, resume=False) as run:
        run.write_config(make_config(tiny_bert))
        before = snapshot(out)
        started = time.monotonic()
        res = subprocess.run(
            [str(BIN / "fedlora-server"), str(preset), "--insecure", "--host", "127.0.0.1", "--port", str(free_port())]
            + ["--out", str(out), "--resume"],
            env={**flower_env(tmp_path / "flwr-home"), **ENV},
            capture_output=True,
            text=True,
            timeout=120,
        )
        err = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(err) == 1, res.stdout + res.stderr
        assert err[0].startswith(f"fedlora-server: error: run directory {out} is in use by pid {os.getpid()} "), err
        assert time.monotonic() - started < 45
        assert snapshot(out) == before  # no superlink.log: no SuperLink was started

        # A fresh run on the held folder: "in use by pid N" rather than "already exists".
        argv = [str(preset), "--insecure", "--host", "127.0.0.1", "--port", str(free_port()), "--out", str(out)]
        assert server_main(argv) == 2
        assert f"run directory {out} is in use by pid {os.getpid()} " in capsys.readouterr().err
        assert snapshot(out) == before
