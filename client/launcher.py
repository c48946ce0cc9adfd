"""``fedlora-client``: a Flower SuperNode running fedlora's ClientApp on this device's own data.

What the command does, in order:

1. checks its inputs (server address, CA certificate, data file, rank, node key) and stops with
   one line naming the first bad one;
2. reaches the server: a TCP connection and, with TLS, a handshake against ``--ca``, retried with
   exponential backoff up to ``--max-retries`` times, so a server that is still starting is
   waited for, a wrong CA is reported as such and an unreachable server ends the command
   instead of hanging;
3. starts its worker (:mod:`fedlora.client.worker`): one long-lived process that imports
   torch/transformers/fedlora and loads the base model once and handles every message of the
   run, on a Unix socket in a private directory with a random key (``FEDLORA_CLIENT_WORKER=0``:
   no worker, every message in a fresh process as before);
4. starts Flower's ``flower-supernode`` with the node config fedlora's ClientApp reads
   (``data-path``, ``rank``, ``partition-id``, ``export-dir``, ``worker-address``). The
   SuperNode asks the server for work, starts the light ClientApp (:mod:`fedlora.client.entry`)
   for each message, which hands it to the worker, and sends back only adapter factors and
   metrics; the file under ``--data`` never leaves the device. After a network drop or a server
   restart the SuperNode reconnects by itself, for up to ``--max-wait`` seconds;
5. runs until stopped (Ctrl-C or SIGTERM: exit 0, the SuperNode, its ClientApp processes and
   the worker shut down with it), or until the server refuses it or stays away: one line,
   exit 1. A worker that dies is restarted (a line says so) up to ``WORKER_RESTARTS`` times;
   after that the command stops with one line, exit 1.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fedlora import protocol as P
from fedlora.certs import check_certificate, check_private_key
from fedlora.config import DEVICE_PATTERN, QUANTIZATIONS
from fedlora.errors import ConnectError, FedLoraError, RunFailed

from .worker import AUTHKEY_ENV, NODE_WORKER_ADDRESS, WORKER_SWITCH_ENV, private_socket, spawn

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
PREFIX = "fedlora-client: "
REFUSAL_RETRIES = 3
#: How often a worker that died is started again before fedlora-client gives up.
WORKER_RESTARTS = 3
#: How long a starting worker may take to listen on its socket.
WORKER_START_TIMEOUT = 60.0


def worker_default() -> bool:
    """Whether fedlora-client runs a worker: yes, unless ``FEDLORA_CLIENT_WORKER=0``."""
    return os.environ.get(WORKER_SWITCH_ENV, "1").strip() not in ("0", "false", "no", "off")


@dataclass
class ClientOptions:
    """What ``fedlora-client`` was asked for (see ``fedlora-client --help``)."""

    server: str
    data: Path
    ca: Path | None = None
    insecure: bool = False
    rank: int | str | None = None
    key: Path | None = None
    device: str | None = None
    quantization: str | None = None
    partition_id: int | None = None
    export_dir: Path | None = None
    max_retries: int = 8
    max_wait: float = 600.0
    connect_timeout: float = 5.0
    verbose: bool = False
    worker: bool = field(default_factory=worker_default)


def parse_address(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) as (host, port); a FedLoraError otherwise."""
    match = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^\s:/\[\]]+):(\d+)", value.strip())
    if not match:
        raise FedLoraError(f"--server must be HOST:PORT (e.g. 192.168.1.10:9092), got {value!r}")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 0 < port < 65536:
        raise FedLoraError(f"--server: port must be 1-65535, got {port}")
    return host, port


