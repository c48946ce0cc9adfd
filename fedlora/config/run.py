"""The run configuration's schema, continued: the federation, privacy, robustness, simulation and
strategy tables, and :class:`RunConfig`, which holds every table and the rules between them."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from fedlora.errors import ConfigError

from .errors import check
from .evaluation import EvaluationConfig
from .model import RESUMABLE, ConfigModel
from .schema import (
    MAX_ROUNDS,
    MAX_SEED,
    Accountant,
    Aggregator,
    DataConfig,
    Devices,
    LoRAConfig,
    LRSchedule,
    ModelConfig,
    PrivacyMode,
    ProfileDevice,
    Quantization,
    TransportDtype,
    TransportQuantizer,
    UpdateClip,
    _matching,
    has_tasks,
    is_image_task,
)
from .secagg import SecureAggregationConfig, secure_aggregation_rules


class ClientProfile(ConfigModel):
    """A kind of device in the federation (``[[federation.profiles]]``)."""

    KEY_PREFIX = "federation.profiles[i]."
    name: str = Field("device", description="Label for reports (``phone``, ``laptop``, ``gpu-server``).")
    rank: int = Field(
        8, ge=1, description="LoRA rank this kind of device trains; at most ``lora.rank`` (the global adapter's)."
    )
    quantization: Literal["", Quantization] = Field(
        "",
        description="The base-model precision this kind of device holds: ``none``, ``8bit`` or ``4bit``; empty "
        "takes ``model.quantization``. One federation may mix them: their adapters aggregate together, and the "
        "server evaluates and exports on ``model.quantization``'s base (keep it ``none`` for an adapter that "
        "loads on the full-precision model).",
    )
    device: ProfileDevice = Field(
        "",
        description="Where this kind of device trains (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``); empty "
        "takes ``model.device``. In simulation, ``simulation.devices`` decides instead.",
    )
    memory_gb: float = Field(
        0.0,
        ge=0,
        description="The memory this kind of device has (0: not declared). When declared, the run is refused "
        "before it starts if training its rank at its precision cannot fit (:mod:`fedlora.model.capacity`).",
    )
    model: str = Field(
        "",
        max_length=500,
        description="The base model this kind of device trains on: a hub name or a local folder; empty takes "
        "``model.name``. Only a strategy for clients of different bases (``pfedlora``) takes another base than "
        "the run's; the simulation loads each distinct base once.",
    )


class FederationConfig(ConfigModel):
    """How the federation trains."""

    KEY_PREFIX = "federation."
    clients: int = Field(8, ge=1, description="Number of (virtual) clients, one data partition each.")
    fraction: float = Field(1.0, gt=0, le=1, description="Fraction of clients sampled per round (at least one).")
    local_steps: int = Field(
        10, ge=1, description="Optimizer steps per client per round (ignored when ``local_epochs`` > 0)."
    )
    local_epochs: float = Field(
        0.0, ge=0, description="Passes over the client's data per round; 0 means use ``local_steps``."
    )
    batch_size: int = Field(16, ge=1, description="Examples per local step.")
    lr: float = Field(
        1e-3, gt=0, description='Client learning rate (AdamW); with ``lr_schedule = "cosine"``, that of round 1.'
    )
    lr_schedule: LRSchedule = Field(
        "constant",
        description="``constant`` or ``cosine``: round ``r`` of ``R`` trains at ``lr_min + (lr - lr_min) * "
        "(1 + cos(pi (r - 1) / (R - 1))) / 2`` (:func:`fedlora.train.local.round_lr`). ``R`` is the run's current "
        "``rounds``: extending a run at ``--resume`` stretches the rest of the curve.",
    )
    lr_min: float = Field(0.0, ge=0, description="The cosine schedule's last-round rate, in ``[0, lr]``.")
    proximal_mu: float = Field(
        0.0,
        ge=0,
        description="FedProx: each client adds ``(mu / 2) * ||w - w_received||^2`` over the tensors it trains to "
        "its local loss (0: plain local training).",
    )
    transport_dtype: TransportDtype = Field(
        "float32",
        description="Float type on the wire, both ways: ``float32``, ``float16`` or ``bfloat16`` (with "
        "``transport_quantize``, the type of the per-block scales). Aggregation is float32.",
    )
    transport_quantize: TransportQuantizer = Field(
        "none",
        description="``none``, ``int8`` or ``nf4``: factors travel as per-block absmax codes, both ways "
        "(:mod:`fedlora.wire.transport`); a node then sends what it trained minus what it received, and the server "
        "adds that to what it sent, so downlink rounding never reaches the global adapter. Base-delta factors "
        "(flora, fedex) always travel exactly.",
    )
    error_feedback: bool = Field(
        False,
        description="With ``transport_quantize``: a node adds last upload's rounding residual to the next one "
        "(kept on the node), so the rounding errors do not accumulate over rounds.",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute activations in the backward pass instead of keeping them (long sequences, small "
        "GPUs): less memory, about a third more compute.",
    )
    round_timeout: float = Field(
        3600.0, gt=0, description="Seconds the server waits for replies each round.", json_schema_extra=RESUMABLE
    )
    max_reply_mb: float = Field(
        512.0, gt=0, description="Replies larger than this are dropped.", json_schema_extra=RESUMABLE
    )
    profiles: list[ClientProfile] = Field(
        default_factory=list,
        description="Device profiles assigned round-robin by partition id in simulation (client ``i`` gets "
        "``profiles[i % len(profiles)]``); empty means every client trains ``lora.rank``.",
    )

    @model_validator(mode="after")
    def _rules(self) -> FederationConfig:
        check(
            self.lr_min <= self.lr,
            "lr_min",
            f"must be in [0, federation.lr = {self.lr}], got {self.lr_min}",
        )
        check(
            not self.error_feedback or self.transport_quantize != "none",
            "error_feedback",
            "needs federation.transport_quantize = 'int8' or 'nf4' (nothing is rounded without it)",
        )
        return self


class PrivacyConfig(ConfigModel):
    """Differential privacy (``[privacy]``); see :mod:`fedlora.privacy`."""

    KEY_PREFIX = "privacy."
    mode: PrivacyMode = Field(
        "off",
        description="``off``; ``local`` (DP-SGD on every client with Opacus: sample-level DP for each client); "
        "``central`` (the server clips each client's update and noises their mean: user-level DP for the "
        "federation).",
    )
    noise_multiplier: float | None = Field(
        None, gt=0, description="Noise std over the clipping bound. Set this or ``target_epsilon``."
    )
    target_epsilon: float | None = Field(
        None,
        gt=0,
        description="The epsilon to end the run at: the noise multiplier is computed for it (local: for each "
        "client's steps over all rounds; central: over the rounds at the sampling rate).",
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="Target delta; below 1/examples (local) or 1/clients (central).")
    max_grad_norm: float = Field(1.0, gt=0, description="``local``: per-example gradient clipping bound.")
    physical_batch_size: int = Field(
        0,
        ge=0,
        description="``local``: examples per forward/backward pass. A DP-SGD step's Poisson batch (expected size "
        "``federation.batch_size``) larger than this is computed in micro-batches whose clipped gradients are "
        "summed before the step's one noise draw (one accountant step), so a large private batch fits a small "
        "device; 0 computes each batch in one piece.",
    )
    clip_norm: float = Field(
        1.0, gt=0, description="``central``: per-client update clipping bound (L2 over all its tensors)."
    )
    accountant: Accountant = Field(
        "rdp", description="``rdp`` or ``prv`` (Opacus accountants; ``central`` uses RDP over rounds)."
    )
    noise: Literal["server", "distributed"] = Field(
        "server",
        description="``central`` under secure aggregation: who adds the Gaussian noise. ``server`` adds it to "
        "the unmasked sum (trust the server to add it); ``distributed``: each client adds its share to its "
        "masked summand, calibrated so that any set of at least ``secure_aggregation.reconstruction_threshold`` "
        "survivors carries the full noise, and the server never sees a less noisy sum (trust that that many "
        "clients are honest). See docs/secure-aggregation.md.",
    )
    epsilon_budget: float | None = Field(
        None,
        gt=0,
        description="``local``: a client whose epsilon would exceed this stops training (default: "
        "``target_epsilon`` when set, else no cap).",
    )

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @property
    def budget(self) -> float:
        """The epsilon a client may not exceed (inf: no cap)."""
        if self.epsilon_budget is not None:
            return self.epsilon_budget
        return self.target_epsilon if self.target_epsilon is not None else math.inf

    @model_validator(mode="after")
    def _rules(self) -> PrivacyConfig:
        if not self.enabled:
            return self
        check(
            (self.noise_multiplier is None) != (self.target_epsilon is None),
            "noise_multiplier",
            f"or privacy.target_epsilon: set exactly one with privacy.mode = {self.mode!r}",
        )
        check(
            self.mode != "central" or self.epsilon_budget is None,
            "epsilon_budget",
            "applies to mode = 'local' (a client's own budget); for central DP set privacy.target_epsilon",
        )
        check(
            self.mode != "central" or self.physical_batch_size == 0,
            "physical_batch_size",
            "applies to mode = 'local' (DP-SGD's micro-batches); central DP clips whole client updates",
        )
        return self


class RobustnessConfig(ConfigModel):
    """Defences against hostile or broken clients (``[robustness]``)."""

    KEY_PREFIX = "robustness."
    update_clip: UpdateClip = Field(
        "none",
        description="``none``, ``median_multiple`` (clip each client's update norm to ``clip_multiple`` x the "
        "round's median update norm) or ``fixed`` (to ``clip_norm``).",
    )
    clip_multiple: float = Field(3.0, gt=0, description="k of ``median_multiple``.")
    clip_norm: float = Field(1.0, gt=0, description="The bound of ``fixed``.")
    aggregator: Aggregator = Field(
        "mean",
        description="``mean`` (the strategy's own weighted average), ``trimmed_mean`` or ``median`` "
        "(coordinate-wise, where the strategy's math allows it).",
    )
    trim_fraction: float = Field(
        0.1, ge=0, lt=0.5, description="Fraction of the clients cut at each end by ``trimmed_mean``."
    )
    max_examples: int = Field(
        1_000_000,
        ge=1,
        description="Cap on the example count one reply may claim (a count above what its node reported in its "
        "capabilities is capped there too); capped counts are logged.",
    )


class SimulationConfig(ConfigModel):
    """The single-machine simulation (``[simulation]``)."""

    KEY_PREFIX = "simulation."
    devices: Devices = Field(
        default_factory=list,
        json_schema_extra=RESUMABLE,
        description="The devices the virtual clients of a round train on concurrently, one base-model copy per "
        'device (``["cuda:0", "cuda:1"]``). Empty: every visible GPU when ``model.device`` is ``auto``, else '
        "``model.device`` alone. Results do not depend on it (fixed seed).",
    )


class StrategyConfig(ConfigModel):
    """Aggregation strategy: ``name`` plus strategy-specific options (checked by the strategy)."""

    KEY_PREFIX = "strategy."
    name: str = Field("fedavg", description="The aggregation strategy (registered in ``fedlora.strategies``).")
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="The strategy's options: the other keys of ``[strategy]``, validated by the strategy's "
        "options model (:class:`fedlora.strategies.StrategyOptions`).",
    )


RunName = Annotated[str, _matching(r"[A-Za-z0-9._-]+", "letters, digits, '.', '_' or '-'")]


class RunConfig(ConfigModel):
    """One federated run. Sections mirror the TOML tables of a preset."""

    name: RunName = Field("run", description="The run's name: its directory is ``runs/<name>/`` (or ``--out``).")
    rounds: int = Field(3, ge=1, le=MAX_ROUNDS, description="Federated rounds to train.", json_schema_extra=RESUMABLE)
    seed: int = Field(
        0, ge=0, le=MAX_SEED, description="Seed of everything random (numpy's seed range): a run is repeatable."
    )
    model: ModelConfig = Field(default_factory=ModelConfig, description="The frozen base model.")
    lora: LoRAConfig = Field(default_factory=LoRAConfig, description="The low-rank adapter.")
    data: DataConfig = Field(default_factory=DataConfig, description="The examples and their partition.")
    federation: FederationConfig = Field(default_factory=FederationConfig, description="How the federation trains.")
    strategy: StrategyConfig = Field(default_factory=StrategyConfig, description="The aggregation strategy.")
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig, description="Differential privacy.")
    simulation: SimulationConfig = Field(default_factory=SimulationConfig, description="The simulation.")
    robustness: RobustnessConfig = Field(default_factory=RobustnessConfig, description="Defences.")
    secure_aggregation: SecureAggregationConfig = Field(
        default_factory=SecureAggregationConfig, description="Secure aggregation (SecAgg+)."
    )
    evaluation: EvaluationConfig = Field(
        default_factory=EvaluationConfig, description="Per-client evaluation and export (personalized strategies)."
    )

    @model_validator(mode="after")
    def _rules(self) -> RunConfig:
        for i, profile in enumerate(self.federation.profiles):
            check(
                profile.rank <= self.lora.rank,
                f"federation.profiles[{i}].rank",
                f"= {profile.rank} exceeds lora.rank = {self.lora.rank}, the global adapter's rank",
            )
        fmt = self.data.format
        check(
            fmt == "text" or self.model.task == "causal_lm",
            "data.format",
            f"= {fmt!r} needs model.task = 'causal_lm' (got {self.model.task!r}); classification reads text",
        )
        check(
            not (is_image_task(self.model.task) and has_tasks(self.data)),
            "data.tasks",
            f"(and data.task_column) cannot be used with model.task = {self.model.task!r}: image runs are single-task",
        )
        check(
            not (self.model.task == "clip" and self.privacy.mode == "local" and "text" in self.lora.towers),
            "lora.towers",
            f"= {self.lora.towers} must be ['vision'] with privacy.mode = 'local' and model.task = 'clip': every "
            "image of a batch shares the class prompts, so DP-SGD cannot clip the text tower's gradient per example",
        )
        p, clients = self.privacy, self.federation.clients
        check(
            p.mode != "central" or p.delta < 1 / clients,
            "privacy.delta",
            f"= {p.delta:g} must be < 1/clients = {1 / clients:.3g} for user-level DP (federation.clients = {clients})",
        )
        secure_aggregation_rules(self)
        return self

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict, with strategy options flattened into ``[strategy]`` as in a preset."""
        out = self.model_dump()
        options = out["strategy"].pop("options")
        out["strategy"].update(options)
        # An unset optional key (``privacy.target_epsilon``) is left out: TOML has no null.
        out["privacy"] = {k: v for k, v in out["privacy"].items() if v is not None}
        out["secure_aggregation"] = {k: v for k, v in out["secure_aggregation"].items() if v is not None}
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> RunConfig:
        """Build and validate from a nested dict (a parsed preset, ``[strategy]`` options flat in it)."""
        if not isinstance(raw, Mapping):
            raise ConfigError(f"a run configuration must be a table, got {raw!r}")
        raw = dict(raw)
        if "strategy" in raw:
            table = raw["strategy"]
            if not isinstance(table, Mapping):
                raise ConfigError(f"config key 'strategy' must be a table, got {table!r}")
            options = {k: v for k, v in table.items() if k != "name"}
            raw["strategy"] = {**({"name": table["name"]} if "name" in table else {}), "options": options}
        return cls.parse(raw)
