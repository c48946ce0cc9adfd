"""An in-process implementation of Flower's ``Grid``.

Messages go straight to the ClientApp in this process: no SuperLink, no serialization of the
base model, no worker processes. Every virtual node has its own ``Context`` (node config with
``partition-id`` / ``num-partitions``, persistent state); all of them share the process-wide
base model cache, so N clients cost one base model plus N small adapters on the wire.

Replies are produced lazily: each :meth:`pull_messages` call runs at most one pending message,
so the ServerApp sees replies trickle in one at a time (and can print progress) exactly as it
would with remote nodes.
"""

from __future__ import annotations

import time
import traceback
import uuid
from collections.abc import Iterable
from logging import ERROR

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedlora.protocol import NODE_NUM_PARTITIONS, NODE_PARTITION_ID


class InProcessGrid(Grid):
    """A Grid whose nodes are virtual ClientApps in the calling process.

    Parameters
    ----------
    client_app : ClientApp
        The ClientApp every node runs.
    num_nodes : int
        Number of virtual nodes; node ``i`` gets ``partition-id = i``.
    run_id : int
        Run identifier placed in message metadata.
    node_config : dict, optional
        Extra entries merged into every node's ``node_config``.
    """

    def __init__(self, client_app: ClientApp, num_nodes: int, run_id: int = 1, node_config: dict | None = None) -> None:
        self.client_app = client_app
        self._run = Run.create_empty(run_id)
        # Node ids start high and are not partition ids, as on a real SuperLink.
        self._node_ids = [1_000_001 + i for i in range(num_nodes)]
        self._contexts = {
            node_id: Context(
                run_id=run_id,
                node_id=node_id,
                node_config={NODE_PARTITION_ID: i, NODE_NUM_PARTITIONS: num_nodes, **(node_config or {})},
                state=RecordDict(),
                run_config={},
            )
            for i, node_id in enumerate(self._node_ids)
        }
        self._pending: dict[str, Message] = {}
        self._replies: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            if msg.metadata.dst_node_id not in self._contexts:
                raise ValueError(f"unknown node {msg.metadata.dst_node_id}")
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            msg.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
            msg.metadata.__dict__["_run_id"] = self._run.run_id
            self._pending[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        return ids

    def _deliver(self, msg: Message) -> Message:
        context = self._contexts[msg.metadata.dst_node_id]
        try:
            reply = self.client_app(msg, context)
        except Exception as ex:  # noqa: BLE001 - a client failure becomes an error reply, as in Flower
            log(ERROR, "node %s: %s", msg.metadata.dst_node_id, traceback.format_exc())
            reply = Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(ex).__name__}: {ex}"), reply_to=msg
            )
        reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        return reply

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        wanted = list(message_ids)
        ready = [self._replies.pop(i) for i in wanted if i in self._replies]
        if ready:
            return ready
        for msg_id in wanted:
            if msg_id in self._pending:
                return [self._deliver(self._pending.pop(msg_id))]
        return []

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        ids = set(self.push_messages(messages))
        end = None if timeout is None else time.monotonic() + timeout
        out: list[Message] = []
        while ids and (end is None or time.monotonic() < end):
            got = list(self.pull_messages(ids))
            if not got:
                break
            for reply in got:
                ids.discard(reply.metadata.reply_to_message_id)
            out.extend(got)
        return out