def check_options(opts: ClientOptions) -> tuple[str, int]:
    """Every input checked before any connection; returns the server's (host, port)."""
    host, port = parse_address(opts.server)
    if opts.insecure:
        if opts.key is not None:
            raise FedLoraError("--key needs TLS: node authentication is only possible over TLS; drop --insecure")
    elif opts.ca is None:
        raise FedLoraError(
            "--ca CA_CERT is required (the ca.crt made by `fedlora certs`, or your organisation's "
            "CA), or pass --insecure to talk to a server running with --insecure"
        )
    else:
        check_certificate(opts.ca, "--ca")
    if not opts.data.is_file():
        raise FedLoraError(f"--data {opts.data}: no such file")
    from fedlora.data import LOCAL_SUFFIXES, _read_local

    if opts.data.suffix.lower() not in LOCAL_SUFFIXES:
        raise FedLoraError(
            f"--data {opts.data}: unsupported format {opts.data.suffix!r} "
            f"({', '.join(sorted(s.lstrip('.') for s in LOCAL_SUFFIXES))})"
        )
    if len(_read_local(opts.data)) == 0:
        raise FedLoraError(f"--data {opts.data}: no examples")
    if opts.rank is not None and opts.rank != "auto" and (not isinstance(opts.rank, int) or opts.rank < 1):
        raise FedLoraError(f"--rank must be an integer >= 1 or auto, got {opts.rank!r}")
    if opts.device is not None:
        if not DEVICE_PATTERN.fullmatch(opts.device):
            raise FedLoraError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {opts.device!r}")
        from fedlora.devices import placement

        placement(opts.device, key="--device")  # asked for a GPU this machine does not have: say so now
    if opts.quantization is not None and opts.quantization not in ("auto", *QUANTIZATIONS):
        raise FedLoraError(f"--quantization must be auto, {', '.join(QUANTIZATIONS)}, got {opts.quantization!r}")
    if opts.partition_id is not None and opts.partition_id < 0:
        raise FedLoraError(f"--partition-id must be >= 0, got {opts.partition_id}")
    if opts.key is not None:
        check_private_key(opts.key)
    if opts.max_retries < 0 or opts.max_wait <= 0:
        raise FedLoraError("--max-retries must be >= 0 and --max-wait > 0")
    for path in (opts.data, opts.export_dir):
        if path is not None and "'" in str(path.resolve()):
            raise FedLoraError(f"{path}: a path with a single quote cannot be passed to the SuperNode; rename it")
    return host, port


def probe(host: str, port: int, ca: Path | None, timeout: float) -> None:
    """One attempt to reach the server (and to verify its certificate against ``ca``).

    Raises ``OSError`` for what a retry may fix (refused, unreachable, timed out) and a
    ConnectError for what it won't (a certificate ``ca`` does not trust, a TLS mismatch).
    """
    with socket.create_connection((host, port), timeout=timeout) as sock:
        if ca is None:
            return
        context = ssl.create_default_context(cafile=str(ca))
        try:
            with context.wrap_socket(sock, server_hostname=host):
                return
        except ssl.SSLCertVerificationError as err:
            raise ConnectError(
                f"the server at {host}:{port} has a certificate that --ca {ca} does not trust "
                f"({err.verify_message}); use the ca.crt made together with the server's certificate"
            ) from None
        except ssl.SSLError as err:
            raise ConnectError(
                f"TLS handshake with {host}:{port} failed ({err.reason}); is the server running with --insecure?"
            ) from None


def reach(
    host: str, port: int, opts: ClientOptions, emit: Callable[[str], None], sleep: Callable[[float], None] = time.sleep
) -> None:
    """:func:`probe` with exponential backoff (1, 2, 4, ... s, at most 30 s) for ``max_retries`` retries."""
    delay = 1.0
    for attempt in range(opts.max_retries + 1):
        try:
            probe(host, port, None if opts.insecure else opts.ca, opts.connect_timeout)
            return
        except ConnectError:
            raise
        except OSError as err:
            reason = err.strerror or type(err).__name__
            if attempt == opts.max_retries:
                raise ConnectError(
                    f"cannot reach the server at {host}:{port} after {attempt + 1} attempts "
                    f"({reason}); is fedlora-server running there and the port open?"
                ) from None
            emit(
                f"{PREFIX}server {host}:{port} not reachable ({reason}); retrying in {delay:g} s "
                f"({attempt + 1}/{opts.max_retries})"
            )
            sleep(delay)
            delay = min(delay * 2, 30.0)


