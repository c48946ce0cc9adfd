"""Run a federation on one machine: the in-process Grid (default) or Flower's Ray simulation.

Both run the same ServerApp (:func:`fedlora.server.make_server_app`) and the same ClientApp
(:data:`fedlora.client.app`); only the transport between them differs.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context, RecordDict

from fedlora.client import app as client_app
from fedlora.config import RunConfig
from fedlora.errors import FedLoraError
from fedlora.protocol import NODE_EXPORT_DIR
from fedlora.runlog import Progress, RunDirectory
from fedlora.server import Prepared, RunResult, make_server_app, prepare

from .grid import InProcessGrid

BACKENDS = ("inprocess", "ray")


def simulate(
    cfg: RunConfig,
    *,
    out: str | Path | None = None,
    backend: str = "inprocess",
    resume: bool = False,
    progress: Progress | None = None,
    ray_address: str | None = None,
    ray_cpus_per_client: float = 1.0,
    report: bool = True,
) -> RunResult:
    """Run ``cfg`` as a simulated federation and return its result.

    Parameters
    ----------
    cfg : RunConfig
        Validated configuration.
    out : path, optional
        Run directory (default ``runs/<name>``); must be new unless ``resume``.
    backend : {"inprocess", "ray"}
        ``inprocess``: one process, one base model shared by all virtual clients.
        ``ray``: Flower's ``run_simulation`` with the Ray backend (one model per Ray worker).
    resume : bool
        Continue from the run directory's latest checkpoint.
    progress : Progress, optional
        Where progress lines go.
    ray_address : str, optional
        Address of an existing Ray cluster (``ray`` backend).
    ray_cpus_per_client : float
        CPUs Ray reserves per virtual client.
    report : bool
        Write the run's report.md and plots into the run directory at the end (the
        federation's results are complete without it; benchmarks that time the federation
        alone turn it off).
    """
    if backend not in BACKENDS:
        raise FedLoraError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    run_dir = RunDirectory.open(out if out is not None else Path("runs") / cfg.name, resume=resume)
    prepared = prepare(cfg)  # every user mistake surfaces here, before anything is written
    progress = progress or Progress()
    results: list[RunResult] = []
    try:
        _run(cfg, prepared, run_dir, progress, results, backend, resume, ray_address, ray_cpus_per_client)
        if not results:
            raise FedLoraError(f"the {backend} simulation ended without finishing the run (see the log above)")
    except BaseException:
        if not resume:  # a run that fails before its first round leaves no files behind
            run_dir.discard_unfinished()
        raise
    if report:
        try:
            from fedlora.report import write_report

            write_report([run_dir.path], run_dir.path)
        except Exception as err:  # noqa: BLE001 - a plotting problem must not cost the finished run
            progress.line(f"report not written: {type(err).__name__}: {err}")
    return results[0]


def _run(
    cfg: RunConfig,
    prepared: Prepared,
    run_dir: RunDirectory,
    progress: Progress,
    results: list[RunResult],
    backend: str,
    resume: bool,
    ray_address: str | None,
    ray_cpus_per_client: float,
) -> None:
    """The federation itself on ``backend``; its result lands in ``results``."""
    server_app = make_server_app(prepared, run_dir, progress=progress, resume=resume, results=results)
    if backend == "inprocess":
        from flwr.common.constant import SUPERLINK_NODE_ID
        from flwr.supercore.task_identity import TaskIdentity

        # Personalized strategies' clients write their own adapters under the run directory.
        grid = InProcessGrid(
            client_app, cfg.federation.clients, node_config={NODE_EXPORT_DIR: str(Path(run_dir.path) / "clients")}
        )
        # Message() stamps the sender's identity from TaskIdentity, as the SuperLink runtime sets it.
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, grid.run.run_id, SUPERLINK_NODE_ID
        server_app(grid, Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={}))
    else:
        from flwr.simulation import run_simulation

        backend_config: dict = {"client_resources": {"num_cpus": ray_cpus_per_client, "num_gpus": 0.0}}
        if ray_address:
            backend_config["init_args"] = {"address": ray_address}
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=cfg.federation.clients,
            backend_name="ray",
            backend_config=backend_config,
        )
