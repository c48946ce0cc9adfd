"""The base of every configuration model: strict, closed, and failing with one line naming the key."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.fields import FieldInfo

from fedlora.errors import ConfigError

from .errors import one_line


class ConfigModel(BaseModel):
    """A section of the configuration (or a strategy's options) as a pydantic model.

    Strict as TOML is: no string is read as a number, no number as a boolean (an integer is
    taken where a number is expected); an unknown key, ``inf`` or ``nan`` is refused. However a
    model is made (:meth:`parse` from a table, its constructor, :meth:`replace`, an assignment), a
    mistake raises :class:`~fedlora.errors.ConfigError` naming ``KEY_PREFIX`` + the dotted key.
    """

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        allow_inf_nan=False,  # inf trains nothing and nan compares false with every bound
        validate_assignment=True,
    )
    #: What the keys of this model are called in messages when it is made on its own
    #: (``model.`` for :class:`~fedlora.config.ModelConfig`); a model nested in another is
    #: named by its path from the one validated.
    KEY_PREFIX: ClassVar[str] = ""

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise ConfigError(one_line(err, type(self), self.KEY_PREFIX)) from None

    # Marked as pydantic's own so that validating a parent does not call it for nested models
    # (their errors then keep the parent's path; the parent's own call converts them).
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as err:
            raise ConfigError(one_line(err, type(self), self.KEY_PREFIX)) from None

    @classmethod
    def parse(cls, raw: Mapping[str, Any], prefix: str | None = None, strategy: str | None = None) -> Self:
        """Build from a (parsed TOML) table; ConfigError naming ``prefix`` + the key.

        ``prefix`` defaults to :attr:`KEY_PREFIX`; ``strategy`` names the strategy whose options
        these are, for the message about an unknown one.
        """
        try:
            return cls.model_validate(raw)
        except ValidationError as err:
            raise ConfigError(one_line(err, cls, cls.KEY_PREFIX if prefix is None else prefix, strategy)) from None

    def replace(self, **changes: Any) -> Self:
        """A validated copy with ``changes`` (as ``dataclasses.replace``, which models do not take)."""
        return type(self)(**{**dict(self), **changes})


#: What a field's ``json_schema_extra`` says of a key that ``--resume`` may change: how long and
#: where a run goes on, not what it computes (:func:`resumable_keys`).
RESUMABLE = {"resume": "may change"}


def resumable_keys(model: type[BaseModel], prefix: str = "") -> tuple[str, ...]:
    """The dotted keys of ``model`` (nested sections included) whose field is marked
    :data:`RESUMABLE`, in declaration order: the one list of them, read from the schema."""
    keys: list[str] = []
    for name, info in model.model_fields.items():
        if _marked(info):
            keys.append(prefix + name)
        elif isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            keys += resumable_keys(info.annotation, f"{prefix}{name}.")
    return tuple(keys)


def _marked(info: FieldInfo) -> bool:
    extra = info.json_schema_extra
    return isinstance(extra, dict) and extra.get("resume") == RESUMABLE["resume"]
