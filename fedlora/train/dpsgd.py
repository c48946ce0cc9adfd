"""DP-SGD on a client (Opacus): Poisson batches, per-example clipping, Gaussian noise.

Every client trains with DP-SGD (Opacus's ``GradSampleModule`` + ``DPOptimizer``, Poisson
sampling by Opacus's ``UniformWithReplacementSampler``): per-example gradients of the trained
tensors only, each clipped to ``max_grad_norm``, Gaussian noise of std
``noise_multiplier * max_grad_norm`` on their sum. :class:`DPSGD` is the context manager the
training loop enters for one client's local round; the accounting is :mod:`fedlora.privacy`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from fedlora.errors import ConfigError

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
    physical_batch_size : int
        Examples per forward/backward pass (``privacy.physical_batch_size``): a Poisson batch
        larger than this is split into micro-batches whose clipped gradients are summed before
        the one noise draw of the step; 0 runs every batch in one piece.
    """

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    expected_batch_size: int
    physical_batch_size: int = 0


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


def micro_batches(indices: Sequence[int], size: int, lengths: Sequence[int] | None = None) -> list[list[int]]:
    """One Poisson batch as the micro-batches of at most ``size`` examples it is computed in.

    The step's gradient is the sum of the examples' clipped gradients, which does not depend on
    their order, so the examples are sorted by ``lengths`` (tokens) first: each micro-batch then
    pads to about its own examples' length instead of the longest of the batch. The pieces are
    balanced as Opacus's ``BatchSplittingSampler`` balances them (``numpy.array_split``).

    Parameters
    ----------
    indices : sequence of int
        The batch's rows (may be empty: one empty piece, the noise-only step).
    size : int
        Most examples per piece; 0 (or at least the batch) keeps the batch in one piece, unsorted.
    lengths : sequence of int, optional
        Tokens per row of the whole dataset, indexed by row.
    """
    import numpy as np

    order = [int(i) for i in indices]
    if size <= 0 or len(order) <= size:
        return [order]
    if lengths is not None:
        order.sort(key=lambda i: lengths[i])
    return [piece.tolist() for piece in np.array_split(np.asarray(order), math.ceil(len(order) / size))]


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
        #: Opacus's RDP accountant, stepped by the optimizer's own hook at every noise draw: what
        #: this round actually ran, one entry per logical (Poisson) batch, never per micro-batch.
        self.accountant = None

    def __enter__(self) -> DPSGD:
        from opacus.accountants import RDPAccountant
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
        self.accountant = RDPAccountant()
        self.optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=self.settings.sample_rate))
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

    @property
    def noised_steps(self) -> int:
        """Noise draws so far (the optimizer hook's accountant history), one per logical batch."""
        return sum(int(n) for _, _, n in (self.accountant.history if self.accountant is not None else []))

    def accumulate(self) -> None:
        """End a micro-batch that is not the last of its Poisson batch: clip its per-example
        gradients into the step's running sum and free them, without noise or a step (Opacus's
        virtual step, as its ``BatchMemoryManager`` signals it)."""
        self.optimizer.signal_skip_step(do_skip=True)
        self.optimizer.pre_step()
        self.optimizer.zero_grad(set_to_none=True)  # keeps the clipped sum (the step was skipped)

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
