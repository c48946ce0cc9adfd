"""Differential privacy: DP-SGD on a client (Opacus), user-level DP on the server, the accounting.

Two units of privacy, never mixed up in what a run reports:

* ``[privacy] mode = "local"``: **sample-level** DP for each client. Every client trains with
  DP-SGD (Opacus's ``GradSampleModule`` + ``DPOptimizer``, Poisson sampling by Opacus's
  ``UniformWithReplacementSampler``): per-example gradients of the trained tensors only, each
  clipped to ``max_grad_norm``, Gaussian noise of std ``noise_multiplier * max_grad_norm`` on
  their sum. Its :class:`PrivacyLedger` (kept in the node's ``Context.state``) counts the steps
  and an Opacus accountant turns them into the client's epsilon at ``delta``.
* ``mode = "central"``: **user-level** DP for the federation (DP-FedAvg, McMahan et al. 2018).
  The server clips each client's whole update to ``clip_norm``, averages the clipped updates
  with equal weights over the sampled clients, adds Gaussian noise of std
  ``noise_multiplier * clip_norm / sampled`` to that mean (:func:`noisy_mean`), and an RDP
  accountant over rounds at the client sampling rate gives the federation's epsilon.

The math here is pure functions over tensors; the Opacus wrapping of a live model is
:class:`DPSGD`, a context manager the training loop enters for one client's local round.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fedlora.config import ACCOUNTANTS, PRIVACY_MODES
from fedlora.errors import ConfigError

#: The values of ``privacy.mode`` (declared with the key, in :mod:`fedlora.config`).
MODES = PRIVACY_MODES
#: Privacy units, as the run's guarantee names them.
UNIT = {"local": "sample level for each client", "central": "user level"}
#: PRV accountant's epsilon error (Opacus's default); the same everywhere, so numbers agree.
PRV_EPS_ERROR = 0.01


# -- accounting ---------------------------------------------------------------------------------


def make_accountant(name: str, history: Iterable[Sequence[float]] = ()):
    """An Opacus accountant (``rdp`` or ``prv``) holding ``history`` of (noise, sample rate, steps)."""
    from opacus.accountants import create_accountant

    if name not in ACCOUNTANTS:
        raise ConfigError(f"config key 'privacy.accountant' must be one of {', '.join(ACCOUNTANTS)}, got {name!r}")
    accountant = create_accountant(mechanism=name)
    accountant.history = [(float(z), float(q), int(n)) for z, q, n in history]
    return accountant


def epsilon(history: Sequence[Sequence[float]], delta: float, accountant: str) -> float:
    """Epsilon that Opacus's ``accountant`` gives for ``history`` at ``delta`` (0 for no steps).

    Parameters
    ----------
    history : sequence of (noise_multiplier, sample_rate, steps)
        What the Gaussian mechanism ran, as Opacus accountants record it.
    delta : float
        Target delta.
    accountant : str
        ``rdp`` or ``prv``.
    """
    if not history or all(int(n) == 0 for _, _, n in history):
        return 0.0
    acc = make_accountant(accountant, history)
    if accountant == "prv":
        return float(acc.get_epsilon(delta=delta, eps_error=PRV_EPS_ERROR))
    return float(acc.get_epsilon(delta=delta))


def noise_for_target(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """Smallest noise multiplier (Opacus's binary search) whose epsilon after ``steps`` steps at
    ``sample_rate`` is at most ``target_epsilon`` (within 0.01 below it)."""
    from opacus.accountants.utils import get_noise_multiplier

    kwargs = {"eps_error": PRV_EPS_ERROR} if accountant == "prv" else {}
    try:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=max(int(steps), 1),
                accountant=accountant,
                epsilon_tolerance=0.01,
                **kwargs,
            )
        )
    except ValueError as err:
        raise ConfigError(f"config key 'privacy.target_epsilon' = {target_epsilon}: {err}") from None


@dataclass
class PrivacyLedger:
    """What one party has spent: Opacus accountant histories, one per disjoint part of its data.

    A client that trains one adapter per task does so on disjoint rows (parallel composition):
    each example is in one part only, so its epsilon is the largest of the parts'. Keeps the
    Opacus accountant interface: :meth:`step`, :meth:`state_dict`, :meth:`from_state`.

    Attributes
    ----------
    history : dict of str to list of [noise_multiplier, sample_rate, steps]
        Per part (``""`` for the whole data).
    """

    history: dict[str, list[list[float]]] = field(default_factory=dict)

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1, part: str = "") -> None:
        """Record ``steps`` mechanism runs at ``noise_multiplier`` and ``sample_rate``."""
        runs = self.history.setdefault(part, [])
        if runs and runs[-1][0] == noise_multiplier and runs[-1][1] == sample_rate:
            runs[-1][2] = int(runs[-1][2]) + int(steps)  # same mechanism: Opacus merges these too
        else:
            runs.append([float(noise_multiplier), float(sample_rate), int(steps)])

    def epsilon(self, delta: float, accountant: str) -> float:
        """The guarantee so far: the largest epsilon over the parts."""
        return max((epsilon(h, delta, accountant) for h in self.history.values()), default=0.0)

    def state_dict(self) -> dict[str, Any]:
        return {"history": {k: [list(r) for r in v] for k, v in self.history.items()}}

    @classmethod
    def from_state(cls, state: Mapping[str, Any] | None) -> PrivacyLedger:
        if not state:
            return cls()
        return cls({str(k): [[float(z), float(q), int(n)] for z, q, n in v] for k, v in state["history"].items()})


def guarantee(mode: str, eps: float, delta: float) -> str:
    """The run's guarantee in one sentence."""
    return f"(epsilon, delta) = ({eps:.4g}, {delta:.3g}) at {UNIT[mode]}"


# -- central (user-level) DP: pure math ---------------------------------------------------------


def global_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of all tensors together (float64)."""
    if not tensors:
        return 0.0
    return float(torch.sqrt(sum((t.detach().to(torch.float64) ** 2).sum() for t in tensors.values())))


def clip_update(update: Mapping[str, torch.Tensor], clip_norm: float) -> tuple[dict[str, torch.Tensor], float]:
    """``update`` scaled to L2 norm at most ``clip_norm`` (as one vector), and its norm before.

    Parameters
    ----------
    update : mapping from key to Tensor
        One client's update (what it trained minus what it was sent).
    clip_norm : float
        The bound C; the user-level sensitivity of a sum of clipped updates.
    """
    norm = global_norm(update)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: (v.to(torch.float64) * scale).to(torch.float32) for k, v in update.items()}, norm


def central_noise_std(noise_multiplier: float, clip_norm: float, sampled: int) -> float:
    """Std of the Gaussian noise on the mean of ``sampled`` clipped updates: z * C / m."""
    return noise_multiplier * clip_norm / max(int(sampled), 1)


def noisy_mean(
    updates: Sequence[Mapping[str, torch.Tensor]],
    *,
    clip_norm: float,
    noise_multiplier: float,
    sampled: int,
    generator: torch.Generator,
) -> tuple[dict[str, torch.Tensor], list[float], float]:
    """DP-FedAvg's release: clip each update, average with equal weights over the ``sampled``
    clients, add Gaussian noise of std ``noise_multiplier * clip_norm / sampled``.

    The denominator is the number of clients *sampled*, not the number that replied: a client
    that drops out contributes a zero update, which changes the sum by at most ``clip_norm``,
    so the sensitivity the noise is calibrated to holds either way.

    Parameters
    ----------
    updates : sequence of mappings
        The replies' updates, all with the same keys and shapes.
    clip_norm, noise_multiplier : float
        C and z.
    sampled : int
        Clients sampled this round (m >= len(updates)).
    generator : torch.Generator
        Source of the noise (seeded per round by the caller, so a run is reproducible).

    Returns
    -------
    (dict of str to Tensor, list of float, float)
        The noisy mean update, each update's norm before clipping, the noise std used.
    """
    if not updates:
        raise ValueError("noisy_mean of no updates")
    if sampled < len(updates):
        raise ValueError(f"{len(updates)} updates from {sampled} sampled clients")
    clipped, norms = [], []
    for u in updates:
        c, n = clip_update(u, clip_norm)
        clipped.append(c)
        norms.append(n)
    std = central_noise_std(noise_multiplier, clip_norm, sampled)
    out = {}
    for key in sorted(updates[0]):
        total = torch.stack([c[key].to(torch.float64) for c in clipped]).sum(0)
        noise = torch.normal(0.0, std, size=total.shape, generator=generator, dtype=torch.float64)
        out[key] = (total / sampled + noise).to(torch.float32)
    return out, norms, std


# -- local (sample-level) DP-SGD with Opacus ----------------------------------------------------


@dataclass(frozen=True)
class DPSettings:
    """One client's DP-SGD for one local round.

    Attributes
    ----------
    noise_multiplier : float
        sigma: noise std over ``max_grad_norm``.
    max_grad_norm : float
        Per-example clipping bound.
    sample_rate : float
        Poisson sampling probability of each example per step (batch size / examples).
    expected_batch_size : int
        The mean over which the clipped, noised gradient sum is averaged.
    """

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    expected_batch_size: int


def check_dp_model(model: torch.nn.Module, trainable: Iterable[torch.nn.Parameter]) -> None:
    """Raise ConfigError, before any training, when Opacus cannot give per-example gradients.

    Opacus refuses trainable layers that carry buffers (their statistics are not private), and
    its ``ModuleValidator`` refuses layers that mix examples within a batch (BatchNorm in
    training): either would make the per-example clipping meaningless.
    """
    from opacus.validators import ModuleValidator

    ids = {id(p) for p in trainable}
    problems = []
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if any(id(p) in ids for p in own) and list(module.buffers(recurse=False)):
            problems.append(f"trainable layer {name or type(module).__name__} ({type(module).__name__}) has buffers")
    if not problems:
        training = model.training
        model.train()  # what training will see (the validator refuses a model in eval mode)
        try:
            problems = [str(e).splitlines()[0] for e in ModuleValidator.validate(model, strict=False)]
        finally:
            model.train(training)
    if problems:
        raise ConfigError(
            f"config key 'privacy.mode': Opacus cannot compute per-example gradients for this model: {problems[0]}"
        )


def poisson_batches(num_examples: int, sample_rate: float, steps: int, seed: int) -> Iterator[list[int]]:
    """``steps`` Poisson-sampled batches (each example in each batch with probability
    ``sample_rate``), from Opacus's ``UniformWithReplacementSampler``; a batch may be empty."""
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    gen = torch.Generator().manual_seed(seed)
    sampler = UniformWithReplacementSampler(
        num_samples=num_examples, sample_rate=sample_rate, generator=gen, steps=steps
    )
    for batch in sampler:
        yield [int(i) for i in batch]


class DPSGD:
    """Opacus DP-SGD around a live model for one local round (a context manager).

    Only ``params`` get per-example gradients: every other parameter of ``model`` has
    ``requires_grad`` off while the hooks are attached (and is restored after). The model is
    wrapped where it already is (the right device): wrapping first and moving after is what
    leaves the LoRA weights silently untouched in a known Opacus + peft failure.

    Parameters
    ----------
    model : torch.nn.Module
        The peft model with the client's adapter active, on its device.
    params : list of Parameter
        The trained tensors (LoRA factors of the active adapter, a trained head).
    optimizer : torch.optim.Optimizer
        The plain optimizer over ``params``; wrapped into Opacus's ``DPOptimizer``.
    settings : DPSettings
        Noise, clipping, sampling.
    seed : int
        Seeds the noise.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        params: list[torch.nn.Parameter],
        optimizer: torch.optim.Optimizer,
        settings: DPSettings,
        seed: int,
    ) -> None:
        self.model = model
        self.params = params
        self.settings = settings
        self.seed = seed
        self.base_optimizer = optimizer
        self.module = None
        self.optimizer = None
        self._frozen: list[torch.nn.Parameter] = []
        self._warnings = warnings.catch_warnings()

    def __enter__(self) -> DPSGD:
        from opacus.grad_sample import GradSampleModule
        from opacus.optimizers import DPOptimizer

        self._warnings.__enter__()
        # Opacus's hooks on a LoRA layer whose input needs no gradient (a frozen embedding's
        # output): PyTorch warns, yet the gradients of the layer's own weights are complete.
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")

        ids = {id(p) for p in self.params}
        self._frozen = [p for p in self.model.parameters() if p.requires_grad and id(p) not in ids]
        for p in self._frozen:
            p.requires_grad_(False)
        check_dp_model(self.model, self.params)
        self.module = GradSampleModule(self.model, batch_first=True, loss_reduction="mean", strict=True)
        device = self.params[0].device
        gen = torch.Generator(device=device).manual_seed(self.seed)
        self.optimizer = DPOptimizer(
            self.base_optimizer,
            noise_multiplier=self.settings.noise_multiplier,
            max_grad_norm=self.settings.max_grad_norm,
            expected_batch_size=self.settings.expected_batch_size,
            loss_reduction="mean",
            generator=gen,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        if self.module is not None:
            self.module._close()  # removes the hooks and the per-example gradient attributes
        for p in self._frozen:
            p.requires_grad_(True)
        self._frozen = []
        self._warnings.__exit__(*exc)

    def empty_batch(self) -> None:
        """A Poisson batch with no example still takes a step: noise only, as in Opacus."""
        for p in self.optimizer.params:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)

    def step(self, extra_grads: Sequence[torch.Tensor | None] | None = None) -> None:
        """Clip, noise and average the per-example gradients, add ``extra_grads`` (the gradient
        of a data-independent regulariser, which costs no privacy), then step."""
        if not self.optimizer.pre_step():
            return
        if extra_grads is not None:
            for p, g in zip(self.optimizer.params, extra_grads):
                if g is not None:
                    p.grad = p.grad + g
        self.optimizer.original_optimizer.step()


def check_moved(before: Sequence[torch.Tensor], params: Sequence[torch.nn.Parameter], step: int) -> None:
    """Raise when a DP-SGD step left every trained tensor exactly as it was: a DP run whose
    weights do not change still spends epsilon, so it is an error, not a result."""
    if all(torch.equal(b, p.detach()) for b, p in zip(before, params)):
        raise RuntimeError(
            f"DP-SGD step {step} left all {len(params)} trained tensors unchanged: the per-example "
            "gradients did not reach them (was the model moved to its device after Opacus wrapped it?)"
        )


def per_example_causal_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over each example's own scored tokens, then over the batch.

    The causal LM loss of transformers averages over all tokens of the batch, so one example's
    weight depends on the others' lengths: the per-example gradients Opacus clips would then not
    be the examples' own. This loss makes each example's term its own.
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].to(logits.device)
    tok = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100, reduction="none"
    ).view(shift_labels.shape)
    mask = (shift_labels != -100).to(tok.dtype)
    per_example = (tok * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    return per_example.mean()


def planned_local_noise(
    target_epsilon: float, delta: float, sample_rate: float, steps_per_round: int, rounds: int, accountant: str
) -> float:
    """Noise multiplier for a client to end the run at ``target_epsilon``, assuming it trains
    every round (the worst case: a client sampled less often ends below the target)."""
    return noise_for_target(target_epsilon, delta, sample_rate, steps_per_round * rounds, accountant)


def sample_rate_for(batch_size: int, num_examples: int) -> float:
    """Poisson sampling rate that gives ``batch_size`` examples per step on average."""
    return min(1.0, batch_size / max(num_examples, 1))
