"""The run directory: resolved config, metrics.jsonl, atomic checkpoints, progress lines.

Layout of ``runs/<name>/``::

    config.toml          the resolved configuration (re-runnable as a preset)
    metrics.jsonl        one JSON object per round
    checkpoints/         round_0001.safetensors + round_0001.json (strategy state), latest.json
    adapter/             the final adapter in PEFT's save_pretrained layout
    events.out.tfevents.*  TensorBoard scalars per round (aggregated and per client)
    report.md, *.png     the run's report (fedlora.report), written at the end
    summary.json         final metrics, written at the end
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import tomli_w
import torch
from safetensors.torch import load_file, save

from fedlora.config import RunConfig
from fedlora.errors import FedLoraError
from fedlora.files import atomic_write_bytes


class RunDirectory:
    """One run's output folder.

    Parameters
    ----------
    path : str or Path
        The folder (``runs/<name>`` by default).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def open(cls, path: str | Path, *, resume: bool) -> RunDirectory:
        """Check the folder may be used; create nothing yet (errors must leave no trace)."""
        run = cls(path)
        if run.path.exists() and not run.path.is_dir():
            raise FedLoraError(f"--out: {run.path} exists and is not a directory")
        if resume:
            if run.latest_checkpoint_round() is None:
                raise FedLoraError(f"--resume: no checkpoint under {run.path / 'checkpoints'}")
        elif run.path.exists() and any(run.path.iterdir()):
            raise FedLoraError(
                f"run directory {run.path} already exists; pick another with --out DIR or continue it with --resume"
            )
        return run

    def discard_unfinished(self) -> bool:
        """Remove the run directory when no round of it was checkpointed (a run that failed
        before its first round leaves no trace); True when it was removed."""
        if not self.path.is_dir() or self.latest_checkpoint_round() is not None:
            return False
        shutil.rmtree(self.path, ignore_errors=True)
        return True

    # -- files ---------------------------------------------------------------------------------

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    def write_config(self, cfg: RunConfig) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path / "config.toml", tomli_w.dumps(cfg.to_dict()).encode())

    def append_metrics(self, record: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        with open(self.metrics_path, encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]

    def truncate_metrics(self, last_round: int) -> None:
        """Drop lines of rounds after ``last_round`` (written before a crash, not checkpointed)."""
        kept = [r for r in self.read_metrics() if int(r.get("round", 0)) <= last_round]
        atomic_write_bytes(self.metrics_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept).encode())

    def write_json(self, name: str, obj: Any) -> None:
        atomic_write_bytes(self.path / name, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())

    # -- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(self, server_round: int, state: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        """Write round ``server_round``'s global state, then move the ``latest`` pointer."""
        stem = f"round_{server_round:04d}"
        tensors = {k: v.contiguous() for k, v in state.items()}
        atomic_write_bytes(self.checkpoint_dir / f"{stem}.safetensors", save(tensors))
        atomic_write_bytes(self.checkpoint_dir / f"{stem}.json", json.dumps(extra, sort_keys=True).encode())
        atomic_write_bytes(self.checkpoint_dir / "latest.json", json.dumps({"round": server_round}).encode())

    def latest_checkpoint_round(self) -> int | None:
        pointer = self.checkpoint_dir / "latest.json"
        if not pointer.exists():
            return None
        return int(json.loads(pointer.read_text())["round"])

    def load_checkpoint(self) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]]:
        server_round = self.latest_checkpoint_round()
        if server_round is None:
            raise FedLoraError(f"no checkpoint under {self.checkpoint_dir}")
        stem = f"round_{server_round:04d}"
        state = load_file(str(self.checkpoint_dir / f"{stem}.safetensors"))
        extra = json.loads((self.checkpoint_dir / f"{stem}.json").read_text())
        return server_round, state, extra


class Progress:
    """Progress for people: lines that stay, plus one status line that rewrites itself.

    On a terminal, :meth:`status` redraws a single line in place (round, client, local step);
    anywhere else (CI logs, pipes) status updates are dropped and only :meth:`line` output
    appears, flushed so logs show it live.

    Parameters
    ----------
    quiet : bool
        Print nothing.
    stream : file, optional
        Where to write (default stdout).
    """

    def __init__(self, quiet: bool = False, stream: Any = None) -> None:
        self.quiet = quiet
        self.stream = stream or sys.stdout
        self.live = not quiet and bool(getattr(self.stream, "isatty", lambda: False)())
        self._status_width = 0

    def line(self, text: str) -> None:
        if self.quiet:
            return
        self._clear()
        print(text, file=self.stream, flush=True)

    def status(self, text: str) -> None:
        """Show ``text`` on the rewriting status line (terminals only)."""
        if not self.live:
            return
        width = max(len(text), self._status_width)
        self.stream.write("\r" + text.ljust(width))
        self.stream.flush()
        self._status_width = len(text)

    def _clear(self) -> None:
        if self.live and self._status_width:
            self.stream.write("\r" + " " * self._status_width + "\r")
            self._status_width = 0


_ACTIVE: Progress | None = None


def set_active(progress: Progress | None) -> None:
    """Make ``progress`` receive status updates from code running in this process (clients)."""
    global _ACTIVE
    _ACTIVE = progress


def status(text: str) -> None:
    """Status update from anywhere in the process; a no-op when no run is showing progress."""
    if _ACTIVE is not None:
        _ACTIVE.status(text)


class ScalarLog:
    """TensorBoard event files in the run directory (``tensorboard --logdir runs/``).

    One scalar per metric per round: the aggregated ones under ``eval/``, ``train/``, ``comm/``
    and the per-client ones under ``client/<node>/``. A run without the ``tensorboard`` package
    keeps going without the events (metrics.jsonl has everything).
    """

    def __init__(self, path: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self._writer = None
            return
        self._writer = SummaryWriter(log_dir=str(path))

    def round(self, record: dict[str, Any], initial: dict[str, float] | None = None) -> None:
        """Write one metrics.jsonl record (and the round-0 evaluation, once)."""
        if self._writer is None:
            return
        step = int(record["round"])
        if initial:
            for key, value in initial.items():
                self._scalar(f"eval/{key.removeprefix('eval_')}", value, 0)
        for key, value in record.items():
            if key.startswith(("eval_", "global_eval_")):
                self._scalar(f"eval/{key.removeprefix('eval_')}", value, step)
            elif key in ("train_loss",):
                self._scalar("train/loss", value, step)
            elif key in ("bytes_down", "bytes_up", "seconds"):
                self._scalar(f"comm/{key}" if key != "seconds" else "time/seconds_per_round", value, step)
            elif key in ("cluster_purity", "epsilon", "clients_ok", "noise_std"):
                self._scalar(f"round/{key}", value, step)
        for client in record.get("clients", []):
            node = client.get("node_id")
            for key in (
                "train_loss",
                "bytes_up",
                "bytes_down",
                "rank",
                "seconds",
                "eval_accuracy",
                "aggregation_weight",
                "epsilon",
                "update_norm",
            ):
                if key in client:
                    self._scalar(f"client/{node}/{key}", client[key], step)
        self._writer.flush()

    def _scalar(self, tag: str, value: Any, step: int) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            self._writer.add_scalar(tag, float(value), step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
