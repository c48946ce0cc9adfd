"""The fedlora ServerApp: check and load everything a run needs, then run the round loop.

The same loop runs under every runtime (in-process Grid, Flower's Ray simulation, the
deployment engine): it talks to clients only through the ``Grid`` it is handed.

* :func:`prepare` checks the configuration, data, model and strategy and loads them, before
  anything is written;
* :func:`run_server` runs :class:`~fedlora.server.rounds.RoundLoop` (the rounds, step by step);
* :mod:`fedlora.server.validation` checks every reply; :mod:`fedlora.server.evaluation`
  evaluates the global state on the server's held-out split.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedlora.config import RunConfig
from fedlora.data import Encoded, TaskData, load_task_data, partition_sizes, partition_sizes_ok
from fedlora.data.images import encode_examples
from fedlora.errors import ConfigError, DataError
from fedlora.model.adapters import AdapterHost, AdapterSpec, get_host, lora_modules
from fedlora.model.capacity import MARGIN, memory_needed
from fedlora.model.devices import placement
from fedlora.model.loading import LoadedModel, load_model, model_facts
from fedlora.run.directory import RunDirectory
from fedlora.run.progress import Progress, set_active
from fedlora.strategies import create, get_strategy_class
from fedlora.train.dpsgd import check_dp_model

from .evaluation import dense_deltas, evaluate_state, evaluate_view, evaluate_views
from .rounds import RoundLoop, RunResult

# Kept importable from here for callers of the earlier single-module layout.
_dense_deltas = dense_deltas

__all__ = [
    "Prepared",
    "RunResult",
    "evaluate_state",
    "evaluate_view",
    "evaluate_views",
    "make_server_app",
    "prepare",
    "run_server",
]


@dataclass
class Prepared:
    """Everything checked and loaded before a run may write anything.

    Attributes
    ----------
    cfg : RunConfig
        The validated configuration.
    data : TaskData
        Training pool, held-out split, label names.
    loaded : LoadedModel
        The cached base model and tokenizer.
    spec : AdapterSpec
        The global adapter's shape.
    eval_data : Encoded
        The tokenized held-out split.
    """

    cfg: RunConfig
    data: TaskData
    loaded: LoadedModel
    spec: AdapterSpec
    eval_data: Encoded

    @property
    def host(self) -> AdapterHost:
        return get_host(self.loaded)


def prepare(cfg: RunConfig, *, check_partitions: bool = True) -> Prepared:
    """Load and check model, data and strategy; raise a FedLoraError naming the first problem.

    Parameters
    ----------
    cfg : RunConfig
        A validated configuration.
    check_partitions : bool
        Also partition the training pool for ``federation.clients`` and require every
        partition to be non-empty (simulation runtimes; a deployment's clients bring their own).
    """
    strategy_cls = get_strategy_class(cfg.strategy.name)
    strategy_cls.parse_options(cfg.strategy.options)
    data = load_task_data(cfg)
    strategy_cls.check_setup(cfg, list(getattr(data, "tasks", [])))
    check_profiles(cfg, max(len(data.labels), 2), here=check_partitions)
    if check_partitions:
        partition_sizes_ok(cfg, data)
        sizes = partition_sizes(cfg, cfg.federation.clients)
        empty = next((pid for pid, size in enumerate(sizes) if size == 0), None)
        if empty is not None:
            raise DataError(
                f"data.partitioner {cfg.data.partitioner!r} left client {empty} with no examples "
                f"(federation.clients = {cfg.federation.clients}); use fewer clients or more data"
            )
        smallest = min(sizes, default=None)
        if cfg.privacy.mode == "local" and smallest is not None and cfg.privacy.delta >= 1 / smallest:
            raise ConfigError(
                f"config key 'privacy.delta' = {cfg.privacy.delta:g} must be < 1/examples = {1 / smallest:.3g} "
                f"for sample-level DP (the smallest client has {smallest} examples)"
            )
    loaded = load_model(
        cfg.model,
        num_labels=max(len(data.labels), 2),
        seed=cfg.seed,
        gradient_checkpointing=cfg.federation.gradient_checkpointing,
        head=strategy_cls.model_head(cfg),
    )
    spec = AdapterSpec.from_config(cfg.lora, cfg.model.task)
    name = get_host(loaded).ensure(spec, seed=cfg.seed)
    if strategy_cls.needs_float_base:
        for module in lora_modules(get_host(loaded).shapes(name)):
            get_host(loaded).base_weight(module)  # raises on a quantized weight
    if cfg.privacy.mode == "local":  # a layer Opacus cannot serve fails here, not mid-round
        host = get_host(loaded)
        with host.lock:
            host.ensure(spec, seed=cfg.seed)
            check_dp_model(host.peft_model, host.params(name).values())
    create(cfg, spec, tasks=list(getattr(data, "tasks", [])))
    eval_data = encode_examples(data.eval, cfg, loaded.tokenizer, data.labels)
    return Prepared(cfg=cfg, data=data, loaded=loaded, spec=spec, eval_data=eval_data)


def check_profiles(cfg: RunConfig, num_labels: int, *, here: bool) -> None:
    """Refuse, in one line, a device profile that cannot be served: one whose rank at its
    precision does not fit the ``memory_gb`` it declares (:mod:`fedlora.model.capacity`, with its
    margin), and, when the clients run ``here`` (simulation), one naming a device this machine
    does not have."""
    for i, profile in enumerate(cfg.federation.profiles):
        device = profile.device or cfg.model.device
        if here:
            placement(device, cfg.model.dtype, key=f"federation.profiles[{i}].device")
        if profile.memory_gb <= 0:
            continue
        quantization = profile.quantization or cfg.model.quantization
        # The compute dtype on that device: auto means bfloat16 on a GPU, float32 on a CPU (or
        # on a device not named: the larger of the two, so the check is on the safe side).
        gpu = device.startswith(("cuda", "mps"))
        dtype = cfg.model.dtype if cfg.model.dtype != "auto" else "bfloat16" if gpu else "float32"
        facts = model_facts(
            cfg.model.replace(name=profile.model or cfg.model.name),  # the profile's own base, if it names one
            list(cfg.lora.target_modules),
            batch=cfg.federation.batch_size,
            num_labels=num_labels,
            checkpointing=cfg.federation.gradient_checkpointing,
            dtype=dtype,
        )
        need = memory_needed(facts, quantization, profile.rank) * (1 + MARGIN)
        if need > profile.memory_gb * 2**30:
            raise ConfigError(
                f"config key 'federation.profiles[{i}].memory_gb': profile {profile.name!r} ({quantization}, rank "
                f"{profile.rank}, batch {cfg.federation.batch_size} x {cfg.model.max_length} tokens) needs "
                f"{need / 2**30:.2f} GB with the {MARGIN:.0%} margin, more than the {profile.memory_gb:g} GB "
                "it declares"
            )


def run_server(
    grid: Grid,
    prepared: Prepared,
    run_dir: RunDirectory,
    *,
    progress: Progress | None = None,
    resume: bool = False,
    announce_nodes: bool = False,
) -> RunResult:
    """Run the configured rounds over ``grid`` and write the run directory (see :class:`RoundLoop`).

    Parameters
    ----------
    grid : Grid
        Where the clients are (any runtime).
    prepared : Prepared
        Output of :func:`prepare`.
    run_dir : RunDirectory
        Where config, metrics, checkpoints and the adapter go.
    progress : Progress, optional
        Receives one line per client reply and per round.
    resume : bool
        Continue from the latest checkpoint in ``run_dir``.
    announce_nodes : bool
        Print a line per node as it joins (rank, device, memory, examples): on a deployment,
        where nodes are real devices; not for hundreds of simulated ones.
    """
    progress = progress or Progress()
    set_active(progress)  # in-process clients report their local steps to the status line
    try:
        return RoundLoop(grid, prepared, run_dir, progress, announce_nodes=announce_nodes).run(resume)
    finally:
        set_active(None)


def make_server_app(
    prepared: Prepared,
    run_dir: RunDirectory,
    *,
    progress: Progress | None = None,
    resume: bool = False,
    results: list[RunResult] | None = None,
) -> ServerApp:
    """A Flower ServerApp whose main runs :func:`run_server`; the result lands in ``results``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        out = run_server(grid, prepared, run_dir, progress=progress, resume=resume)
        if results is not None:
            results.append(out)

    return app
