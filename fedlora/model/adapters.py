"""LoRA adapters on a shared base model (via peft), and their factors on the wire.

Conventions used across fedlora:

* An adapter's state is a flat ``dict[str, Tensor]`` keyed the way peft saves adapters
  (``...query.lora_A.weight``, ``...query.lora_B.weight``, ``...classifier.weight`` for a
  trained head), with no adapter name inside the key. ``A`` is (r x in), ``B`` is (out x r).
* The update of a target weight is ``(alpha / r) * B @ A`` (peft's ``scaling``).
* One :class:`AdapterHost` per base model per process holds one peft model; each distinct
  (rank, LoRA settings) is a named peft adapter on it, so clients of different ranks share the
  frozen base and only swap small tensors.
"""

from __future__ import annotations

import hashlib
import threading
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord

from fedlora.config import LoRAConfig, is_image_task
from fedlora.errors import ConfigError
from fedlora.model.loading import LoadedModel
from fedlora.process import HOST, process_state
from fedlora.wire.transport import Wire, arrays_of, decode

LORA_A = "lora_A"
LORA_B = "lora_B"
DELTA_A = "base_delta_A"
DELTA_B = "base_delta_B"


def is_lora_a(key: str) -> bool:
    return f".{LORA_A}." in key


def is_lora_b(key: str) -> bool:
    return f".{LORA_B}." in key


def is_base_delta(key: str) -> bool:
    """Factors of a delta folded into the frozen base weight: installed, never trained."""
    return key.endswith((f".{DELTA_A}", f".{DELTA_B}"))


#: A base-delta link (:mod:`fedlora.strategies.basechain`) is a base-delta key with ``@<index>``.
LINK_SEP = "@"


def is_base_link(key: str) -> bool:
    """Factors of one round's increment of the base delta (the stateful downlink)."""
    return LINK_SEP in key and is_base_delta(key.rpartition(LINK_SEP)[0])


def exact_on_wire(key: str) -> bool:
    """Base-delta factors and their links accumulate on the node: they travel as exact float32."""
    return is_base_delta(key) or is_base_link(key)


def delta_keys(module: str) -> tuple[str, str]:
    """(A key, B key) of the base delta of ``module``: ``D = B @ A``, unscaled."""
    return f"{module}.{DELTA_A}", f"{module}.{DELTA_B}"


def lora_keys(module: str) -> tuple[str, str]:
    """(A key, B key) of the LoRA factors of ``module`` as peft saves them."""
    return f"{module}.{LORA_A}.weight", f"{module}.{LORA_B}.weight"


def rank_dim(key: str) -> int:
    """The axis of a factor that has the adapter's rank: 0 for A (r x in), 1 for B (out x r)."""
    if is_lora_a(key) or key.endswith(f".{DELTA_A}"):
        return 0
    if is_lora_b(key) or key.endswith(f".{DELTA_B}"):
        return 1
    raise ValueError(f"not a low-rank factor key: {key}")


def module_of(key: str) -> str:
    """Target module path of a LoRA factor key (the part before ``.lora_A``/``.lora_B``)."""
    for marker in (f".{LORA_A}.", f".{LORA_B}."):
        if marker in key:
            return key.split(marker)[0]
    for suffix in (f".{DELTA_A}", f".{DELTA_B}"):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    raise ValueError(f"not a LoRA factor key: {key}")


