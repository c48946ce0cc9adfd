"""The long-lived worker of a deployed device: fedlora's ClientApp handlers in one warm process.

Flower's SuperNode starts a fresh ClientApp process (``flwr-clientapp``) for every message.
Running fedlora's handlers there would pay, per message, the import of torch, transformers and
fedlora and a full load of the base model (the per-process cache of :mod:`fedlora.process` dies
with the process). So ``fedlora-client`` (:mod:`fedlora.client.launcher`) starts this worker
once, before its SuperNode: it imports the stack once, keeps the process store (base model,
adapters, tokenized data) across messages, and serves requests from the light per-message
ClientApp (:mod:`fedlora.client.entry`), one at a time. With ``--take-tasks`` (what
``fedlora-client`` starts by default) it is also its SuperNode's ClientApp executor
(:mod:`fedlora.client.executor`), so no per-message ClientApp process runs at all; the socket
serves ``FEDLORA_CLIENT_WORKER=forward`` and a SuperNode started by hand with its address.

Transport: :mod:`multiprocessing.connection` over a Unix socket in a private directory (mode
0700, made by the launcher), authenticated with a random 32-byte key per ``fedlora-client``
start (HMAC challenge of ``authkey``). Only bytes travel (``send_bytes``/``recv_bytes``), never
pickles. The key reaches the ClientApp through the SuperNode's environment (:data:`AUTHKEY_ENV`,
inherited by Flower's SuperExec and the ``flwr-clientapp`` processes it starts), never through
node config; the socket's path is in node config (:data:`NODE_WORKER_ADDRESS`), which stays on
the device.

One request, as frames:

1. a JSON header ``{"v": PROTOCOL, "kind": "train" | "evaluate" | "query"}``;
2. the Flower ``Message``, serialized with Flower's own protobuf serde (``message_to_proto``);
3. the ``Context`` (``context_to_proto``).

One reply: a JSON header ``{"ok": true}`` then the reply ``Message`` and the updated
``context.state`` (a ``RecordDict`` proto: the handlers keep node state there and the SuperNode
persists it between messages); or ``{"ok": false, "module", "qualname", "message"}`` for an
exception in the handler, then ``context.state`` (as the ClientApp process would have left it).
:func:`call_worker` raises that exception in the ClientApp with the same type name and message,
so the server sees the error reply it saw before the worker existed.

The worker ends with its parent: it polls ``os.getppid()`` (:data:`PARENT_POLL_S`), so even a
SIGKILL of ``fedlora-client`` does not leave it running; SIGTERM (the launcher's stop) ends it
at once.

This module imports only the standard library at module level: the light ClientApp imports it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import threading
import time
import traceback
from multiprocessing.connection import AuthenticationError, Client, Connection, Listener
from pathlib import Path
from typing import Any

from .executor import RUNTIME_NAME, SECRET_NAME

#: Node config key: the worker's Unix socket path (written by ``fedlora-client``).
NODE_WORKER_ADDRESS = "worker-address"
#: Environment variable holding the worker's authkey (hex) for the SuperNode's ClientApp processes.
AUTHKEY_ENV = "FEDLORA_WORKER_AUTHKEY"
#: ``FEDLORA_CLIENT_WORKER=0`` makes ``fedlora-client`` run without a worker (a fresh process per message).
WORKER_SWITCH_ENV = "FEDLORA_CLIENT_WORKER"
#: Prefix of the private directories the launcher makes (the worker removes its own on exit).
DIR_PREFIX = "fedlora-worker-"
SOCKET_NAME = "worker.sock"
AUTHKEY_BYTES = 32
PROTOCOL = 1
#: Handler names in :mod:`fedlora.client.client_app`, looked up there at call time.
HANDLERS = {"query": "handle_query", "train": "handle_train", "evaluate": "handle_evaluate"}
HANDLER_MODULE = "fedlora.client.client_app"
PARENT_POLL_S = 0.5
MAX_HEADER_BYTES = 1 << 16
PREFIX = "fedlora-client: "


class WorkerError(RuntimeError):
    """The worker cannot be reached, refused us, or stopped while handling a message."""


def private_socket() -> tuple[Path, str, bytes]:
    """Where a new worker listens: a private directory (mode 0700, :data:`DIR_PREFIX`), the
    socket path in it, and a fresh random key. The worker removes the directory when it ends."""
    import secrets
    import tempfile

    base = tempfile.gettempdir()
    if len(base) > 60:  # a Unix socket path must stay under ~104 bytes
        base = "/tmp"
    directory = Path(tempfile.mkdtemp(prefix=DIR_PREFIX, dir=base))
    return directory, str(directory / SOCKET_NAME), secrets.token_bytes(AUTHKEY_BYTES)


def spawn(address: str, authkey: bytes, env: dict[str, str], preexec_fn: Any = None, take_tasks: bool = False) -> Any:
    """Start a worker listening on ``address`` (a :class:`subprocess.Popen`, text output piped).

    It gets ``authkey`` through its environment (it pops it at once), ends when this process is
    no longer its parent (``--parent-pid``), and runs in its own session so a Ctrl-C in the
    terminal reaches only its launcher, which stops it. ``take_tasks``: it also takes its
    SuperNode's ClientApp tasks itself (:mod:`fedlora.client.executor`).
    """
    import subprocess

    cmd = [sys.executable, "-m", "fedlora.client.worker", "--address", address, "--parent-pid", str(os.getpid())]
    if take_tasks:
        cmd.append("--take-tasks")
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env={**env, AUTHKEY_ENV: authkey.hex()},
        start_new_session=True,
        preexec_fn=preexec_fn,
    )


# -- the ClientApp's side --------------------------------------------------------------------------


def worker_address(node_config: Any) -> str | None:
    """The worker's socket path from node config, or None when this node has no worker."""
    value = node_config.get(NODE_WORKER_ADDRESS) if node_config else None
    return str(value) if value else None


