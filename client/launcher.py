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
   run (``FEDLORA_CLIENT_WORKER=0``: no worker, every message in a fresh process as before);
4. starts Flower's ``flower-supernode`` with the node config fedlora's ClientApp reads
   (``data-path``, ``rank``, ``partition-id``, ``export-dir``). With the worker, the SuperNode
   runs with ``--isolation process`` and the worker is its ClientApp executor
   (:mod:`fedlora.client.executor`): it takes each message from the SuperNode's local Runtime API
   (guarded by a SuperExec secret in the worker's private directory) and runs fedlora's ClientApp
   in place, with no process per message. Without it, the SuperNode starts a ClientApp process
   per message. Only adapter factors and metrics go back; the file under ``--data`` never leaves
   the device. A message the device cannot handle (its data file does not fit the run, say) is
   explained on the device in one line;
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
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fedlora.config import DEVICE_PATTERN, QUANTIZATIONS
from fedlora.deploy.certs import check_certificate, check_private_key
from fedlora.errors import ConnectError, FedLoraError
from fedlora.wire import protocol as P

from .device import PREFIX, Watcher, Worker, _over
from .reach import reach, wait_for_server
from .worker import NODE_WORKER_ADDRESS, WORKER_SWITCH_ENV

REFUSAL_RETRIES = 3


def worker_default() -> bool:
    """Whether fedlora-client runs a worker: yes, unless ``FEDLORA_CLIENT_WORKER=0``."""
    return os.environ.get(WORKER_SWITCH_ENV, "1").strip() not in ("0", "false", "no", "off")


def take_tasks_default() -> bool:
    """Whether the worker takes the SuperNode's tasks itself: yes, unless
    ``FEDLORA_CLIENT_WORKER=forward``: Flower's SuperExec starts a ``flwr-clientapp`` process per
    message that forwards it to the worker, the previous path, kept to measure against
    (``benchmarks/deploy_latency.py``)."""
    return os.environ.get(WORKER_SWITCH_ENV, "1").strip() != "forward"


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
    model: str | None = None
    partition_id: int | None = None
    export_dir: Path | None = None
    max_retries: int = 8
    max_wait: float = 600.0
    connect_timeout: float = 5.0
    verbose: bool = False
    worker: bool = field(default_factory=worker_default)
    take_tasks: bool = field(default_factory=take_tasks_default)


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


#: A hub name (``owner/name``, ``name``) or a folder: what ``--model`` may hold (it travels in the
#: SuperNode's quoted ``--node-config``, so no quotes, spaces or control characters).
MODEL_PATTERN = re.compile(r"[\w./~:+@-]{1,500}")


def check_model_option(model: str) -> None:
    """A FedLoraError naming ``--model`` unless it is an existing folder or reads as a hub name."""
    if not MODEL_PATTERN.fullmatch(model):
        raise FedLoraError(f"--model must be a hub name or a local folder (no spaces or quotes), got {model!r:.80}")
    local = Path(model).expanduser()
    if model.startswith((".", "/", "~")) and not local.is_dir():
        raise FedLoraError(f"--model {model}: no such folder")
    if local.is_dir() and not (local / "config.json").is_file():
        raise FedLoraError(f"--model {model}: no config.json in that folder (not a saved transformers model)")


def check_data_option(data: Path) -> None:
    """``--data``: a csv/tsv/json/jsonl/parquet file with examples, or an image folder (every
    image's header read now, so a device whose images are bad says so on the device)."""
    if data.is_dir():
        from fedlora.data.images import check_device_folder

        check_device_folder(data)
        return
    if not data.is_file():
        raise FedLoraError(f"--data {data}: no such file")
    from fedlora.data import LOCAL_SUFFIXES, _read_local

    if data.suffix.lower() not in LOCAL_SUFFIXES:
        raise FedLoraError(
            f"--data {data}: unsupported format {data.suffix!r} "
            f"({', '.join(sorted(s.lstrip('.') for s in LOCAL_SUFFIXES))})"
        )
    if len(_read_local(data)) == 0:
        raise FedLoraError(f"--data {data}: no examples")


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
    check_data_option(opts.data)
    if opts.rank is not None and opts.rank != "auto" and (not isinstance(opts.rank, int) or opts.rank < 1):
        raise FedLoraError(f"--rank must be an integer >= 1 or auto, got {opts.rank!r}")
    if opts.device is not None:
        if not DEVICE_PATTERN.fullmatch(opts.device):
            raise FedLoraError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {opts.device!r}")
        from fedlora.model.devices import placement

        placement(opts.device, key="--device")  # asked for a GPU this machine does not have: say so now
    if opts.quantization is not None and opts.quantization not in ("auto", *QUANTIZATIONS):
        raise FedLoraError(f"--quantization must be auto, {', '.join(QUANTIZATIONS)}, got {opts.quantization!r}")
    if opts.model is not None:
        check_model_option(opts.model)
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
    if opts.model is not None:  # a folder as an absolute path: the SuperNode runs elsewhere
        local = Path(opts.model).expanduser()
        items.append(f"{P.NODE_MODEL}='{local.resolve() if local.is_dir() else opts.model}'")
    if opts.partition_id is not None:
        items.append(f"{P.NODE_PARTITION_ID}={int(opts.partition_id)}")
    if opts.export_dir is not None:
        items.append(f"{P.NODE_EXPORT_DIR}='{opts.export_dir.resolve()}'")
    return " ".join(items)


def supernode_command(
    opts: ClientOptions, runtime_port: int, worker_address: str | None = None, secret_file: Path | None = None
) -> list[str]:
    """Flower's ``flower-supernode`` for ``opts``. With ``secret_file`` (the worker takes the tasks
    itself): ``--isolation process``, its Runtime API guarded by that SuperExec secret; else
    ``--isolation subprocess`` (a ClientApp process per message, forwarding to ``worker_address``
    when given)."""
    from fedlora.deploy.processes import tool

    isolation = ["process", "--superexec-auth-secret-file", str(secret_file)] if secret_file else ["subprocess"]
    cmd = [
        tool("flower-supernode"),
        "--superlink",
        opts.server,
        "--node-config",
        node_config(opts, worker_address),
        "--isolation",
        *isolation,
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


def _supernode(
    opts: ClientOptions, worker: Worker | None, emit: Callable[[str], None]
) -> tuple[subprocess.Popen, Watcher]:
    """Start a SuperNode for ``opts`` and watch its output. With a ``worker`` that takes the tasks,
    it is told this SuperNode's Runtime API port first; with one that does not, the SuperNode's
    ClientApp processes get its address and key."""
    from fedlora.deploy.processes import die_with_parent, tool_env

    port = free_port()
    if worker is None:
        cmd, env = supernode_command(opts, port), tool_env()
    elif worker.take_tasks:
        worker.announce(port)
        cmd, env = supernode_command(opts, port, secret_file=worker.secret_file), tool_env()
    else:
        cmd, env = supernode_command(opts, port, worker.address), worker.env(tool_env())
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
        start_new_session=True,
        # A SIGKILLed fedlora-client takes its SuperNode along (its ClientApps watch it).
        preexec_fn=die_with_parent(),
    )
    return proc, Watcher(proc.stdout, emit, opts.verbose)


def run_client(
    opts: ClientOptions, emit: Callable[[str], None] = print, stop_event: threading.Event | None = None
) -> int:
    """Run SuperNodes until the run is over or the device is stopped (0), or until the server
    refuses it or stays away longer than ``--max-wait`` (ConnectError).

    ``stop_event`` (tests) or SIGTERM / SIGINT stop it cleanly.
    """
    host, port = check_options(opts)
    if opts.insecure:
        emit(f"{PREFIX}WARNING: --insecure: adapter factors and metrics travel unencrypted")
    reach(host, port, opts, emit)
    stop_event = stop_event or threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda *_: stop_event.set())
    emit(f"{PREFIX}starting a SuperNode for {host}:{port} ({_describe(opts)})")
    worker = Worker(emit, opts.verbose, take_tasks=opts.take_tasks) if opts.worker else None
    try:
        if worker is not None:
            worker.start()
        return _sessions(opts, host, port, worker, emit, stop_event)
    finally:
        if worker is not None:
            worker.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _describe(opts: ClientOptions) -> str:
    """What this device offers, for the line that starts it."""
    return (
        f"data {opts.data}"
        f"{', rank ' + str(opts.rank) if opts.rank is not None else ''}"
        f"{', quantization ' + opts.quantization if opts.quantization is not None else ''}"
        f"{', device ' + opts.device if opts.device is not None else ''}"
        f"{', authenticated' if opts.key is not None else ''}"
    )


