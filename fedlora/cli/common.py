"""What every command shares: the parser class, ``--debug``, one-line errors, loading a preset.

User mistakes (bad preset, flag, data, model) print one line ``fedlora: error: ...`` and exit
with status 2; no traceback. ``--debug`` (on every command, before or after a ``fedlora``
subcommand) or ``FEDLORA_DEBUG=1`` also prints the traceback after that line.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

from fedlora.errors import FedLoraError

EXIT_USAGE = 2
DEBUG_ENV = "FEDLORA_DEBUG"
_DEBUG_HELP = f"on an error, also print the full traceback (same as {DEBUG_ENV}=1)"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, as for every other user mistake
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _add_debug(parser: argparse.ArgumentParser, *, subcommand: bool = False) -> None:
    """``--debug`` on ``parser``; a subcommand's leaves the top-level value alone unless given."""
    parser.add_argument(
        "--debug", action="store_true", help=_DEBUG_HELP, **({"default": argparse.SUPPRESS} if subcommand else {})
    )


def _debug_enabled(args: argparse.Namespace) -> bool:
    env = os.environ.get(DEBUG_ENV, "").strip().lower()
    return bool(getattr(args, "debug", False)) or env not in ("", "0", "false", "no", "off")


def _absolute_local_paths(raw: dict) -> dict:
    """Make local data paths absolute so worker processes with another cwd find them."""
    data = raw.get("data", {})
    sources = [data] + [t for t in data.get("tasks", []) if isinstance(t, dict)]
    for source in sources:
        for key in ("path", "eval_path"):
            value = source.get(key)
            if isinstance(value, str) and value and not value.startswith("synthetic:"):
                p = Path(value).expanduser()
                if p.exists():
                    source[key] = str(p.resolve())
    return raw


def load_run_config(preset: str | None, overrides: list[str]):
    """The RunConfig for ``preset`` (path or packaged name; default quickstart) plus overrides."""
    from fedlora.config import RunConfig, apply_overrides, read_preset
    from fedlora.simulations import preset_path

    path = preset_path(preset or "quickstart")
    raw = apply_overrides(read_preset(path), overrides)
    return RunConfig.from_dict(_absolute_local_paths(raw))


def resume_run_config(preset: str | None, overrides: list[str], out: str | None):
    """``--resume``: the RunConfig of the run on disk, its own ``config.toml`` plus ``--set``.

    The preset only names the run directory when ``--out`` is not given (``runs/<name>``); what
    runs is what the run was started with. A ``--set`` may change only what
    :data:`fedlora.run.directory.RESUME_MUTABLE` lists (``rounds`` to extend it, the round timeout, the
    device); any other change is refused where the run directory is opened, naming the key.
    """
    from fedlora.config import RunConfig, apply_overrides, read_preset
    from fedlora.simulations import preset_path

    if out is None:
        name = apply_overrides(read_preset(preset_path(preset or "quickstart")), overrides).get("name", "run")
        out = str(Path("runs") / str(name))
    config = Path(out) / "config.toml"
    if not config.is_file():
        raise FedLoraError(f"--resume: {config} not found (is {out} a run directory? name it with --out DIR)")
    raw = apply_overrides(read_preset(config), overrides)
    return RunConfig.from_dict(_absolute_local_paths(raw)), out


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    logging.getLogger("flwr").setLevel(logging.WARNING)
    # Only on AVX512-BF16 CPUs, about an optional kernel for a path fedlora turns off (models.py).
    logging.getLogger("bitsandbytes.backends.cpu").setLevel(logging.ERROR)
    import datasets

    datasets.disable_progress_bars()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def _run(func, args, prog: str = "fedlora") -> int:
    try:
        return func(args)
    except FedLoraError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        _traceback_if_debug(args, err)
        return err.exit_code
    except KeyboardInterrupt as err:
        print(f"{prog}: interrupted", file=sys.stderr)
        _traceback_if_debug(args, err)
        return 130


def _traceback_if_debug(args: argparse.Namespace, err: BaseException) -> None:
    if _debug_enabled(args):
        sys.stderr.flush()
        traceback.print_exception(err, file=sys.stderr)
