"""Helpers shared by the benchmark scripts: quiet libraries, a clean stdout, the JSON report.

Every benchmark prints exactly one JSON object on stdout. Libraries it drives (Flower, Ray,
transformers, bitsandbytes) write log lines of their own, some of them from other threads or
straight to file descriptor 1, so :func:`stdout_to_stderr` points fd 1 at stderr while the
measurement runs; the report is printed after it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def quiet_libraries() -> None:
    """Silence progress bars and chatty loggers before the libraries are imported.

    Set here rather than borrowed from the CLI so the scripts do not depend on its private
    helpers; the variables only take effect when set before the first import.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    with contextlib.suppress(ImportError):
        import datasets

        datasets.disable_progress_bars()
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send everything written to stdout inside the block (by any thread or library) to stderr."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def emit(report: dict[str, Any], out: str | None) -> None:
    """Print ``report`` as one JSON object and, with ``out``, write the same text there.

    Parameters
    ----------
    report : dict
        JSON-serialisable results.
    out : str, optional
        File to write as well (parent folders are created).
    """
    text = json.dumps(report, indent=2)
    print(text, flush=True)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)
