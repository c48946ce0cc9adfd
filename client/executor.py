"""The warm worker as the SuperNode's ClientApp executor: no process per message.

Why this exists: with ``--isolation subprocess`` Flower's SuperNode starts ``flower-superexec``,
which starts a fresh ``flwr-clientapp`` process for every message (about 2.4 s of Python start
and Flower import on a small CPU) before the message even reaches fedlora's warm worker. Flower
1.42's SuperExec cannot hand a task to a process that is already running: ``--plugin-type`` is
ignored, its executors are ``subprocess`` (one process per task) and ``kubernetes``, and its
warm pools serve only agent, model and connector tasks on Kubernetes. What Flower does offer is
``--isolation process``: the SuperNode serves its Runtime API and leaves running the ClientApp
to "a separate independent process". This module is that process's loop, in the worker that
already holds torch, transformers and the base model.

It makes the calls Flower's own components make, with Flower's own client and helpers:

* the SuperExec's ``AcquireTask`` (signed with the SuperExec HMAC secret the SuperNode was given
  with ``--superexec-auth-secret-file``, so no other local process can claim this node's tasks),
  every :data:`TASK_POLL_S`;
* the ClientApp's: ``PullTaskInput`` / ``PullMessages`` / the message's objects
  (:func:`flwr.supernode.runtime.run_clientapp.pull_task_input`), task heartbeats, the reply
  (``push_message``) and the task's end with the node's context (``push_task_output``).

Between the two it runs the FAB's ClientApp, fedlora's (:data:`APP_REFERENCE`), in this process,
and builds an error reply exactly as ``flwr-clientapp`` does when it raises. A FAB naming any
other ClientApp is answered with Flower's "could not load the ClientApp" error: a fedlora device
runs fedlora's code only.

The launcher (:mod:`fedlora.client.launcher`) writes the current SuperNode's Runtime API address
into the worker's private directory (:data:`RUNTIME_NAME`) before each SuperNode starts, so a
worker outlives SuperNode sessions (a rejoin after a server restart) and a restarted worker
finds the SuperNode that is running.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

#: The ClientApp a fedlora run names in its FAB (``fedlora-server`` and examples/flower-app).
APP_REFERENCE = "fedlora.client.entry:app"
#: How often the worker asks its SuperNode for a task (one small local HTTP request).
TASK_POLL_S = 0.1
#: How long to wait before asking again when no SuperNode answers (starting, or gone).
RETRY_S = 0.5
#: First wait for a message object the SuperNode is still receiving (doubles up to 0.5 s).
OBJECT_RETRY_S = 0.02
#: Files in the worker's private directory (mode 0700): the SuperNode's Runtime API address,
#: and the SuperExec secret the SuperNode checks ``AcquireTask`` against.
RUNTIME_NAME = "runtime"
SECRET_NAME = "superexec.secret"
WORKER_LINE = "fedlora-worker: "


def superexec_secret(authkey: bytes) -> bytes:
    """The SuperExec auth secret of a worker with ``authkey``: derived, so the launcher and a
    restarted worker agree on it without a second secret in the environment."""
    return hmac.new(authkey, b"fedlora superexec auth", hashlib.sha256).digest()


def read_runtime(directory: Path) -> str | None:
    """The Runtime API address the launcher wrote for the current SuperNode, or None."""
    try:
        return (directory / RUNTIME_NAME).read_text().strip() or None
    except OSError:
        return None


def clientapp_reference(fab_content: bytes) -> str:
    """The ``clientapp`` a FAB names (``[tool.flwr.app.components]``), or "" when it names none."""
    from flwr.common.config import get_fab_config

    components = get_fab_config(fab_content).get("tool", {}).get("flwr", {}).get("app", {}).get("components", {})
    return str(components.get("clientapp", ""))


def error_reason(err: BaseException) -> str:
    """The reason ``flwr-clientapp`` gives the server for a ClientApp that raised ``err``."""
    return str(type(err)) + ":<'" + str(err) + "'>"


class Executor:
    """Takes this node's ClientApp tasks from its SuperNode and runs them in this process, one at
    a time under ``lock`` (the worker's socket requests share it)."""

    def __init__(self, directory: Path, authkey: bytes, lock: threading.Lock):
        self.directory = directory
        self.secret = superexec_secret(authkey)
        self.lock = lock
        self.stop = threading.Event()
        self.address: str | None = None
        self.link: Any = None
        self.complained = ""

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.loop, name="fedlora-executor", daemon=True)
        thread.start()
        return thread

    def loop(self) -> None:
        """Ask for a task, run it, ask again at once; wait :data:`TASK_POLL_S` when there is none."""
        while not self.stop.is_set():
            wait = self.poll_once()
            if wait:
                self.stop.wait(wait)

    def connect(self) -> Any:
        """The client for ``AcquireTask`` on the current SuperNode (re-made when it changes)."""
        address = read_runtime(self.directory)
        if address != self.address:
            if self.link is not None:
                self.link.close()
            self.link = acquire_client(address, self.secret) if address else None
            self.address, self.complained = address, ""
        return self.link

    def poll_once(self) -> float:
        """One ``AcquireTask``; the task it got run. How long to wait before the next one."""
        import httpx
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType

        link = self.connect()
        if link is None:
            return RETRY_S
        try:
            res = link.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
        except httpx.TransportError:
            return RETRY_S  # the SuperNode is starting, or its session ended
        except httpx.HTTPError as err:
            self.complain(f"the SuperNode at {self.address} refused to hand over tasks: {err}")
            return RETRY_S
        if not (res.HasField("task") and res.token):
            return TASK_POLL_S
        acquired = time.time()
        with self.lock:
            run_task(str(self.address), res.token, res.task.task_id, acquired)
        return 0.0  # another message may be waiting

    def complain(self, line: str) -> None:
        """Say ``line`` once per SuperNode (for --verbose), not every poll."""
        if line != self.complained:
            self.complained = line
            print(f"{WORKER_LINE}{line}", file=sys.stderr, flush=True)


