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
   metrics; the file under ``--data`` never leaves the device. A message the device cannot
   handle (its data file does not fit the run, say) is explained on the device in one line;
5. runs until the server says the run is over (it prints "the federation is over: ..." and
   exits 0), until stopped (Ctrl-C or SIGTERM: exit 0; the SuperNode, its ClientApp processes
   and the worker shut down with it), or until the server refuses it (one line at once, exit
   1). When the server goes away mid-run (its host restarted; ``fedlora-server --resume``
   brings it back) the device says so once and joins again by itself, for up to
   ``--max-wait`` seconds, keeping its worker and loaded model. A worker that dies is
   restarted (a line says so) up to ``WORKER_RESTARTS`` times; after that the command stops
   with one line, exit 1.
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

from fedlora.config import DEVICE_PATTERN, QUANTIZATIONS
from fedlora.deploy.certs import check_certificate, check_private_key
from fedlora.errors import ConnectError, FedLoraError, RunFailed
from fedlora.wire import protocol as P

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
        from fedlora.model.devices import placement

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
            if _speaks_tls(sock, host):
                raise ConnectError(
                    f"the server at {host}:{port} uses TLS; drop --insecure and pass --ca CA_CERT "
                    "(the ca.crt made by `fedlora certs` together with the server's certificate)"
                )
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


