"""Command line: ``fedlora simulate|presets|report|certs``; ``fedlora-server`` / ``fedlora-client``.

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

from fedlora.config import DATA_FORMATS, DTYPES, QUANTIZATIONS, TEMPLATES
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
    :data:`fedlora.runlog.RESUME_MUTABLE` lists (``rounds`` to extend it, the round timeout, the
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


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedlora.runlog import Progress
    from fedlora.simulations.runtime import simulate

    if args.resume:  # the run on disk says what runs; the preset at most names its folder
        cfg, args.out = resume_run_config(args.preset, args.set or [], args.out)
    else:
        cfg = load_run_config(args.preset, args.set or [])
    progress = Progress(quiet=args.quiet)
    if args.resume and args.preset:
        progress.line(f"fedlora simulate: --resume runs {args.out}/config.toml; the preset only named the folder")
    progress.line(
        f"fedlora simulate: {cfg.name}  strategy {cfg.strategy.name}  {cfg.federation.clients} clients  "
        f"{cfg.rounds} rounds  model {cfg.model.name}  data "
        f"{', '.join(f'{t.name}={t.path}' for t in cfg.data.tasks) if cfg.data.tasks else cfg.data.path}  "
        f"backend {args.backend}"
    )
    result = simulate(
        cfg, out=args.out, backend=args.backend, resume=args.resume, progress=progress, ray_address=args.ray_address
    )
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


def cmd_truncate(args: argparse.Namespace) -> int:
    from fedlora.strategies.dpdylora import truncate_adapter_dir

    src = Path(args.adapter)
    if not (src / "adapter_config.json").is_file():
        raise FedLoraError(f"fedlora truncate: {src} is not a peft adapter folder (no adapter_config.json)")
    out = Path(args.out) if args.out else src.parent / f"{src.name}-rank{args.rank}"
    if out.exists():
        raise FedLoraError(f"fedlora truncate: {out} exists; name another --out")
    try:
        truncate_adapter_dir(src, args.rank, out)
    except ValueError as err:
        raise FedLoraError(f"fedlora truncate: --rank {args.rank}: {err}") from None
    print(f"Rank-{args.rank} adapter: {out} (PeftModel.from_pretrained loads it)")
    return 0


def _column_arg(value: str) -> tuple[str, str]:
    """``--column KEY=NAME``: which column of the file plays which part."""
    from fedlora.llm_eval import COLUMN_KEYS

    key, sep, name = value.partition("=")
    key = key.strip().removeprefix("data.")
    if not sep or not name.strip() or key not in COLUMN_KEYS:
        raise argparse.ArgumentTypeError(f"expected KEY=NAME with KEY one of {', '.join(COLUMN_KEYS)}, got {value!r}")
    return key, name.strip()


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``fedlora evaluate``: one JSON object with the adapter's metrics on a data file, on stdout."""
    import json

    from fedlora.llm_eval import EvalOptions, evaluate_adapter

    for flag in ("max_length", "max_examples"):
        if getattr(args, flag) < 0:
            raise FedLoraError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    for flag in ("batch_size", "max_answer_tokens"):
        if getattr(args, flag) < 1:
            raise FedLoraError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    result = evaluate_adapter(
        args.adapter,
        args.data,
        base=args.base,
        data_format=args.format,
        template=args.template,
        columns=dict(args.column or []),
        max_length=args.max_length,
        device=args.device,
        dtype=args.dtype,
        options=EvalOptions(
            batch_size=args.batch_size, max_examples=args.max_examples, max_answer_tokens=args.max_answer_tokens
        ),
    )
    print(json.dumps(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedlora", description="Federated LoRA fine-tuning on Flower.")
    _add_debug(parser)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (_add_simulate, _add_runs_tools, _add_evaluate, _add_deploy_tools):
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    return _run(args.func, args)


def cmd_certs(args: argparse.Namespace) -> int:
    from fedlora.certs import create_certs

    names = [n.strip() for n in args.node_names.split(",") if n.strip()] if args.node_names else None
    files = create_certs(
        args.out, args.server_host, nodes=args.nodes, node_names=names, days=args.days, force=args.force
    )
    print(f"CA certificate:     {files.ca_cert}  (copy to every client: fedlora-client --ca)")
    print(f"CA key:             {files.ca_key}  (keep private; it signs certificates)")
    print(
        f"server certificate: {files.server_cert}, key {files.server_key}  (fedlora-server --certs "
        f"{args.out}), valid for {args.server_host}, localhost, 127.0.0.1"
    )
    for key, pub in zip(files.node_keys, files.node_public_keys):
        print(f"node key pair:      {key} (give to one device: fedlora-client --key), {pub}")
    if files.node_keys:
        print(f"Authorise them: fedlora-server PRESET --certs {args.out} --auth-keys {files.node_keys[0].parent}")
    return 0


def cmd_partition(args: argparse.Namespace) -> int:
    from fedlora.data import write_partitions

    cfg = load_run_config(args.preset, args.set or [])
    clients = args.clients or cfg.federation.clients
    if clients < 1:
        raise FedLoraError(f"--clients must be >= 1, got {clients}")
    for path in write_partitions(cfg, args.out, clients):
        print(path)
    return 0


def _server_parser() -> argparse.ArgumentParser:
    from fedlora.server.launcher import DEFAULT_PORT

    p = _Parser(
        prog="fedlora-server",
        description=(
            "Start a Flower SuperLink and run one federation on it: clients join with fedlora-client. "
            "Writes runs/<name>/ as `fedlora simulate` does."
        ),
    )
    p.add_argument("preset", help="preset TOML path or packaged name")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--certs", help="folder with ca.crt, server.crt, server.key (from `fedlora certs`)")
    p.add_argument("--insecure", action="store_true", help="no TLS (trusted test networks only; prints a warning)")
    p.add_argument(
        "--auth-keys",
        metavar="DIR",
        help="only SuperNodes whose public key is a *.pub file in DIR may join (needs TLS)",
    )
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all interfaces)")
    p.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"the port devices dial: Flower's Fleet API only, the rest stays on loopback (default {DEFAULT_PORT})",
    )
    p.add_argument(
        "--database", metavar="PATH", help="SuperLink state file (SQLite) that survives restarts (default: in memory)"
    )
    p.add_argument("--out", help="run directory (default: runs/<name>/)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run directory from its last good checkpoint, with its own config.toml "
        "(--set may change rounds and operational keys only)",
    )
    _add_server_waits(p)
    _add_fleet_limits(p)
    _add_debug(p)
    return p


