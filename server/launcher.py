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

import contextlib
import hashlib
import io
import math
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import tomli_w

import fedlora
from fedlora.config import RunConfig
from fedlora.deploy.certs import CA_CERT, SERVER_CERT, SERVER_KEY, check_certificate, load_public_keys
from fedlora.deploy.processes import die_with_parent, end_group, loopback_port, tool, tool_env
from fedlora.errors import FedLoraError, RunFailed
from fedlora.run.directory import RunDirectory
from fedlora.wire import protocol as P

from .deployed_app import DONE_PREFIX, ERROR_PREFIX
from .fleet_auth import NodeKeys
from .gateway import MIB, FleetGateway, GatewayLimits, request_limit

DEFAULT_PORT = 9092
SERVER_APP = "fedlora.server.deployed_app:app"
CLIENT_APP = "fedlora.client.entry:app"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
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


def fab_files(cfg: RunConfig, run_dir: Path, opts: ServerOptions) -> dict[str, bytes]:
    """The Flower App Bundle of one run: a pyproject.toml naming fedlora's apps, the run in its config."""
    project = {
        "project": {
            "name": "fedlora-run",
            "version": re.sub(r"[^0-9.]", "", fedlora.__version__) or "0.0.0",
            "description": f"fedlora federation {cfg.name}",
            "license": "Apache-2.0",
            # fedlora is installed on the server and on every device; nothing to install per run.
            "dependencies": [],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "fedlora",
                    "components": {"serverapp": SERVER_APP, "clientapp": CLIENT_APP},
                    "config": {
                        P.RUN_CONFIG_FEDLORA: cfg.to_json(),
                        P.RUN_CONFIG_RUN_DIR: str(run_dir),
                        P.RUN_CONFIG_RESUME: bool(opts.resume),
                        P.RUN_CONFIG_MIN_CLIENTS: int(
                            opts.min_clients if opts.min_clients is not None else cfg.federation.clients
                        ),
                        P.RUN_CONFIG_WAIT_CLIENTS: float(opts.wait_clients),
                    },
                }
            }
        },
    }
    return {"pyproject.toml": tomli_w.dumps(project).encode()}


