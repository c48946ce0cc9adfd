"""The SuperLink ``fedlora-server`` runs on loopback, and the Flower App it hands its ServerApp.

:class:`SuperLink` starts Flower's ``flower-superlink`` (its Fleet, Control and ServerAppIo APIs on
loopback ports only: the devices reach it through :mod:`fedlora.server.gateway`), submits the run
as a Flower App built by :func:`fab_files`, follows the ServerApp's output and stops every process
it started, whatever ends the run.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomli_w

import fedlora
from fedlora.config import RunConfig
from fedlora.deploy.processes import die_with_parent, end_group, loopback_port, tool, tool_env
from fedlora.errors import FedLoraError
from fedlora.wire import protocol as P

from .fleet_auth import NodeKeys
from .gateway import FleetGateway

if TYPE_CHECKING:
    from .launcher import ServerOptions

SERVER_APP = "fedlora.server.deployed_app:app"
CLIENT_APP = "fedlora.client.entry:app"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


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