def _add_server_waits(p: argparse.ArgumentParser) -> None:
    """How long ``fedlora-server`` waits for clients, replies and its SuperLink."""
    p.add_argument(
        "--min-clients",
        type=int,
        metavar="N",
        help="clients that must be connected before round 1 (default: federation.clients)",
    )
    p.add_argument(
        "--wait-clients",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="how long to wait for them before giving up (default 300)",
    )
    p.add_argument(
        "--round-timeout",
        type=float,
        metavar="SECONDS",
        help="seconds to wait for replies each round (sets federation.round_timeout)",
    )
    p.add_argument(
        "--startup-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long the SuperLink may take to start (default 60)",
    )


def _add_fleet_limits(p: argparse.ArgumentParser) -> None:
    """What the fleet port accepts (fedlora.server.gateway; docs/deployment.md: "The fleet port")."""
    from fedlora.server.gateway import GatewayLimits as L

    g = p.add_argument_group("fleet port limits")
    g.add_argument(
        "--max-request-mb",
        type=float,
        metavar="MB",
        help="largest request body a device may send; larger ones get 413 unread (default: from the run's adapter "
        "size, 2 x its values at the upload precision + 16 MB)",
    )
    g.add_argument(
        "--max-inflight-mb",
        type=float,
        metavar="MB",
        help="request bytes forwarded at once, all devices together; beyond it 503 (retried by devices) "
        "(default: 8 x --max-request-mb, at least 1024)",
    )
    g.add_argument(
        "--max-connections",
        type=int,
        default=L.max_connections,
        metavar="N",
        help=f"open connections in all; at the cap an idle one is dropped for a newcomer (default {L.max_connections})",
    )
    g.add_argument(
        "--max-connections-per-peer",
        type=int,
        default=L.max_connections_per_peer,
        metavar="N",
        help=f"open connections from one address (default {L.max_connections_per_peer})",
    )
    g.add_argument(
        "--header-timeout",
        type=float,
        default=L.header_timeout,
        metavar="SECONDS",
        help=f"TLS handshake, request line and headers must arrive within this (default {L.header_timeout:g})",
    )


