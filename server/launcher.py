"""``fedlora-server``: a Flower SuperLink plus one federation run on it.

What the command does, in order (every user mistake stops it before anything starts, with one
line naming the problem):

1. checks the preset (model, data, strategy: :func:`~fedlora.server.server_app.prepare`), the
   TLS files, the node keys, the run directory and the port;
2. starts Flower's ``flower-superlink`` on loopback only, with TLS (``--insecure`` must be asked
   for), node authentication when ``--auth-keys`` is given, and ``--database`` for a state that
   survives restarts; its own log goes to ``runs/<name>/superlink.log``. Flower 1.41 serves its
   Fleet, Control and ServerAppIo (runtime) APIs on one HTTP port, so the devices never see that
   port: ``--host``/``--port`` is a :class:`FleetGateway` that forwards the Fleet API
   (``/v1/fleet/...``) and refuses everything else, so a device cannot register node keys,
   start or stop runs, read the run's logs or take the ServerApp's tasks;
3. registers each public key of ``--auth-keys`` through the SuperLink's Control API on loopback
   (the operator path), so only SuperNodes holding one of the private keys may join;
4. submits the run: a Flower App Bundle (FAB) whose components are this package's
   ServerApp (:mod:`fedlora.server.deployed_app`) and ClientApp, and whose run config carries
   the resolved preset. fedlora itself is installed on every machine, so the bundle holds only
   its ``pyproject.toml`` and needs no dependency installation at run time;
5. streams the run's log (rounds, clients, accuracy) to the terminal until the run ends, stops
   the SuperLink and exits 0 on success, 1 when the run failed, 130 on Ctrl-C.
"""

from __future__ import annotations

import math
import re
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fedlora.config import RunConfig
from fedlora.deploy.certs import CA_CERT, SERVER_CERT, SERVER_KEY, check_certificate, load_public_keys
from fedlora.errors import FedLoraError, RunFailed
from fedlora.run.directory import RunDirectory

from .deployed_app import DONE_PREFIX, ERROR_PREFIX
from .fleet_auth import NodeKeys
from .gateway_limits import MIB, GatewayLimits, request_limit
from .superlink import _ANSI, SuperLink, fab_files

DEFAULT_PORT = 9092
# Flower's own INFO chatter from the ServerApp process (process start, FAB installation).
_NOISE = re.compile(r"^(INFO\s*:|DEBUG\s*:|Successfully installed )|Warning: |warnings\.warn\(|kernels-community")


@dataclass
class ServerOptions:
    """What ``fedlora-server`` was asked for (see ``fedlora-server --help``)."""

    out: Path
    certs: Path | None = None
    insecure: bool = False
    auth_keys: Path | None = None
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    database: str | None = None
    min_clients: int | None = None
    wait_clients: float = 300.0
    resume: bool = False
    startup_timeout: float = 60.0
    #: The fleet port's limits (:mod:`fedlora.server.gateway`); None: derived from the run / defaults.
    max_request_mb: float | None = None
    max_inflight_mb: float | None = None
    max_connections: int = GatewayLimits.max_connections
    max_connections_per_peer: int = GatewayLimits.max_connections_per_peer
    header_timeout: float = GatewayLimits.header_timeout

    def limits(self) -> GatewayLimits:
        """The fleet port's limits, before the run's own request bound is known."""
        limits = GatewayLimits(
            max_connections=self.max_connections,
            max_connections_per_peer=self.max_connections_per_peer,
            header_timeout=self.header_timeout,
        )
        if self.max_request_mb is not None:
            limits = replace(limits, max_request_bytes=int(self.max_request_mb * MIB))
        if self.max_inflight_mb is not None:
            limits = replace(limits, max_inflight_bytes=int(self.max_inflight_mb * MIB))
        return limits