def authkey_from_env(env: Any = None) -> bytes:
    """The authkey the launcher put in the SuperNode's environment; a WorkerError when missing."""
    raw = (os.environ if env is None else env).get(AUTHKEY_ENV, "")
    try:
        key = bytes.fromhex(raw)
    except ValueError:
        key = b""
    if len(key) != AUTHKEY_BYTES:
        raise WorkerError(
            f"node config names a fedlora worker but {AUTHKEY_ENV} is missing or malformed in this "
            "ClientApp's environment; start the node with fedlora-client"
        )
    return key


def remote_error(module: str, qualname: str, message: str) -> Exception:
    """An exception whose type prints as ``<class 'module.qualname'>`` and whose ``str`` is
    ``message``: what Flower puts in the error reply, identical to the handler's own exception.

    It subclasses the original class when that is already importable here (builtins, flwr,
    fedlora.errors...), so ``except`` clauses still match; the worker's traceback is in its log.
    """
    base: type = Exception
    owner = sys.modules.get(module)
    if owner is not None:
        found: Any = owner
        for part in qualname.split("."):
            found = getattr(found, part, None)
        if isinstance(found, type) and issubclass(found, Exception):
            base = found
    namespace = {"__module__": module, "__qualname__": qualname, "__str__": lambda self: message}
    for parent in (base, Exception):
        try:
            cls = type(qualname.rsplit(".", 1)[-1], (parent,), namespace)
            err = parent.__new__(cls)
            Exception.__init__(err, message)
            return err
        except TypeError:  # a base with an unusual layout or constructor
            continue
    return Exception(message)  # pragma: no cover - Exception itself always works


def _proto(cls: Any, data: bytes) -> Any:
    proto = cls()
    proto.ParseFromString(data)
    return proto


