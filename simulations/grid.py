"""An in-process implementation of Flower's ``Grid``.

Messages go straight to the ClientApp in this process: no SuperLink, no serialization of the
base model. Every virtual node has its own ``Context`` (node config with ``partition-id`` /
``num-partitions``, persistent state); all of them share the process-wide base model cache, so
N clients cost one base model plus N small adapters on the wire.

One device (the default): replies are produced lazily, each :meth:`pull_messages` call runs at
most one pending message, so the ServerApp sees replies trickle in one at a time (and can print
progress) exactly as it would with remote nodes.

Several devices (``simulation.devices``): one *lane* per device, each holding its own copy of
the base model, and the messages pushed go to whichever lane is free, so the sampled clients of
a round train concurrently. Lane 0 is a thread of this process (it shares the server's cached
base model when the devices match); every further lane is a worker process
(:mod:`fedlora.client.worker`, the deployed device's warm worker) reached over an authenticated
Unix socket. A Python process computes on one device at a time as far as the GIL lets it, and a
base model is tied to the process that loaded it; a process per extra device is what lets the
devices really work at once. Each delivery routes the node to its lane's device through
``node_config["device"]`` (:data:`fedlora.wire.protocol.NODE_DEVICE`, read by
:func:`fedlora.client.node.node_model`) in a copy of the node's Context whose state is the
node's own, so node state persists whichever lane serves it next.

Which lane serves a client does not change what it computes: its training is seeded per client
and the server aggregates in sampling order, so a run gives the same adapter on one lane or
many (bit for bit on identical devices).
"""

from __future__ import annotations

import threading
import time
import traceback
import uuid
from collections.abc import Iterable, Sequence
from logging import ERROR
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedlora.client.worker import call_worker
from fedlora.errors import RunFailed
from fedlora.wire.protocol import NODE_DEVICE, NODE_NUM_PARTITIONS, NODE_PARTITION_ID

from .lanes import WORKER_START_TIMEOUT_S, _error_reply, _LaneLost, _stamp, _transport_failure, _WorkerProcess
from .node_store import NodeStateStore

#: How long :meth:`InProcessGrid.pull_messages` waits for a reply before it answers "none yet":
#: a reply that lands meanwhile is returned at once, and the caller sleeps after an empty answer.
PULL_WAIT_S = 0.5
#: The first virtual node's id (node ``FIRST_NODE_ID + i`` holds partition ``i``).
FIRST_NODE_ID = 1_000_001