def _speaks_tls(sock: socket.socket, host: str) -> bool:
    """Whether the server on ``sock`` completes a TLS handshake (an ``--insecure`` client would
    otherwise retry plain HTTP against it until ``--max-wait``). Nothing is verified or sent."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with context.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=True):
            return True
    except (ssl.SSLError, OSError):  # a plain HTTP server answers the hello with an error, or closes
        return False


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
    from fedlora.deploy.processes import tool

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


#: Flower's SuperNode lines that say the server refused the node (:class:`ApiErrorCode`): no
#: self-registration on an authenticating server (2001), a key it does not know (2004).
_NO_KEY = "[code: 2001]"
_UNKNOWN_KEY = ("Failed to activate SuperNode", "[code: 2004]")
#: Flower's retry warning: the connection to the server is gone (said once, in fedlora's words).
_RETRYING = "Connection attempt failed"


class _Watcher:
    """Reads a child's output (the SuperNode's, or the worker's): passes fedlora's lines (and,
    verbose, everything) through and remembers what explains an exit."""

    def __init__(self, stream, emit: Callable[[str], None], verbose: bool):
        self.emit = emit
        self.verbose = verbose
        self.node_id = ""
        self.refused = ""  # "no-key" or "unknown-key"
        self.over = ""  # the server's word that the run has ended
        self.lost = False  # connected, then the connection went away (reset by a new session)
        self.last_error = ""
        self.flower_error = ""
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
            if _NO_KEY in line:
                self.refused = "no-key"
            elif any(mark in line for mark in _UNKNOWN_KEY):
                self.refused = self.refused or "unknown-key"
            if line.startswith(PREFIX + P.RUN_OVER_LINE):
                self.over = line[len(PREFIX) :]
            if "[code: " in line:
                self.flower_error = line  # Flower's reason, the most telling line of a failure
            if "ERROR" in line or "Exit Code" in line or "Traceback" in line:
                self.last_error = line
            if _RETRYING in line:
                if self.node_id and not self.lost and not self.over:
                    self.lost = True
                    self.emit(f"{PREFIX}lost the connection to the server; reconnecting")
                if not self.verbose:
                    continue  # Flower retries on its own; one line above says so
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
        from fedlora.deploy.processes import die_with_parent, tool_env

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
            from fedlora.deploy.processes import end_group

            end_group(self.process, grace=10)
        if self.watcher is not None:
            self.watcher.thread.join(timeout=5)
        shutil.rmtree(self.directory, ignore_errors=True)


def _supernode(
    opts: ClientOptions, worker: Worker | None, emit: Callable[[str], None]
) -> tuple[subprocess.Popen, _Watcher]:
    """Start a SuperNode for ``opts`` (with ``worker``'s address and key) and watch its output."""
    from fedlora.deploy.processes import die_with_parent, tool_env

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
    return proc, _Watcher(proc.stdout, emit, opts.verbose)


def _over(watcher: _Watcher, worker: Worker | None) -> str:
    """The server's end-of-run notice, as the device printed it (the ClientApp or the worker), or ""."""
    if watcher.over:
        return watcher.over
    if worker is not None and worker.watcher is not None:
        return worker.watcher.over
    return ""


def wait_for_server(host: str, port: int, opts: ClientOptions, deadline: float, stop_event: threading.Event) -> bool:
    """Probe the server until it answers (True), ``stop_event`` is set (False), or ``deadline``
    passes (ConnectError naming how long it has been away). A certificate problem is raised at once."""
    delay = 1.0
    while True:
        try:
            probe(host, port, None if opts.insecure else opts.ca, opts.connect_timeout)
            return True
        except ConnectError:
            raise
        except OSError:
            pass
        left = deadline - time.monotonic()
        if left <= 0:
            raise ConnectError(
                f"the server at {host}:{port} has been away for {opts.max_wait:g} s (--max-wait); giving up"
            )
        if stop_event.wait(min(delay, left)):
            return False
        delay = min(delay * 2, 10.0)


def run_client(
    opts: ClientOptions, emit: Callable[[str], None] = print, stop_event: threading.Event | None = None
) -> int:
    """Run SuperNodes until the run is over or the device is stopped (0), or until the server
    refuses it or stays away longer than ``--max-wait`` (ConnectError).

    ``stop_event`` (tests) or SIGTERM / SIGINT stop it cleanly.
    """
    from fedlora.deploy.processes import end_group

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
        refusals = 0
        away_since: float | None = None  # when the server went away, while reconnecting
        while True:
            proc, watcher = _supernode(opts, worker, emit)
            try:
                # A lost connection ends the session: Flower's SuperNode would retry with a node id
                # that a restarted server may not know, for up to --max-wait; a new one joins at once.
                while (
                    proc.poll() is None and not stop_event.is_set() and not _over(watcher, worker) and not watcher.lost
                ):
                    if worker is not None:
                        worker.check()
                    if watcher.node_id and not watcher.lost:
                        away_since = None
                    stop_event.wait(0.2)
                if _over(watcher, worker) and proc.poll() is None:
                    stop_event.wait(1.0)  # the SuperNode sends the reply to the server's notice
            finally:
                end_group(proc, grace=20)
                watcher.thread.join(timeout=5)
            if stop_event.is_set():
                emit(f"{PREFIX}stopped")
                return 0
            if _over(watcher, worker):
                return 0  # the device printed the server's word; nothing is left to do
            if watcher.refused == "no-key":
                raise ConnectError(
                    f"the server at {host}:{port} refused this node: it requires node authentication; "
                    "pass --key with a key whose .pub the server lists in --auth-keys"
                )
            if watcher.refused:
                # An operator may be adding this node's key right now: a few retries, then one line.
                if refusals == REFUSAL_RETRIES:
                    raise ConnectError(
                        f"the server at {host}:{port} refused this node: the public key of --key {opts.key} "
                        "is not among the server's --auth-keys"
                    )
                delay = 2.0**refusals
                refusals += 1
                emit(f"{PREFIX}the server refused this node; retrying in {delay:g} s ({refusals}/{REFUSAL_RETRIES})")
                if stop_event.wait(delay):
                    emit(f"{PREFIX}stopped")
                    return 0
                continue
            if not watcher.node_id:
                reason = watcher.flower_error or watcher.last_error or f"exit {proc.returncode}"
                raise ConnectError(f"the SuperNode could not join the server at {host}:{port}: {reason}")
            # It had joined and the server went away (a restarted server forgets its nodes): join
            # again with a new SuperNode once the server answers, for up to --max-wait.
            if not watcher.lost:
                emit(f"{PREFIX}lost the connection to the server; reconnecting")
            away_since = away_since or time.monotonic()
            if not wait_for_server(host, port, opts, away_since + opts.max_wait, stop_event):
                emit(f"{PREFIX}stopped")
                return 0
            emit(f"{PREFIX}the server is back; joining again")
    finally:
        if worker is not None:
            worker.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
