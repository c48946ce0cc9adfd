"""The docs site and the README: generated reference pages complete, strategy tables in step with
the registry, README links alive and small, and the strict mkdocs build (when mkdocs is installed)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pydantic
import pytest

from fedlora.config import RunConfig
from fedlora.strategies import STRATEGIES, StrategyOptions

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"


@pytest.fixture(scope="module")
def gen():
    """The MkDocs hook that writes the generated parts (docs/hooks/generate.py), as a module."""
    spec = importlib.util.spec_from_file_location("fedlora_docs_generate", DOCS / "hooks" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def table_names(markdown: str, heading: str) -> list[str]:
    """The backticked names in the first column of the first table under ``heading``."""
    section = markdown.split(heading, 1)[1]
    names = []
    started = False
    for line in section.splitlines():
        if line.startswith("|"):
            started = True
            match = re.match(r"\|\s*`([^`]+)`\s*\|", line)
            if match:
                names.append(match.group(1))
        elif started:
            break
    return names


def config_keys_by_hand() -> list[str]:
    """Every dotted key of RunConfig, walked here independently of the generator."""
    keys: list[str] = []

    def is_model(typ: object) -> bool:
        return isinstance(typ, type) and issubclass(typ, pydantic.BaseModel)

    def walk(cls: type, prefix: str) -> None:
        for name, info in cls.model_fields.items():
            typ = info.annotation
            if cls is RunConfig and name == "strategy":
                keys.append("strategy.name")
                keys.extend(f"strategy.{g}" for g in StrategyOptions.model_fields)
            elif is_model(typ):
                walk(typ, f"{prefix}{name}.")
            elif typing.get_origin(typ) is list and is_model(typing.get_args(typ)[0]):
                walk(typing.get_args(typ)[0], f"{prefix}{name}[i].")
            else:
                keys.append(f"{prefix}{name}")

    walk(RunConfig, "")
    return keys


def test_readme_strategy_table_lists_exactly_the_registry():
    names = table_names(README.read_text(encoding="utf-8"), "## Strategies")
    assert sorted(names) == sorted(STRATEGIES), "README.md's strategy table and the registry differ"


def test_docs_side_by_side_table_lists_exactly_the_registry():
    names = table_names((DOCS / "strategies.md").read_text(encoding="utf-8"), "## Side by side")
    assert sorted(names) == sorted(STRATEGIES), "docs/strategies.md's 'Side by side' table and the registry differ"


def test_every_strategy_and_option_is_on_the_generated_strategies_page(gen):
    page = gen.render((DOCS / "strategies.md").read_text(encoding="utf-8"))
    shared = set(StrategyOptions.model_fields)
    for name, cls in STRATEGIES.items():
        assert f"\n### {name}\n" in page, name
        assert f"[`{name}`](#{name})" in page, f"{name} missing from the matrix"
        for option in cls.options_class.model_fields:
            assert f"`strategy.{option}`" in page, f"{name}: option {option}"
    for name in shared:
        assert f"`strategy.{name}`" in page


def test_every_config_key_is_on_the_generated_configuration_page(gen):
    page = gen.render((DOCS / "configuration.md").read_text(encoding="utf-8"))
    keys = config_keys_by_hand()
    assert len(keys) > 60
    missing = [k for k in keys if f"| `{k}` |" not in page]
    assert not missing, f"not in the configuration reference: {missing}"
    # choices come from the schema's own validation, not from a retyped list
    row = next(line for line in page.splitlines() if line.startswith("| `model.quantization` |"))
    assert "none, 4bit, 8bit" in row
    row = next(line for line in page.splitlines() if line.startswith("| `strategy.name` |"))
    assert all(f"`{n}`" in row for n in STRATEGIES)


def test_every_command_line_flag_is_on_the_generated_page(gen):
    page = gen.render((DOCS / "cli.md").read_text(encoding="utf-8"))
    for title, parser in gen._parsers():
        assert f"### `{title}`" in page
        for action in parser._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}`" in page, f"{title} {flag}"


def test_every_benchmark_result_is_on_the_benchmarks_page(gen):
    page = gen.render((DOCS / "benchmarks.md").read_text(encoding="utf-8"))
    for name in gen.result_names():
        assert f"`benchmarks/results/{name}.json`" in page, name
    for png in (ROOT / "benchmarks" / "results").glob("*.png"):
        assert f"{gen.ASSETS}/{png.name}" in page, png.name


def test_every_placeholder_of_every_page_renders(gen):
    for page in DOCS.glob("*.md"):
        out = gen.render(page.read_text(encoding="utf-8"))
        assert "fedlora:" not in re.sub(r"`[^`]*`", "", out), f"{page.name}: a placeholder was left"


def test_readme_is_short_keeps_its_commands_and_links_to_pages_that_exist():
    text = README.read_text(encoding="utf-8")
    assert len(text.encode("utf-8")) < 12 * 1024
    assert 'pip install torch==2.13.0 && pip install -e ".[quickstart]" && fedlora simulate' in text
    assert 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q' in text
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert 'pip install torch==2.13.0 && pip install -e ".[test]"' in ci and "python -m pytest -q" in ci
    links = re.findall(r"\]\(((?:docs/)[^)#]*)", text)
    assert {"docs/quickstart.md", "docs/configuration.md", "docs/strategies.md"} <= set(links)
    for link in links:
        assert (ROOT / link).exists(), f"README links to missing {link}"
    pages = {p.name for p in DOCS.glob("*.md")} - {"index.md"}
    assert pages <= {Path(link).name for link in links}, "every docs page is linked from the README"


def test_mkdocs_build_strict(tmp_path):
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (pip install -e '.[docs]')")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "site" / "configuration" / "index.html").is_file()
    assert (tmp_path / "site" / "assets" / "benchmarks").is_dir()