def acquire_client(address: str, secret: bytes) -> Any:
    """A Runtime API client that signs ``AcquireTask`` as Flower's SuperExec does."""
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient

    interceptors = [
        RuntimeVersionHttpInterceptor(component_name="SuperExec"),
        SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods=("/flwr.proto.Runtime/AcquireTask",)),
    ]
    # No retry invoker: Flower's sends SIGINT to its own process on a 401, and this loop retries.
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None, interceptors=interceptors
    )


def task_client(address: str, token: str) -> Any:
    """A Runtime API client acting as the ClientApp of the task behind ``token``."""
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient

    interceptors = [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), RuntimeTokenHttpInterceptor(token)]
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None, interceptors=interceptors
    )


def heartbeat(client: Any) -> Any:
    """Flower's task heartbeat, without its SIGINT on a refused beat (that would stop the worker)."""
    import httpx
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest
    from flwr.supercore.heartbeat import HeartbeatSender

    def beat() -> bool:
        try:
            return bool(client.SendTaskHeartbeat(SendTaskHeartbeatRequest()).success)
        except httpx.HTTPError:
            return False

    return HeartbeatSender(beat)


def run_task(address: str, token: str, task_id: int, acquired: float) -> None:
    """Be the ClientApp of one task: pull its message and context, run fedlora's ClientApp here,
    push the reply and the task's end (with the node's context) back to the SuperNode."""
    from flwr.common.constant import SubStatus
    from flwr.supernode.runtime.run_clientapp import push_message

    client = task_client(address, token)
    beats = heartbeat(client)
    beats.start()
    marks = {"acquired": acquired}
    context, kind, sub_status, details = None, "?", SubStatus.FAILED, "fedlora's worker could not run the task"
    try:
        message, context, fab = pull_input(client)
        marks["created"], kind, marks["input"] = message.metadata.created_at, message.metadata.message_type, time.time()
        reply, sub_status, details = call_app(message, context, fab.content)
        marks["handled"] = time.time()
        push_message(client, reply, context)
        marks["pushed"] = time.time()
    except Exception as err:  # noqa: BLE001 - the SuperNode's own expiry answers the server
        print(f"{WORKER_LINE}task {task_id} failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
    finally:
        end_task(client, context, sub_status, details)
        marks["done"] = time.time()
        if beats.is_running:
            beats.stop()
        client.close()
    # One line per message with wall-clock marks: benchmarks/deploy_latency.py reads them.
    stamps = " ".join(f"{name} {t:.3f}" for name, t in marks.items())
    print(f"{WORKER_LINE}task {task_id} {kind}: {stamps}", flush=True)


def pull_input(client: Any) -> tuple[Any, Any, Any]:
    """(message, context, FAB) of the task: Flower's ``run_clientapp.pull_task_input``, but
    checking for the message's objects every :data:`OBJECT_RETRY_S` (doubling to 0.5 s) instead
    of after 1 s: this worker takes a task as soon as the SuperNode creates it, often while the
    SuperNode is still receiving the message's objects from the server."""
    from flwr.app import Message
    from flwr.common.serde import context_from_proto, fab_from_proto
    from flwr.proto.node_pb2 import Node
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    res = client.PullTaskInput(PullTaskInputRequest())
    context, fab = context_from_proto(res.context), fab_from_proto(res.fab)
    # The task running in this process now (a message this process creates is from it).
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = res.task_id, res.run.run_id, context.node_id
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("no message came with the task")
    node, tree = Node(node_id=context.node_id), pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message,
        max_tries_per_object=None,  # bounded by Flower's PULL_MAX_TIME
        initial_backoff=OBJECT_RETRY_S,
        backoff_cap=0.5,
    )
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower's pull_task_input does
    return message, context, fab