def call_worker(address: str, kind: str, message: Any, context: Any, authkey: bytes | None = None) -> Any:
    """Have the worker at ``address`` handle ``message`` (a ``kind`` message) in ``context``.

    Returns the reply Message (made here, in reply to ``message``) and leaves the worker's
    ``context.state`` in ``context``; raises the handler's exception as :func:`remote_error`, or a
    WorkerError when the worker is not there or stopped midway.
    """
    from flwr.app import Message
    from flwr.common.serde import (
        context_to_proto,
        message_from_proto,
        message_to_proto,
        recorddict_from_proto,
    )
    from flwr.proto.message_pb2 import Message as ProtoMessage
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    key = authkey if authkey is not None else authkey_from_env()
    try:
        conn = Client(address, family="AF_UNIX", authkey=key)
    except (FileNotFoundError, ConnectionRefusedError) as err:
        raise WorkerError(
            f"the fedlora worker of this node is not running ({address}: {err.strerror}); "
            "see fedlora-client's output, or restart fedlora-client"
        ) from None
    except AuthenticationError:
        raise WorkerError(f"the fedlora worker at {address} refused this ClientApp's key") from None
    except (EOFError, OSError) as err:  # it died during the handshake
        raise WorkerError(
            f"the fedlora worker of this node stopped while accepting a connection ({type(err).__name__}); "
            "see fedlora-client's output"
        ) from None
    with conn:
        try:
            conn.send_bytes(json.dumps({"v": PROTOCOL, "kind": kind}).encode())
            conn.send_bytes(message_to_proto(message).SerializeToString())
            conn.send_bytes(context_to_proto(context).SerializeToString())
            header = json.loads(conn.recv_bytes(MAX_HEADER_BYTES))
            if header.get("ok"):
                reply = message_from_proto(_proto(ProtoMessage, conn.recv_bytes()))
            state = recorddict_from_proto(_proto(ProtoRecordDict, conn.recv_bytes()))
        except (EOFError, OSError) as err:
            raise WorkerError(
                f"the fedlora worker of this node stopped while handling a {kind} message "
                f"({type(err).__name__}); see fedlora-client's output"
            ) from None
    context.state = state
    if not header.get("ok"):
        raise remote_error(str(header.get("module")), str(header.get("qualname")), str(header.get("message")))
    # Made here, so its metadata (task ids, ttl) is this ClientApp process's, as without a worker.
    if reply.has_error():
        return Message(reply.error, reply_to=message)
    return Message(reply.content, reply_to=message)


# -- the worker's side -----------------------------------------------------------------------------


def say_failure(kind: str, err: BaseException) -> None:
    """One line on the device saying why it could not handle a ``kind`` message (its data file is
    unusable, say): the server names the node, the device names the problem. fedlora's own errors
    are already one line; anything else gets its type."""
    from fedlora.errors import FedLoraError

    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    what = text if isinstance(err, FedLoraError) else f"{type(err).__name__}: {text}"
    print(f"{PREFIX}could not handle the server's {kind} message: {what}", flush=True)


def handle(conn: Connection, module: Any) -> None:
    """Serve one request on ``conn`` with the handlers of ``module`` (looked up now)."""
    from flwr.common.serde import context_from_proto, message_from_proto, message_to_proto, recorddict_to_proto
    from flwr.proto.message_pb2 import Context as ProtoContext
    from flwr.proto.message_pb2 import Message as ProtoMessage

    header = json.loads(conn.recv_bytes(MAX_HEADER_BYTES))
    message = message_from_proto(_proto(ProtoMessage, conn.recv_bytes()))
    context = context_from_proto(_proto(ProtoContext, conn.recv_bytes()))
    kind = str(header.get("kind", ""))
    try:
        if header.get("v") != PROTOCOL or kind not in HANDLERS:
            raise WorkerError(f"unsupported request (protocol {header.get('v')!r}, kind {kind!r})")
        reply = getattr(module, HANDLERS[kind])(message, context)
        frames = [json.dumps({"ok": True}).encode(), message_to_proto(reply).SerializeToString()]
    except Exception as err:  # noqa: BLE001 - every handler error goes back to the ClientApp
        traceback.print_exc()  # for --verbose; the device's own line follows
        sys.stderr.flush()
        say_failure(kind, err)
        error = {"ok": False, "module": type(err).__module__, "qualname": type(err).__qualname__, "message": str(err)}
        frames = [json.dumps(error).encode()]
    frames.append(recorddict_to_proto(context.state).SerializeToString())
    for frame in frames:
        conn.send_bytes(frame)


