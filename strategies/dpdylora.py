"""DP-DyLoRA: dynamic-rank LoRA under differentially private federated learning.

Xu et al., "DP-DyLoRA: Fine-Tuning Transformer-Based Models On-Device under Differentially
Private Federated Learning using Dynamic Low-Rank Adaptation", 2024 (arXiv 2405.06368), built on
DyLoRA (Valipour et al., EACL 2023, arXiv 2210.07558).

DyLoRA trains one adapter so that every truncation to its first ``b`` components works: at each
step a rank ``b`` is drawn and the forward pass uses only ``A[:b, :]`` and ``B[:, :b]``. Under DP
federated learning the rank cannot be each client's own choice: clients training different
slices would make the average over each slice divide by a data-dependent number of clients,
while the DP analysis assumes one fixed denominator. So the *server* draws one rank ``b_t`` per
round (uniform in ``[min_rank, r]``, a pure function of the run's seed and the round), every
client of the round trains and sends the same rank-``b_t`` sub-adapter, and the replies average
like FedAvg into the first ``b_t`` components of the global adapter. Inside local training each
step draws ``b`` in ``1..b_t`` (DyLoRA's nested sampling); that randomness depends on no example
and costs no privacy.

Scaling convention (as :mod:`.ranks`): every truncation keeps the global scaling ``alpha / r``, so
the rank-``b`` adapter has alpha ``alpha * b / r`` and is exactly the leading part of the global
one. A finished adapter can therefore be cut to any rank ``k <= r`` afterwards
(:func:`truncate_adapter`, :func:`truncate_adapter_dir` for a saved peft folder).

The client half masks rather than slices: a forward pre-hook on every ``lora_B`` of the active
adapter zeroes its input features ``>= b``, so components ``>= b`` contribute nothing and get
zero gradient that step. It works under Opacus too: its forward hook records the input the
pre-hook returned, so per-example gradients of the masked components are zero as well.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from fedlora.errors import ConfigError
from fedlora.model.adapters import AdapterSpec, is_lora_a, is_lora_b, rank_dim
from fedlora.wire import protocol as P

from .base import ClientUpdate, LoRAStrategy
from .fedavg import weighted_mean
from .hooks import ClientHooks
from .options import StrategyOptions, option
from .ranks import truncate
from .registry import register
from .robust import Reducer
from .settings import StrategySettings

#: Mixed into the round's seed for the per-step ranks, so they are not the draws of other
#: generators seeded from the same number (dropout, batch order).
STEP_SEED_SALT = 0x5D7_1A


# -- the math: pure functions --------------------------------------------------------------------


def sample_round_rank(seed: int, server_round: int, min_rank: int, max_rank: int) -> int:
    """The rank ``b_t`` every client trains in round ``server_round``: uniform in [min_rank, max_rank].

    A pure function of (seed, round): every client of the round, the server's payload, its
    aggregation and a resumed run all agree on it without any state, and it depends on no data,
    so choosing it costs no privacy. The generator is seeded from a string (hashed with SHA-512
    by :mod:`random`, the same in every process) so its draws are not those of the server's
    client sampling, which seeds ``random.Random`` with a small integer of the same round.
    """
    if not 1 <= min_rank <= max_rank:
        raise ValueError(f"need 1 <= min_rank <= max_rank, got {min_rank}, {max_rank}")
    return random.Random(f"dpdylora-round-rank:{seed}:{server_round}").randint(min_rank, max_rank)


def truncated_spec(spec: AdapterSpec, rank: int) -> AdapterSpec:
    """The rank-``rank`` adapter shape with the global scaling kept (alpha ``alpha * rank / r``).

    With the same ``alpha / r``, the truncated adapter's update is exactly the first ``rank``
    components of the global one: truncation (and writing a trained slice back) loses nothing.
    """
    if not 1 <= rank <= spec.rank:
        raise ValueError(f"rank must be in [1, {spec.rank}], got {rank}")
    return replace(spec, rank=rank, alpha=spec.alpha * rank / spec.rank)


def _factor_rank(state: Mapping[str, torch.Tensor]) -> int | None:
    ranks = {int(v.shape[rank_dim(k)]) for k, v in state.items() if is_lora_a(k) or is_lora_b(k)}
    if len(ranks) > 1:
        raise ValueError(f"LoRA factors of different ranks {sorted(ranks)} in one state")
    return ranks.pop() if ranks else None


def truncate_adapter(state: Mapping[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """The first ``rank`` components of a (DyLoRA-trained) adapter: ``A[:rank]``, ``B[:, :rank]``,
    other tensors (a trained head) unchanged.

    DyLoRA trained every leading slice to work on its own, so the cut is a usable smaller
    adapter. Scaling stays ``alpha / r_max``: a peft adapter holding these factors needs
    ``lora_alpha = alpha * rank / r_max`` (:func:`truncated_spec`).
    """
    current = _factor_rank(state)
    if current is not None and not 1 <= rank <= current:
        raise ValueError(f"rank must be in [1, {current}], got {rank}")
    return truncate(state, rank)


def dylora_aggregate(
    state: Mapping[str, torch.Tensor],
    updates: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    rank: int,
    mean: Reducer = weighted_mean,
) -> dict[str, torch.Tensor]:
    """New global state: the weighted mean of the round's rank-``rank`` replies written into the
    first ``rank`` components of the global factors; components ``>= rank`` unchanged.

    Every reply of a round has the round's rank (the server chose it, not the clients), so each
    slice is averaged over all the round's clients with one fixed set of weights: the mean the DP
    analysis (and central DP's clipped mean) assumes. Components above the round's rank were
    neither sent nor trained, so nothing updates them. Trained tensors other than factors (a
    classification head) are averaged whole.

    Parameters
    ----------
    state : mapping
        Current global state at rank ``r_max``.
    updates : sequence of mappings
        The clients' trained tensors, every LoRA factor at rank ``rank``.
    weights : sequence of float
        Example counts per client (normalised here).
    rank : int
        The round's rank ``b_t``.
    mean : callable
        The average of the slices (weighted mean, or a robust reducer).
    """
    for i, update in enumerate(updates):
        got = _factor_rank(update)
        if got is not None and got != rank:
            raise ValueError(f"update {i} has rank {got}, the round's rank is {rank}")
        missing = [k for k in update if k not in state]
        if missing:
            raise KeyError(f"update {i} has a tensor the global state lacks: {missing[0]}")
    averaged = mean(updates, weights)
    out = dict(state)
    for key, value in averaged.items():
        if is_lora_a(key):
            new = state[key].clone()
            new[:rank] = value
        elif is_lora_b(key):
            new = state[key].clone()
            new[:, :rank] = value
        else:
            new = value
        out[key] = new
    return out


def mask_rank(x: torch.Tensor, rank: int) -> torch.Tensor:
    """``x`` with its last-axis features ``>= rank`` set to zero (the input of ``lora_B``).

    ``B @ mask(h)`` equals ``B[:, :rank] @ h[:rank]``: the forward pass of the rank-``rank``
    truncation, and the gradient of every masked component (in ``B`` and in ``A``) is zero.
    """
    if rank >= x.shape[-1]:
        return x
    keep = torch.arange(x.shape[-1], device=x.device) < rank
    return x.masked_fill(~keep, 0)


def lora_b_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The ``lora_B`` Linear of the active adapter in every peft LoRA layer of ``model``."""
    from peft.tuners.lora import LoraLayer

    out = []
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name in module.active_adapters:
                if name in module.lora_B:
                    out.append(module.lora_B[name])
    return out


@contextlib.contextmanager
def rank_mask(model: torch.nn.Module) -> Iterator[list[int | None]]:
    """Mask every active ``lora_B``'s input to a rank while the context is open.

    Yields a one-element list: set ``cell[0] = b`` to train (and run) the rank-``b`` slice;
    None uses the whole adapter. The hooks are removed on exit, exceptions included.
    """
    cell: list[int | None] = [None]

    def pre_hook(module: torch.nn.Module, args: tuple) -> tuple | None:
        if cell[0] is None or not args:
            return None
        return (mask_rank(args[0], cell[0]), *args[1:])

    handles = []
    try:
        for module in lora_b_modules(model):
            handles.append(module.register_forward_pre_hook(pre_hook))
        yield cell
    finally:
        for handle in handles:
            handle.remove()


# -- options, client half, server half -----------------------------------------------------------


class DPDyLoRAOptions(StrategyOptions):
    min_rank: int = option(1, "smallest rank the server samples for a round (at most lora.rank)", ge=1)


class DPDyLoRAClient(ClientHooks):
    """Client half: train the round's rank-``b_t`` adapter with a rank ``b`` in ``1..b_t`` drawn
    before every step (seeded from the round's seed); evaluation never masks."""

    def step_generator(self) -> torch.Generator:
        """The seeded generator of the round's per-step ranks (data-independent randomness)."""
        return torch.Generator().manual_seed((int(self.config[P.SEED]) + STEP_SEED_SALT) % (2**63))

    @contextlib.contextmanager
    def training(self, model: torch.nn.Module, spec: Any) -> Iterator[Callable[[int], int]]:
        rank = int(spec.rank)
        gen = self.step_generator()
        with rank_mask(model) as cell:

            def before_step(step: int) -> int:
                """Draw this step's rank and mask to it; returns the rank (for tests and logs)."""
                cell[0] = int(torch.randint(1, rank + 1, (1,), generator=gen))
                return cell[0]

            yield before_step


@register
class DPDyLoRA(LoRAStrategy):
    """``dpdylora``: one server-sampled rank per round (option ``min_rank``), DyLoRA's nested
    per-step ranks on the clients; the global adapter at ``lora.rank`` can be truncated to any
    rank when the run is done (:func:`truncate_adapter_dir`)."""

    name = "dpdylora"
    #: Secure aggregation serves it: the round's rank-b_t slice is the weighted mean of the replies: the masked sum
    #: gives it exactly.
    secure_aggregation_refusal = ""
    options_class = DPDyLoRAOptions
    client_hooks = DPDyLoRAClient
    #: Every reply is the same rank-b_t slice, averaged coordinate-wise: any coordinate-wise reducer fits.
    robust_aggregators = ("mean", "trimmed_mean", "median")
    #: The round's slice is averaged and the rest kept, so aggregate - old is a pseudo-gradient (zero
    #: above b_t, where the moments only decay); a server step is post-processing of the DP release.
    server_optimizer_refusal = ""

    def __init__(self, settings: StrategySettings, spec: AdapterSpec, **kwargs: Any) -> None:
        super().__init__(settings, spec, **kwargs)
        self._round: int | None = None
        # (round, the global state it was cut from, the payload): kept by reference, not by id().
        self._sent: tuple[int, Mapping[str, torch.Tensor], dict[str, torch.Tensor]] | None = None

    @classmethod
    def check_setup(cls, cfg, tasks: list[str]) -> None:
        super().check_setup(cfg, tasks)
        opts = cls.parse_options(cfg.strategy.options)
        if opts.min_rank > cfg.lora.rank:
            raise ConfigError(
                f"config key 'strategy.min_rank' must be at most lora.rank = {cfg.lora.rank}, got {opts.min_rank}"
            )

    def round_rank(self, server_round: int) -> int:
        """``b_t``: the rank every client trains in ``server_round``."""
        return sample_round_rank(
            self.settings.seed, server_round, min(self.options.min_rank, self.spec.rank), self.spec.rank
        )

    def begin_round(self, server_round: int) -> None:
        """Make ``server_round`` the round that :meth:`node_spec` and :meth:`payload` answer for."""
        if server_round != self._round:
            self._round = server_round
            self._sent = None

    def _current_rank(self) -> int:
        return self.round_rank(self._round) if self._round is not None else self.spec.rank

    def node_rank(self, node_id: int) -> int:
        return self._current_rank()

    def node_spec(self, node_id: int) -> AdapterSpec:
        return truncated_spec(self.spec, self._current_rank())

    def base_client_config(self, node_id: int, server_round: int) -> dict[str, Any]:
        self.begin_round(server_round)
        return super().base_client_config(node_id, server_round)

    def configure_train(self, server_round, arrays, config, grid):
        self.begin_round(server_round)
        return super().configure_train(server_round, arrays, config, grid)

    def payload(self, node_id: int, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # One truncation per round, the same tensors for every node: one serialized record, and
        # central DP sees the single payload it requires.
        rank = self._current_rank()
        if self._sent is None or self._sent[0] != self._round or self._sent[1] is not state:
            self._sent = (self._round, state, truncate_adapter(state, rank))
        return self._sent[2]

    def aggregate(
        self, server_round: int, state: dict[str, torch.Tensor], updates: list[ClientUpdate]
    ) -> dict[str, torch.Tensor]:
        return dylora_aggregate(
            state,
            [u.state for u in updates],
            [u.num_examples for u in updates],
            self.round_rank(server_round),
            self.average(weighted_mean),
        )

    def round_metrics(self) -> dict[str, Any]:
        return {"round_rank": self.round_rank(self._round)} if self._round is not None else {}


# -- a finished adapter, cut to a smaller rank ---------------------------------------------------

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FEDLORA_META = "fedlora.json"


def truncate_adapter_dir(src_dir: str | Path, rank: int, out_dir: str | Path) -> Path:
    """Write the rank-``rank`` truncation of a saved peft LoRA adapter folder to ``out_dir``.

    Reads ``adapter_config.json`` and ``adapter_model.safetensors`` (as
    :func:`fedlora.run.export.export_adapter` writes them), keeps ``lora_A`` rows and ``lora_B``
    columns ``[:rank]``, sets ``r = rank`` and ``lora_alpha`` so that the scaling is unchanged
    (``alpha * rank / r``; ``alpha * sqrt(rank / r)`` under rsLoRA), and copies every other file
    (tokenizer, ``fedlora.json`` with its rank and alpha updated). The result loads with
    ``PeftModel.from_pretrained``. Only meaningful for an adapter whose leading slices were
    trained to stand alone (DyLoRA); for any other it is a crude low-rank cut.

    Raises
    ------
    ValueError
        ``rank`` outside ``[1, r]``, per-module ranks (``rank_pattern``), or DoRA.
    FileNotFoundError
        No safetensors weights in ``src_dir``.
    """
    from safetensors.torch import load_file, save_file

    src, out = Path(src_dir), Path(out_dir)
    config = json.loads((src / ADAPTER_CONFIG).read_text())
    weights = src / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found (only safetensors adapters are supported)")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError("the adapter has per-module ranks (rank_pattern/alpha_pattern); cannot truncate it uniformly")
    if config.get("use_dora"):
        raise ValueError("DoRA adapters cannot be truncated: their magnitude depends on the full product")
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    if not 1 <= rank <= r:
        raise ValueError(f"rank must be in [1, {r}], got {rank}")
    tensors = load_file(str(weights))
    cut: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if is_lora_a(key) or is_lora_b(key):
            value = value.narrow(rank_dim(key), 0, rank)
        cut[key] = value.contiguous().clone()
    new_alpha = alpha * math.sqrt(rank / r) if config.get("use_rslora") else alpha * rank / r
    config["r"], config["lora_alpha"] = rank, new_alpha
    in_place = out.exists() and src.resolve() == out.resolve()
    if not in_place:
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        for item in src.iterdir():
            if item.is_file() and item.name not in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, FEDLORA_META):
                shutil.copy2(item, out / item.name)
    save_file(cut, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    meta_file = src / FEDLORA_META
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        meta.update({"rank": rank, "alpha": new_alpha, "truncated_from_rank": r})
        (out / FEDLORA_META).write_text(json.dumps(meta, indent=2) + "\n")
    return out