def check_port_free(host: str, port: int) -> None:
    """Raise a FedLoraError when ``host:port`` cannot be bound (in use, or not this machine's)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            raise FedLoraError(f"--host {host} --port {port}: cannot listen there ({err.strerror})") from None


def tls_files(certs: Path) -> dict[str, Path]:
    """The CA, server certificate and key in ``certs``; a FedLoraError names a missing or bad one."""
    if not certs.is_dir():
        raise FedLoraError(
            f"--certs {certs}: not a folder (make one with `fedlora certs --out {certs} --server-host HOST`)"
        )
    certs = certs.resolve()
    files = {"ca": certs / CA_CERT, "cert": certs / SERVER_CERT, "key": certs / SERVER_KEY}
    for path in files.values():
        if not path.is_file():
            raise FedLoraError(f"--certs: missing {path} (needs {CA_CERT}, {SERVER_CERT}, {SERVER_KEY})")
    check_certificate(files["ca"], "--certs")
    check_certificate(files["cert"], "--certs")
    if b"PRIVATE KEY" not in files["key"].read_bytes():
        raise FedLoraError(f"--certs: {files['key']} is not a PEM private key")
    return files


def _show(text: str, emit: Callable[[str], None], errors: list[str]) -> None:
    for raw in text.splitlines():
        line = _ANSI.sub("", raw).rstrip()
        if line.startswith(ERROR_PREFIX):
            errors.append(line[len(ERROR_PREFIX) :])
            continue
        if errors:  # after fedlora's own error line, Flower's traceback of it adds nothing
            continue
        if not line.strip() or _NOISE.search(line) or line.startswith(DONE_PREFIX):
            continue
        emit(line)


def _check_options(opts: ServerOptions, emit: Callable[[str], None]) -> tuple[dict[str, Path] | None, dict[str, bytes]]:
    """The TLS files and node keys ``opts`` name; a FedLoraError for the first bad flag."""
    if opts.auth_keys is not None and opts.insecure:
        raise FedLoraError("--auth-keys needs TLS: node authentication is signed over TLS; drop --insecure")
    tls = None
    if opts.insecure:
        emit(
            "fedlora-server: WARNING: --insecure: traffic to and from the clients is NOT encrypted; "
            "use it only on a trusted network"
        )
    else:
        if opts.certs is None:
            raise FedLoraError(
                "--certs DIR is required (make one with `fedlora certs --out certs/ --server-host "
                "HOST`), or pass --insecure for an unencrypted test setup"
            )
        tls = tls_files(opts.certs)
    keys = load_public_keys(opts.auth_keys) if opts.auth_keys is not None else {}
    if opts.min_clients is not None and opts.min_clients < 1:
        raise FedLoraError(f"--min-clients must be >= 1, got {opts.min_clients}")
    if opts.wait_clients <= 0:
        raise FedLoraError(f"--wait-clients must be > 0 seconds, got {opts.wait_clients:g}")
    if not 0 < opts.port < 65536:
        raise FedLoraError(f"--port must be 1-65535, got {opts.port}")
    _check_limits(opts)
    return tls, keys


def _check_limits(opts: ServerOptions) -> None:
    """The fleet port's flags: positive, finite numbers (one line naming the flag)."""
    for flag, value in (
        ("--max-request-mb", opts.max_request_mb),
        ("--max-inflight-mb", opts.max_inflight_mb),
        ("--max-connections", opts.max_connections),
        ("--max-connections-per-peer", opts.max_connections_per_peer),
        ("--header-timeout", opts.header_timeout),
    ):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise FedLoraError(f"{flag} must be a number > 0, got {value:g}")


def run_request_limit(prepared: Any) -> int:
    """:func:`~fedlora.server.gateway_limits.request_limit` of a prepared run: every trainable value of
    the global adapter (heads included; one adapter per task for multi-task strategies) at the
    upload's float width (quantized uploads are smaller)."""
    host = prepared.host
    values = sum(p.numel() for p in host.params(host.ensure(prepared.spec, seed=prepared.cfg.seed)).values())
    tasks = max(len(getattr(prepared.data, "tasks", None) or ()), 1)
    width = 4 if prepared.cfg.federation.transport_dtype == "float32" else 2
    return request_limit(values * tasks, width)