def free_port() -> int:
    """A free loopback port for the SuperNode's local Runtime API (several clients may share a host)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def node_config(opts: ClientOptions, worker_address: str | None = None) -> str:
    """The SuperNode's ``--node-config``: what fedlora's ClientApp reads from ``context.node_config``."""
    items = [f"{P.NODE_DATA_PATH}='{opts.data.resolve()}'"]
    if worker_address is not None:
        items.append(f"{NODE_WORKER_ADDRESS}='{worker_address}'")
    if opts.rank == "auto":
        items.append(f"{P.NODE_RANK}='auto'")
    elif opts.rank is not None:
        items.append(f"{P.NODE_RANK}={int(opts.rank)}")
    if opts.device is not None:
        items.append(f"{P.NODE_DEVICE}='{opts.device}'")
    if opts.quantization is not None:
        items.append(f"{P.NODE_QUANTIZATION}='{opts.quantization}'")
    if opts.partition_id is not None:
        items.append(f"{P.NODE_PARTITION_ID}={int(opts.partition_id)}")
    if opts.export_dir is not None:
        items.append(f"{P.NODE_EXPORT_DIR}='{opts.export_dir.resolve()}'")
    return " ".join(items)


def supernode_command(opts: ClientOptions, runtime_port: int, worker_address: str | None = None) -> list[str]:
    from fedlora.server.launcher import tool

    cmd = [
        tool("flower-supernode"),
        "--superlink",
        opts.server,
        "--node-config",
        node_config(opts, worker_address),
        "--isolation",
        "subprocess",
        "--host",
        "127.0.0.1",
        "--port",
        str(runtime_port),
        "--max-wait-time",
        str(opts.max_wait),
    ]
    if opts.insecure:
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(opts.ca.resolve())]
    if opts.key is not None:
        cmd += ["--auth-supernode-private-key", str(opts.key.resolve())]
    return cmd


class _Watcher:
    """Reads the SuperNode's output: passes fedlora's lines (and, verbose, everything) through and
    remembers what explains an exit."""

    def __init__(self, stream, emit: Callable[[str], None], verbose: bool):
        self.emit = emit
        self.verbose = verbose
        self.node_id = ""
        self.refused = False
        self.last_error = ""
        self.last_line = ""
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream) -> None:
        for raw in iter(stream.readline, ""):
            line = _ANSI.sub("", raw).rstrip()
            if not line:
                continue
            self.last_line = line
            if "SuperNode ID:" in line:
                self.node_id = line.rsplit(":", 1)[-1].strip()
                self.emit(f"{PREFIX}connected as node {self.node_id}; waiting for the server's rounds")
            if "Failed to activate SuperNode" in line or "[code: 2004]" in line:
                self.refused = True
            if "ERROR" in line or "Exit Code" in line or "Traceback" in line:
                self.last_error = line
            if (
                self.verbose
                or line.startswith(PREFIX)
                or (line.startswith(("WARNING", "ERROR")) and "Exit Code" not in line)
            ):
                self.emit(line)
        stream.close()


class Worker:
    """This device's worker process (:mod:`fedlora.client.worker`): its private directory,
    socket and key, and the process itself (restarted on the same socket and key)."""

    def __init__(self, emit: Callable[[str], None], verbose: bool):
        self.emit = emit
        self.verbose = verbose
        self.directory, self.address, self.authkey = private_socket()
        self.process: subprocess.Popen | None = None
        self.watcher: _Watcher | None = None
        self.restarts = 0

    def env(self, base: dict[str, str]) -> dict[str, str]:
        """``base`` plus the key: the worker's and the SuperNode's environment (Flower's SuperExec
        and its ClientApp processes inherit the SuperNode's)."""
        return {**base, AUTHKEY_ENV: self.authkey.hex()}

    def start(self) -> None:
        """Start the process and wait until it listens (or has exited: :meth:`dead` tells)."""
        from fedlora.server.launcher import die_with_parent, tool_env

        self.directory.mkdir(mode=0o700, exist_ok=True)  # a worker that stopped may have removed it
        try:
            os.unlink(self.address)
        except OSError:
            pass
        self.process = spawn(self.address, self.authkey, tool_env(), preexec_fn=die_with_parent())
        self.watcher = _Watcher(self.process.stdout, self.emit, self.verbose)
        deadline = time.monotonic() + WORKER_START_TIMEOUT
        while not os.path.exists(self.address) and self.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)

    def dead(self) -> int | None:
        """The exit status of a worker that stopped, else None."""
        return None if self.process is None else self.process.poll()

    def why(self) -> str:
        code = self.dead()
        if self.watcher is not None:
            self.watcher.thread.join(timeout=2)
        if code is not None and code < 0:
            return f"signal {-code}"
        # A Python failure (an import error, say) ends its output with the exception's line.
        last = self.watcher.last_line if self.watcher is not None else ""
        return f"exit {code}{': ' + last if last and not last.startswith(PREFIX) else ''}"

    def check(self) -> None:
        """Restart a worker that stopped; a RunFailed once it has stopped too often."""
        if self.dead() is None:
            return
        why = self.why()
        if self.restarts >= WORKER_RESTARTS:
            raise RunFailed(f"the worker process stopped ({why}) after {self.restarts} restarts; giving up")
        self.restarts += 1
        self.emit(f"{PREFIX}the worker process stopped ({why}); restarting it ({self.restarts}/{WORKER_RESTARTS})")
        self.start()

    def stop(self) -> None:
        if self.process is not None:
            from fedlora.server.launcher import end_group

            end_group(self.process, grace=10)
        if self.watcher is not None:
            self.watcher.thread.join(timeout=5)
        shutil.rmtree(self.directory, ignore_errors=True)


