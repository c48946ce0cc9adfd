"""Progress lines on the terminal and TensorBoard scalars of a run."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


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
