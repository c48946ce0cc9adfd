"""Crash and resume (issue 15, items 6, 7, 12): checksummed checkpoints that fall back to the
newest good round, every virtual node's state checkpointed with the run (FedSA's private B),
and ``--resume`` that continues the run on disk with its own config.toml.

The bit-exact checks stop a run after round 1 by raising from a patched ``RoundLoop.round``
(in process, every strategy), and once with a real SIGKILL of ``fedlora simulate``; the
resumed run must end with exactly the adapter (and metrics) of an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib

import pytest
import tomli_w
import torch
from conftest import STRATEGY_RUNS

from fedlora.cli.common import resume_run_config
from fedlora.cli.deploy import server_main
from fedlora.cli.main import main
from fedlora.errors import FedLoraError
from fedlora.run.directory import RunDirectory
from fedlora.run.progress import Progress
from fedlora.server.rounds import RoundLoop
from fedlora.simulations.runtime import simulate

pytestmark = pytest.mark.simulation

#: Per-round metrics that must match exactly between a resumed and an uninterrupted run.
TIMING_KEYS = {"seconds", "train_seconds"}


class Killed(Exception):
    """Stands for the process dying right after a round's checkpoint was written."""


def quiet() -> Progress:
    return Progress(quiet=True)


def run_interrupted(cfg, out, after: int, monkeypatch) -> None:
    """Run ``cfg`` into ``out`` and stop it dead once round ``after`` is checkpointed."""
    original = RoundLoop.round

    def round_then_die(self, server_round, state, result):
        state = original(self, server_round, state, result)
        if server_round == after:
            raise Killed
        return state

    with monkeypatch.context() as patch:
        patch.setattr(RoundLoop, "round", round_then_die)
        with pytest.raises(Killed):
            simulate(cfg, out=out, progress=quiet(), report=False)


def final_state(out) -> dict[str, torch.Tensor]:
    return RunDirectory(out).load_checkpoint()[1]


