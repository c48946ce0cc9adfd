"""Pydantic's validation errors as the one line a user reads: ``config key 'lora.rank' must be >= 1, got 0``.

Every configuration model (the run's sections and each strategy's options) validates through
pydantic; :func:`one_line` turns the first error into a message that names the dotted key, so
that a mistake in a preset, a ``--set`` or a strategy option reads the same wherever it is made.
Cross-key rules raise :func:`fail` with the key they blame (relative to the model that checks).
"""

from __future__ import annotations

import typing
from collections.abc import Sequence
from typing import Any

import annotated_types
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

#: The error type of :func:`fail`: its context holds the key (relative to the error's location)
#: and the message, which :func:`one_line` prints as they are.
OWN_ERROR = "fedlora"

_TYPE_MESSAGES = {
    "float_type": "must be a number",
    "int_type": "must be an integer",
    "string_type": "must be a string",
    "bool_type": "must be true or false",
    "list_type": "must be a list",
    "dict_type": "must be a table",
    "model_type": "must be a table",
    "model_attributes_type": "must be a table",
    "finite_number": "must be a finite number",
}
_RANGE_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def fail(key: str, message: str) -> PydanticCustomError:
    """The error a validator raises for ``key`` (dotted, relative to the model; "" for the field itself)."""
    return PydanticCustomError(OWN_ERROR, "{message}", {"key": key, "message": message})


def check(ok: bool, key: str, message: str) -> None:
    """Raise :func:`fail` unless ``ok`` (the cross-key rules read as a list of these)."""
    if not ok:
        raise fail(key, message)


def dotted(loc: Sequence[str | int]) -> str:
    """``('federation', 'profiles', 0, 'rank')`` as ``federation.profiles[0].rank``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part:  # a cross-key rule's own key may itself be dotted or indexed (``profiles[0].rank``)
            out += f".{part}" if out and not part.startswith("[") else part
    return out


def _bound(value: Any) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def bounds_text(info: FieldInfo) -> str:
    """A field's declared range as messages and the reference say it: ``in [0, 1)``, ``>= 1``, or ""."""
    low = high = None
    for m in info.metadata:
        if isinstance(m, annotated_types.Ge | annotated_types.Gt):
            low = ("[" if isinstance(m, annotated_types.Ge) else "(", m.ge if hasattr(m, "ge") else m.gt)
        elif isinstance(m, annotated_types.Le | annotated_types.Lt):
            high = ("]" if isinstance(m, annotated_types.Le) else ")", m.le if hasattr(m, "le") else m.lt)
    if low and high:
        return f"in {low[0]}{_bound(low[1])}, {_bound(high[1])}{high[0]}"
    if low:
        return f"{'>=' if low[0] == '[' else '>'} {_bound(low[1])}"
    if high:
        return f"{'<=' if high[0] == ']' else '<'} {_bound(high[1])}"
    return ""


def _schema_of(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds (itself, in a list, or optional), else None."""
    for typ in (annotation, *typing.get_args(annotation)):
        if isinstance(typ, type) and issubclass(typ, BaseModel):
            return typ
    return None


def _locate(root: type[BaseModel], loc: Sequence[str | int]) -> tuple[type[BaseModel] | None, FieldInfo | None]:
    """The model that owns the last part of ``loc`` and that part's field (None where unknown)."""
    owner: type[BaseModel] | None = root
    info: FieldInfo | None = None
    names = [p for p in loc if isinstance(p, str)]
    for i, name in enumerate(names):
        info = owner.model_fields.get(name) if owner else None
        if i < len(names) - 1:
            owner = _schema_of(info.annotation) if info else None
    return owner, info


def _shown(value: Any, info: FieldInfo | None) -> str:
    """The refused value as the user wrote it, an integer given for a number shown as that number."""
    if info is not None and isinstance(value, int) and not isinstance(value, bool):
        if float in (info.annotation, *typing.get_args(info.annotation)):
            value = float(value)
    return repr(value)


def one_line(err: ValidationError, root: type[BaseModel], prefix: str = "", strategy: str | None = None) -> str:
    """The first error of ``err`` (validating ``root``) as one line naming ``prefix`` + the dotted key.

    ``strategy`` names the strategy whose options were validated, for an unknown option.
    """
    e = err.errors(include_url=False)[0]
    loc, kind, ctx, value = e["loc"], e["type"], e.get("ctx") or {}, e.get("input")
    key = prefix + dotted(loc)
    if kind == OWN_ERROR:
        return f"config key '{prefix}{dotted([*loc, ctx['key']])}' {ctx['message']}"
    owner, info = _locate(root, loc)
    if kind == "extra_forbidden":
        known = ", ".join(sorted(owner.model_fields)) if owner else ""
        if strategy is not None:
            return f"unknown config key '{key}' for strategy '{strategy}' (options: {known or 'none'})"
        return f"unknown config key '{key}' (known: {known})"
    if kind == "missing":
        return f"config key '{key}' is required"
    if kind == "string_too_short":
        return f"config key '{key}' must not be empty"
    if kind == "literal_error":
        choices = typing.get_args(info.annotation) if info else ()
        said = ", ".join(str(c) for c in choices if c != "") or ctx.get("expected", "")
        empty = " (or empty)" if "" in choices else ""
        return f"config key '{key}' must be one of {said}{empty}, got {value!r}"
    if kind in _RANGE_ERRORS and info is not None:
        return f"config key '{key}' must be {bounds_text(info)}, got {_shown(value, info)}"
    if kind in _TYPE_MESSAGES:
        return f"config key '{key}' {_TYPE_MESSAGES[kind]}, got {_shown(value, info)}"
    return f"config key '{key}' is invalid: {' '.join(e['msg'].split())}, got {value!r}"[:300]