def lora_modules(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Target modules that have LoRA factors in ``state``, sorted."""
    return sorted({module_of(k) for k in state if is_lora_a(k) or is_lora_b(k)})


@dataclass(frozen=True)
class AdapterSpec:
    """What defines one named adapter on a host.

    ``rank_pattern``/``alpha_pattern`` are peft's per-module overrides, as (module path, value)
    pairs; exports use them when a module's adapter needs more rank than the rest.
    """

    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]
    task: str
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    #: CLIP's towers that get LoRA (``lora.towers``); empty for every other task. Out of the
    #: repr, so the adapter names of the other tasks are what they were.
    towers: tuple[str, ...] = field(default=(), repr=False)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def name(self) -> str:
        digest = hashlib.sha1((repr(self) + (f"towers={self.towers}" if self.towers else "")).encode()).hexdigest()
        return f"r{self.rank}_{digest[:8]}"

    @classmethod
    def from_config(cls, lora: LoRAConfig, task: str, rank: int | None = None) -> AdapterSpec:
        return cls(
            rank=int(rank if rank is not None else lora.rank),
            alpha=float(lora.alpha),
            dropout=float(lora.dropout),
            target_modules=tuple(lora.target_modules),
            task=task,
            towers=tuple(lora.towers) if task == "clip" else (),
        )


def check_target_modules(model: torch.nn.Module, targets: Iterable[str], model_name: str) -> None:
    """Raise ConfigError naming the first target module the model does not have."""
    names = [n for n, _ in model.named_modules()]
    for target in targets:
        if not any(n == target or n.endswith("." + target) for n in names):
            leaves = sorted(
                {n.rsplit(".", 1)[-1] for n in names if n and isinstance(model.get_submodule(n), torch.nn.Linear)}
                | {n.rsplit(".", 1)[-1] for n in names if type(model.get_submodule(n)).__name__ == "Conv1D"}
            )
            raise ConfigError(
                f"config key 'lora.target_modules': model {model_name!r} has no module named {target!r} "
                f"(linear modules: {', '.join(leaves[:12])})"
            )


class AdapterHost:
    """A peft model over one cached base model, holding one named adapter per spec.

    Parameters
    ----------
    loaded : LoadedModel
        The frozen base model and tokenizer (from :func:`fedlora.model.loading.load_model`).
    """

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.peft_model = None
        self._params: dict[str, dict[str, torch.nn.Parameter]] = {}
        self.specs: dict[str, AdapterSpec] = {}
        self.lock = threading.RLock()
        # Pristine copies of base weights that currently carry a delta, and what is applied.
        self._originals: dict[str, torch.Tensor] = {}
        self._base_token: str = ""

    def _peft_config(self, spec: AdapterSpec):
        from peft import LoraConfig, TaskType

        if is_image_task(spec.task):
            return self._image_peft_config(spec)
        return LoraConfig(
            r=spec.rank,
            lora_alpha=spec.alpha,
            lora_dropout=spec.dropout,
            target_modules=list(spec.target_modules) or None,
            rank_pattern=dict(spec.rank_pattern),
            alpha_pattern=dict(spec.alpha_pattern),
            task_type=TaskType.SEQ_CLS if spec.task == "classification" else TaskType.CAUSAL_LM,
        )

    def _image_peft_config(self, spec: AdapterSpec):
        """An image model's LoRA: no peft task type (its forward takes pixels), targets per
        architecture (:func:`fedlora.model.vision.default_targets`), the fresh head trained in full."""
        from peft import LoraConfig

        from fedlora.model.vision import IMAGE_HEAD, default_targets

        targets = default_targets(self.loaded.model, spec.task, spec.towers, spec.target_modules)
        return LoraConfig(
            r=spec.rank,
            lora_alpha=spec.alpha,
            lora_dropout=spec.dropout,
            target_modules=targets,
            rank_pattern=dict(spec.rank_pattern),
            alpha_pattern=dict(spec.alpha_pattern),
            modules_to_save=[IMAGE_HEAD] if spec.task == "image_classification" else None,
        )

    def ensure(self, spec: AdapterSpec, seed: int = 0) -> str:
        """Create the adapter for ``spec`` if needed (seeded init), make it active, return its name."""
        from peft import get_peft_model

        name = spec.name
        with self.lock:
            if name not in self.specs:
                if spec.target_modules:
                    check_target_modules(self.loaded.model, spec.target_modules, self.loaded.source)
                torch.manual_seed(seed)
                try:
                    if self.peft_model is None:
                        self.peft_model = get_peft_model(self.loaded.model, self._peft_config(spec), adapter_name=name)
                    else:
                        self.peft_model.add_adapter(name, self._peft_config(spec))
                except ValueError as err:
                    raise ConfigError(f"config key 'lora.target_modules': {str(err).splitlines()[0]}") from None
                self.specs[name] = spec
                self._params[name] = self._collect(name)
                # Master weights in float32 whatever the base's dtype: peft casts LoRA factors
                # already; a trained head copied from a bfloat16 base is cast here.
                with torch.no_grad():
                    for param in self._params[name].values():
                        if param.dtype != torch.float32:
                            param.data = param.data.to(torch.float32)
            self.peft_model.set_adapter(name)
            return name

    def _collect(self, name: str) -> dict[str, torch.nn.Parameter]:
        marker = f".{name}."
        out = {}
        for pname, param in self.peft_model.named_parameters():
            if marker in pname:
                out[pname.replace(marker, ".")] = param
        return dict(sorted(out.items()))

    def params(self, name: str) -> dict[str, torch.nn.Parameter]:
        """Trainable tensors of adapter ``name`` by canonical key (live parameters)."""
        return self._params[name]

    def state(self, name: str) -> dict[str, torch.Tensor]:
        """A detached copy of adapter ``name``'s tensors."""
        return {k: p.detach().clone() for k, p in self._params[name].items()}

    def load_state(self, name: str, state: Mapping[str, torch.Tensor]) -> None:
        """Copy ``state`` into adapter ``name`` (a subset of its keys is allowed)."""
        params = self._params[name]
        with torch.no_grad():
            for key, value in state.items():
                if key not in params:
                    raise KeyError(f"adapter has no tensor {key}")
                if tuple(params[key].shape) != tuple(value.shape):
                    raise ValueError(f"{key}: shape {tuple(value.shape)} != {tuple(params[key].shape)}")
                params[key].copy_(value.to(params[key].dtype))

    def initial_state(self, name: str, seed: int) -> dict[str, torch.Tensor]:
        """Re-initialise adapter ``name`` as peft does (seeded) and return it.

        A run must start from the same adapter whatever ran before it in this process, so the
        initial state is a function of (spec, seed) alone: LoRA factors re-drawn with peft's own
        init, trained heads copied back from the base model's untouched head.
        """
        from peft.tuners.lora import LoraLayer
        from peft.utils import ModulesToSaveWrapper

        with self.lock, torch.no_grad():
            torch.manual_seed(seed)
            for module in self.peft_model.modules():
                if isinstance(module, LoraLayer) and name in module.lora_A:
                    module.reset_lora_parameters(name, True)
                elif isinstance(module, ModulesToSaveWrapper) and name in module.modules_to_save:
                    module.modules_to_save[name].load_state_dict(module.original_module.state_dict())
            return self.state(name)

    def shapes(self, name: str) -> dict[str, tuple[int, ...]]:
        return {k: tuple(p.shape) for k, p in self._params[name].items()}

    # -- the frozen base weights ---------------------------------------------------------------

    def _base_layer(self, module: str) -> tuple[torch.nn.Module, bool]:
        layer = self.peft_model.get_submodule(module)
        base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
        return base, bool(getattr(layer, "fan_in_fan_out", False))

    def base_weight(self, module: str) -> torch.Tensor:
        """The pretrained weight of target ``module`` as (out x in) float32, ignoring any delta.

        Raises
        ------
        ConfigError
            When the weight is quantized (bitsandbytes), where no SVD or merge is exact.
        """
        with self.lock:
            base, transposed = self._base_layer(module)
            weight = self._originals.get(module, base.weight)
            if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16) or type(weight).__name__.startswith(
                ("Params4bit", "Int8Params")
            ):
                raise ConfigError(
                    f"config key 'model.quantization': module {module!r} is quantized "
                    f"({self.loaded.key[3]}); this strategy needs its float weights (use quantization = 'none')"
                )
            weight = weight.detach().to(torch.float32)
            return (weight.T if transposed else weight).clone()

    def set_base_delta(self, deltas: Mapping[str, torch.Tensor], token: str) -> None:
        """Make the frozen base ``W0 + deltas[module]`` for every module listed, ``W0`` elsewhere.

        Parameters
        ----------
        deltas : mapping from module path to Tensor
            Dense (out x in) deltas; empty restores the pretrained base.
        token : str
            Identifies ``deltas`` (a digest): when it matches what is applied, nothing is redone,
            so the virtual clients of a round share one application.
        """
        with self.lock, torch.no_grad():
            if token == self._base_token:
                return
            for module in list(self._originals):
                if module not in deltas:
                    base, _ = self._base_layer(module)
                    base.weight.copy_(self._originals.pop(module))
            for module, delta in deltas.items():
                original = self.base_weight(module)  # also refuses quantized weights
                base, transposed = self._base_layer(module)
                self._originals.setdefault(module, base.weight.detach().clone())
                new = original + delta.to(original.device, torch.float32)
                base.weight.copy_((new.T if transposed else new).to(base.weight.dtype))
            self._base_token = token


