"""DP-SGD on a client (Opacus): Poisson batches, per-example clipping, Gaussian noise.

Every client trains with DP-SGD (Opacus's ``GradSampleModule`` + ``DPOptimizer``, Poisson
sampling by Opacus's ``UniformWithReplacementSampler``): per-example gradients of the trained
tensors only, each clipped to ``max_grad_norm``, Gaussian noise of std
``noise_multiplier * max_grad_norm`` on their sum. :class:`DPSGD` is the context manager the
training loop enters for one client's local round; the accounting is :mod:`fedlora.privacy`.
"""

from __future__ import annotations

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
