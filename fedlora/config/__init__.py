"""Typed run configuration: loaded from a TOML preset, overridden by ``--set key=value``.

The dotted key names (``lora.rank``, ``federation.clients``, ...) are the interface that the
docs, the tests and every runtime share. Each is declared once, as a field of a pydantic model
(:mod:`fedlora.config.schema`, :mod:`fedlora.config.run`) with its type, default, bounds and
help; the reference in the docs and :meth:`RunConfig.model_json_schema` are generated from them.
Validation is strict: an unknown key, a value of the wrong type, a non-finite number or a value
out of range raises :class:`~fedlora.errors.ConfigError` naming the key, before anything is
loaded or written, whether the configuration comes from a preset or is built in code.
"""

from .errors import bounds_text, check, fail
from .evaluation import EvaluationConfig
from .loading import apply_overrides, load_config, parse_override, read_preset
from .model import ConfigModel
from .run import (
    ClientProfile,
    FederationConfig,
    PrivacyConfig,
    RobustnessConfig,
    RunConfig,
    SimulationConfig,
    StrategyConfig,
)
from .schema import (
    ACCOUNTANTS,
    AGGREGATORS,
    DATA_FORMATS,
    DEVICE_PATTERN,
    DTYPES,
    IMAGE_TASKS,
    LR_SCHEDULES,
    MAX_ROUNDS,
    MAX_SEED,
    MAX_SYNTHETIC_EXAMPLES,
    PARTITIONERS,
    PRIVACY_MODES,
    QUANT_TYPES,
    QUANTIZATIONS,
    TASKS,
    TEMPLATES,
    TOWERS,
    TRANSPORT_DTYPES,
    TRANSPORT_QUANTIZERS,
    UPDATE_CLIPS,
    DataConfig,
    LoRAConfig,
    ModelConfig,
    TaskSource,
    has_tasks,
    is_image_task,
    labelled,
)
from .secagg import SECAGG_MODES, SecureAggregationConfig

__all__ = [
    "ACCOUNTANTS",
    "AGGREGATORS",
    "DATA_FORMATS",
    "DEVICE_PATTERN",
    "DTYPES",
    "IMAGE_TASKS",
    "LR_SCHEDULES",
    "MAX_ROUNDS",
    "MAX_SEED",
    "MAX_SYNTHETIC_EXAMPLES",
    "PARTITIONERS",
    "PRIVACY_MODES",
    "QUANTIZATIONS",
    "QUANT_TYPES",
    "SECAGG_MODES",
    "TASKS",
    "TEMPLATES",
    "TOWERS",
    "TRANSPORT_DTYPES",
    "TRANSPORT_QUANTIZERS",
    "UPDATE_CLIPS",
    "ClientProfile",
    "ConfigModel",
    "DataConfig",
    "FederationConfig",
    "LoRAConfig",
    "ModelConfig",
    "PrivacyConfig",
    "RobustnessConfig",
    "RunConfig",
    "SecureAggregationConfig",
    "EvaluationConfig",
    "SimulationConfig",
    "StrategyConfig",
    "TaskSource",
    "apply_overrides",
    "bounds_text",
    "check",
    "fail",
    "has_tasks",
    "is_image_task",
    "labelled",
    "load_config",
    "parse_override",
    "read_preset",
]
