"""The client side of ``[privacy] mode = "local"``: this node's privacy ledger and DP-SGD plan.

The ledger (:class:`fedlora.privacy.accounting.PrivacyLedger`) lives in Flower's ``Context.state``, which
persists across rounds in every runtime and is never sent. A device (``fedlora-client``) also
keeps it in a file beside its data, ``<data>.fedlora-privacy.json`` (one entry per run name),
so a restarted client resumes its spending instead of starting from zero. Each round, before any training,
the node plans each adapter's DP-SGD (noise multiplier, Poisson sampling rate) and checks that
the steps would keep its epsilon within ``privacy.epsilon_budget``; if not, it trains nothing
and says so. After training it records the steps and reports its epsilon so far.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ConfigRecord, RecordDict

from fedlora.config import RunConfig
from fedlora.files import atomic_write_bytes
from fedlora.privacy.accounting import PrivacyLedger, planned_local_noise, sample_rate_for
from fedlora.train.dpsgd import DPSettings
from fedlora.wire import protocol as P

_LEDGER = "ledger"
_NOISE = "noise"


@dataclass
class NodePrivacy:
    """This node's ledger plus the noise multipliers it fixed for the run, per data part."""

    run: RunConfig
    ledger: PrivacyLedger
    noise: dict[str, float]

    @classmethod
    def load(cls, run: RunConfig, state: RecordDict, ledger_file: Path | None = None) -> NodePrivacy:
        """The node's ledger: from ``Context.state``, else from ``ledger_file`` (a device's), else new."""
        if P.PRIVACY_STATE in state.config_records:
            raw = state[P.PRIVACY_STATE]
            return cls(run, PrivacyLedger.from_state(json.loads(str(raw[_LEDGER]))), json.loads(str(raw[_NOISE])))
        if ledger_file is not None and ledger_file.exists():
            entry = json.loads(ledger_file.read_text(encoding="utf-8")).get(run.name)
            if entry:
                return cls(run, PrivacyLedger.from_state(entry[_LEDGER]), dict(entry[_NOISE]))
        return cls(run, PrivacyLedger(), {})

    def save(self, state: RecordDict, ledger_file: Path | None = None) -> None:
        state[P.PRIVACY_STATE] = ConfigRecord(
            {_LEDGER: json.dumps(self.ledger.state_dict()), _NOISE: json.dumps(self.noise)}
        )
        if ledger_file is not None:
            entries = json.loads(ledger_file.read_text(encoding="utf-8")) if ledger_file.exists() else {}
            entries[self.run.name] = {_LEDGER: self.ledger.state_dict(), _NOISE: self.noise}
            atomic_write_bytes(ledger_file, json.dumps(entries, indent=1, sort_keys=True).encode(), private=True)

    def plan(self, part: str, num_examples: int, batch_size: int, steps: int) -> DPSettings:
        """DP-SGD settings for ``steps`` steps on ``part`` (``num_examples`` rows); ValueError
        when ``privacy.delta`` is not below 1/examples (no meaningful sample-level guarantee)."""
        p = self.run.privacy
        if p.delta >= 1.0 / max(num_examples, 1):
            raise ValueError(
                f"privacy.delta = {p.delta:g} must be < 1/examples = {1 / max(num_examples, 1):.3g} "
                f"(this node has {num_examples} training examples{f' for task {part!r}' if part else ''})"
            )
        q = sample_rate_for(batch_size, num_examples)
        if part not in self.noise:
            if p.noise_multiplier is not None:
                self.noise[part] = float(p.noise_multiplier)
            else:
                self.noise[part] = planned_local_noise(
                    float(p.target_epsilon), p.delta, q, steps, self.run.rounds, p.accountant
                )
        return DPSettings(
            noise_multiplier=self.noise[part],
            max_grad_norm=p.max_grad_norm,
            sample_rate=q,
            expected_batch_size=max(1, round(q * num_examples)),
            physical_batch_size=p.physical_batch_size,
        )

    def epsilon(self) -> float:
        return self.ledger.epsilon(self.run.privacy.delta, self.run.privacy.accountant)

    def would_exceed(self, plans: dict[str, tuple[DPSettings, int]]) -> float | None:
        """The epsilon this round's ``plans`` ({part: (settings, steps)}) would reach, when it
        is over the budget; None when the round fits."""
        p = self.run.privacy
        if math.isinf(p.budget):
            return None
        trial = PrivacyLedger.from_state(self.ledger.state_dict())
        for part, (dp, steps) in plans.items():
            trial.step(dp.noise_multiplier, dp.sample_rate, steps, part)
        reached = trial.epsilon(p.delta, p.accountant)
        # The planned noise lands within Opacus's search tolerance under the target: a client
        # on plan must not be stopped by a rounding difference.
        return reached if reached > p.budget * (1 + 1e-9) else None

    def record(self, part: str, dp: DPSettings, steps: int) -> None:
        self.ledger.step(dp.noise_multiplier, dp.sample_rate, steps, part)


def _beside_data(node_config: dict, suffix: str) -> Path | None:
    """``<data file><suffix>`` beside a device's ``--data`` file; None in simulation (no data path)."""
    if P.NODE_DATA_PATH not in node_config:
        return None
    data = Path(str(node_config[P.NODE_DATA_PATH]))
    return data.with_name(data.name + suffix)


def state_file(node_config: dict) -> Path | None:
    """Where a device keeps what it trains for itself across restarts (FedSA's private factors),
    beside its data like its privacy ledger; None in simulation (checkpoints hold node state)."""
    return _beside_data(node_config, ".fedlora-state.safetensors")


def ledger_file(node_config: dict) -> Path | None:
    """Where a device keeps its ledger across restarts (beside its data); None in simulation."""
    return _beside_data(node_config, ".fedlora-privacy.json")