def comparable(out) -> list[dict]:
    """metrics.jsonl without wall-clock times (everything else is a function of the run)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k not in TIMING_KEYS and "seconds" not in k}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj

    return strip(rows)


def assert_same_run(a, b) -> None:
    sa, sb = final_state(a), final_state(b)
    assert sorted(sa) == sorted(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa), [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert comparable(a) == comparable(b)


# -- bit-exact resume ----------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", sorted(STRATEGY_RUNS))
def test_resume_after_a_crash_is_bit_exact_for_every_strategy(tmp_path, tiny_bert, make_config, monkeypatch, strategy):
    cfg = make_config(tiny_bert, strategy=strategy, sets=STRATEGY_RUNS[strategy])
    simulate(cfg, out=tmp_path / "whole", progress=quiet(), report=False)
    run_interrupted(cfg, tmp_path / "cut", after=1, monkeypatch=monkeypatch)
    assert RunDirectory(tmp_path / "cut").latest_checkpoint_round() == 1
    assert (tmp_path / "cut" / "checkpoints" / "round_0001.nodes.pb").is_file()
    simulate(cfg, out=tmp_path / "cut", resume=True, progress=quiet(), report=False)
    assert_same_run(tmp_path / "whole", tmp_path / "cut")
    if strategy == "fedsa":  # the clients' private B survived: their personalized adapters agree too
        for partition in range(cfg.federation.clients):
            rel = f"clients/{partition}/adapter/adapter_model.safetensors"
            assert (tmp_path / "whole" / rel).read_bytes() == (tmp_path / "cut" / rel).read_bytes()


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_bert, make_config):
    """A real ``fedlora simulate`` process killed with SIGKILL once a round is on disk."""
    cfg = make_config(tiny_bert, strategy="fedsa", sets=("rounds=3",))
    preset = tmp_path / "fedsa.toml"
    preset.write_text(tomli_w.dumps(cfg.to_dict()))
    cut = tmp_path / "cut"
    # The killed process computes the first rounds, this one the rest and the uninterrupted run:
    # both with this process's torch thread count, since float sums depend on it.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedlora.cli", "simulate", str(preset), "--out", str(cut), "--quiet"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not (cut / "checkpoints" / "round_0001.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    killed_after = RunDirectory(cut).latest_checkpoint_round()
    assert killed_after is not None and killed_after < 3  # it really died mid-run
    assert main(["simulate", str(preset), "--out", str(cut), "--resume", "--quiet"]) == 0
    simulate(cfg, out=tmp_path / "whole", progress=quiet(), report=False)
    assert_same_run(tmp_path / "whole", cut)


# -- corrupted checkpoints -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def three_rounds(tmp_path_factory, tiny_bert):
    """A finished 3-round FedSA run (its checkpoints carry node state too)."""
    from conftest import tiny_config

    cfg = tiny_config(tiny_bert, strategy="fedsa", sets=("rounds=3",))
    out = tmp_path_factory.mktemp("three") / "run"
    simulate(cfg, out=out, progress=quiet(), report=False)
    return cfg, out


def corrupt_truncated(ckpt):
    data = (ckpt / "round_0003.safetensors").read_bytes()
    (ckpt / "round_0003.safetensors").write_bytes(data[: len(data) // 2])


def corrupt_empty(ckpt):
    (ckpt / "round_0003.safetensors").write_bytes(b"")


def corrupt_bit_flip(ckpt):
    data = bytearray((ckpt / "round_0003.safetensors").read_bytes())
    data[-5] ^= 0x01  # a low mantissa bit of the last tensor: still loads, silently wrong
    (ckpt / "round_0003.safetensors").write_bytes(bytes(data))


def corrupt_overwritten(ckpt):
    shutil.copy(ckpt / "round_0002.safetensors", ckpt / "round_0003.safetensors")


def corrupt_both_overwritten(ckpt):
    for suffix in ("safetensors", "json", "nodes.pb"):
        shutil.copy(ckpt / f"round_0002.{suffix}", ckpt / f"round_0003.{suffix}")


def corrupt_sidecar(ckpt):
    sidecar = json.loads((ckpt / "round_0003.json").read_text())
    sidecar["extra"]["initial"] = {"eval_accuracy": 1.0}  # edited without its digest
    (ckpt / "round_0003.json").write_text(json.dumps(sidecar))


def corrupt_nodes(ckpt):
    data = bytearray((ckpt / "round_0003.nodes.pb").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (ckpt / "round_0003.nodes.pb").write_bytes(bytes(data))


def corrupt_nan(ckpt):
    """A non-finite adapter written with valid checksums (the old silent NaN resume)."""
    run = RunDirectory(ckpt.parent)
    ckpt_3 = run._read_round(3)
    state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in ckpt_3.state.items()}
    run.save_checkpoint(3, state, ckpt_3.extra, nodes=ckpt_3.nodes)


CORRUPTIONS = {
    "truncated": (corrupt_truncated, "round_0003.safetensors does not match its checksum"),
    "empty": (corrupt_empty, "(empty)"),
    "bit-flipped": (corrupt_bit_flip, "round_0003.safetensors does not match its checksum"),
    "overwritten by round 2": (corrupt_overwritten, "round_0003.safetensors does not match its checksum"),
    "all files overwritten by round 2": (corrupt_both_overwritten, "belongs to round 2"),
    "sidecar edited": (corrupt_sidecar, "round_0003.json fails its checksum"),
    "node state flipped": (corrupt_nodes, "round_0003.nodes.pb does not match its checksum"),
    "non-finite": (corrupt_nan, "non-finite values"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_a_corrupted_checkpoint_is_reported_in_one_line_and_skipped(tmp_path, three_rounds, case):
    _, out = three_rounds
    run = tmp_path / "run"
    shutil.copytree(out, run)
    corrupt, why = CORRUPTIONS[case]
    corrupt(run / "checkpoints")
    lines: list[str] = []
    ckpt = RunDirectory(run).load_round(report=lines.append)
    assert ckpt.round == 2 and ckpt.nodes is not None
    assert all(torch.equal(ckpt.state[k], v) for k, v in RunDirectory(out)._read_round(2).state.items())
    assert "\n" not in "".join(lines) and why in lines[0] and "round 3" in lines[0], lines
    # The bad round is set aside, kept for inspection, and no longer read.
    assert sorted(p.name for p in (run / "checkpoints" / "unusable").iterdir())[0] == "round_0003.json"
    assert RunDirectory(run).load_round().round == 2


def test_resume_falls_back_to_the_newest_good_round_and_redoes_the_rest(tmp_path, three_rounds):
    cfg, out = three_rounds
    run = tmp_path / "run"
    shutil.copytree(out, run)
    corrupt_bit_flip(run / "checkpoints")
    lines: list[str] = []

    class Lines(Progress):
        def line(self, text: str) -> None:
            lines.append(text)

    simulate(cfg, out=run, resume=True, progress=Lines(quiet=True), report=False)
    assert any("round 3 is unusable" in line for line in lines)
    assert any(line.startswith("resuming") and "after round 2" in line for line in lines)
    assert_same_run(out, run)  # round 3 done again, from round 2's adapter and node state: the same


def test_missing_latest_pointer_resumes_from_the_newest_round_on_disk(tmp_path, three_rounds):
    _, out = three_rounds
    run = tmp_path / "run"
    shutil.copytree(out, run)
    (run / "checkpoints" / "latest.json").unlink()
    lines: list[str] = []
    assert RunDirectory(run).load_round(report=lines.append).round == 3
    assert len(lines) == 1 and "latest.json" in lines[0]


def test_no_good_checkpoint_is_one_line_error(tmp_path, three_rounds):
    _, out = three_rounds
    run = tmp_path / "run"
    shutil.copytree(out, run)
    for p in (run / "checkpoints").glob("round_*.safetensors"):
        p.write_bytes(b"")
    with pytest.raises(FedLoraError) as err:
        RunDirectory(run).load_round()
    assert "no usable checkpoint" in str(err.value) and "\n" not in str(err.value)
    assert all(f"round {r}:" in str(err.value) for r in (1, 2, 3))


def test_a_run_stopped_before_its_first_checkpoint_resumes_from_round_1(tmp_path, three_rounds):
    """A server killed during round 1 leaves config.toml (and maybe round 1's metrics line) but no
    checkpoint: --resume starts the run over instead of refusing it (a fresh start would be
    refused too: the directory exists)."""
    cfg, out = three_rounds
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(out / "config.toml", run / "config.toml")
    (run / "metrics.jsonl").write_text((out / "metrics.jsonl").read_text().splitlines()[0] + "\n")
    lines = []

    class Lines(Progress):
        def line(self, text: str) -> None:
            lines.append(text)

    simulate(cfg, out=run, resume=True, progress=Lines(quiet=True), report=False)
    assert any("no round of" in line and "starting at round 1" in line for line in lines), lines
    assert_same_run(out, run)


# -- the run's own configuration -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ("lora.rank=2", "lora.rank"),
        ("lora.target_modules=['query']", "lora.target_modules"),
        ("strategy.name='fedavg'", "strategy.name"),
        ("federation.clients=8", "federation.clients"),
        ("seed=1", "seed"),
    ],
)
def test_resume_that_changes_the_run_is_refused_naming_the_key(tmp_path, three_rounds, tiny_bert, change, key):
    from conftest import tiny_config

    _, out = three_rounds
    changed = tiny_config(tiny_bert, strategy="fedsa", sets=("rounds=3", change))
    with pytest.raises(FedLoraError) as err:
        simulate(changed, out=out, resume=True, progress=quiet(), report=False)
    assert str(err.value).startswith(f"--resume: {key} =") and "\n" not in str(err.value)


def test_hand_edited_config_cannot_change_the_adapter_shape(tmp_path, three_rounds, tiny_bert):
    from conftest import tiny_config

    _, out = three_rounds
    run = tmp_path / "run"
    shutil.copytree(out, run)
    changed = tiny_config(tiny_bert, strategy="fedsa", sets=("rounds=3", "lora.rank=2"))
    RunDirectory(run).write_config(changed)  # config.toml edited to agree: the checkpoint still knows
    with pytest.raises(FedLoraError, match=r"^--resume: lora.rank = 2 but the checkpoint was made with 4"):
        simulate(changed, out=run, resume=True, progress=quiet(), report=False)


def test_cli_resume_continues_the_run_on_disk_not_the_preset(tmp_path, tiny_bert, make_config, capsys):
    """An ffa run resumed with a fedavg preset stays ffa; --set that changes it is refused;
    extending ``rounds`` rewrites config.toml."""
    ffa = make_config(tiny_bert, strategy="ffa", sets=("rounds=1", "federation.clients=2"))
    fedavg = make_config(tiny_bert, strategy="fedavg", sets=("rounds=1", "federation.clients=4"))
    (tmp_path / "ffa.toml").write_text(tomli_w.dumps(ffa.to_dict()))
    (tmp_path / "fedavg.toml").write_text(tomli_w.dumps(fedavg.to_dict()))
    out = str(tmp_path / "run")
    assert main(["simulate", str(tmp_path / "ffa.toml"), "--out", out, "--quiet"]) == 0

    for change in ("strategy.name=fedavg", "federation.clients=4"):
        capsys.readouterr()
        code = main(["simulate", str(tmp_path / "fedavg.toml"), "--out", out, "--resume", "--set", change, "--quiet"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.count("\n") == 0 and change.split("=")[0] in err, err

    # fedlora-server --resume builds its config the same way and refuses the same changes.
    cfg, _ = resume_run_config(str(tmp_path / "fedavg.toml"), ["federation.round_timeout=5"], out)
    assert (cfg.strategy.name, cfg.federation.clients, cfg.federation.round_timeout) == ("ffa", 2, 5.0)
    capsys.readouterr()
    code = server_main([str(tmp_path / "fedavg.toml"), "--out", out, "--resume", "--insecure", "--set", "seed=3"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "--resume: seed = 3 differs" in err, err

    assert (
        main(["simulate", str(tmp_path / "fedavg.toml"), "--out", out, "--resume", "--set", "rounds=2", "--quiet"]) == 0
    )
    saved = tomllib.loads((tmp_path / "run" / "config.toml").read_text())
    assert saved["strategy"]["name"] == "ffa" and saved["federation"]["clients"] == 2 and saved["rounds"] == 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and all(r["clients_sampled"] == 2 for r in rows)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["strategy"] == "ffa"


@pytest.mark.unit
def test_cli_resume_without_a_run_directory_is_one_line(tmp_path, capsys):
    code = main(["simulate", "--out", str(tmp_path / "nothing"), "--resume", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "config.toml not found" in err


def test_resume_cannot_shorten_a_run_below_its_rounds_done(three_rounds, tiny_bert):
    from conftest import tiny_config

    _, out = three_rounds
    with pytest.raises(FedLoraError, match=r"^--resume: rounds = 2 but the run has already done 3 rounds$"):
        simulate(tiny_config(tiny_bert, strategy="fedsa", sets=("rounds=2",)), out=out, resume=True, progress=quiet())


@pytest.mark.unit
def test_a_device_keeps_its_private_factors_in_its_own_file(tmp_path):
    """FedSA-LoRA on a device: a restarted server starts a new Flower run (an empty Context), so
    the private B comes back from the device's state file, and only for the same fedlora run."""
    from flwr.app import RecordDict

    from fedlora.client.privacy import state_file
    from fedlora.strategies.hooks import NodeStore
    from fedlora.wire.protocol import NODE_DATA_PATH

    file = state_file({NODE_DATA_PATH: str(tmp_path / "local.csv")})
    assert file == tmp_path / "local.csv.fedlora-state.safetensors"
    assert state_file({}) is None  # simulation: node state is checkpointed with the run instead
    kept = {"layer.lora_B": torch.arange(6.0).reshape(3, 2)}
    NodeStore(RecordDict(), file, "run-a").save(kept)
    assert file.stat().st_mode & 0o077 == 0  # the device's own: not readable by other users

    fresh = RecordDict()
    back = NodeStore(fresh, file, "run-a").load()
    assert torch.equal(back["layer.lora_B"], kept["layer.lora_B"])
    assert NodeStore(fresh, None, "").load().keys() == back.keys()  # now in the Context too
    assert NodeStore(RecordDict(), file, "run-b").load() == {}  # another run: start afresh
    file.write_bytes(b"not safetensors")
    assert NodeStore(RecordDict(), file, "run-a").load() == {}  # unreadable: start afresh, do not fail


def test_the_run_uid_survives_resume(tmp_path, tiny_bert, make_config, monkeypatch):
    cfg = make_config(tiny_bert, strategy="fedsa")
    run_interrupted(cfg, tmp_path / "cut", after=1, monkeypatch=monkeypatch)
    first = RunDirectory(tmp_path / "cut").load_checkpoint()[2]["run_uid"]
    simulate(cfg, out=tmp_path / "cut", resume=True, progress=quiet(), report=False)
    assert RunDirectory(tmp_path / "cut").load_checkpoint()[2]["run_uid"] == first
    other = tmp_path / "other"
    simulate(cfg, out=other, progress=quiet(), report=False)
    assert RunDirectory(other).load_checkpoint()[2]["run_uid"] != first
