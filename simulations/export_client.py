"""``fedlora export RUN --client K``: one client's personalized adapter, after the run.

A personalized strategy (fedsa, pfedlora) gives each client a model of its own: the shared part
the server holds plus what the client keeps (FedSA's private B). A simulation keeps the clients'
part in its checkpoints (:mod:`.node_store`), so any client's adapter can be written later, on
request, instead of one folder per client at the end of a million-client run. The client is
served exactly as in the run's last evaluation: the newest checkpoint's global state and
strategy state, its own node state, the same ClientApp; it evaluates on its own held-out
examples while it writes, and those numbers are printed with the path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord

from fedlora.client.client_app import app as client_app
from fedlora.config import RunConfig
from fedlora.errors import FedLoraError
from fedlora.model.adapters import to_record
from fedlora.run.directory import RunDirectory
from fedlora.server.server_app import prepare
from fedlora.strategies import NodeDirectory, create, get_strategy_class
from fedlora.wire import protocol as P

from .grid import InProcessGrid


def export_client(run: str | Path, client: int, out: str | Path | None = None) -> dict[str, Any]:
    """Write client ``client``'s personalized adapter of the run in ``run`` (a run directory of an
    in-process simulation); returns ``{"adapter": path, "round": k, "metrics": {...}}``.

    Raises
    ------
    FedLoraError
        One line: not a run directory, a strategy without per-client adapters, a client that is
        not in the federation, no usable checkpoint, or the client's own evaluation failed.
    """
    run_dir = RunDirectory(run)
    cfg = _run_config(run_dir.path)
    if not get_strategy_class(cfg.strategy.name).personalized:
        raise FedLoraError(
            f"--client: strategy {cfg.strategy.name!r} trains one global adapter, no per-client ones "
            f"(it is {run_dir.adapter_dir})"
        )
    if not 0 <= client < cfg.federation.clients:
        raise FedLoraError(f"--client must be a partition id in [0, {cfg.federation.clients - 1}], got {client}")
    ckpt = run_dir.load_round()
    prepared = prepare(cfg, check_partitions=False)
    tasks = list(prepared.data.tasks or [])
    strategy = create(cfg, prepared.spec, tasks=tasks, nodes=NodeDirectory())
    strategy.load_state_dict(ckpt.extra.get("strategy", {}))
    strategy.load_tensor_state(ckpt.server or {})
    target = Path(out) if out is not None else run_dir.path / "clients"
    grid = InProcessGrid(client_app, cfg.federation.clients, node_config={P.NODE_EXPORT_DIR: str(target.resolve())})
    grid.restore_node_states(run_dir.node_state_chain(ckpt.round) if ckpt.nodes is not None else [])
    node = grid.node_of_partition(client)
    shared = {
        P.RUN: cfg.to_json(),
        P.LABELS: json.dumps(prepared.data.labels),
        P.RUN_TASKS: json.dumps(tasks),
        P.RUN_UID: str(ckpt.extra.get("run_uid", "")),
    }
    messages = strategy.configure_evaluate(
        ckpt.round, to_record(ckpt.state), ConfigRecord(shared), grid, nodes=[node], export=[node]
    )
    replies = list(grid.send_and_receive(messages, timeout=cfg.federation.round_timeout))
    if not replies or replies[0].has_error():
        why = replies[0].error.reason if replies else "no reply"
        raise FedLoraError(f"--client {client}: the client could not write its adapter: {why}")
    metrics = {k: float(v) for k, v in dict(replies[0].content.metric_records[P.METRICS]).items()}
    return {"adapter": str(target / str(client) / "adapter"), "round": ckpt.round, "metrics": metrics}


def _run_config(path: Path) -> RunConfig:
    """The run's own configuration (``config.toml``), or one line saying why there is none."""
    import tomllib

    config = path / "config.toml"
    try:
        return RunConfig.from_dict(tomllib.loads(config.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise FedLoraError(f"RUN: {path} is not a run directory (no config.toml)") from None
    except (OSError, ValueError) as err:  # TOMLDecodeError and ConfigError are ValueErrors
        raise FedLoraError(f"RUN: {config} is unreadable: {err}") from None
