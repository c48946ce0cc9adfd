"""Run a federation on one machine: the in-process Grid (default) or Flower's Ray simulation.

Both run the same ServerApp (:func:`fedlora.server.make_server_app`) and the same ClientApp
(:data:`fedlora.client.app`); only the transport between them differs.

The in-process backend uses every device of ``simulation.devices`` (default: every visible GPU
when ``model.device`` is ``auto``), one base-model copy each, and trains a round's sampled
clients concurrently across them (:class:`~fedlora.simulations.grid.InProcessGrid`);
:func:`simulation_devices` decides which.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context, RecordDict

from fedlora.client import app as client_app
from fedlora.config import RunConfig
from fedlora.errors import ConfigError, FedLoraError
from fedlora.model.devices import resolve_device
from fedlora.run.directory import RunDirectory
from fedlora.run.progress import Progress
from fedlora.server import Prepared, RunResult, make_server_app, prepare
from fedlora.wire.protocol import NODE_EXPORT_DIR

from .grid import InProcessGrid

BACKENDS = ("inprocess", "ray")


def simulation_devices(cfg: RunConfig, *, cuda_count: int, mps: bool = False) -> list[str]:
    """The devices the in-process simulation trains on, resolved (``cuda`` -> ``cuda:0``).

    A pure function of the configuration and of what the machine has, so it is tested without
    the hardware (:func:`machine_devices` probes torch and applies it).

    Parameters
    ----------
    cfg : RunConfig
        The run; ``simulation.devices`` and ``model.device`` decide.
    cuda_count : int
        CUDA devices visible here.
    mps : bool
        Whether Apple's MPS backend is available.

    Returns
    -------
    list of str
        ``simulation.devices`` when given (repeats are separate base-model copies on one
        device); else every ``cuda:i`` when ``model.device`` is ``auto`` and more than one GPU
        is visible (``auto`` means "use what this machine has"); else the model's own device
        alone.

    Raises
    ------
    ConfigError
        One line naming ``simulation.devices[i]`` (or ``model.device``) when a device is not there.
    """
    if cfg.simulation.devices:
        return [
            resolve_device(device, cuda_count=cuda_count, mps=mps, key=f"simulation.devices[{i}]")
            for i, device in enumerate(cfg.simulation.devices)
        ]
    if cfg.model.device == "auto" and cuda_count > 1:
        return [f"cuda:{i}" for i in range(cuda_count)]
    return [resolve_device(cfg.model.device, cuda_count=cuda_count, mps=mps)]


def machine_devices(cfg: RunConfig) -> list[str]:
    """:func:`simulation_devices` on this machine."""
    from fedlora.model.devices import machine

    cuda_count, mps = machine()
    return simulation_devices(cfg, cuda_count=cuda_count, mps=mps)


def grid_devices(cfg: RunConfig, backend: str = "inprocess") -> list[str]:
    """The devices to give the in-process Grid: empty when nothing is to change from one
    process on the model's own device (each node then trains where its config and profile
    say, as always), else the resolved list.

    Raises
    ------
    ConfigError
        A device that is not there; or ``simulation.devices`` with the Ray backend, which
        places clients by Ray's own resources and would silently ignore it.
    """
    devices = machine_devices(cfg)
    if not cfg.simulation.devices and len(devices) == 1:
        return []
    if backend == "ray":
        if cfg.simulation.devices:
            raise ConfigError(
                "config key 'simulation.devices': applies to the in-process backend only (Ray places clients "
                "by its own resources); remove it or use --backend inprocess"
            )
        return []  # several GPUs found by `auto`: Ray's own placement, as before
    return devices


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
        ``inprocess``: one process, one base model shared by all virtual clients; with several
        devices (:func:`grid_devices`), one base model per device and a worker process per
        extra device, the clients of a round training concurrently.
        ``ray``: Flower's ``run_simulation`` with the Ray backend (one model per Ray worker;
        ``simulation.devices`` is refused there).
    resume : bool
        Continue from the run directory's newest good checkpoint (every virtual node's state
        included, in process); ``cfg`` may differ from the run's config.toml only in
        :data:`fedlora.run.directory.RESUME_MUTABLE` keys (``rounds`` extended, say).
    progress : Progress, optional
        Where progress lines go.
    ray_address : str, optional
        Address of an existing Ray cluster (``ray`` backend).
    ray_cpus_per_client : float
        CPUs Ray reserves per virtual client.
    report : bool
        Write report.md and plots into the run directory at the end (benchmarks that time the
        federation alone turn it off).
    """
    if backend not in BACKENDS:
        raise FedLoraError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    devices = grid_devices(cfg, backend)  # a device that is not there: one line, before anything is written
    # The folder's lock, held to the end (also on errors): one run writes a run directory at a time.
    with RunDirectory.open(out if out is not None else Path("runs") / cfg.name, resume=resume) as run_dir:
        if resume:
            run_dir.check_resume_config(cfg)  # the run on disk keeps its meaning: strategy, clients, adapter
        prepared = prepare(cfg)  # every user mistake surfaces here, before anything is written
        progress = progress or Progress()
        results: list[RunResult] = []
        try:
            _run(cfg, prepared, run_dir, progress, results, backend, resume, ray_address, ray_cpus_per_client, devices)
            if not results:
                raise FedLoraError(f"the {backend} simulation ended without finishing the run (see the log above)")
        except BaseException:
            if not resume:  # a run that fails before its first round leaves no files behind
                run_dir.discard_unfinished()
            raise
        if report:
            _write_report(run_dir.path, progress)
    return results[0]


def _write_report(path: Path, progress: Progress) -> None:
    """The run's report.md and plots; a plotting problem is one line, never the finished run."""
    try:
        from fedlora.run.report import write_report

        write_report([path], path)
    except Exception as err:  # noqa: BLE001 - a plotting problem must not cost the finished run
        progress.line(f"report not written: {type(err).__name__}: {err}")


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
    devices: list[str] | None = None,
) -> None:
    """The federation itself on ``backend``; its result lands in ``results``. ``devices``: the
    in-process Grid's (:func:`grid_devices`)."""
    server_app = make_server_app(prepared, run_dir, progress=progress, resume=resume, results=results)
    if backend == "inprocess":
        from flwr.common.constant import SUPERLINK_NODE_ID
        from flwr.supercore.task_identity import TaskIdentity

        # Personalized strategies' clients write their own adapters under the run directory.
        node_config = {NODE_EXPORT_DIR: str(Path(run_dir.path) / "clients")}
        # `devices` only when there are some: a one-device run builds the Grid exactly as before.
        extra = {"devices": devices} if devices else {}
        if len(devices or ()) > 1:
            progress.line(f"simulation: {len(devices)} devices ({', '.join(devices)}), one base model on each")
        grid = InProcessGrid(client_app, cfg.federation.clients, node_config=node_config, **extra)
        try:
            # Message() stamps the sender's identity from TaskIdentity, as the SuperLink runtime sets it.
            TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, grid.run.run_id, SUPERLINK_NODE_ID
            context = Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={})
            server_app(grid, context)
        finally:
            grid.close()  # the worker processes of extra devices stop with the run, also on error
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