def serve(cfg: RunConfig, opts: ServerOptions, emit: Callable[[str], None] = print, poll: float = 0.5) -> int:
    """Run ``cfg`` on a fresh SuperLink until it ends; return the process exit status.

    Raises a FedLoraError for every problem found before the run starts.
    """
    tls, keys = _check_options(opts, emit)
    # The folder's lock, held by this process until the run ends (the ServerApp process it starts
    # writes there under it): one run writes a run directory at a time.
    run_dir = RunDirectory.open(opts.out, resume=opts.resume)
    link = SuperLink(opts, run_dir.path / "superlink.log", tls, NodeKeys(keys.values()) if keys else None, emit)
    run_id = None
    try:
        if opts.resume:
            run_dir.check_resume_config(cfg)  # the run on disk keeps its meaning: strategy, clients, adapter
        check_port_free(opts.host, opts.port)
        link.launch()  # boots while the preset is checked
        try:
            _prepare(cfg, opts, link, emit)
        except FedLoraError:
            link.stop()
            if run_dir.lock is not None and run_dir.lock.created:
                shutil.rmtree(run_dir.path, ignore_errors=True)  # a rejected preset leaves no trace
            raise
        link.wait_ready()
        scheme = "insecure" if tls is None else "TLS"
        emit(
            f"fedlora-server: SuperLink on {opts.host}:{opts.port} ({scheme}"
            f"{', node authentication' if keys else ''}{', state ' + opts.database if opts.database else ''})"
        )
        if keys:
            link.register_keys(keys)
            emit(f"fedlora-server: {len(keys)} node key(s) authorised from {opts.auth_keys}: {', '.join(keys)}")
        link.open_gateway()
        run_id = link.start_run(fab_files(cfg, run_dir.path.resolve(), opts))
        emit(
            f"fedlora-server: run {run_id} ({cfg.name}, strategy {cfg.strategy.name}, {cfg.rounds} rounds) "
            f"submitted; clients connect with fedlora-client --server <this host>:{opts.port}"
        )
        sub_status, errors = _follow(link, run_id, emit, poll)
        run_id = None
        if sub_status != "completed":
            raise RunFailed(errors[-1] if errors else f"the run {sub_status} (see {link.log_path})")
        _summary(cfg, run_dir.path, emit)
        return 0
    except KeyboardInterrupt:
        if run_id is not None:
            link.stop_run(run_id)
        emit("fedlora-server: interrupted; the run was stopped (continue it with --resume)")
        return 130
    finally:
        link.stop()
        run_dir.close()


def _prepare(cfg: RunConfig, opts: ServerOptions, link: SuperLink, emit: Callable[[str], None]) -> None:
    """Check the preset as the run will (a preset it would reject is rejected before it starts)
    and size the fleet port's largest request from the run's adapter."""
    from fedlora.model.loading import clear_cache

    from .server_app import prepare

    prepared = prepare(cfg, check_partitions=False)
    if opts.max_request_mb is None:
        link.gateway.set_limits(max_request_bytes=run_request_limit(prepared))
    limits = link.gateway.limits
    if opts.max_inflight_mb is None:  # room for a few largest requests at once, and at least 1 GiB
        link.gateway.set_limits(max_inflight_bytes=max(8 * limits.max_request_bytes, 1 << 30))
    del prepared
    clear_cache()  # the ServerApp process loads its own copy
    emit(
        f"fedlora-server: fleet port accepts requests up to {link.gateway.limits.max_request_bytes / MIB:.1f} MB, "
        f"{limits.max_connections} connections ({limits.max_connections_per_peer} per address)"
    )


def _follow(link: SuperLink, run_id: int, emit: Callable[[str], None], poll: float) -> tuple[str, list[str]]:
    """Stream the run's log to ``emit`` until it ends: its sub-status and fedlora's error lines."""
    errors: list[str] = []
    pending = [""]  # a chunk may end mid-line

    def on_text(text: str) -> None:
        *lines, pending[0] = (pending[0] + text).split("\n")
        _show("\n".join(lines), emit, errors)

    after = 0.0
    while True:
        after = link.follow_logs(run_id, after, on_text)
        if link.process is not None and link.process.poll() is not None:
            raise FedLoraError(f"the SuperLink stopped during the run: {link._log_error()}")
        status, sub_status = link.status(run_id)
        if status == "finished":
            break
        time.sleep(poll)
    _show(pending[0], emit, errors)
    return sub_status, errors


def _summary(cfg: RunConfig, run_dir: Path, emit: Callable[[str], None]) -> None:
    import json

    metric = "eval_perplexity" if cfg.model.task == "causal_lm" else "eval_accuracy"
    emit(f"\nResults in {run_dir}/ (metrics.jsonl, config.toml, checkpoints/, adapter/, report.md)")
    try:
        rounds = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    except OSError:
        rounds = []
    for record in rounds:
        if metric in record:
            emit(f"  round {record['round']}: {metric} {record[metric]:.4f}")
    emit(f"Load the adapter: PeftModel.from_pretrained(base, {str(run_dir / 'adapter')!r})")
