"""``fedlora``: the parser of its subcommands and the entry point."""

from __future__ import annotations

import argparse

from fedlora.cli.commands import (
    _column_arg,
    cmd_certs,
    cmd_evaluate,
    cmd_export,
    cmd_partition,
    cmd_presets,
    cmd_report,
    cmd_simulate,
    cmd_truncate,
)
from fedlora.cli.common import _add_debug, _Parser, _quiet_libraries, _run
from fedlora.cli.privacy_plan import add_privacy_plan
from fedlora.config import DATA_FORMATS, DTYPES, TEMPLATES


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedlora", description="Federated LoRA fine-tuning on Flower.")
    _add_debug(parser)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (_add_simulate, _add_runs_tools, _add_evaluate, _add_deploy_tools, add_privacy_plan):
        add(sub)
    return parser


def _add_simulate(sub) -> None:
    """``fedlora simulate``."""
    sim = sub.add_parser("simulate", help="run a federation on this machine")
    sim.add_argument("preset", nargs="?", help="preset TOML path or packaged name (default: quickstart)")
    sim.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    sim.add_argument("--out", help="run directory (default: runs/<name>/); never overwritten silently")
    sim.add_argument(
        "--backend",
        default="inprocess",
        choices=["inprocess", "ray"],
        help="inprocess (one shared base model) or ray (Flower's Ray simulation)",
    )
    sim.add_argument(
        "--resume",
        action="store_true",
        help="continue the run directory from its last good checkpoint, with its own config.toml "
        "(--set may change rounds and operational keys only)",
    )
    sim.add_argument("--ray-address", help="existing Ray cluster address (with --backend ray)")
    sim.add_argument("--quiet", action="store_true", help="no progress lines")
    sim.set_defaults(func=cmd_simulate)
    _add_debug(sim, subcommand=True)


def _add_runs_tools(sub) -> None:
    """``fedlora presets``, ``report`` and ``truncate``: tools over packaged presets and run directories."""
    pre = sub.add_parser("presets", help="list the packaged presets")
    pre.set_defaults(func=cmd_presets)
    rep = sub.add_parser("report", help="report.md and plots comparing run directories")
    rep.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (runs/<name>)")
    rep.add_argument(
        "--out", help="output folder (default: the run's own folder for one run, reports/<a>-vs-<b>/ for several)"
    )
    rep.set_defaults(func=cmd_report)
    trunc = sub.add_parser("truncate", help="cut a dpdylora adapter to a smaller rank (its leading slice)")
    trunc.add_argument("adapter", metavar="ADAPTER_DIR", help="a peft adapter folder (runs/<name>/adapter)")
    trunc.add_argument("--rank", type=int, required=True, help="the rank to keep (1..the adapter's rank)")
    trunc.add_argument("--out", help="output folder (default: <ADAPTER_DIR>-rank<K> beside it)")
    trunc.set_defaults(func=cmd_truncate)
    exp = sub.add_parser("export", help="write one client's personalized adapter of a simulated run (fedsa, pfedlora)")
    exp.add_argument("run", metavar="RUN_DIR", help="a run directory (runs/<name>)")
    exp.add_argument("--client", type=int, required=True, metavar="K", help="the client's partition id")
    exp.add_argument("--out", help="output folder: <OUT>/<K>/adapter (default: <RUN_DIR>/clients)")
    exp.set_defaults(func=cmd_export)
    _add_debug(exp, subcommand=True)
    for subparser in (pre, rep):
        _add_debug(subparser, subcommand=True)


def _add_evaluate(sub) -> None:
    """``fedlora evaluate``."""
    ev = sub.add_parser(
        "evaluate", help="loss/perplexity, choice accuracy, exact match (or accuracy) of a peft adapter on a file"
    )
    ev.add_argument(
        "adapter", metavar="ADAPTER_DIR", help="a peft adapter folder (runs/<name>/adapter or any peft LoRA)"
    )
    ev.add_argument("--data", required=True, metavar="FILE", help="csv/tsv/json/jsonl/parquet file to evaluate on")
    ev.add_argument(
        "--base", help="base model: hub name or local folder (default: the adapter's base_model_name_or_path)"
    )
    ev.add_argument(
        "--format",
        choices=DATA_FORMATS,
        help="how rows are laid out (default: the run's data.format from fedlora.json, else sniffed from the columns)",
    )
    ev.add_argument(
        "--template",
        choices=TEMPLATES,
        help="prompt template (default: the run's; else alpaca, or for chat the tokenizer's own or vicuna)",
    )
    ev.add_argument(
        "--column",
        action="append",
        type=_column_arg,
        metavar="KEY=NAME",
        help="name a column, e.g. response_column=response (repeatable; default: the run's, else data.* defaults)",
    )
    ev.add_argument(
        "--max-length", type=int, default=0, help="tokens per example (default: the run's, else the model's)"
    )
    ev.add_argument("--batch-size", type=int, default=8, help="rows per forward pass (default 8)")
    ev.add_argument("--max-examples", type=int, default=0, help="evaluate only the file's first N rows (default: all)")
    ev.add_argument(
        "--max-answer-tokens",
        type=int,
        default=32,
        help="exact match covers references of at most this many tokens (default 32)",
    )
    ev.add_argument("--device", default="auto", help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N, mps")
    ev.add_argument("--dtype", default="auto", choices=DTYPES, help="compute dtype")
    ev.set_defaults(func=cmd_evaluate)
    _add_debug(ev, subcommand=True)


def _add_deploy_tools(sub) -> None:
    """``fedlora partition`` and ``certs``: what a deployment is set up with."""
    par = sub.add_parser("partition", help="write each simulated client's data to a CSV (for fedlora-client --data)")
    par.add_argument("preset", nargs="?", help="preset TOML path or packaged name (default: quickstart)")
    par.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    par.add_argument("--out", required=True, help="output folder: client0.csv, client1.csv, ...")
    par.add_argument("--clients", type=int, help="number of partitions (default: federation.clients)")
    par.set_defaults(func=cmd_partition)
    cer = sub.add_parser("certs", help="development CA, server certificate and node keys for a deployment")
    cer.add_argument("--out", required=True, help="output folder (e.g. certs/)")
    cer.add_argument(
        "--server-host",
        required=True,
        metavar="HOST",
        help="DNS name or IP the clients dial; localhost and 127.0.0.1 are always included",
    )
    cer.add_argument("--nodes", type=int, default=3, help="node key pairs to make (default 3: node1..node3)")
    cer.add_argument("--node-names", metavar="A,B,...", help="names of the node key pairs instead of node1..N")
    cer.add_argument("--days", type=int, default=365, help="certificate validity in days (default 365)")
    cer.add_argument("--force", action="store_true", help="replace an existing CA in --out")
    cer.set_defaults(func=cmd_certs)
    for subparser in (par, cer):
        _add_debug(subparser, subcommand=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    return _run(args.func, args)
