"""The ServerApp that Flower's deployment engine runs (``fedlora.server.deployed_app:app``).

``fedlora-server`` submits it to its SuperLink as a Flower App Bundle whose run config carries
the resolved fedlora configuration (see :mod:`fedlora.server.launcher`). The SuperLink starts it
in a ``flwr-serverapp`` process on the server machine, which then runs the same
:func:`~fedlora.server.server_app.run_server` loop as a simulation over the real grid of
SuperNodes. Its stdout is the run's log, which ``fedlora-server`` streams to the terminal.

Run config keys (all written by ``fedlora-server``):

``fedlora-config``
    The run's configuration as JSON (:meth:`RunConfig.to_json`).
``run-dir``
    Absolute path of ``runs/<name>/`` on the server machine.
``resume``
    Continue ``run-dir`` from its last checkpoint.
``min-clients`` / ``wait-clients``
    Round 1 starts once this many SuperNodes are connected; the run fails with a one-line
    error if they are not there within ``wait-clients`` seconds.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterable

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedlora.config import RunConfig
from fedlora.errors import FedLoraError
from fedlora.run.directory import RunDirectory
from fedlora.run.progress import Progress
from fedlora.wire import protocol as P

from .server_app import prepare, run_server

ERROR_PREFIX = "fedlora-server: error: "
DONE_PREFIX = "fedlora-server: done: "

app = ServerApp()


def wait_for_nodes(grid: Grid, count: int, timeout: float, progress: Progress, poll: float = 1.0) -> int:
    """Block until ``count`` SuperNodes are connected; return how many are.

    Raises a FedLoraError naming how many came when ``timeout`` seconds pass first.
    """
    deadline = time.monotonic() + timeout
    seen = -1
    while True:
        connected = len(list(grid.get_node_ids()))
        if connected != seen:
            progress.line(f"waiting for clients: {connected}/{count} connected")
            seen = connected
        if connected >= count:
            return connected
        if time.monotonic() >= deadline:
            raise FedLoraError(
                f"only {connected} of {count} clients connected within {timeout:g} s "
                "(start more fedlora-client processes, or lower --min-clients / raise --wait-clients)"
            )
        time.sleep(poll)


#: How long the end-of-run notice waits for the devices' acknowledgements (a device that is
#: away then waits out its own --max-wait, as before).
END_NOTICE_TIMEOUT = 20.0


def announce_end(grid: Grid, text: str, timeout: float = END_NOTICE_TIMEOUT, skip: Iterable[int] = ()) -> None:
    """Tell every connected device that the run is over (one query carrying only
    :data:`~fedlora.wire.protocol.RUN_OVER`), so each ``fedlora-client`` prints ``text`` and exits 0
    instead of waiting for a server that is not coming back. A server stopped by the operator
    (Ctrl-C, continued later with ``--resume``) sends nothing: its devices wait for it.

    ``skip``: nodes the last round found gone or silent. Flower lists a dead device until its
    heartbeat expires; waiting for its answer would hold the end of the run for ``timeout``."""
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    from .rounds import collect

    messages = [
        Message(
            content=RecordDict({P.CONFIG: ConfigRecord({P.RUN_OVER: text})}),
            message_type=MessageType.QUERY,
            dst_node_id=node,
            group_id="end",
        )
        for node in sorted(set(grid.get_node_ids()) - set(skip))
    ]
    try:
        collect(grid, messages, timeout)
    except Exception:  # noqa: BLE001 - a courtesy to the devices: it never changes how the run ended
        pass


#: Seconds this process may outlive the SuperExec that started it before it ends itself.
ORPHAN_GRACE_S = 10.0


def end_when_orphaned(grace: float = ORPHAN_GRACE_S) -> None:
    """End this process once its parent (Flower's SuperExec) is gone for ``grace`` seconds.

    Flower's own monitor only raises SIGINT when the parent dies; with the SuperLink killed too
    (a server host going down), the ServerApp's shutdown then retries calls to a SuperLink that
    is not there, and the process can outlive its server for minutes. Its checkpoints are
    atomic, so ending it hard loses nothing that ``--resume`` needs.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        time.sleep(grace)
        os._exit(1)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


@app.main()
def main(grid: Grid, context: Context) -> None:
    end_when_orphaned()
    progress = Progress()
    try:
        rc = context.run_config
        cfg = RunConfig.from_dict(json.loads(str(rc[P.RUN_CONFIG_FEDLORA])))
        resume = bool(rc.get(P.RUN_CONFIG_RESUME, False))
        run_dir = RunDirectory(str(rc[P.RUN_CONFIG_RUN_DIR]))
        prepared = prepare(cfg, check_partitions=False)  # the clients bring their own data
        wait_for_nodes(
            grid,
            int(rc.get(P.RUN_CONFIG_MIN_CLIENTS, cfg.federation.clients)),
            float(rc.get(P.RUN_CONFIG_WAIT_CLIENTS, 300.0)),
            progress,
        )
        result = run_server(grid, prepared, run_dir, progress=progress, resume=resume, announce_nodes=True)
    except FedLoraError as err:
        # The launcher shows this line as the run's error; the exception marks the run failed.
        print(f"{ERROR_PREFIX}{err}", flush=True)
        announce_end(grid, f"the run failed on the server: {str(err)[:200]}")
        raise
    last = result.rounds[-1] if result.rounds else {}
    silent = [c.get("node_id") for c in last.get("clients", []) if c.get("dropped") in ("gone", "timeout")]
    announce_end(grid, f"run {cfg.name!r} completed {cfg.rounds} rounds", skip=[n for n in silent if n is not None])
    try:
        from fedlora.run.report import write_report

        write_report([run_dir.path], run_dir.path)
    except Exception as err:  # noqa: BLE001 - a plotting problem must not cost the finished run
        progress.line(f"report not written: {type(err).__name__}: {err}")
    print(f"{DONE_PREFIX}{result.adapter_dir}", flush=True)
