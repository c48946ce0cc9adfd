"""``fedlora-server`` and ``fedlora-client``: their parsers and entry points."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedlora.cli.common import _add_debug, _Parser, _quiet_libraries, _run, load_run_config, resume_run_config
from fedlora.config import QUANTIZATIONS


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
    from fedlora.server.gateway_limits import GatewayLimits as L

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
    _add_device_choices(p)
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


def _add_device_choices(p: argparse.ArgumentParser) -> None:
    """What this device trains with, each defaulting to the run's: rank, precision, base, device."""
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
        "--model",
        help="this device's own base model, a hub name or a local folder (default: the run's; another base only "
        "under a strategy for clients of different bases, pfedlora)",
    )
    p.add_argument(
        "--device",
        help="where this device trains: auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N, mps (default: the run's)",
    )


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
            model=args.model,
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
