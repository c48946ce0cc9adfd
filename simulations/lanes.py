"""A worker lane of the in-process simulation: one process per extra device, its life and failures.

With several ``simulation.devices``, :class:`~fedlora.simulations.grid.InProcessGrid` runs the
clients of one device in this process and those of each other device in a worker process
(:mod:`fedlora.client.worker`, the deployed device's warm worker) reached over an authenticated
private socket. :class:`_WorkerProcess` starts, calls and stops one such lane; a lane that dies is
reported as a transport failure of the messages it held (:class:`_LaneLost`), never a hung round.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
import uuid

from flwr.app import Error, Message
from flwr.common.constant import ErrorCode

from fedlora.client.worker import WorkerError, private_socket, spawn
from fedlora.errors import RunFailed

#: How long a worker lane may take to import its stack and listen (torch, transformers, peft).
WORKER_START_TIMEOUT_S = 180.0
#: How long a stopping worker gets after SIGTERM before SIGKILL.
WORKER_STOP_GRACE_S = 10.0


def _error_reply(msg: Message, ex: BaseException) -> Message:
    """The error reply Flower sends for a ClientApp that raised ``ex``."""
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(ex).__name__}: {ex}"), reply_to=msg)


def _stamp(reply: Message) -> Message:
    reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
    return reply


class _WorkerProcess:
    """The worker process of one lane: its private socket directory, key and output.

    The worker's output (model-loading warnings, a failing handler's traceback) is passed to
    this process's stderr, prefixed with the lane, as the same output of lane 0 appears
    directly.
    """

    def __init__(self, lane: int, device: str) -> None:
        import torch

        self.lane, self.device = lane, device
        self.directory, self.address, self.authkey = private_socket()
        self.ready = threading.Event()
        self.last_line = ""
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        # The same intra-op thread count as this process: CPU reductions split their work by
        # thread, so a different count could round differently and a CPU lane would not compute
        # what lane 0 computes.
        env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
        try:
            self.process = spawn(self.address, self.authkey, env)
        except BaseException:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise
        self._reader = threading.Thread(target=self._read, name=f"fedlora-lane-{lane}-output", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in iter(self.process.stdout.readline, ""):
            line = raw.rstrip()
            if not line:
                continue
            if "worker ready" in line:
                self.ready.set()
                continue
            self.last_line = line
            print(f"[simulation.devices[{self.lane}] {self.device}] {line}", file=sys.stderr, flush=True)
        self.process.stdout.close()

    def why(self) -> str:
        """Why the process stopped: its exit status or signal, and its last line of output."""
        code = self.process.poll()
        self._reader.join(timeout=2)
        what = f"signal {-code}" if code is not None and code < 0 else f"exit {code}"
        return f"{what}: {self.last_line}" if self.last_line else what

    def wait_ready(self, deadline: float) -> None:
        """Return once the worker serves requests; a one-line RunFailed if it stops or never does."""
        while not self.ready.wait(0.05):
            if self.process.poll() is not None:
                raise RunFailed(
                    f"simulation.devices[{self.lane}] ({self.device}): its worker process stopped while "
                    f"starting ({self.why()})"
                )
            if time.monotonic() > deadline:
                raise RunFailed(
                    f"simulation.devices[{self.lane}] ({self.device}): its worker process was not ready after "
                    f"{WORKER_START_TIMEOUT_S:.0f} s"
                )

    def stop(self) -> None:
        from fedlora.deploy.processes import end_group

        end_group(self.process, grace=WORKER_STOP_GRACE_S)
        self._reader.join(timeout=5)
        shutil.rmtree(self.directory, ignore_errors=True)


def _transport_failure(err: BaseException) -> bool:
    """Whether ``err`` from :func:`call_worker` is the socket failing (a worker that died, say)
    rather than the handler's own exception: :func:`call_worker` raises every socket failure as
    WorkerError itself, the handler's exceptions as :func:`remote_error`'s classes, made on the spot."""
    return type(err) is WorkerError


class _LaneLost(Exception):
    """A worker lane's process stopped or cannot be reached (not a client's failure)."""

    def __init__(self, worker: _WorkerProcess, error: BaseException) -> None:
        try:
            worker.process.wait(timeout=2)  # a worker that dies closes its socket a moment before it exits
        except subprocess.TimeoutExpired:
            pass
        why = f"its worker process stopped ({worker.why()})" if worker.process.poll() is not None else str(error)
        super().__init__(why)
        self.error = error
