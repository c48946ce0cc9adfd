"""Reports and TensorBoard events from real (tiny) runs."""

from __future__ import annotations

import io
import json

import pytest

from fedlora.cli.main import main
from fedlora.run.progress import Progress
from fedlora.simulations.runtime import simulate

pytestmark = pytest.mark.simulation

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_bert):
    from conftest import tiny_config

    root = tmp_path_factory.mktemp("runs")
    out = []
    for strategy in ("fedavg", "ffa"):
        cfg = tiny_config(tiny_bert, strategy=strategy, sets=(f"name=rep-{strategy}",))
        simulate(cfg, out=root / strategy, progress=Progress(quiet=True))
        out.append(root / strategy)
    return out


def _valid_png(path):
    from PIL import Image

    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        image.verify()
        assert image.size[0] > 100 and image.size[1] > 100


def test_every_run_writes_its_report_and_tensorboard_events(two_runs):
    run = two_runs[0]
    for name in ("accuracy.png", "loss.png", "bytes.png"):
        _valid_png(run / name)
    text = (run / "report.md").read_text()
    assert "rep-fedavg" in text and "eval_accuracy" in text and "bytes_down" in text
    events = list(run.glob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"eval/accuracy", "eval/loss", "train/loss", "comm/bytes_down", "comm/bytes_up"} <= tags
    assert [e.step for e in acc.Scalars("eval/accuracy")] == [0, 1, 2]
    assert any(t.startswith("client/") and t.endswith("/train_loss") for t in tags)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in acc.Scalars("comm/bytes_up")] == [float(r["bytes_up"]) for r in lines]


def test_report_command_compares_runs(two_runs, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["report", *map(str, two_runs), "--out", str(out)]) == 0
    for name in ("accuracy.png", "loss.png", "bytes.png"):
        _valid_png(out / name)
    text = (out / "report.md").read_text()
    for needle in (
        "rep-fedavg",
        "rep-ffa",
        "eval_accuracy",
        "eval_loss",
        "train_loss",
        "bytes_down",
        "bytes_up",
        "accuracy.png",
        "loss.png",
        "bytes.png",
    ):
        assert needle in text
    assert not (out / "epsilon.png").exists()  # no run used DP


@pytest.mark.unit
def test_report_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "metrics.jsonl" in err


@pytest.mark.unit
def test_progress_status_line_only_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty, log = Tty(), io.StringIO()
    for stream in (tty, log):
        p = Progress(stream=stream)
        p.status("round 1/2  client 0  step 1/4")
        p.status("round 1/2  client 0  step 2/4")
        p.line("round 1/2  client 1/3  done")
    assert log.getvalue() == "round 1/2  client 1/3  done\n"  # plain lines for logs
    assert "\rround 1/2  client 0  step 2/4" in tty.getvalue() and tty.getvalue().endswith("done\n")


def test_causal_run_plots_perplexity_on_its_own(tmp_path, tiny_gpt2, two_runs):
    from conftest import tiny_config

    cfg = tiny_config(tiny_gpt2, task="causal_lm", sets=("name=rep-causal", "rounds=1"))
    run = tmp_path / "causal"
    simulate(cfg, out=run, progress=Progress(quiet=True))
    _valid_png(run / "perplexity.png")
    assert not (run / "accuracy.png").exists()  # a causal LM has no accuracy to plot
    text = (run / "report.md").read_text()
    assert "(perplexity.png)" in text and "accuracy.png" not in text and "eval_perplexity" in text
    # beside a classification run: each plot holds the runs that have its metric
    out = tmp_path / "mixed"
    assert main(["report", str(run), str(two_runs[0]), "--out", str(out)]) == 0
    _valid_png(out / "perplexity.png")
    _valid_png(out / "accuracy.png")
    text = (out / "report.md").read_text()
    assert "(perplexity.png)" in text and "(accuracy.png)" in text
