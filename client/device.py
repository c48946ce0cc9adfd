"""The processes ``fedlora-client`` runs on a device: its warm worker, and what it reads of them.

:class:`Worker` is the long-lived worker process (:mod:`fedlora.client.worker`): its private
directory, socket and key, restarted on the same socket and key when it dies. :class:`Watcher`
reads a child's output (the SuperNode's or the worker's), passes fedlora's own lines through and
remembers what explains an exit: the node id it joined as, a refusal by the server, the server's
word that the run is over, a lost connection.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable

from fedlora.errors import RunFailed
from fedlora.files import atomic_write_bytes
from fedlora.wire import protocol as P

from .executor import RUNTIME_NAME, SECRET_NAME, superexec_secret
from .worker import AUTHKEY_ENV, private_socket, spawn

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
PREFIX = "fedlora-client: "
#: How often a worker that died is started again before fedlora-client gives up.
WORKER_RESTARTS = 3
#: How long a starting worker may take to listen on its socket.
WORKER_START_TIMEOUT = 60.0


#: Flower's SuperNode lines that say the server refused the node (:class:`ApiErrorCode`): no
#: self-registration on an authenticating server (2001), a key it does not know (2004).
_NO_KEY = "[code: 2001]"
_UNKNOWN_KEY = ("Failed to activate SuperNode", "[code: 2004]")
#: Flower's retry warning: the connection to the server is gone (said once, in fedlora's words).
_RETRYING = "Connection attempt failed"
#: Flower's warnings that say nothing to a device's user (shown with --verbose): the SuperNode's
#: note on the SuperExec secret that guards its tasks for the worker.
_QUIET = ("SuperExec authentication is experimental",)


class Watcher:
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
                or (
                    line.startswith(("WARNING", "ERROR"))
                    and "Exit Code" not in line
                    and not any(q in line for q in _QUIET)
                )
            ):
                self.emit(line)
        stream.close()


class Worker:
    """This device's worker process (:mod:`fedlora.client.worker`): its private directory,
    socket and key, and the process itself (restarted on the same socket and key).

    ``take_tasks``: the worker is also its SuperNode's ClientApp executor
    (:mod:`fedlora.client.executor`); the directory then holds the SuperExec secret the SuperNode
    checks (:attr:`secret_file`) and the current SuperNode's Runtime API address (:meth:`announce`).
    """

    def __init__(self, emit: Callable[[str], None], verbose: bool, take_tasks: bool = False):
        self.emit = emit
        self.verbose = verbose
        self.take_tasks = take_tasks
        self.directory, self.address, self.authkey = private_socket()
        self.secret_file = self.directory / SECRET_NAME
        self.process: subprocess.Popen | None = None
        self.watcher: Watcher | None = None
        self.restarts = 0

    def announce(self, runtime_port: int) -> None:
        """Tell the worker (running or restarted) where the SuperNode starting now serves tasks."""
        atomic_write_bytes(self.directory / RUNTIME_NAME, f"127.0.0.1:{runtime_port}".encode(), private=True)

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
        if self.take_tasks and not self.secret_file.exists():
            atomic_write_bytes(self.secret_file, superexec_secret(self.authkey), private=True)
        env = tool_env()
        self.process = spawn(self.address, self.authkey, env, preexec_fn=die_with_parent(), take_tasks=self.take_tasks)
        self.watcher = Watcher(self.process.stdout, self.emit, self.verbose)
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


def _over(watcher: Watcher, worker: Worker | None) -> str:
    """The server's end-of-run notice, as the device printed it (the ClientApp or the worker), or ""."""
    if watcher.over:
        return watcher.over
    if worker is not None and worker.watcher is not None:
        return worker.watcher.over
    return ""