def run_client(
    opts: ClientOptions, emit: Callable[[str], None] = print, stop_event: threading.Event | None = None
) -> int:
    """Run the SuperNode until it is stopped (0) or gives up (ConnectError).

    ``stop_event`` (tests) or SIGTERM / SIGINT stop it cleanly.
    """
    from fedlora.server.launcher import die_with_parent, end_group, tool_env

    host, port = check_options(opts)
    if opts.insecure:
        emit(f"{PREFIX}WARNING: --insecure: adapter factors and metrics travel unencrypted")
    reach(host, port, opts, emit)
    stop_event = stop_event or threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda *_: stop_event.set())
    emit(
        f"{PREFIX}starting a SuperNode for {host}:{port} (data {opts.data}"
        f"{', rank ' + str(opts.rank) if opts.rank is not None else ''}"
        f"{', quantization ' + opts.quantization if opts.quantization is not None else ''}"
        f"{', device ' + opts.device if opts.device is not None else ''}"
        f"{', authenticated' if opts.key is not None else ''})"
    )
    worker = Worker(emit, opts.verbose) if opts.worker else None
    try:
        if worker is not None:
            worker.start()
        # A refusal is retried a few times: the server authorises its keys just after it starts
        # listening, and an operator may be adding this node's key right now.
        for attempt in range(REFUSAL_RETRIES + 1):
            proc = subprocess.Popen(
                supernode_command(opts, free_port(), worker.address if worker is not None else None),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
                env=worker.env(tool_env()) if worker is not None else tool_env(),
                start_new_session=True,
                # A SIGKILLed fedlora-client takes its SuperNode along (its ClientApps watch it).
                preexec_fn=die_with_parent(),
            )
            watcher = _Watcher(proc.stdout, emit, opts.verbose)
            try:
                while proc.poll() is None and not stop_event.is_set():
                    if worker is not None:
                        worker.check()
                    stop_event.wait(0.2)
            finally:
                end_group(proc, grace=20)
                watcher.thread.join(timeout=5)
            if stop_event.is_set():
                emit(f"{PREFIX}stopped")
                return 0
            if not watcher.refused or attempt == REFUSAL_RETRIES:
                break
            delay = 2.0**attempt
            emit(f"{PREFIX}the server refused this node; retrying in {delay:g} s ({attempt + 1}/{REFUSAL_RETRIES})")
            if stop_event.wait(delay):
                emit(f"{PREFIX}stopped")
                return 0
        if watcher.refused:
            if opts.key is None:
                raise ConnectError(
                    f"the server at {host}:{port} refused this node: it requires node "
                    "authentication; pass --key with a key whose .pub the server lists in --auth-keys"
                )
            raise ConnectError(
                f"the server at {host}:{port} refused this node: the public key of --key {opts.key} "
                "is not among the server's --auth-keys"
            )
        if proc.returncode == 0:
            return 0
        raise ConnectError(
            f"the SuperNode stopped (exit {proc.returncode}): "
            f"{watcher.last_error or 'lost the server and gave up reconnecting'}"
        )
    finally:
        if worker is not None:
            worker.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