def _sessions(
    opts: ClientOptions,
    host: str,
    port: int,
    worker: Worker | None,
    emit: Callable[[str], None],
    stop_event: threading.Event,
) -> int:
    """One SuperNode session after another: until the run is over or the device is stopped (0),
    refused for good or the server stays away past ``--max-wait`` (ConnectError)."""
    refusals = 0
    away_since: float | None = None  # when the server went away, while reconnecting
    while True:
        proc, watcher = _supernode(opts, worker, emit)
        if _session(proc, watcher, worker, stop_event):
            away_since = None  # it joined: a later absence counts from then
        if stop_event.is_set():
            emit(f"{PREFIX}stopped")
            return 0
        if _over(watcher, worker):
            return 0  # the device printed the server's word; nothing is left to do
        if watcher.refused:
            refusals = _refused(watcher, opts, host, port, refusals, emit)
            if stop_event.wait(2.0 ** (refusals - 1)):
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


def _session(proc: subprocess.Popen, watcher: Watcher, worker: Worker | None, stop_event: threading.Event) -> bool:
    """Watch one SuperNode until it exits, the device is stopped, the run is over or the
    connection is lost; then end it. Whether it joined the server with a live connection."""
    from fedlora.deploy.processes import end_group

    joined = False
    try:
        # A lost connection ends the session: Flower's SuperNode would retry with a node id
        # that a restarted server may not know, for up to --max-wait; a new one joins at once.
        while proc.poll() is None and not stop_event.is_set() and not _over(watcher, worker) and not watcher.lost:
            if worker is not None:
                worker.check()
            if watcher.node_id and not watcher.lost:
                joined = True
            stop_event.wait(0.2)
        if _over(watcher, worker) and proc.poll() is None:
            stop_event.wait(1.0)  # the SuperNode sends the reply to the server's notice
    finally:
        end_group(proc, grace=20)
        watcher.thread.join(timeout=5)
    return joined


def _refused(watcher: Watcher, opts: ClientOptions, host: str, port: int, refusals: int, emit) -> int:
    """The refusals so far, one more, after the server refused this node; ConnectError when the
    server wants a key and none was given, or after ``REFUSAL_RETRIES`` retries."""
    if watcher.refused == "no-key":
        raise ConnectError(
            f"the server at {host}:{port} refused this node: it requires node authentication; "
            "pass --key with a key whose .pub the server lists in --auth-keys"
        )
    # An operator may be adding this node's key right now: a few retries, then one line.
    if refusals == REFUSAL_RETRIES:
        raise ConnectError(
            f"the server at {host}:{port} refused this node: the public key of --key {opts.key} "
            "is not among the server's --auth-keys"
        )
    emit(f"{PREFIX}the server refused this node; retrying in {2.0**refusals:g} s ({refusals + 1}/{REFUSAL_RETRIES})")
    return refusals + 1