class SuperLink:
    """A ``flower-superlink`` child process on loopback and a Control API client to it."""

    def __init__(
        self,
        opts: ServerOptions,
        log_path: Path,
        tls: dict[str, Path] | None,
        keys: NodeKeys | None = None,
        emit: Callable[[str], None] = print,
    ):
        self.opts = opts
        self.keys = keys
        self.emit = emit
        self.log_path = log_path
        self.tls = tls
        self.process: subprocess.Popen | None = None
        self.client: Any = None
        self.gateway: FleetGateway | None = None
        # Fleet, Control and ServerAppIo share this port: only this host may reach it.
        self.internal_port = loopback_port()

    def command(self) -> list[str]:
        o = self.opts
        cmd = [
            tool("flower-superlink"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.internal_port),
            "--isolation",
            "subprocess",
            "--disable-runtime-dependency-installation",
        ]
        if self.tls is None:
            cmd.append("--insecure")
        else:
            cmd += [
                "--ssl-ca-certfile",
                str(self.tls["ca"]),
                "--ssl-certfile",
                str(self.tls["cert"]),
                "--ssl-keyfile",
                str(self.tls["key"]),
            ]
        if o.auth_keys is not None:
            cmd.append("--enable-supernode-auth")
        if o.database:
            cmd += ["--database", o.database]
        return cmd

    def launch(self) -> None:
        """Start the process and bind the devices' gateway (served from :meth:`open_gateway`);
        :meth:`wait_ready` connects to the process."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log_file:
            # Own session: stopping it takes the SuperExec and ServerApp processes along; it dies
            # with fedlora-server even when that is SIGKILLed.
            self.process = subprocess.Popen(
                self.command(),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=tool_env(),
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
        try:
            self.gateway = FleetGateway(
                self.opts.host,
                self.opts.port,
                self.internal_port,
                self.tls,
                limits=self.opts.limits(),
                keys=self.keys,
                emit=self.emit,
            )
        except OSError as err:
            raise FedLoraError(
                f"--host {self.opts.host} --port {self.opts.port}: cannot listen there ({err.strerror})"
            ) from None

    def open_gateway(self) -> None:
        """Serve the devices (the port is bound since :meth:`launch`, so nothing else takes it):
        called once the node keys are in, so a device that arrives early waits on its handshake
        instead of being refused for a key that was about to be registered."""
        self.gateway.start()

    def wait_ready(self) -> None:
        self.client = self._wait_ready()

    def _log_error(self) -> str:
        try:
            lines = [_ANSI.sub("", ln).strip() for ln in self.log_path.read_text(errors="replace").splitlines()]
        except OSError:
            return ""
        errors = [ln for ln in lines if "ERROR" in ln or "Error" in ln or "error" in ln]
        return (errors or lines or [""])[-1][:300]

    def _wait_ready(self) -> Any:
        from flwr.cli.typing import SuperLinkConnection
        from flwr.cli.utils import init_http_client_from_connection
        from flwr.proto.control_pb2 import ListRunsRequest

        address = f"127.0.0.1:{self.internal_port}"
        conn = SuperLinkConnection(
            name="fedlora-server",
            address=address,
            root_certificates=str(self.tls["ca"]) if self.tls else None,
            insecure=self.tls is None,
        )
        deadline = time.monotonic() + self.opts.startup_timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise FedLoraError(
                    f"the SuperLink exited at start-up (code {self.process.returncode}): "
                    f"{self._log_error()} (log: {self.log_path})"
                )
            client = None
            try:
                with contextlib.redirect_stdout(io.StringIO()):  # Flower's CLI announces the connection
                    client = init_http_client_from_connection(conn)
                client.ListRuns(ListRunsRequest(limit=1))
                return client
            except (Exception, SystemExit) as err:  # noqa: BLE001 - not up yet; Flower's CLI helpers may exit
                last = err if isinstance(err, Exception) else RuntimeError(str(err))
                if client is not None:
                    client.close()
                time.sleep(0.3)
        raise FedLoraError(
            f"the SuperLink did not answer on {address} within {self.opts.startup_timeout:g} s "
            f"({type(last).__name__}: {str(last).splitlines()[0] if last else ''}; log: {self.log_path})"
        )

    def register_keys(self, keys: dict[str, bytes]) -> int:
        """Authorise these node public keys (PEM); return how many were new.

        Keys the SuperLink already holds (a persistent ``--database`` from an earlier start: a
        restart with ``--resume``) are left as they are: registering one again is refused by
        Flower with HTTP 412, so they are listed first and skipped.
        """
        from cryptography.hazmat.primitives import serialization
        from flwr.proto.control_pb2 import ListNodesRequest, RegisterNodeRequest
        from flwr.supercore.primitives.asymmetric import public_key_to_bytes

        known = {
            bytes(n.public_key)
            for n in self.client.ListNodes(ListNodesRequest()).nodes_info
            if not n.HasField("unregistered_at")
        }
        added = 0
        for name, pem in keys.items():
            raw = public_key_to_bytes(serialization.load_pem_public_key(pem))
            if raw in known:
                continue
            try:
                self.client.RegisterNode(RegisterNodeRequest(public_key=raw, name=name))
            except Exception as err:  # noqa: BLE001 - Flower's HTTP client raises httpx errors
                raise FedLoraError(
                    f"--auth-keys: the SuperLink refused key {name!r}: {str(err).splitlines()[0]}"
                ) from None
            known.add(raw)
            added += 1
        return added

    def start_run(self, files: dict[str, bytes]) -> int:
        from flwr.cli.build import build_fab_from_files
        from flwr.common.serde import fab_to_proto, user_config_to_proto
        from flwr.proto.control_pb2 import StartRunRequest
        from flwr.supercore.fab import Fab

        fab, _ = build_fab_from_files(files)
        res = self.client.StartRun(
            StartRunRequest(
                fab=fab_to_proto(Fab(hashlib.sha256(fab).hexdigest(), fab, {})),
                override_config=user_config_to_proto({}),
            )
        )
        if not res.HasField("run_id"):
            raise FedLoraError(f"the SuperLink did not accept the run{': ' + res.note if res.HasField('note') else ''}")
        return int(res.run_id)

    def status(self, run_id: int) -> tuple[str, str]:
        from flwr.proto.control_pb2 import ListRunsRequest

        run = self.client.ListRuns(ListRunsRequest(run_id=run_id)).run_dict[run_id]
        return str(run.status.status), str(run.status.sub_status)

    def follow_logs(self, run_id: int, after: float, on_text: Callable[[str], None]) -> float:
        """Pass the run's log to ``on_text`` as it is written; return when the run ends (or the
        stream breaks) with the timestamp to continue from."""
        from flwr.proto.control_pb2 import StreamLogsRequest

        latest = after
        try:
            for res in self.client.StreamLogs(StreamLogsRequest(run_id=run_id, after_timestamp=after)):
                on_text(res.log_output)
                latest = max(latest, float(res.latest_timestamp))
        except Exception:  # noqa: BLE001 - the caller checks the run and the SuperLink, and follows again
            time.sleep(0.5)
        return latest

    def stop_run(self, run_id: int) -> None:
        from flwr.proto.control_pb2 import StopRunRequest

        try:
            self.client.StopRun(StopRunRequest(run_id=run_id))
        except Exception:  # noqa: BLE001 - stopping anyway
            pass

    def stop(self, grace: float = 15.0) -> None:
        if self.gateway is not None:
            self.gateway.stop()
            self.gateway = None
        if self.client is not None:
            try:
                self.client.close()
            except Exception:  # noqa: BLE001
                pass
            self.client = None
        if self.process is not None:
            end_group(self.process, grace)


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
    """:func:`~fedlora.server.gateway.request_limit` of a prepared run: every trainable value of
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

    metric = "eval_accuracy" if cfg.model.task == "classification" else "eval_perplexity"
    emit(f"\nResults in {run_dir}/ (metrics.jsonl, config.toml, checkpoints/, adapter/, report.md)")
    try:
        rounds = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    except OSError:
        rounds = []
    for record in rounds:
        if metric in record:
            emit(f"  round {record['round']}: {metric} {record[metric]:.4f}")
    emit(f"Load the adapter: PeftModel.from_pretrained(base, {str(run_dir / 'adapter')!r})")
