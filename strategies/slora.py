"""SLoRA: sparse fine-tuning first, then LoRA started from what it learnt.

Babakniya et al., "SLoRA: Federated Parameter Efficient Fine-Tuning of Language Models"
(arXiv 2308.06522). The paper finds that the gap between federated LoRA and full fine-tuning
widens as the clients' data grow more heterogeneous, and that a data-driven start of the LoRA
factors closes most of it (Sec. 1 and 4). Two stages:

1. **Sparse fine-tuning** (Sec. 4, stage 1), for ``strategy.stage1_rounds`` rounds: every client
   trains the same sparse subset of the target modules' full weights (and the trained head),
   chosen by one random mask of ``strategy.density`` (the paper's ~1 %) that the server fixes
   from a seed; the mask itself never travels (each node rebuilds it from the seed and checks a
   digest of it), only the masked entries' values do, so a message carries ``density`` of the
   dense bytes. The server averages the values (:func:`sparse_mean`): with one mask for all, the
   average of the sparse updates is exactly the sparse update of the averages.
2. **Data-driven LoRA start** (Sec. 4, stage 2): as the first stage-2 round starts, the server
   takes each module's accumulated sparse update ``dW`` and sets ``B``, ``A`` from its rank-r
   truncated SVD, the singular values split evenly between the factors (``B = U_r S^1/2``,
   ``A = S^1/2 V_r^T``, each divided by ``sqrt(alpha / r)``) so that ``(alpha / r) * B @ A`` is the
   best rank-r approximation of ``dW`` (:func:`svd_start`; peft's own PiSSA init,
   :func:`fedlora.model.lowrank.svd_init`, applied to ``dW`` instead of ``W``). The remaining
   rounds are FedIT (FedAvg of A and B) on the *pretrained* base.

Choices made here, and why (the even split of the singular values, PiSSA's, is one too: the
rule this module follows is the product ``(alpha / r) B A = U_r S_r V_r^T``, which any split keeps):

* **The residual** ``dW - (alpha / r) B A`` is dropped: the base stays the pretrained weight, as
  stage 1 serves to find the LoRA start and stage 2 is plain LoRA on the pretrained model.
  Folding the residual into the base would make it a dense, full-rank change (a random sparse
  matrix has nearly full rank), which every node must download dense and every export must carry
  as a rank-``min(out, in)`` term, the adapter's whole point lost. The share of ``dW``'s energy
  the start keeps (``slora-svd-energy``, ``||(alpha / r) B A||^2 / ||dW||^2``) is logged at the
  boundary, so what the truncation loses is measured, not hidden. The trained head is kept.
* **The mask** is uniform over each module's entries (``round(density * out * in)`` of them,
  at least one), drawn by :func:`torch.randperm` from a seed and the module's name (option
  ``mask_seed``, default the run's seed); a module whose ``dW`` is zero keeps peft's LoRA init
  (an SVD start of zero would leave both factors zero and untrainable).
* ``density = 1`` with ``stage1_rounds >= rounds`` is dense FedAvg of the target modules' full
  weights: the full fine-tuning baseline ``benchmarks/quality.py`` compares against.

A run that ends in stage 1 exports the sparse change as a base delta folded into the peft
adapter (:func:`fedlora.run.export.fold_base_delta`: exact, at rank ``r + in``); a run that
reaches stage 2 exports plain LoRA. Resume needs no strategy state: the stage is a function of
the round, the mask of the seed, and the values stay in the global state (zero in stage 2), so
every checkpoint holds the same tensors. ``sparse_lr_scale`` sets the weight entries' step apart
from the head's and the LoRA factors' (full weights usually take a far smaller one). Stage 1
trains the frozen weights' entries, so a quantized base is refused, as is local DP (Opacus
computes per-example gradients of module parameters only).
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from fedlora.config import RunConfig
from fedlora.errors import ConfigError
from fedlora.model.adapters import AdapterHost, from_record, is_lora_a, is_lora_b, lora_keys, lora_modules, to_record
from fedlora.model.lowrank import svd_init

from .base import ClientUpdate, GlobalView, LoRAStrategy
from .checks import quantized
from .fedavg import weighted_mean
from .hooks import ClientHooks, TrainGroup
from .options import StrategyOptions, option
from .registry import register
from .robust import Reducer

#: Key suffix of a module's stage-1 values: ``<module>.slora_values``, the masked entries in mask order.
VALUES = "slora_values"
#: Round config keys: the stage (1 or 2) and, in stage 1, the mask's density, seed and digest and
#: the weight entries' step as a multiple of the client lr.
STAGE = "slora-stage"
DENSITY = "slora-density"
MASK_SEED = "slora-mask-seed"
MASK_DIGEST = "slora-mask-digest"
LR_SCALE = "slora-lr-scale"
#: Round metric: the share of the stage-1 update's energy the SVD start keeps (logged at the boundary).
SVD_ENERGY = "slora-svd-energy"


def values_key(module: str) -> str:
    return f"{module}.{VALUES}"


def is_values(key: str) -> bool:
    return key.endswith(f".{VALUES}")


def values_module(key: str) -> str:
    return key[: -len(VALUES) - 1]


def mask_size(shape: tuple[int, int], density: float) -> int:
    """Entries of an (out x in) weight that the mask keeps: ``round(density * out * in)``, at least one."""
    total = int(shape[0]) * int(shape[1])
    return min(total, max(1, round(density * total)))


def sparse_mask(module: str, shape: tuple[int, int], density: float, seed: int) -> torch.Tensor:
    """The shared mask of one module: sorted flat indices into its (out x in) weight.

    A function of (module name, shape, density, seed) alone, so the server and every node draw the
    same one (each key from its own generator, as :func:`fedlora.model.adapters.seeded_lora_a`).
    """
    total = int(shape[0]) * int(shape[1])
    count = mask_size(shape, density)
    if count == total:
        return torch.arange(total)
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(module.encode())) % (2**63))
    return torch.randperm(total, generator=gen)[:count].sort().values


def module_shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """(out, in) of every LoRA target module of ``state``, from its factors' shapes."""
    shapes = {}
    for module in lora_modules(state):
        a_key, b_key = lora_keys(module)
        shapes[module] = (int(state[b_key].shape[0]), int(state[a_key].shape[1]))
    return shapes


