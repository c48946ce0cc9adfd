"""A run's configuration from a TOML preset and ``--set key=value`` overrides."""

from __future__ import annotations

import datetime
import json
import re
import tomllib
from pathlib import Path
from typing import Any

from fedlora.errors import ConfigError

from .run import RunConfig


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse one ``--set key=value``; the value is read as TOML, else taken as a plain string."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
        raise ConfigError(f"--set has an invalid key {key!r}")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError as err:
        # A bare word is a string (--set model.name=gpt2); something that starts like a TOML
        # array, table or quoted string but does not parse is a mistake, not a string.
        if raw and raw[0] in "[{\"'":
            raise ConfigError(f"--set {key}: {raw!r} is not a valid TOML value ({err})") from None
        value = raw
    return key.split("."), _plain(key, value)


def _plain(key: str, value: Any) -> Any:
    """``value`` if it holds only what a config can (strings, numbers, booleans, lists, tables);
    a ConfigError naming ``key`` for a TOML date or time, which no config key takes."""
    if isinstance(value, dict):
        return {k: _plain(f"{key}.{k}", v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(key, v) for v in value]
    if isinstance(value, (datetime.date, datetime.time)):
        raise ConfigError(f"config key '{key}' must not be a TOML date or time, got {value.isoformat()}")
    return value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of the nested preset dict with ``key=value`` overrides applied."""
    out = json.loads(json.dumps({k: _plain(k, v) for k, v in raw.items()}))
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {'.'.join(parts)}: '{part}' is not a table")
            node = nxt
        node[parts[-1]] = value
    return out


def read_preset(path: str | Path) -> dict[str, Any]:
    """Read a TOML preset into a nested dict (errors name the file)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"preset not found: {p}")
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{p}: invalid TOML: {err}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not a UTF-8 text file") from None
    if not raw:  # an empty file would silently run the whole default federation
        raise ConfigError(f"{p}: the preset is empty; start from one of `fedlora presets`")
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Load a preset file, apply overrides, validate."""
    raw = apply_overrides(read_preset(path), overrides or [])
    return RunConfig.from_dict(raw)
