"""Command line: ``fedlora simulate``, ``fedlora presets``; ``fedlora-server`` / ``fedlora-client``.

User mistakes (bad preset, flag, data, model) print one line ``fedlora: error: ...`` and exit
with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from fedlora.errors import FedLoraError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, as for every other user mistake
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


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


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedlora.runlog import Progress
    from fedlora.simulations.runtime import simulate

    cfg = load_run_config(args.preset, args.set or [])
    progress = Progress(quiet=args.quiet)
    progress.line(
        f"fedlora simulate: {cfg.name}  strategy {cfg.strategy.name}  {cfg.federation.clients} clients  "
        f"{cfg.rounds} rounds  model {cfg.model.name}  data "
        f"{', '.join(f'{t.name}={t.path}' for t in cfg.data.tasks) if cfg.data.tasks else cfg.data.path}  "
        f"backend {args.backend}"
    )
    result = simulate(cfg, out=args.out, backend=args.backend, resume=args.resume, progress=progress,
                      ray_address=args.ray_address)
    metric = "eval_accuracy" if cfg.model.task == "classification" else "eval_perplexity"
    print(f"\nResults in {result.run_dir}/ (metrics.jsonl, config.toml, checkpoints/, adapter/)")
    print(f"{metric} per round:")
    if result.initial:
        print(f"  round 0 (before training): {result.initial[metric]:.4f}")
    for record in result.rounds:
        print(f"  round {record['round']}: {record[metric]:.4f}")
    print(f"Load the adapter: PeftModel.from_pretrained(base, {str(result.adapter_dir)!r})")
    clients_dir = Path(result.run_dir) / "clients"
    if clients_dir.is_dir():
        print(f"Each client's own (personalized) adapter: {clients_dir}/<partition>/adapter")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from fedlora.simulations import PRESET_DIR, list_presets

    for name in list_presets():
        print(f"{name}\t{PRESET_DIR / (name + '.toml')}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fedlora.report import load_run, write_report

    runs = [load_run(p) for p in args.runs]  # every folder is checked before anything is written
    if args.out:
        out = Path(args.out)
    elif len(runs) == 1:
        out = runs[0].path
    else:
        out = Path("reports") / "-vs-".join(r.path.name for r in runs)
    report = write_report([r.path for r in runs], out)
    print(f"Report: {report} (plots beside it)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedlora", description="Federated LoRA fine-tuning on Flower.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sim = sub.add_parser("simulate", help="run a federation on this machine")
    sim.add_argument("preset", nargs="?", help="preset TOML path or packaged name (default: quickstart)")
    sim.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    sim.add_argument("--out", help="run directory (default: runs/<name>/); never overwritten silently")
    sim.add_argument("--backend", default="inprocess", choices=["inprocess", "ray"],
                     help="inprocess (one shared base model) or ray (Flower's Ray simulation)")
    sim.add_argument("--resume", action="store_true", help="continue the run directory from its last checkpoint")
    sim.add_argument("--ray-address", help="existing Ray cluster address (with --backend ray)")
    sim.add_argument("--quiet", action="store_true", help="no progress lines")
    sim.set_defaults(func=cmd_simulate)
    pre = sub.add_parser("presets", help="list the packaged presets")
    pre.set_defaults(func=cmd_presets)
    rep = sub.add_parser("report", help="report.md and plots comparing run directories")
    rep.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (runs/<name>)")
    rep.add_argument("--out", help="output folder (default: the run's own folder for one run, "
                                    "reports/<a>-vs-<b>/ for several)")
    rep.set_defaults(func=cmd_report)
    return parser


def _run(func, args) -> int:
    try:
        return func(args)
    except FedLoraError as err:
        print(f"fedlora: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fedlora: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    return _run(args.func, args)


def server_main(argv: list[str] | None = None) -> int:
    """``fedlora-server``: the deployment runtime is not part of this release yet."""
    print("fedlora-server: error: the deployment runtime (SuperLink + ServerApp over TLS) is not available "
          "in this version; use `fedlora simulate` (in-process or --backend ray)", file=sys.stderr)
    return EXIT_USAGE


def client_main(argv: list[str] | None = None) -> int:
    """``fedlora-client``: the deployment runtime is not part of this release yet."""
    print("fedlora-client: error: the deployment runtime (SuperNode over TLS) is not available in this "
          "version; use `fedlora simulate` (in-process or --backend ray)", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
