"""Presets (``*.toml`` in this folder) and the single-machine simulation runtimes."""

from __future__ import annotations

from pathlib import Path

PRESET_DIR = Path(__file__).resolve().parent


def preset_path(name: str) -> Path:
    """A packaged preset by bare name (``quickstart``, ``sst2``), else ``name`` as a path."""
    candidate = PRESET_DIR / f"{name}.toml"
    if "/" not in name and not name.endswith(".toml") and candidate.is_file():
        return candidate
    return Path(name)


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


__all__ = ["PRESET_DIR", "list_presets", "preset_path"]