def get_host(loaded: LoadedModel) -> AdapterHost:
    """The process-wide adapter host of a cached base model (kept in :mod:`fedlora.process`)."""
    store = process_state()
    host = store.get(HOST, loaded.key, lambda: AdapterHost(loaded))
    if host.loaded is not loaded:  # the model was reloaded after a clear: a new peft wrapper on it
        host = AdapterHost(loaded)
        store.put(HOST, loaded.key, host)
    return host


def seeded_lora_a(shapes: Mapping[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Deterministic A factors (peft's Kaiming-uniform bound), identical in every process.

    Each key draws from its own generator seeded by ``seed`` and a CRC of the key, so the value
    does not depend on which other keys are asked for or in which order.
    """
    out = {}
    for key, shape in sorted(shapes.items()):
        if not is_lora_a(key):
            continue
        gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63))
        fan_in = shape[1]
        bound = 1.0 / np.sqrt(fan_in)
        out[key] = (torch.rand(shape, generator=gen, dtype=torch.float32) * 2 - 1) * bound
    return out


# ---------------------------------------------------------------------------------------------
# The wire format (:mod:`fedlora.wire.transport`): float arrays or absmax codes, float32 on both ends.


def to_record(
    state: Mapping[str, torch.Tensor], dtype: str = "float32", quantize: str = "none", packed: bool = False
) -> ArrayRecord:
    """Tensors -> ArrayRecord in ``dtype`` (or ``quantize`` codes), keys sorted so both ends agree
    on the order, in one Array when ``packed`` (messages); base-delta factors and links always
    as exact float32."""
    return Wire(dtype, quantize).to_record(state, exact=exact_on_wire, packed=packed)


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """ArrayRecord -> float32 tensors (exact for float32 on the wire); a
    :class:`~fedlora.wire.transport.WireError` for an array whose bytes do not fit its header."""
    return {key: decode(array) for key, array in arrays_of(record).items()}


def record_bytes(record: ArrayRecord) -> int:
    """Bytes the record occupies on the wire (serialized arrays plus keys)."""
    return int(record.count_bytes())


def tensor_bytes(state: Mapping[str, torch.Tensor], dtype: str = "float32") -> int:
    """Raw bytes of the tensors alone in ``dtype``: the floor any framing is measured against."""
    return int(sum(t.numel() for t in state.values()) * np.dtype(dtype).itemsize)