#: What the launcher keeps beside the socket (the SuperNode's address and SuperExec secret):
#: removed by an orphaned worker, kept for a restarted one.
SESSION_FILES = (RUNTIME_NAME, SECRET_NAME)


def _cleanup(address: str, orphaned: bool = False) -> None:
    path = Path(address)
    for name in (path.name, *(SESSION_FILES if orphaned else ())):
        try:
            (path.parent / name).unlink()
        except OSError:
            pass
    if path.parent.name.startswith(DIR_PREFIX):
        try:
            path.parent.rmdir()
        except OSError:
            pass


def _watch_parent(parent_pid: int, address: str) -> None:
    while True:
        if os.getppid() != parent_pid:
            _cleanup(address, orphaned=True)
            os._exit(0)
        time.sleep(PARENT_POLL_S)


def serve(
    address: str,
    authkey: bytes,
    parent_pid: int | None = None,
    handlers: str = HANDLER_MODULE,
    take_tasks: bool = False,
) -> None:
    """Listen on ``address`` and serve requests one at a time, until killed or orphaned;
    ``take_tasks``: also run the SuperNode's ClientApp tasks (:mod:`fedlora.client.executor`),
    one at a time with the socket's requests."""
    listener = Listener(address, family="AF_UNIX", backlog=16, authkey=authkey)
    os.chmod(address, 0o600)
    if parent_pid is not None:
        threading.Thread(target=_watch_parent, args=(parent_pid, address), daemon=True).start()

    def on_term(*_: Any) -> None:
        raise SystemExit(0)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_term)
    try:
        started = time.perf_counter()
        module = importlib.import_module(handlers)  # the heavy import, once, before the first request
        one_at_a_time = threading.Lock()
        if take_tasks:
            from .executor import Executor

            Executor(Path(address).parent, authkey, one_at_a_time).start()
        print(
            f"{PREFIX}worker ready (pid {os.getpid()}, imports {time.perf_counter() - started:.1f} s)",
            flush=True,
        )
        while True:
            try:
                conn = listener.accept()
            except (AuthenticationError, EOFError, OSError) as err:
                print(f"{PREFIX}worker refused a connection: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
                continue
            with conn, one_at_a_time:
                try:
                    handle(conn, module)
                except (EOFError, OSError) as err:  # the ClientApp went away (its run was stopped)
                    print(f"{PREFIX}worker lost a ClientApp: {type(err).__name__}", file=sys.stderr, flush=True)
    finally:
        listener.close()
        _cleanup(address)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedlora.client.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True, help="Unix socket path to listen on (in a 0700 directory)")
    parser.add_argument("--parent-pid", type=int, help="exit when this process is no longer the parent")
    parser.add_argument("--handlers", default=HANDLER_MODULE, help=argparse.SUPPRESS)  # tests
    parser.add_argument("--take-tasks", action="store_true", help="also run the SuperNode's ClientApp tasks")
    args = parser.parse_args(argv)
    authkey = authkey_from_env()
    os.environ.pop(AUTHKEY_ENV, None)  # nothing this process starts needs it
    if args.parent_pid is not None and os.getppid() != args.parent_pid:
        return 0
    serve(args.address, authkey, args.parent_pid, args.handlers, args.take_tasks)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