class InProcessGrid(Grid):
    """A Grid whose nodes are virtual ClientApps in the calling process (and, with several
    devices, in one worker process per extra device).

    Parameters
    ----------
    client_app : ClientApp
        The ClientApp every node runs (in this process; worker lanes run fedlora's handlers).
    num_nodes : int
        Number of virtual nodes; node ``i`` gets ``partition-id = i``.
    run_id : int
        Run identifier placed in message metadata.
    node_config : dict, optional
        Extra entries merged into every node's ``node_config``.
    devices : sequence of str, optional
        Resolved devices (``cpu``, ``cuda:N``, ``mps``), one lane each; repeats are separate
        lanes. Empty: each node trains where its config says (today's sequential path). One:
        the same sequential path with every node on that device. Several: concurrent lanes
        (see the module docstring); call :meth:`close` when the run ends.
    """

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        run_id: int = 1,
        node_config: dict | None = None,
        devices: Sequence[str] = (),
    ) -> None:
        self.client_app = client_app
        self.devices = list(devices)
        self._run = Run.create_empty(run_id)
        # Node ids start high and are not partition ids, as on a real SuperLink. A range, not a
        # list: a million nodes cost nothing until they are sampled.
        self._node_ids = range(FIRST_NODE_ID, FIRST_NODE_ID + num_nodes)
        self._num_nodes = num_nodes
        extra = dict(node_config or {})
        if len(self.devices) == 1:
            extra[NODE_DEVICE] = self.devices[0]
        self._node_extra = extra
        #: Every node's own state: in memory only for the nodes served since the last checkpoint.
        self.store = NodeStateStore(self._node_ids)
        self._pending: dict[str, Message] = {}
        self._replies: dict[str, Message] = {}
        # Concurrent lanes (several devices) only, all guarded by _cond.
        self._cond = threading.Condition()
        self._running: set[str] = set()
        self._slots: list[Message | None] = [None] * len(self.devices)  # what each lane works on
        self._busy_nodes: set[int] = set()
        self._failure: str | None = None
        self._closed = False
        self._workers: dict[int, _WorkerProcess] = {}
        self._threads: list[threading.Thread] = []
        #: Messages each lane has handled (lane ``k`` runs on ``devices[k]``).
        self.lane_deliveries = [0] * len(self.devices)
        #: (lane, node id, message type) of each message the lanes handled, in completion order.
        self.lane_log: list[tuple[int, int, str]] = []
        if len(self.devices) > 1:
            try:
                self._start_lanes()
            except BaseException:
                self.close()
                raise

    def _context(self, node_id: int, device: str | None = None) -> Context:
        """Node ``node_id``'s Context for one delivery: its node config (partition, device) and its
        own state from the store (the ClientApp mutates it in place; a worker lane's is put back)."""
        node_config = {NODE_PARTITION_ID: node_id - FIRST_NODE_ID, NODE_NUM_PARTITIONS: self._num_nodes}
        node_config.update(self._node_extra)
        if device is not None:
            node_config[NODE_DEVICE] = device
        with self._cond:
            state = self.store.state(node_id)
        return Context(run_id=self._run.run_id, node_id=node_id, node_config=node_config, state=state, run_config={})

    # -- lanes -----------------------------------------------------------------------------------

    def _start_lanes(self) -> None:
        """Start the worker processes (together: their imports overlap), wait until each serves,
        then one thread per lane."""
        for k, device in enumerate(self.devices[1:], start=1):
            self._workers[k] = _WorkerProcess(k, device)
        deadline = time.monotonic() + WORKER_START_TIMEOUT_S
        for worker in self._workers.values():
            worker.wait_ready(deadline)
        for k in range(len(self.devices)):
            thread = threading.Thread(target=self._lane_loop, args=(k,), name=f"fedlora-lane-{k}", daemon=True)
            self._threads.append(thread)
            thread.start()

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the worker lanes (lanes 1..), for tests and diagnostics."""
        return [w.process.pid for w in self._workers.values()]

    def _dispatch(self) -> None:
        """Hand pending messages, oldest first, to free lanes (under ``_cond``).

        A node is never served by two lanes at once: its state travels with each delivery, so
        its next message waits until the previous one is back.
        """
        for msg_id, msg in list(self._pending.items()):
            free = [lane for lane, slot in enumerate(self._slots) if slot is None]
            if not free or self._closed or self._failure is not None:
                break
            if msg.metadata.dst_node_id in self._busy_nodes:
                continue
            lane = self._choose_lane(msg, free)
            if lane is None:
                continue
            del self._pending[msg_id]
            self._running.add(msg_id)
            self._busy_nodes.add(msg.metadata.dst_node_id)
            self._slots[lane] = msg
        self._cond.notify_all()

    def _choose_lane(self, msg: Message, free: list[int]) -> int | None:
        """The free lane ``msg`` goes to (None: leave it pending). The first: lane 0 when free, so
        that a round with fewer clients than devices runs where the server's base model already
        is, without serialization. (Tests override this to move nodes between lanes.)"""
        return free[0]

    def _lane_loop(self, lane: int) -> None:
        while True:
            with self._cond:
                while self._slots[lane] is None and not self._closed and self._failure is None:
                    self._cond.wait()
                msg = self._slots[lane]
                if msg is None or self._closed:  # closed: the run is over, nobody pulls its reply
                    return
            try:
                reply = self._deliver_on(lane, msg)
            except _LaneLost as lost:  # its worker process is gone: the run cannot go on as asked
                reply = _error_reply(msg, lost.error)
                with self._cond:
                    if not self._closed:
                        self._failure = f"simulation.devices[{lane}] ({self.devices[lane]}): {lost}"
            with self._cond:
                self._slots[lane] = None
                self._running.discard(msg.metadata.message_id)
                self._busy_nodes.discard(msg.metadata.dst_node_id)
                self._replies[msg.metadata.message_id] = _stamp(reply)
                self.lane_deliveries[lane] += 1
                self.lane_log.append((lane, msg.metadata.dst_node_id, msg.metadata.message_type))
                self._dispatch()  # also wakes pull_messages
                if self._failure is not None:
                    return

    def _deliver_on(self, lane: int, msg: Message) -> Message:
        """``msg`` handled on ``lane``, in a copy of its node's Context that names the lane's
        device; the node's persistent Context keeps the state it leaves."""
        context = self._context(msg.metadata.dst_node_id, self.devices[lane])
        try:
            if lane == 0:
                return self.client_app(msg, context)
            worker = self._workers[lane]
            try:
                return call_worker(worker.address, msg.metadata.message_type, msg, context, worker.authkey)
            except Exception as err:
                if _transport_failure(err):
                    raise _LaneLost(worker, err) from None
                raise
        except _LaneLost:
            raise
        except Exception as ex:  # noqa: BLE001 - a client failure becomes an error reply, as in Flower
            if lane == 0:
                log(ERROR, "node %s: %s", msg.metadata.dst_node_id, traceback.format_exc())
            else:  # the worker printed its own traceback (passed to stderr by _WorkerProcess)
                where = f"simulation.devices[{lane}] {self.devices[lane]}"
                log(ERROR, "node %s (%s): %s: %s", msg.metadata.dst_node_id, where, type(ex).__name__, ex)
            return _error_reply(msg, ex)
        finally:
            with self._cond:  # the worker lane replaces the object; lane 0 mutates it
                self.store.put(msg.metadata.dst_node_id, context.state)

    def close(self) -> None:
        """Stop the lanes: the threads once they finish what they hold, the worker processes now
        (SIGTERM, then SIGKILL). Safe to call twice, and a no-op for one device."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for worker in self._workers.values():
            worker.stop()
        for thread in self._threads:
            thread.join(timeout=1.0)  # lane 0 may be mid-training after an error; it is a daemon

    # -- node state (checkpointed with the run) ---------------------------------------------------

    def node_states(self) -> bytes:
        """The nodes' own state for the run's checkpoint, as :mod:`.node_store` lays it out: the
        nodes served since the last checkpoint only (a resumed simulation gets its nodes back as
        they were: FedSA's private B, HetLoRA's pruning, error-feedback residuals, privacy
        ledgers). Call :meth:`node_states_saved` once the bytes are on disk."""
        with self._cond:  # between rounds nothing runs, but a late lane must not swap a state mid-read
            return self.store.delta()

    def node_states_saved(self, path: Path) -> None:
        """:meth:`node_states`' bytes are in ``path``: those nodes leave memory until sampled again."""
        with self._cond:
            self.store.saved(path)

    def restore_node_states(self, files: list[Path]) -> None:
        """Put the nodes back as the checkpoint files of rounds 1..k (oldest first) left them.

        Raises
        ------
        RunFailed
            A file is malformed or names other nodes (a checkpoint of another federation).
        """
        with self._cond:
            self.store.restore(files)

    # -- Grid --------------------------------------------------------------------------------------

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def node_of_partition(self, partition_id: int) -> int | None:
        """The node holding partition ``partition_id`` (None when there is no such partition)."""
        return FIRST_NODE_ID + partition_id if 0 <= partition_id < self._num_nodes else None

    def get_node_ids(self) -> Iterable[int]:
        """The node ids, as a ``range`` (sorted, O(1) to hold and to test membership in)."""
        return self._node_ids

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        with self._cond:
            for msg in messages:
                if msg.metadata.dst_node_id not in self._node_ids:
                    raise ValueError(f"unknown node {msg.metadata.dst_node_id}")
                msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
                msg.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
                msg.metadata.__dict__["_run_id"] = self._run.run_id
                self._pending[msg.metadata.message_id] = msg
                ids.append(msg.metadata.message_id)
            if len(self.devices) > 1:
                self._dispatch()
        return ids

    def _deliver(self, msg: Message) -> Message:
        context = self._context(msg.metadata.dst_node_id)
        try:
            reply = self.client_app(msg, context)
        except Exception as ex:  # noqa: BLE001 - a client failure becomes an error reply, as in Flower
            log(ERROR, "node %s: %s", msg.metadata.dst_node_id, traceback.format_exc())
            reply = _error_reply(msg, ex)
        finally:
            with self._cond:
                self.store.put(msg.metadata.dst_node_id, context.state)
        return _stamp(reply)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        wanted = list(message_ids)
        if len(self.devices) > 1:
            return self._pull_concurrent(wanted)
        ready = [self._replies.pop(i) for i in wanted if i in self._replies]
        if ready:
            return ready
        for msg_id in wanted:
            if msg_id in self._pending:
                return [self._deliver(self._pending.pop(msg_id))]
        return []

    def _pull_concurrent(self, wanted: list[str]) -> list[Message]:
        """The replies among ``wanted`` that are in, waiting up to :data:`PULL_WAIT_S` for one
        when none is (a lane notifies as it finishes, so nothing waits longer than needed)."""
        with self._cond:
            ready = [self._replies.pop(i) for i in wanted if i in self._replies]
            outstanding = any(i in self._pending or i in self._running for i in wanted)
            if not ready and outstanding and self._failure is None:
                self._cond.wait(PULL_WAIT_S)
                ready = [self._replies.pop(i) for i in wanted if i in self._replies]
            if self._failure is not None:
                raise RunFailed(f"{self._failure}; the run stopped")
            return ready

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        ids = set(self.push_messages(messages))
        end = None if timeout is None else time.monotonic() + timeout
        out: list[Message] = []
        while ids and (end is None or time.monotonic() < end):
            got = list(self.pull_messages(ids))
            if not got:
                if len(self.devices) > 1 and any(i in self._pending or i in self._running for i in ids):
                    continue  # the lanes are still at it (pull_messages waited already)
                break
            for reply in got:
                ids.discard(reply.metadata.reply_to_message_id)
            out.extend(got)
        return out
