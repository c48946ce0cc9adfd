"""``fedlora-client``: a Flower SuperNode running fedlora's ClientApp on this device's own data.

What the command does, in order:

1. checks its inputs (server address, CA certificate, data file, rank, node key) and stops with
   one line naming the first bad one;
2. reaches the server: a TCP connection and, with TLS, a handshake against ``--ca``, retried with
   exponential backoff up to ``--max-retries`` times, so a server that is still starting is
   waited for, a wrong CA is reported as such and an unreachable server ends the command
   instead of hanging;
3. starts Flower's ``flower-supernode`` with the node config fedlora's ClientApp reads
   (``data-path``, ``rank``, ``partition-id``, ``export-dir``). The SuperNode asks the server for
   work, starts the ClientApp for each message and sends back only adapter factors and
   metrics; the file under ``--data`` never leaves the device. After a network drop or a server
   restart the SuperNode reconnects by itself, for up to ``--max-wait`` seconds;
4. runs until stopped (Ctrl-C or SIGTERM: exit 0, the SuperNode and its ClientApp processes
   shut down with it), or until the server refuses it or stays away: one line, exit 1.
"""

from __future__ import annotations

import re
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedlora import protocol as P
from fedlora.certs import check_certificate, check_private_key
from fedlora.errors import ConnectError, FedLoraError

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
PREFIX = "fedlora-client: "
REFUSAL_RETRIES = 3


@dataclass
class ClientOptions:
    """What ``fedlora-client`` was asked for (see ``fedlora-client --help``)."""

    server: str
    data: Path
    ca: Path | None = None
    insecure: bool = False
    rank: int | None = None
    key: Path | None = None
    partition_id: int | None = None
    export_dir: Path | None = None
    max_retries: int = 8
    max_wait: float = 600.0
    connect_timeout: float = 5.0
    verbose: bool = False


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
    if opts.rank is not None and opts.rank < 1:
        raise FedLoraError(f"--rank must be >= 1, got {opts.rank}")
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


def node_config(opts: ClientOptions) -> str:
    """The SuperNode's ``--node-config``: what fedlora's ClientApp reads from ``context.node_config``."""
    items = [f"{P.NODE_DATA_PATH}='{opts.data.resolve()}'"]
    if opts.rank is not None:
        items.append(f"{P.NODE_RANK}={int(opts.rank)}")
    if opts.partition_id is not None:
        items.append(f"{P.NODE_PARTITION_ID}={int(opts.partition_id)}")
    if opts.export_dir is not None:
        items.append(f"{P.NODE_EXPORT_DIR}='{opts.export_dir.resolve()}'")
    return " ".join(items)


def supernode_command(opts: ClientOptions, runtime_port: int) -> list[str]:
    from fedlora.server.launcher import tool

    cmd = [
        tool("flower-supernode"),
        "--superlink",
        opts.server,
        "--node-config",
        node_config(opts),
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
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream) -> None:
        for raw in iter(stream.readline, ""):
            line = _ANSI.sub("", raw).rstrip()
            if not line:
                continue
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


def run_client(
    opts: ClientOptions, emit: Callable[[str], None] = print, stop_event: threading.Event | None = None
) -> int:
    """Run the SuperNode until it is stopped (0) or gives up (ConnectError).

    ``stop_event`` (tests) or SIGTERM / SIGINT stop it cleanly.
    """
    from fedlora.server.launcher import _signal_group, tool_env

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
        f"{', authenticated' if opts.key is not None else ''})"
    )
    try:
        # A refusal is retried a few times: the server authorises its keys just after it starts
        # listening, and an operator may be adding this node's key right now.
        for attempt in range(REFUSAL_RETRIES + 1):
            proc = subprocess.Popen(
                supernode_command(opts, free_port()),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
                env=tool_env(),
                start_new_session=True,
            )
            watcher = _Watcher(proc.stdout, emit, opts.verbose)
            try:
                while proc.poll() is None and not stop_event.is_set():
                    stop_event.wait(0.2)
            finally:
                if proc.poll() is None:
                    _signal_group(proc, signal.SIGTERM)
                    try:
                        proc.wait(timeout=20)
                    except subprocess.TimeoutExpired:
                        _signal_group(proc, signal.SIGKILL)
                        proc.wait(timeout=5)
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
        for sig, handler in previous.items():
            signal.signal(sig, handler)