def end_task(client: Any, context: Any, sub_status: str, details: str) -> None:
    """The task's end and the node's context (its ``state``) to the SuperNode, which keeps the
    context for the run's next message. Flower's ``push_task_output`` does the same but logs an
    ERROR line on the device when the SuperNode has gone (a rejoin): the launcher says that."""
    import httpx
    from flwr.common.serde import context_to_proto
    from flwr.proto.runtime_pb2 import PushTaskOutputRequest

    request = PushTaskOutputRequest(
        context=context_to_proto(context) if context else None, sub_status=sub_status, details=details
    )
    try:
        client.PushTaskOutput(request)
    except httpx.HTTPError as err:
        print(f"{WORKER_LINE}could not end the task: {err}", file=sys.stderr, flush=True)


def call_app(message: Any, context: Any, fab_content: bytes) -> tuple[Any, str, str]:
    """(reply, task status, details) of fedlora's ClientApp on ``message``; an error reply, as
    ``flwr-clientapp`` makes it, when the app raises or the FAB names another ClientApp."""
    from flwr.common.constant import ErrorCode, SubStatus

    reference = clientapp_reference(fab_content)
    if reference != APP_REFERENCE:
        print(
            f"fedlora-client: the server's run names the ClientApp {reference!r}; this device runs "
            f"fedlora's ({APP_REFERENCE}) only",
            flush=True,
        )
        reason = "An exception was raised when attempting to load `ClientApp`"
        return error_reply(message, ErrorCode.LOAD_CLIENT_APP_EXCEPTION, reason), SubStatus.FAILED, reason
    module, _, attr = APP_REFERENCE.partition(":")
    app = getattr(importlib.import_module(module), attr)
    try:
        return app(message=message, context=context), SubStatus.COMPLETED, ""
    except Exception as err:  # noqa: BLE001 - the server gets the error reply flwr-clientapp sends
        traceback.print_exc()  # for --verbose; the handler already said why in one line
        reason = error_reason(err)
        return error_reply(message, ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), SubStatus.FAILED, reason


def error_reply(message: Any, code: int, reason: str) -> Any:
    from flwr.app import Error, Message

    return Message(Error(code=code, reason=reason), reply_to=message)
