"""The start of a run: the strategy's round-0 adapter, or ``--resume`` from the newest good
checkpoint (global state, strategy and server-optimizer state, privacy ledgers, central DP, the
in-process nodes' own state, the run uid devices saved their state under), refusing a resume
that would change the adapter's shape."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from fedlora.config import RunConfig
from fedlora.errors import FedLoraError

from .evaluation import evaluate_state

if TYPE_CHECKING:
    from .rounds import RoundLoop, RunResult


def start(loop: RoundLoop, resume: bool) -> tuple[dict[str, torch.Tensor], RunResult, int]:
    """(global state, result so far, first round to run) of ``loop``'s run: the strategy's round-0
    adapter (evaluated, config written), or the latest checkpoint when resuming."""
    from .rounds import RunResult, fmt_metrics

    cfg, host = loop.cfg, loop.prepared.host
    with host.lock:
        name = host.ensure(loop.prepared.spec, seed=cfg.seed)
        initial_state = host.initial_state(name, cfg.seed)
    state = loop.strategy.initialize(initial_state, host)
    result = RunResult(run_dir=str(loop.run_dir.path))
    if resume and loop.run_dir.latest_checkpoint_round() is None:
        loop.progress.line(f"--resume: no round of {cfg.name} was completed before it stopped; starting at round 1")
        loop.run_dir.truncate_metrics(0)
        resume = False
    if resume:
        return _resume(loop, state, result)
    loop.run_dir.write_config(cfg)
    result.initial = evaluate_state(loop.prepared, state, loop.strategy)
    loop.progress.line(f"round 0/{cfg.rounds}  initial global adapter  {fmt_metrics(result.initial)}")
    return state, result, 1


def _resume(
    loop: RoundLoop, fresh: dict[str, torch.Tensor], result: RunResult
) -> tuple[dict[str, torch.Tensor], RunResult, int]:
    """Everything the newest good checkpoint holds, put back where the run keeps it."""
    cfg = loop.cfg
    ckpt = loop.run_dir.load_round(report=loop.progress.line)
    last, extra = ckpt.round, ckpt.extra
    if cfg.rounds < last:
        raise FedLoraError(f"--resume: rounds = {cfg.rounds} but the run has already done {last} rounds")
    check_adapter_shape(cfg, extra.get("adapter"), ckpt.state, fresh)
    chain = loop.run_dir.node_state_chain(last) if ckpt.nodes is not None else []
    loop.node_book.restore(chain, loop.strategy.personalized)
    loop.run_uid = str(extra.get("run_uid", loop.run_uid))  # a device's saved state is this run's
    loop.run_dir.write_config(cfg)  # `rounds` may have been extended: config.toml says what runs
    loop.strategy.load_state_dict(extra.get("strategy", {}))
    loop.strategy.load_tensor_state(ckpt.server or {})
    loop.privacy.load_state_dict(extra.get("privacy", {}))
    if loop.central is not None:
        loop.central.load_state_dict(extra.get("central_dp", {}))
    loop.run_dir.truncate_metrics(last)
    result.rounds = loop.run_dir.read_metrics()
    result.initial = extra.get("initial", {})
    loop.progress.line(f"resuming {cfg.name} after round {last}/{cfg.rounds}")
    return ckpt.state, result, last + 1


def adapter_shape(cfg: RunConfig) -> dict[str, Any]:
    """What fixes the global adapter's shape, kept in each checkpoint so a resume that would
    change it is refused even when config.toml was edited by hand."""
    return {
        "strategy.name": cfg.strategy.name,
        "model.name": cfg.model.name,
        "lora.rank": cfg.lora.rank,
        "lora.target_modules": list(cfg.lora.target_modules),
    }


def check_adapter_shape(
    cfg: RunConfig, saved: dict[str, Any] | None, loaded: dict[str, torch.Tensor], fresh: dict[str, torch.Tensor]
) -> None:
    """Refuse, in one line naming the key, a resume whose configuration changes the adapter."""
    for key, value in adapter_shape(cfg).items():
        if saved is not None and key in saved and saved[key] != value:
            raise FedLoraError(
                f"--resume: {key} = {value!r} but the checkpoint was made with {saved[key]!r}; "
                "the adapter's shape cannot change in a resumed run (start a new run with --out DIR)"
            )
    # The fresh adapter's tensors must all be there, shaped alike (strategies may keep more,
    # such as FedEx's base deltas).
    wrong = sorted(k for k in fresh if k not in loaded or loaded[k].shape != fresh[k].shape)
    if wrong:
        raise FedLoraError(
            f"--resume: the checkpoint's adapter does not match this configuration (tensor {wrong[0]}); "
            "check lora.target_modules, lora.rank and strategy.name against the run's config.toml"
        )
