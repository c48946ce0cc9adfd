"""Secure aggregation in the in-process simulation (issue 25): the same ServerApp, ClientApp and
strategies as any run, with ``secure_aggregation.mode = "secagg+"``.

A secure run's global adapter equals the plain run's within the field's quantization bound (each
served strategy, one round from the same start), a run learns, nothing individual lands in
metrics.jsonl, and clients that fail before or after their masked input are recovered.
"""

from __future__ import annotations

import json

import pytest
import torch

from fedlora.run.directory import RunDirectory
from fedlora.run.progress import Progress
from fedlora.simulations.runtime import simulate
from fedlora.wire import secagg as S

pytestmark = pytest.mark.simulation

SECURE = "secure_aggregation.mode=secagg+"
SERVED = ("fedavg", "ffa", "fedsa", "federa", "dpdylora")


class Lines(Progress):
    def __init__(self) -> None:
        super().__init__(quiet=True)
        self.lines: list[str] = []

    def line(self, text: str) -> None:
        self.lines.append(text)


def rounds_of(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("strategy", SERVED)
def test_one_round_equals_plain_aggregation_within_the_bound(tmp_path, tiny_bert, make_config, strategy):
    states = {}
    for mode, sets in (("plain", ()), ("secure", (SECURE,))):
        cfg = make_config(tiny_bert, strategy=strategy, sets=("rounds=1", "federation.local_steps=1", *sets))
        simulate(cfg, out=tmp_path / mode, progress=Progress(quiet=True))
        states[mode] = RunDirectory(tmp_path / mode).load_checkpoint()[1]
    record = rounds_of(tmp_path / "secure")[0]
    sa = cfg.secure_aggregation
    field = S.FieldSpec(sa.clipping_range, sa.quantization_bits, sa.modulus_bits, sa.max_weight)
    examples = sum(c["num_examples"] for c in rounds_of(tmp_path / "plain")[0]["clients"])
    # the weights enter the sum quantized (f_k = n_k / max_weight); float32 rounding besides
    bound = S.error_bound(3, examples / sa.max_weight, field) + 1e-6
    assert record["secure_aggregation"]["survivors"] == 3 and record["clients_ok"] == 3
    assert states["plain"].keys() == states["secure"].keys()
    worst = max((states["plain"][k] - states["secure"][k]).abs().max().item() for k in states["plain"])
    assert worst <= bound, (strategy, worst, bound)
    up = {mode: sum(c["bytes_up"] for c in rounds_of(tmp_path / mode)[0]["clients"]) for mode in states}
    assert up["secure"] < 2 * up["plain"] + 3 * 4096  # the field vector, plus the key material


def test_central_dp_noises_the_unmasked_sum_as_it_noises_the_plain_mean(tmp_path, tiny_bert, make_config):
    """Clients clip their own update and weigh 1; the server draws the very noise central DP draws
    without secure aggregation, so the two releases agree within the field's bound."""
    dp = ("rounds=1", "federation.local_steps=1", "privacy.mode=central", "privacy.noise_multiplier=0.3")
    states, records = {}, {}
    for mode, sets in (("plain", (*dp, "privacy.clip_norm=0.05")), ("secure", (*dp, SECURE, "privacy.clip_norm=0.05"))):
        cfg = make_config(tiny_bert, sets=sets)
        simulate(cfg, out=tmp_path / mode, progress=Progress(quiet=True))
        states[mode], records[mode] = RunDirectory(tmp_path / mode).load_checkpoint()[1], rounds_of(tmp_path / mode)[0]
    assert records["plain"]["clipped"] > 0  # the bound bites: the clients' own clipping is exercised
    assert records["secure"]["epsilon"] == pytest.approx(records["plain"]["epsilon"])
    assert records["secure"]["epsilon"] > 0
    assert records["secure"]["noise_std"] == pytest.approx(records["plain"]["noise_std"])
    sa = cfg.secure_aggregation
    field = S.FieldSpec(sa.clipping_range, sa.quantization_bits, sa.modulus_bits, sa.max_weight)
    bound = S.error_bound(3, 3.0, field) + 1e-6  # weights 1 each, the sum over the 3 sampled
    worst = max((states["plain"][k] - states["secure"][k]).abs().max().item() for k in states["plain"])
    assert worst <= bound, (worst, bound)
    assert all("update_norm" not in c for c in records["secure"]["clients"])


def test_a_secure_run_learns_and_logs_nothing_individual(tmp_path, tiny_bert, make_config):
    sets = ("rounds=3", "data.path=synthetic:sentiment", "data.partitioner=iid", "federation.lr=0.02")
    cfg = make_config(tiny_bert, sets=(*sets, "federation.local_steps=6", SECURE))
    result = simulate(cfg, out=tmp_path / "run", progress=Progress(quiet=True))
    assert result.rounds[-1]["eval_loss"] < result.initial["eval_loss"] - 0.005
    assert result.rounds[-1]["eval_accuracy"] > result.initial["eval_accuracy"]
    for record in rounds_of(tmp_path / "run"):
        for client in record["clients"]:  # no loss, example count or update norm of any one client
            assert set(client) <= {"node_id", "bytes_down", "bytes_up", "seconds", "dropped"}, client
        assert record["train_loss"] is not None and record["clients_ok"] == 3


def test_clients_failing_before_or_after_masking_are_recovered(tmp_path, tiny_bert, make_config, monkeypatch):
    """Round 1: a node fails after sending its masked input (its input still counts); round 2: a
    node fails while training (its pairwise masks are taken back out); round 3: two of three fail,
    below the threshold of 2: the round is skipped and the run goes on."""
    from fedlora.client import client_app

    real = client_app.handle_train
    nodes = [1_000_001, 1_000_002, 1_000_003]
    fail = {1: {(nodes[0], S.UNMASK)}, 2: {(nodes[1], S.MASKED_INPUT)}, 3: {(n, S.SHARE_KEYS) for n in nodes[1:]}}
    seen: dict[str, int] = {}

    def crashing(msg, context):
        record = msg.content.config_records.get(S.RECORD)
        if record is not None:
            server_round = seen[record[S.SESSION]] = seen.get(record[S.SESSION], len(seen) + 1)
            if (msg.metadata.dst_node_id, record[S.STAGE]) in fail[server_round]:
                raise RuntimeError("device lost")
        return real(msg, context)

    monkeypatch.setattr(client_app, "handle_train", crashing)
    cfg = make_config(tiny_bert, sets=("rounds=3", SECURE))
    lines = Lines()
    result = simulate(cfg, out=tmp_path / "run", progress=lines)
    first, second, third = result.rounds
    assert first["clients_ok"] == 3 and first["secure_aggregation"]["dropped_after_masking"] == 0
    # it failed after its input was in: named as dropped, its input counted, its self mask rebuilt
    assert [d["node_id"] for d in first["dropped"]] == [nodes[0]] and "unmask" in first["dropped"][0]["reason"]
    assert second["clients_ok"] == 2 and second["secure_aggregation"]["dropped_after_masking"] == 1
    assert [d["node_id"] for d in second["dropped"]] == [nodes[1]]
    assert "masked-input: the node failed" in second["dropped"][0]["reason"]
    assert third["clients_ok"] == 0 and "skipped" in third["secure_aggregation"]
    assert any("round 3/3  secure aggregation: round skipped" in line for line in lines.lines)
    assert torch.isfinite(torch.tensor(third["eval_loss"]))


def test_benchmark_quick(tmp_path):
    from test_benchmarks import run_quick

    report = run_quick("secagg.py", tmp_path, timeout=120)
    for graph in ("secagg", "secagg+"):
        result = report["results"][graph]["6"]
        assert result["server_seconds"] > 0 and result["client_seconds"] > 0
        assert result["bytes_up"] > result["vector_bytes"] and 0 < result["key_bytes_up"] < result["vector_bytes"]
    assert report["met"]["bytes_up_ratio"] is True and report["threads"] == 1


def test_resume_after_the_server_died_in_the_middle_of_unmasking(tmp_path, tiny_bert, make_config, monkeypatch):
    """The server dies in round 2's unmask stage; --resume redoes round 2 with fresh keys and ends
    where an uninterrupted run ends, bit for bit (the masks cancel exactly; rounding is seeded)."""
    from test_resume import Killed, assert_same_run

    from fedlora.server.secure_round import SecureRound

    cfg = make_config(tiny_bert, sets=(SECURE, "federation.local_steps=1"))
    simulate(cfg, out=tmp_path / "whole", progress=Progress(quiet=True), report=False)
    real = SecureRound.stage

    def dies(self, proto, stage, *args, **kwargs):
        if proto.server_round == 2 and stage == S.UNMASK:
            raise Killed()
        return real(self, proto, stage, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(SecureRound, "stage", dies)
        with pytest.raises(Killed):
            simulate(cfg, out=tmp_path / "cut", progress=Progress(quiet=True), report=False)
    assert RunDirectory(tmp_path / "cut").latest_checkpoint_round() == 1
    simulate(cfg, out=tmp_path / "cut", resume=True, progress=Progress(quiet=True), report=False)
    assert_same_run(tmp_path / "whole", tmp_path / "cut")


def test_distributed_noise_the_clients_add_it_and_the_server_adds_none(tmp_path, tiny_bert, make_config):
    """``privacy.noise = "distributed"``: with updates a millionth of the noise (lr 1e-9), the
    released adapter is the start plus the clients' noise alone: std sqrt(s / k) z C / m on each
    coordinate (s = 3 survivors, k = threshold 2, m = 3 sampled), not the larger std server noise
    on top would give; the ledger's epsilon is the server mode's, the record names the noise, and
    neither the train loss nor the clipped fraction leaves the clients."""
    dp = ("rounds=1", "federation.local_steps=1", "federation.lr=1e-9", "privacy.mode=central")
    dp += ("privacy.noise_multiplier=1.0", "privacy.clip_norm=0.03", SECURE)
    runs = {"plain": ("rounds=1", "federation.local_steps=1", "federation.lr=1e-9")}
    runs.update({"server": dp, "distributed": (*dp, "privacy.noise=distributed")})
    states, records = {}, {}
    for mode, sets in runs.items():
        cfg = make_config(tiny_bert, sets=sets)
        simulate(cfg, out=tmp_path / mode, progress=Progress(quiet=True), report=False)
        states[mode], records[mode] = RunDirectory(tmp_path / mode).load_checkpoint()[1], rounds_of(tmp_path / mode)[0]
    dist = records["distributed"]
    assert dist["noise"] == "distributed" and records["server"]["noise"] == "server"
    assert dist["epsilon"] == pytest.approx(records["server"]["epsilon"]) and dist["epsilon"] > 0
    assert dist["noise_std"] == pytest.approx(records["server"]["noise_std"])
    facts = dist["distributed_noise"]
    assert facts["clients"] == 3 and facts["calibrated_for"] == 2
    assert dist["train_loss"] is None and dist["secure_aggregation"]["clipped_fraction"] is None
    diff = torch.cat([(states["distributed"][k] - states["plain"][k]).reshape(-1) for k in states["plain"]])
    target = 1.0 * 0.03 * (3 / 2) ** 0.5 / 3
    # 1,156 coordinates: the std is known to 2%; server noise on top would give sqrt(5 / 3) = 1.29 times it
    assert diff.numel() > 1000 and 0.9 < float(diff.std()) / target < 1.1, (float(diff.std()), target)