def masks_for(shapes: Mapping[str, tuple[int, int]], density: float, seed: int) -> dict[str, torch.Tensor]:
    return {m: sparse_mask(m, shape, density, seed) for m, shape in sorted(shapes.items())}


def mask_digest(masks: Mapping[str, torch.Tensor]) -> str:
    """CRC-32 of the modules' names and indices: a node checks that it drew the server's masks."""
    crc = 0
    for module in sorted(masks):
        crc = zlib.crc32(module.encode(), crc)
        crc = zlib.crc32(masks[module].to(torch.int64).contiguous().numpy().tobytes(), crc)
    return f"{crc:08x}"


def densify(values: torch.Tensor, index: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The dense (out x in) update whose masked entries are ``values`` (differentiable in them)."""
    flat = values.new_zeros(int(shape[0]) * int(shape[1]))
    return flat.scatter(0, index.to(values.device), values).view(int(shape[0]), int(shape[1]))


def sparse_mean(
    updates: list[Mapping[str, torch.Tensor]], weights: list[float], mean: Reducer = weighted_mean
) -> dict[str, torch.Tensor]:
    """The average of the clients' sparse values (and head): one mask for all, so it is exactly the
    masked entries of the average of their dense sparse updates."""
    return mean(updates, weights)


def svd_start(delta: torch.Tensor, rank: int, alpha: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """LoRA factors whose ``(alpha / rank) * B @ A`` is the rank-r truncated SVD of ``delta``.

    Returns
    -------
    tuple
        ``(A, B, energy)``: A (r x in), B (out x r), the singular values split evenly
        (``sqrt(S / scaling)`` on each side), and the share ``energy`` of ``||delta||^2`` kept.
    """
    a, b, residual = svd_init(delta, rank, alpha)
    total = float(delta.double().pow(2).sum())
    energy = 1.0 - float(residual.double().pow(2).sum()) / total if total > 0 else 0.0
    return a, b, energy


def stage_two(state: Mapping[str, torch.Tensor], rank: int, alpha: float, masks: Mapping[str, torch.Tensor]):
    """The global state at the boundary: every module's values turned into the SVD start of its
    sparse update and then zeroed (the residual dropped, see the module docstring; the keys stay,
    so every checkpoint of a run holds the same tensors); ``(state, mean energy kept)``."""
    out = {k: torch.zeros_like(v) if is_values(k) else v for k, v in state.items()}
    shapes = module_shapes(state)
    energies = []
    for key in sorted(k for k in state if is_values(k)):
        module = values_module(key)
        delta = densify(state[key], masks[module], shapes[module])
        if not bool(delta.any()):
            continue  # nothing learnt here: peft's init, not an all-zero (untrainable) start
        a, b, energy = svd_start(delta, rank, alpha)
        a_key, b_key = lora_keys(module)
        out[a_key], out[b_key] = a, b
        energies.append(energy)
    return out, (sum(energies) / len(energies) if energies else 0.0)


class SLoRAOptions(StrategyOptions):
    stage1_rounds: int = option(
        2, "rounds of stage-1 sparse fine-tuning before the SVD start of LoRA (>= rounds: sparse only)", ge=1
    )
    density: float = option(0.01, "share of each target weight's entries trained in stage 1 (paper: ~1%)", gt=0, le=1)
    mask_seed: int | None = option(None, "seed of the shared stage-1 mask (default: the run's seed)")
    sparse_lr_scale: float = option(
        1.0,
        "step of the stage-1 weight entries as a multiple of the client lr (full weights usually want a smaller "
        "step than LoRA factors; the head keeps the client lr)",
        gt=0,
        le=1000,
    )


class SLoRAClient(ClientHooks):
    """Client half: in stage 1, train the received sparse values of the target weights (the
    adapter's LoRA held at zero); in stage 2, FedIT's default."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        self._values: dict[str, torch.Tensor] = {}
        self._trained: dict[str, tuple[torch.nn.Parameter, torch.Tensor, tuple[int, int]]] = {}

    def groups(self, received, data, task_rows) -> list[TrainGroup]:
        self._values = {k: v for k, v in received.items() if is_values(k)}
        rest = {k: v for k, v in received.items() if not is_values(k)}
        return [TrainGroup(name="", tensors=rest, data=data)]

    def frozen(self, shapes, group: TrainGroup) -> dict[str, torch.Tensor]:
        if int(self.config.get(STAGE, 2)) != 1:
            return {}
        # The shared host may hold another run's factors: LoRA adds exactly nothing in stage 1.
        return {
            k: torch.zeros(s) for k, s in shapes.items() if (is_lora_a(k) or is_lora_b(k)) and k not in group.tensors
        }

    def outside(self, host: AdapterHost, group: TrainGroup) -> dict[str, torch.nn.Parameter]:
        if not self._values:
            return {}
        modules = [values_module(k) for k in sorted(self._values)]
        weights = {m: host.base_weight(m) for m in modules}  # refuses a quantized weight, naming the key
        shapes = {m: (int(w.shape[0]), int(w.shape[1])) for m, w in weights.items()}
        masks = masks_for(shapes, float(self.config[DENSITY]), int(self.config[MASK_SEED]))
        if mask_digest(masks) != str(self.config[MASK_DIGEST]):
            raise ValueError(f"slora: this node's stage-1 masks ({mask_digest(masks)}) differ from the server's")
        params = {}
        for module in modules:
            key, device = values_key(module), weights[module].device
            if tuple(self._values[key].shape) != (masks[module].numel(),):
                got, want = tuple(self._values[key].shape), masks[module].numel()
                raise ValueError(f"slora: {key} has {got} values, the mask keeps {want}")
            # Trained as values / scale and used as scale * parameter: AdamW's step on the parameter is
            # about the lr whatever its gradient's size, so the values move by about scale * lr.
            start = self._values[key].detach().to(device, torch.float32) / self._scale
            params[key] = torch.nn.Parameter(start.clone())
            self._trained[module] = (params[key], masks[module].to(device), shapes[module])
        return params

    @property
    def _scale(self) -> float:
        return float(self.config.get(LR_SCALE, 1.0))

    @contextlib.contextmanager
    def training(self, model: torch.nn.Module, spec: Any) -> Iterator[None]:
        """Add ``x @ densify(values)^T`` to each target layer's output while it trains."""
        handles = []

        def hook_for(values, index, shape):
            def add_sparse(module, args, output):
                delta = (
                    densify(values * self._scale, index, shape) if self._scale != 1.0 else densify(values, index, shape)
                )
                return output + torch.nn.functional.linear(args[0], delta.to(args[0].dtype))

            return add_sparse

        try:
            for module, (values, index, shape) in self._trained.items():
                handles.append(model.get_submodule(module).register_forward_hook(hook_for(values, index, shape)))
            yield None
        finally:
            for handle in handles:
                handle.remove()

    def after_train(self, trained, rank):
        if self._scale == 1.0:
            return trained, {}
        return {k: v * self._scale if is_values(k) else v for k, v in trained.items()}, {}


@register
class SLoRA(LoRAStrategy):
    """``slora``: stage-1 sparse fine-tuning of a shared random mask, then FedIT from the SVD start."""

    name = "slora"
    options_class = SLoRAOptions
    client_hooks = SLoRAClient
    #: Stage 1 trains entries of the frozen weights themselves: float weights only.
    needs_float_base = True
    #: Values and factors are averaged coordinate-wise over one mask: any coordinate-wise reducer fits.
    robust_aggregators = ("mean", "trimmed_mean", "median")
    #: Central DP releases one noisy mean of the clipped updates of one payload sent to all: stage 1's
    #: values and head are such a payload, and the SVD start is post-processing of the release.
    central_dp_refusal = ""
    local_dp_refusal = (
        "trains sparse weight entries outside the model's parameters in stage 1, which DP-SGD (Opacus) cannot "
        "clip per example; use privacy.mode = 'none'"
    )
    server_optimizer_refusal = "at the stage boundary A and B are replaced by the SVD start, which is no update of them"
    #: The SVD start's share of the stage-1 update's energy, at the boundary round only.
    _energy: float | None = None
    #: The round being configured (what a node is sent depends on its stage).
    _round: int = 0
    #: (module shapes, their masks), kept once drawn.
    _masks: tuple[tuple, dict[str, torch.Tensor]] | None = None

    @classmethod
    def check_setup(cls, cfg: RunConfig, tasks: list[str]) -> None:
        for key, quantization in quantized(cfg):
            raise ConfigError(
                f"config key '{key}': strategy 'slora' fine-tunes entries of the frozen weights in stage 1, "
                f"which a {quantization} base cannot train; use quantization = 'none'"
            )
        super().check_setup(cfg, tasks)

    @property
    def mask_seed(self) -> int:
        return self.settings.seed if self.options.mask_seed is None else self.options.mask_seed

    def masks(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The shared masks of ``state``'s modules (drawn once per run: every node's message names them)."""
        shapes = module_shapes(state)
        key = tuple(sorted(shapes.items()))
        if self._masks is None or self._masks[0] != key:
            self._masks = (key, masks_for(shapes, self.options.density, self.mask_seed))
        return self._masks[1]

    def initialize(self, state: dict[str, torch.Tensor], host: AdapterHost | None = None) -> dict[str, torch.Tensor]:
        state = dict(state)
        for module, index in self.masks(state).items():
            state[values_key(module)] = torch.zeros(index.numel())
        return state

    def stage(self, server_round: int) -> int:
        """1 for the sparse rounds, 2 for the LoRA rounds."""
        return 1 if server_round <= self.options.stage1_rounds else 2

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        """The round's messages; the first stage-2 round first turns the values into the SVD start
        (done here, not at the end of the last sparse round, so that a run whose ``rounds`` grow
        on resume past ``stage1_rounds`` still takes it)."""
        self._round, self._energy = server_round, None
        state = from_record(arrays)
        if self.stage(server_round) == 2 and any(bool(v.any()) for k, v in state.items() if is_values(k)):
            try:
                state, self._energy = stage_two(state, self.spec.rank, self.spec.alpha, self.masks(state))
            except ValueError as err:
                rank = self.spec.rank
                raise ConfigError(f"config key 'lora.rank': SLoRA cannot take a rank-{rank} SVD: {err}") from None
            arrays = to_record(state)
        return super().configure_train(server_round, arrays, config, grid)

    def payload(self, node_id: int, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.stage(self._round) == 1:  # the values and the head, no LoRA factors (held at zero)
            return {k: v for k, v in state.items() if not (is_lora_a(k) or is_lora_b(k))}
        return {k: v for k, v in state.items() if not is_values(k)}

    def client_config(self, node_id: int, server_round: int) -> dict[str, Any]:
        if self.stage(server_round) == 2:
            return {STAGE: 2}
        return {
            STAGE: 1,
            DENSITY: self.options.density,
            MASK_SEED: self.mask_seed,
            MASK_DIGEST: mask_digest(self.masks(self._global)),
            LR_SCALE: self.options.sparse_lr_scale,
        }

    def aggregate(
        self, server_round: int, state: dict[str, torch.Tensor], updates: list[ClientUpdate]
    ) -> dict[str, torch.Tensor]:
        mean = self.average(weighted_mean)
        state.update(sparse_mean([u.state for u in updates], [u.num_examples for u in updates], mean))
        return state

    def round_metrics(self) -> dict[str, Any]:
        return {} if self._energy is None else {SVD_ENERGY: self._energy}

    def views(self, state: Mapping[str, torch.Tensor]) -> list[GlobalView]:
        """The model is ``W0 + densify(values) + scaling * B @ A`` (in stage 1 B is zero, in stage 2
        the values are): the sparse change is a base delta ``(dense, I)``, exact."""
        adapter = {k: v for k, v in state.items() if not is_values(k)}
        learnt = [k for k, v in state.items() if is_values(k) and bool(v.any())]
        shapes, masks = module_shapes(state), self.masks(state) if learnt else {}
        deltas = {}
        for key in learnt:
            module = values_module(key)
            dense = densify(state[key], masks[module], shapes[module])
            deltas[module] = (dense, torch.eye(shapes[module][1]))
        return [GlobalView(name="", spec=self.spec, state=adapter, base_delta=deltas)]