def server_main(argv: list[str] | None = None) -> int:
    """``fedlora-server``: SuperLink + one federation run (see :mod:`fedlora.server.launcher`)."""
    args = _server_parser().parse_args(argv)
    _quiet_libraries()

    def go(args: argparse.Namespace) -> int:
        from fedlora.server.launcher import ServerOptions, serve

        overrides = list(args.set or [])
        if args.round_timeout is not None:
            overrides.append(f"federation.round_timeout={args.round_timeout}")
        if args.resume:  # the run on disk says what runs, as for `fedlora simulate --resume`
            cfg, out = resume_run_config(args.preset, overrides, args.out)
        else:
            cfg, out = load_run_config(args.preset, overrides), args.out
        opts = ServerOptions(
            out=Path(out) if out else Path("runs") / cfg.name,
            certs=Path(args.certs) if args.certs else None,
            insecure=args.insecure,
            auth_keys=Path(args.auth_keys) if args.auth_keys else None,
            host=args.host,
            port=args.port,
            database=str(Path(args.database).resolve()) if args.database else None,
            min_clients=args.min_clients,
            wait_clients=args.wait_clients,
            resume=args.resume,
            startup_timeout=args.startup_timeout,
            max_request_mb=args.max_request_mb,
            max_inflight_mb=args.max_inflight_mb,
            max_connections=args.max_connections,
            max_connections_per_peer=args.max_connections_per_peer,
            header_timeout=args.header_timeout,
        )
        return serve(cfg, opts, emit=lambda line: print(line, flush=True))

    return _run(go, args, prog="fedlora-server")


def _rank_arg(value: str) -> int | str:
    """``--rank``: a positive integer, or ``auto``."""
    if value == "auto":
        return value
    try:
        rank = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1 or auto, got {value!r}") from None
    if rank < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1 or auto, got {value!r}")
    return rank


def _client_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="fedlora-client",
        description=(
            "Join a fedlora federation from this device: a Flower SuperNode running fedlora's ClientApp on "
            "a local data file, which never leaves the device."
        ),
    )
    p.add_argument("--server", required=True, metavar="HOST:PORT", help="the fedlora-server to join")
    p.add_argument("--ca", help="CA certificate that signed the server's (ca.crt from `fedlora certs`)")
    p.add_argument("--insecure", action="store_true", help="no TLS, for a server started with --insecure")
    p.add_argument("--data", required=True, help="local csv/tsv/json/jsonl/parquet file with the run's columns")
    p.add_argument(
        "--rank",
        type=_rank_arg,
        help="LoRA rank this device trains, or auto: the largest that fits its free memory (default: the run's)",
    )
    p.add_argument(
        "--quantization",
        choices=("auto", *QUANTIZATIONS),
        help="base-model precision on this device, or auto: the least quantized that fits (default: the run's)",
    )
    p.add_argument(
        "--device",
        help="where this device trains: auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N, mps (default: the run's)",
    )
    p.add_argument("--key", help="this node's private key (from `fedlora certs`), when the server uses --auth-keys")
    p.add_argument(
        "--partition-id",
        type=int,
        metavar="N",
        help="this device's index: seeds its training and picks its [[federation.profiles]] entry",
    )
    p.add_argument(
        "--export-dir",
        default="fedlora-adapters",
        help="where a personalized run writes this device's own adapter (default ./fedlora-adapters)",
    )
    p.add_argument(
        "--max-retries",
        type=int,
        default=8,
        help="connection attempts to a server that is not up yet, with backoff (default 8)",
    )
    p.add_argument(
        "--max-wait",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="how long to keep reconnecting after the server goes away (default 600)",
    )
    p.add_argument("--verbose", action="store_true", help="also show Flower's SuperNode log")
    p.add_argument(
        "--no-worker",
        action="store_true",
        help="no long-lived worker: every message loads the model in a fresh process (slower; for comparison)",
    )
    _add_debug(p)
    return p


def client_main(argv: list[str] | None = None) -> int:
    """``fedlora-client``: a SuperNode with fedlora's ClientApp (see :mod:`fedlora.client.launcher`)."""
    args = _client_parser().parse_args(argv)
    _quiet_libraries()

    def go(args: argparse.Namespace) -> int:
        from fedlora.client.launcher import ClientOptions, run_client

        opts = ClientOptions(
            server=args.server,
            data=Path(args.data),
            ca=Path(args.ca) if args.ca else None,
            insecure=args.insecure,
            rank=args.rank,
            device=args.device,
            quantization=args.quantization,
            key=Path(args.key) if args.key else None,
            partition_id=args.partition_id,
            export_dir=Path(args.export_dir) if args.export_dir else None,
            max_retries=args.max_retries,
            max_wait=args.max_wait,
            verbose=args.verbose,
            **({"worker": False} if args.no_worker else {}),
        )
        return run_client(opts, emit=lambda line: print(line, flush=True))

    return _run(go, args, prog="fedlora-client")


if __name__ == "__main__":
    raise SystemExit(main())
