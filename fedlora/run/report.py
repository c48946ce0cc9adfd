"""Reports: report.md and PNG plots comparing one or more run directories on shared axes.

``fedlora report runs/a runs/b`` reads each run's metrics.jsonl, summary.json and config.toml
and writes, in the output folder:

* ``accuracy.png``: eval accuracy per round, round 0 included, when a run has accuracy
  (classification);
* ``perplexity.png``: eval perplexity per round (log scale), round 0 included, for causal LM runs;
* ``loss.png``: train and eval loss per round;
* ``bytes.png``: bytes down and up per round (all clients);
* ``epsilon.png``: the privacy budget per round, when a run records ``epsilon``;
* ``report.md``: one table of runs, one table of rounds per run, and the plots.

Every simulation writes its own report into its run directory when it ends.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora.errors import FedLoraError


@dataclass
class RunRecord:
    """What a report needs from one run directory."""

    name: str
    path: Path
    rounds: list[dict[str, Any]]
    initial: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def series(self, key: str, with_initial: bool = False) -> tuple[list[int], list[float]]:
        """(rounds, values) of ``key``; round 0 from the initial evaluation when asked."""
        xs: list[int] = []
        ys: list[float] = []
        if with_initial and key in self.initial:
            xs.append(0)
            ys.append(float(self.initial[key]))
        for record in self.rounds:
            value = record.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                xs.append(int(record["round"]))
                ys.append(float(value))
        return xs, ys


def load_run(path: str | Path) -> RunRecord:
    """Read a run directory; FedLoraError naming the folder when it is not one."""
    p = Path(path)
    metrics = p / "metrics.jsonl"
    if not metrics.is_file():
        raise FedLoraError(f"fedlora report: {p} is not a run directory (no metrics.jsonl)")
    try:
        rounds = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise FedLoraError(
            f"fedlora report: {metrics} is not valid JSON lines ({err.msg}, line {err.lineno})"
        ) from None
    summary = json.loads((p / "summary.json").read_text()) if (p / "summary.json").is_file() else {}
    config: dict[str, Any] = {}
    if (p / "config.toml").is_file():
        config = tomllib.loads((p / "config.toml").read_text(encoding="utf-8"))
    initial = summary.get("initial", {})
    if not initial and (p / "checkpoints").is_dir():
        for extra in sorted((p / "checkpoints").glob("round_*.json")):
            initial = json.loads(extra.read_text()).get("initial", {})
            break
    return RunRecord(name=config.get("name", p.name), path=p, rounds=rounds, initial=initial, config=config)


def _metric_keys(runs: Sequence[RunRecord]) -> list[str]:
    keys: set[str] = set()
    for run in runs:
        for record in run.rounds:
            keys |= {
                k
                for k, v in record.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("round",)
            }
    return sorted(keys)


def _label(run: RunRecord, runs: Sequence[RunRecord]) -> str:
    names = [r.name for r in runs]
    name = run.name if names.count(run.name) == 1 else f"{run.name} ({run.path})"
    strategy = run.config.get("strategy", {}).get("name")
    return f"{name} [{strategy}]" if strategy and strategy not in name else name


def _plot(
    path: Path, title: str, ylabel: str, lines: list[tuple[str, list[int], list[float], str]], logy: bool = False
) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [line for line in lines if line[1]]
    if not lines:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for label, xs, ys, style in lines:
        ax.plot(xs, ys, style, marker="o", markersize=3, label=label)
    ax.set_title(title)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    if logy and all(y > 0 for _, _, ys, _ in lines for y in ys):
        ax.set_yscale("log")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_report(run_dirs: Sequence[str | Path], out_dir: str | Path) -> Path:
    """Write report.md and the plots comparing ``run_dirs`` into ``out_dir``.

    Parameters
    ----------
    run_dirs : sequence of paths
        Run directories (each with metrics.jsonl).
    out_dir : path
        Where report.md and the PNGs go (created).

    Returns
    -------
    Path
        The report.md written.
    """
    runs = [load_run(p) for p in run_dirs]
    if not runs:
        raise FedLoraError("fedlora report: name at least one run directory")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    causal = all(r.config.get("model", {}).get("task") == "causal_lm" for r in runs if r.config)
    quality = "eval_perplexity" if causal else "eval_accuracy"
    plots = _write_plots(runs, out)
    md = ["# fedlora report", "", *_summary_table(runs, quality), ""]
    for run in runs:
        if run.rounds and run.rounds[-1].get("privacy"):
            md += [f"Privacy of {_label(run, runs)}: {run.rounds[-1]['privacy']}.", ""]
    for name, caption in plots.items():
        md += [f"![{caption}]({name})", "", f"*{caption}*", ""]
    for run in runs:
        md += _round_table(run, runs)
    md.append("Metrics: " + ", ".join(_metric_keys(runs)) + ".")
    report = out / "report.md"
    report.write_text("\n".join(md) + "\n", encoding="utf-8")
    return report


def _write_plots(runs: list, out: Path) -> dict[str, str]:
    """The report's PNGs in ``out``: {file name: caption} of those that had data."""
    plots: dict[str, str] = {}
    # Accuracy and perplexity get a plot each: they share no scale (a fraction vs. a number of
    # the vocabulary's order), and a run reports the one its task has.
    for metric, png, logy in (("eval_accuracy", "accuracy.png", False), ("eval_perplexity", "perplexity.png", True)):
        lines = []
        for run in runs:
            label = _label(run, runs)
            lines.append((label, *run.series(metric, with_initial=True), "-"))
            for key in _metric_keys([run]):
                if key.startswith(f"{metric}/"):
                    lines.append((f"{label}: {key.split('/', 1)[1]}", *run.series(key), ":"))
        title = metric.replace("eval_", "eval ") + " per round" + (" (log scale)" if logy else "")
        if _plot(out / png, title, metric, lines, logy=logy):
            plots[png] = f"{metric} per round (round 0: before training)"
    loss_lines = []
    byte_lines = []
    for run in runs:
        label = _label(run, runs)
        loss_lines.append((f"{label}: train", *run.series("train_loss"), "--"))
        loss_lines.append((f"{label}: eval", *run.series("eval_loss", with_initial=True), "-"))
        byte_lines.append((f"{label}: down", *run.series("bytes_down"), "-"))
        byte_lines.append((f"{label}: up", *run.series("bytes_up"), "--"))
    if _plot(out / "loss.png", "loss per round", "loss", loss_lines):
        plots["loss.png"] = "train loss (mean over clients) and eval loss per round"
    if _plot(out / "bytes.png", "bytes per round (all clients)", "bytes", byte_lines):
        plots["bytes.png"] = "bytes sent to and received from all clients per round"
    eps_lines = [(_label(run, runs), *run.series("epsilon"), "-") for run in runs]
    if _plot(out / "epsilon.png", "privacy budget per round", "epsilon", eps_lines):
        plots["epsilon.png"] = "cumulative (epsilon, delta)-DP budget per round"
    return plots


def _summary_table(runs: list, quality: str) -> list[str]:
    """One row per run: strategy, clients, rounds, quality before and after, bytes, seconds."""
    md = ["| run | strategy | clients | rounds | " + quality + " before → after | total bytes down / up | seconds |"]
    md.append("| --- | --- | --- | --- | --- | --- | --- |")
    for run in runs:
        cfg = run.config
        before = run.initial.get(quality)
        after = run.rounds[-1].get(quality) if run.rounds else None
        down = sum(int(r.get("bytes_down", 0)) for r in run.rounds)
        up = sum(int(r.get("bytes_up", 0)) for r in run.rounds)
        secs = sum(float(r.get("seconds", 0.0)) for r in run.rounds)
        strategy = cfg.get("strategy", {}).get("name", run.rounds[0].get("strategy", "?") if run.rounds else "?")
        md.append(
            f"| {_label(run, runs)} | {strategy} "
            f"| {cfg.get('federation', {}).get('clients', '?')} | {len(run.rounds)} | {_fmt(before)} → {_fmt(after)} "
            f"| {down:,} / {up:,} | {secs:.1f} |"
        )
    return md


def _round_table(run, runs: list) -> list[str]:
    """A run's section: every metric per round (round 0: before training)."""
    keys = [k for k in _metric_keys([run]) if k not in ("clients_ok", "clients_sampled", "privacy")]
    md = [f"## {_label(run, runs)}", "", f"Run directory: `{run.path}`", ""]
    md.append("| round | " + " | ".join(keys) + " |")
    md.append("| --- |" + " --- |" * len(keys))
    if run.initial:
        md.append("| 0 | " + " | ".join(_fmt(run.initial.get(k)) for k in keys) + " |")
    for record in run.rounds:
        md.append(f"| {record['round']} | " + " | ".join(_fmt(record.get(k)) for k in keys) + " |")
    md.append("")
    return md


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
