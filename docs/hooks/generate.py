"""MkDocs hook: the reference parts of the docs, generated from the code at build time.

A page asks for a generated part with a placeholder comment (a block on a line of its own,
or inline in a sentence)::

    <!-- fedlora:config-reference -->
    <!-- fedlora:benchmark overhead -->

and :func:`on_page_markdown` replaces it with the markdown that :data:`GENERATORS` gives for
that name (an unknown name, or a generator that fails, stops the build). Nothing a generator
writes is typed by hand: keys, types, defaults and help texts come from the pydantic models
of the configuration (``fedlora.config``: each field's annotation, default and
``Field(description=...)``), allowed values from their ``Literal`` choices and ``Field`` bounds
or, for a rule written as a validator, from the configuration's own validation messages;
strategies and their options from the registry (``fedlora.strategies``); command-line options
from the argparse parsers of ``fedlora.cli``; figures from ``benchmarks/results/*.json``.
:func:`on_files` publishes the benchmark plots (``benchmarks/results/*.png``) under
``assets/benchmarks/``.

The functions are plain (markdown in, markdown out) so that ``tests/test_docs.py`` calls them
directly.
"""

from __future__ import annotations

import argparse
import ast
import functools
import inspect
import json
import math
import operator
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
#: Where the benchmark plots appear in the site (relative to the docs folder).
ASSETS = "assets/benchmarks"
PLACEHOLDER = re.compile(r"<!--\s*fedlora:([a-z0-9-]+)((?:\s+[^\s>-][^\s>]*)*)\s*-->")
REQUIRED = object()

# -- text helpers -----------------------------------------------------------------------------------

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj|const):`(~?)([^`]+)`")
_CODE = re.compile(r"(`+)(.+?)\1")


def plain(text: str) -> str:
    """Docstring text as markdown: Sphinx roles become code spans (``~`` keeps the last name)."""
    return _ROLE.sub(lambda m: f"`{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}`", text)


def cell(text: Any) -> str:
    """``text`` on one line, fit for a table cell: pipes outside code spans escaped."""
    text = " ".join(str(text).split())
    out, last = [], 0
    for m in _CODE.finditer(text):
        out.append(text[last : m.start()].replace("|", "\\|"))
        out.append(m.group(0))
        last = m.end()
    out.append(text[last:].replace("|", "\\|"))
    return "".join(out)


def table(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> str:
    """A markdown table."""
    header = list(header)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def code(value: Any) -> str:
    return f"`{value}`"


def toml_value(value: Any) -> str:
    """A default as it is written in a preset (``None``: unset; TOML has no null)."""
    if value is REQUIRED:
        return "required"
    if value is None:
        return "unset"
    if hasattr(value, "model_dump"):  # a pydantic model
        value = value.model_dump()
    return code(json.dumps(value))


def number(value: Any, digits: int = 3) -> str:
    """A figure for a table: ints with thousands separators, floats to ``digits`` significant digits."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:,.{digits}g}" if abs(value) >= 1 else f"{value:.{digits}g}"
    if value is None:
        return "—"
    return str(value)


def docstring_sections(obj: Any) -> tuple[str, dict[str, str]]:
    """(summary, {attribute or parameter name: description}) of a numpy-style docstring.

    The summary is the text before the first section; "Attributes" and "Parameters" entries such
    as ``a, b : str`` describe every name they list.
    """
    doc = inspect.cleandoc(obj.__dict__.get("__doc__") or "") if isinstance(obj, type) else inspect.getdoc(obj) or ""
    lines = doc.splitlines()
    sections: list[tuple[str, list[str]]] = [("", [])]
    i = 0
    while i < len(lines):
        if i + 1 < len(lines) and lines[i].strip() and re.fullmatch(r"-{3,}", lines[i + 1].strip()):
            sections.append((lines[i].strip(), []))
            i += 2
            continue
        sections[-1][1].append(lines[i])
        i += 1
    summary = "\n".join(sections[0][1]).strip()
    entries: dict[str, str] = {}
    for title, body in sections[1:]:
        if title not in ("Attributes", "Parameters"):
            continue
        names: list[str] = []
        for line in body:
            if line and not line[0].isspace():
                names = [n.strip() for n in line.split(":", 1)[0].split(",") if n.strip()]
                for name in names:
                    entries.setdefault(name, "")
            elif line.strip():
                for name in names:
                    entries[name] = (entries[name] + " " + line.strip()).strip()
    return summary, entries


# -- schema introspection (the pydantic models of fedlora.config) -----------------------------------


class Key(typing.NamedTuple):
    """One key of the schema."""

    name: str
    annotation: Any
    default: Any
    help: str
    #: The pydantic ``FieldInfo`` (its bounds), when the key comes from a model.
    info: Any = None


def is_schema(typ: Any) -> bool:
    return isinstance(typ, type) and hasattr(typ, "model_fields")


def schema_keys(cls: type) -> list[Key]:
    """Every field of a model with its annotation, default and help text (``Field(description=...)``)."""
    keys = []
    for name, info in cls.model_fields.items():
        default = REQUIRED if info.is_required() else info.get_default(call_default_factory=True)
        keys.append(Key(name, info.annotation, default, info.description or "", info))
    return keys


def _inner(typ: Any) -> tuple[Any, bool]:
    """(the type without ``None`` and ``Annotated`` validators, whether ``None`` is allowed)."""
    if typing.get_origin(typ) is typing.Annotated:
        return _inner(typing.get_args(typ)[0])
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        joined = functools.reduce(operator.or_, args)
        return joined, len(args) < len(typing.get_args(typ))
    return typ, False


def item_schema(typ: Any) -> type | None:
    """The schema class of a ``list[Schema]`` annotation (an array of tables), else None."""
    typ, _ = _inner(typ)
    if typing.get_origin(typ) is list:
        (item,) = typing.get_args(typ)
        return item if is_schema(item) else None
    return None


def type_name(typ: Any) -> str:
    typ, optional = _inner(typ)
    origin = typing.get_origin(typ)
    names = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "table"}
    if origin is typing.Literal:
        kinds = {type(a) for a in typing.get_args(typ)}
        name = names.get(kinds.pop(), "value") if len(kinds) == 1 else "value"
    elif origin is list:
        (item,) = typing.get_args(typ)
        name = "list of tables" if is_schema(item) else f"list of {type_name(item)}s"
    elif origin is dict:
        name = "table"
    elif isinstance(typ, type) and issubclass(typ, __import__("enum").Enum):
        name = "string"
    else:
        name = names.get(typ, getattr(typ, "__name__", str(typ)))
    return f"{name} (optional)" if optional else name


def declared_choices(typ: Any) -> list[Any] | None:
    """Allowed values declared by the annotation itself (``Literal[...]``, an Enum), else None."""
    import enum

    typ, _ = _inner(typ)
    if typing.get_origin(typ) is list:
        (typ,) = typing.get_args(typ)
    if typing.get_origin(typ) is typing.Literal:
        return list(typing.get_args(typ))
    if isinstance(typ, type) and issubclass(typ, enum.Enum):
        return [m.value for m in typ]
    return None


_TYPE_MESSAGE = re.compile(
    r"^must (be|not be) (a number|an integer|a string|true or false|a list|a table|a finite number)(,|$)"
)


def _probe_values(typ: Any, default: Any) -> list[Any]:
    """Values that a validator with a choice or a range refuses, so that its message says which."""
    typ, optional = _inner(typ)
    if typing.get_origin(typ) is list:
        (item,) = typing.get_args(typ)
        return [[v] for v in _probe_values(item, None)[:1]]
    if typ is bool:
        return []
    if typ is int:
        return [-(2**62)]
    if typ is float:
        return [-1e300]
    if typ is str:
        return ["\x01?", ""] if default not in ("", REQUIRED) else ["\x01?"]
    return []


def _allowed_message(message: str, key: str) -> str:
    """What a ConfigError about ``key`` says is allowed (``must be one of a, b``), or ""."""
    for form in (f"config key '{key}' ", f"config key '{key}[0]' "):
        if message.startswith(form):
            rest = message[len(form) :]
            break
    else:
        return ""
    if _TYPE_MESSAGE.match(rest):
        return ""
    rest = re.sub(r",? got .*$", "", rest, flags=re.DOTALL).strip()
    return re.sub(r"^must (not )?be ", lambda m: "not " if m.group(1) else "", rest)


def allowed(key: Key, check: Callable[[Any], None], dotted: str) -> str:
    """The allowed values or range of ``key``: declared, else what validation says of bad values."""
    choices = declared_choices(key.annotation)
    if choices is not None:
        # As the validation messages say them (``must be one of none, 4bit, 8bit (or empty)``).
        said = ", ".join(str(c) for c in choices if c != "")
        return f"one of {said}" + (" (or empty)" if "" in choices else "")
    if _inner(key.annotation)[0] is bool:
        return "`true`, `false`"
    from fedlora.config import bounds_text
    from fedlora.errors import ConfigError

    if key.info is not None and bounds_text(key.info):
        return bounds_text(key.info)

    said: list[str] = []
    for value in _probe_values(key.annotation, key.default):
        try:
            check(value)
        except ConfigError as err:
            text = _allowed_message(str(err), dotted)
            if text and text not in said:
                said.append(text)
    return "; ".join(said)


# -- configuration reference ------------------------------------------------------------------------


def _nested(path: list[str], value: Any) -> dict[str, Any]:
    out: dict[str, Any] = value
    for part in reversed(path):
        out = {part: out}
    return out


def _run_check(path: list[str], list_base: list[dict] | None = None, index_path: list[str] | None = None):
    """A check that builds a RunConfig with one key set (inside the first table of an array when
    ``list_base`` is given) and lets its validation speak."""
    from fedlora.config import RunConfig

    def check(value: Any) -> None:
        if list_base is None:
            RunConfig.from_dict(_nested(path, value))
            return
        items = [dict(t) for t in list_base]
        items[0][path[-1]] = value
        RunConfig.from_dict(_nested(index_path, items))

    return check


#: The first tables of an array-of-tables that validation accepts, for probing one key of it.
_ARRAY_BASES = {"data.tasks": [{"name": "a", "path": "a.csv"}, {"name": "b", "path": "b.csv"}]}


def config_keys() -> list[str]:
    """Every dotted key of a run's configuration, as the reference lists it."""
    from fedlora.config import RunConfig

    keys: list[str] = []

    def walk(cls: type, prefix: str) -> None:
        for key in schema_keys(cls):
            dotted = f"{prefix}{key.name}"
            if is_schema(_inner(key.annotation)[0]):
                walk(_inner(key.annotation)[0], f"{dotted}.")
            elif item_schema(key.annotation):
                walk(item_schema(key.annotation), f"{dotted}[i].")
            else:
                keys.append(dotted)

    walk(RunConfig, "")
    return keys


def _section_rows(cls: type, prefix: str, path: list[str], array: tuple[str, list[dict]] | None) -> list[list[str]]:
    rows = []
    for key in schema_keys(cls):
        if is_schema(_inner(key.annotation)[0]) or item_schema(key.annotation):
            continue
        if array:
            name, base = array
            check = _run_check([*path, key.name], list_base=base, index_path=name.split("."))
            probe_key = f"{name}[0].{key.name}"
        else:
            check = _run_check([*path, key.name])
            probe_key = f"{prefix}{key.name}"
        rows.append(
            [
                code(f"{prefix}{key.name}"),
                type_name(key.annotation),
                toml_value(key.default),
                allowed(key, check, probe_key),
                plain(key.help) or "—",
            ]
        )
    return rows


HEADER = ("key", "type", "default", "allowed", "description")


def config_reference() -> str:
    """Every key of a run, table by table, from ``fedlora.config`` (and the registry for ``[strategy]``)."""
    from fedlora.config import RunConfig

    out: list[str] = []

    def section(cls: type, prefix: str, path: list[str], title: str, array=None) -> None:
        summary, _ = docstring_sections(cls)
        out.append(f"### `{title}`\n")
        if summary:
            out.append(plain(summary) + "\n")
        rows = _section_rows(cls, prefix, path, array)
        if rows:
            out.append(table(HEADER, rows) + "\n")
        for key in schema_keys(cls):
            inner = _inner(key.annotation)[0]
            dotted = f"{prefix}{key.name}"
            if is_schema(inner) and key.name == "strategy" and not prefix:
                strategy_section(inner)
            elif is_schema(inner):
                section(inner, f"{dotted}.", [*path, key.name], f"[{dotted}]")
            elif item_schema(key.annotation):
                array = (dotted, _ARRAY_BASES.get(dotted, [{}]))
                section(item_schema(key.annotation), f"{dotted}[i].", [*path, key.name], f"[[{dotted}]]", array)

    def strategy_section(cls: type) -> None:
        from fedlora.strategies import STRATEGIES, StrategyOptions

        out.append("### `[strategy]`\n")
        out.append(
            plain(docstring_sections(cls)[0])
            + " `name` picks the strategy; the other keys of the table are its options. The keys "
            "below are taken by every strategy; each strategy's own options are listed on "
            "[Strategies](strategies.md#options-of-each-strategy).\n"
        )
        names = ", ".join(code(n) for n in sorted(STRATEGIES))
        name_key = next(k for k in schema_keys(cls) if k.name == "name")
        rows = [
            [
                "`strategy.name`",
                type_name(name_key.annotation),
                toml_value(name_key.default),
                f"one of {names}",
                "the aggregation strategy (registered in `fedlora.strategies`)",
            ]
        ]
        rows += option_rows(StrategyOptions, "(shared)")
        out.append(table(HEADER, rows) + "\n")

    top = RunConfig
    summary, _ = docstring_sections(top)
    out.append("### Top level\n")
    if summary:
        out.append(plain(summary) + "\n")
    out.append(table(HEADER, _section_rows(top, "", [], None)) + "\n")
    for key in schema_keys(top):
        inner = _inner(key.annotation)[0]
        if is_schema(inner) and key.name == "strategy":
            strategy_section(inner)
        elif is_schema(inner):
            section(inner, f"{key.name}.", [key.name], f"[{key.name}]")
    return "\n".join(out)


# -- strategies (the registry) --------------------------------------------------------------------


def strategies() -> dict[str, type]:
    from fedlora.strategies import STRATEGIES

    return dict(sorted(STRATEGIES.items()))


def own_options(cls: type) -> list[Key]:
    """A strategy's own options: its options class's fields beyond the shared ones."""
    from fedlora.strategies import StrategyOptions

    shared = {k.name for k in schema_keys(StrategyOptions)}
    return [k for k in schema_keys(cls.options_class) if k.name not in shared]


def option_rows(options_class: type, strategy: str, only: Iterable[Key] | None = None) -> list[list[str]]:
    def check_for(name: str):
        def check(value: Any) -> None:
            options_class.from_dict({name: value}, strategy)

        return check

    keys = list(only) if only is not None else schema_keys(options_class)
    return [
        [
            code(f"strategy.{k.name}"),
            type_name(k.annotation),
            toml_value(k.default),
            allowed(k, check_for(k.name), f"strategy.{k.name}"),
            plain(k.help) or "—",
        ]
        for k in keys
    ]


def _yes(refusal: str) -> str:
    return "refused" if refusal else "yes"


def strategy_matrix() -> str:
    """Which strategy takes which setting, from the registry's class attributes."""
    rows = []
    for name, cls in strategies().items():
        opts = ", ".join(f"[`{k.name}`](#{name})" for k in own_options(cls)) or "—"
        rows.append(
            [
                f"[`{name}`](#{name})",
                "any (`[[federation.profiles]]`)" if cls.heterogeneous_ranks else "`lora.rank` for every client",
                "refused" if cls.needs_float_base else "yes",
                "yes" if cls.personalized else "no",
                _yes(cls.central_dp_refusal),
                ", ".join(code(a) for a in cls.robust_aggregators),
                _yes(cls.server_optimizer_refusal),
                opts,
            ]
        )
    header = (
        "strategy",
        "client ranks",
        "quantized base",
        "personalized",
        '`privacy.mode = "central"`',
        "`robustness.aggregator`",
        "`strategy.server_optimizer`",
        "own options",
    )
    return table(header, rows)


def strategies_reference() -> str:
    """One section per registered strategy: what it does, what it refuses and its own options."""
    out = []
    for name, cls in strategies().items():
        summary, _ = docstring_sections(cls)
        out.append(f"### {name}\n")
        out.append(f"Class `{cls.__module__}.{cls.__qualname__}`.\n")
        out.append(plain(summary) + "\n")
        notes = []
        if cls.heterogeneous_ranks:
            notes.append("Clients may train different ranks (`[[federation.profiles]]`, `fedlora-client --rank`).")
        if cls.needs_node_info:
            notes.append("A node is asked for its capabilities before its first train message.")
        if cls.personalized:
            notes.append("Each client ends with its own model and evaluates it on its own data.")
        if cls.needs_float_base:
            notes.append("It changes the frozen base weights, so a quantized base (any profile) is refused.")
        if cls.central_dp_refusal:
            notes.append(f'Refuses `privacy.mode = "central"`: {cls.central_dp_refusal}.')
        if cls.server_optimizer_refusal:
            notes.append(f"Refuses `strategy.server_optimizer`: {cls.server_optimizer_refusal}.")
        if tuple(cls.robust_aggregators) == ("mean",):
            notes.append("Refuses `robustness.aggregator` other than `mean` (use `robustness.update_clip`).")
        if notes:
            out.append("\n".join(f"- {plain(n)}" for n in notes) + "\n")
        keys = own_options(cls)
        if keys:
            out.append(table(HEADER, option_rows(cls.options_class, name, keys)) + "\n")
        else:
            out.append("No options of its own (the shared ones below apply).\n")
    return "\n".join(out)


def shared_options() -> str:
    """The ``[strategy]`` keys every strategy takes (the options base class)."""
    from fedlora.strategies import StrategyOptions

    return table(HEADER, option_rows(StrategyOptions, "(shared)"))


_SUPPORT: dict[str, tuple[str, Callable[[type], str]]] = {
    "server_optimizer": ("`strategy.server_optimizer`", lambda c: c.server_optimizer_refusal),
    "central_dp": ('`privacy.mode = "central"`', lambda c: c.central_dp_refusal),
    "secure_aggregation": ('`secure_aggregation.mode = "secagg+"`', lambda c: c.secure_aggregation_refusal),
    "aggregator": (
        "`robustness.aggregator`",
        lambda c: "" if tuple(c.robust_aggregators) != ("mean",) else "only `mean`: its aggregate is not a plain mean",
    ),
    "quantized_base": (
        "a quantized base",
        lambda c: (
            "it changes the frozen base weights, which cannot be done exactly on a quantized base"
            if c.needs_float_base
            else ""
        ),
    ),
    "profiles": (
        "profiles of different ranks",
        lambda c: "" if c.heterogeneous_ranks else "every client trains `lora.rank`",
    ),
}


def strategy_support(feature: str) -> str:
    """Which strategies take ``feature`` (one of :data:`_SUPPORT`), and why the others refuse it."""
    title, refusal = _SUPPORT[feature]
    rows = []
    for name, cls in strategies().items():
        why = refusal(cls)
        if feature == "aggregator" and not why:
            taken = ", ".join(code(a) for a in cls.robust_aggregators)
        else:
            taken = "refused" if why else "yes"
        rows.append([f"[`{name}`](strategies.md#{name})", taken, plain(why) if why else "—"])
    return table(("strategy", title, "why not"), rows)


def strategy_names() -> str:
    """The registered names, inline."""
    return ", ".join(code(n) for n in strategies())


def strategy_bytes() -> str:
    """Bytes per client and round of every strategy (float32 wire), from communication.json."""
    data = _result("communication")
    rows = []
    for name, transports in sorted(data["cells"].items()):
        cell32 = transports["float32"]
        per_round = [f"{r['bytes_down_per_client']:,} / {r['bytes_up_per_client']:,}" for r in cell32["rounds"]]
        rows.append([f"[`{name}`](strategies.md#{name})", *per_round, number(cell32["final_accuracy"])])
    rounds = len(next(iter(data["cells"].values()))["float32"]["rounds"])
    header = ["strategy", *[f"round {i + 1} (down / up)" for i in range(rounds)], f"accuracy after {rounds} rounds"]
    return table(header, rows)


# -- presets ----------------------------------------------------------------------------------------


def presets() -> str:
    """The packaged presets (``fedlora presets``): each file's leading comment and main settings."""
    import tomllib

    from fedlora.simulations import PRESET_DIR, list_presets

    rows = []
    for name in list_presets():
        path = PRESET_DIR / f"{name}.toml"
        text = path.read_text(encoding="utf-8")
        comment = []
        for line in text.splitlines():
            if not line.startswith("#"):
                break
            comment.append(line.lstrip("#").strip())
        raw = tomllib.loads(text)
        settings = [
            ("strategy", raw.get("strategy", {}).get("name", "fedavg")),
            ("model", raw.get("model", {}).get("name", "")),
            ("clients", raw.get("federation", {}).get("clients", "")),
            ("rounds", raw.get("rounds", "")),
        ]
        said = ", ".join(f"{k} {code(v)}" for k, v in settings if v != "")
        rows.append([code(name), said, " ".join(comment)])
    return table(("preset", "settings", "what it is"), rows)


# -- command line -----------------------------------------------------------------------------------


def _parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    from fedlora.cli import deploy, main

    out: list[tuple[str, argparse.ArgumentParser]] = []
    top = main.build_parser()
    out.append(("fedlora", top))
    for action in top._actions:
        if isinstance(action, argparse._SubParsersAction):
            out += [(f"fedlora {name}", sub) for name, sub in action.choices.items()]
    for attr in ("_server_parser", "_client_parser"):
        maker = getattr(deploy, attr, None)
        if maker is None:
            raise RuntimeError(f"fedlora.cli.deploy.{attr} is gone: docs/hooks/generate.py needs the parser it built")
        parser = maker()
        out.append((parser.prog, parser))
    return out


def _help(action: argparse.Action, parser: argparse.ArgumentParser) -> str:
    text = action.help or ""
    if "%" in text:
        params = {**vars(action), "prog": parser.prog}
        try:
            text = text % params
        except (KeyError, TypeError, ValueError):
            pass
    return text


def cli_reference() -> str:
    """Every command and option of ``fedlora``, ``fedlora-server`` and ``fedlora-client``."""
    out = []
    for title, parser in _parsers():
        out.append(f"### `{title}`\n")
        if parser.description:
            out.append(parser.description + "\n")
        usage = parser.format_usage().strip().removeprefix("usage: ")
        out.append(f"```text\n{usage}\n```\n")
        rows = []
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    rows.append([f"[`{choice.dest}`](#fedlora-{choice.dest})", "", "", choice.help or ""])
                continue
            name = ", ".join(code(s) for s in action.option_strings) or code(action.metavar or action.dest)
            if action.option_strings and action.nargs != 0:
                name += f" {code(action.metavar or action.dest.upper())}"
            default = action.default
            unset = default is None or default is argparse.SUPPRESS or default is False or action.nargs == 0
            shown = "" if unset else code(default)
            if action.required:
                shown = "required"
            choices = ", ".join(code(c) for c in action.choices) if action.choices else ""
            rows.append([name, shown, choices, _help(action, parser)])
        if rows:
            out.append(table(("argument", "default", "choices", "what"), rows) + "\n")
    return "\n".join(out)


# -- benchmarks -------------------------------------------------------------------------------------


def _result(name: str) -> dict[str, Any]:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text(encoding="utf-8"))


def result_names() -> list[str]:
    return sorted(p.stem for p in RESULTS.glob("*.json"))


def _flatten(value: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    else:
        yield prefix, value


def targets_met(data: Mapping[str, Any]) -> list[tuple[str, bool]]:
    """Every pass/fail flag of a result: booleans under a key that says met/meets, or under ``checks``."""
    flags = []
    for path, value in _flatten(data):
        parts = path.split(".")
        if not isinstance(value, bool):
            continue
        if any(re.search(r"(^|_)(met|meets)(_|$)", p) for p in parts) or parts[0] == "checks":
            flags.append((path, value))
    return flags


def grouped_flags(flags: list[tuple[str, bool]]) -> list[tuple[str, str]]:
    """Flags as table rows; three or more under one parent (``checks.int8.<strategy>``) share a row."""
    groups: dict[str, list[tuple[str, bool]]] = {}
    for path, value in flags:
        path = path.removesuffix(".ok")
        parent, _, leaf = path.rpartition(".")
        groups.setdefault(parent, []).append((leaf, value))
    rows = []
    for parent, members in groups.items():
        if len(members) < 3 or not parent:
            rows += [(code(f"{parent}.{leaf}" if parent else leaf), "yes" if v else "**no**") for leaf, v in members]
            continue
        missed = [leaf for leaf, v in members if not v]
        said = f"all {len(members)}" if not missed else f"{len(members) - len(missed)} of {len(members)}; **not**: "
        rows.append((code(parent) + " (" + ", ".join(leaf for leaf, _ in members) + ")", said + ", ".join(missed)))
    return rows


def _fig_overhead(d):
    t = d["targets"]
    return [
        ("plain peft loop (a)", f"{d['plain_s']} s"),
        ("fedlora in-process (b)", f"{d['fedlora_s']} s ({d['fedlora_outside_training_s']} s outside training)"),
        ("Flower's Ray simulation, model rebuilt per call (c)", f"{d['flower_ray_s']} s"),
        ("(b) / (a)", f"{d['fedlora_over_plain']} (target <= {t['fedlora_over_plain']}; median, {d['repeats']} pairs)"),
        ("(c) / (b)", f"{d['ray_over_fedlora']} (target >= {t['ray_over_fedlora']})"),
    ]


def _fig_memory(d):
    rows = [(f"peak RSS, {n} clients", f"{v} MB") for n, v in d["peak_rss_mb"].items()]
    rows.append(("100 clients / 2 clients", f"{d['ratio_100_over_2']} (target <= {d['target_ratio_100_over_2']})"))
    rows.append(("per extra client", f"{d['mb_per_extra_client']} MB"))
    return rows


def _fig_communication(d):
    fed = d["ratios"]["fedavg"]
    rows = [
        (f"{t} bytes up / float32 (fedavg)", number(fed[t]["bytes_up_vs_own_float32"], 4))
        for t in fed
        if t != "float32"
    ]
    rows.append(("full-model FedAvg bytes / fedavg's LoRA bytes", number(d["full_model_over_fedavg_lora"])))
    rows.append(("whole run", f"{d['seconds'] / 60:.1f} min"))
    return rows


def _fig_deploy_latency(d):
    b, a = d["before"], d["after"]
    return [
        ("overhead per round without the worker", f"{b['overhead_s']} s (round {b['round_s']} s)"),
        ("overhead per round with the worker", f"{a['overhead_s']} s (round {a['round_s']} s)"),
        ("without / with", f"{d['before_over_after']} x (round time {d['round_before_over_after']} x)"),
        ("target", f"<= {d['target_overhead_s']} s per round"),
    ]


def _fig_aggregation(d):
    return [
        (f"{name}, {d['clients']} clients", f"{s} s (target < {d['targets'][name]} s)")
        for name, s in d["seconds"].items()
    ] + [("FL-TAC cluster purity", number(d["fltac_purity"]))]


def _fig_privacy(d):
    rows = [("majority-class accuracy", number(d["majority_class_accuracy"]))]
    st = d.get("step_time")
    if st:
        rows.append(
            (
                f"DP step of {st['batch']} in micro-batches of {st['physical_batch_size']} / plain step",
                f"{st['dp_over_plain']} ({st['ms_per_logical_step']['dp']} / {st['ms_per_logical_step']['plain']} ms)",
            )
        )
    for table in ("sweep", "local", "central"):
        for key, run in d.get(table, {}).get("runs", {}).items():
            rows.append((f"{table}: {key}", f"accuracy {number(run['final_eval_accuracy'])}"))
    for strategy, cells in d.get("ffa_vs_fedavg", {}).get("best_accuracy", {}).items():
        rows.append((f"{strategy} best accuracy ({', '.join(cells)})", " / ".join(number(v) for v in cells.values())))
    return rows


def _fig_quality(d):
    rows = [
        (run, f"{number(r['rounds'][-1]['eval_accuracy'])} after {len(r['rounds'])} rounds")
        for run, r in d["runs"].items()
    ]
    rows += [
        (f"{run} / centralised", f"{number(r['ratio'])} (target {d['targets_ratio'].get(run.split('/', 1)[1], '—')})")
        for run, r in d["ratios"].items()
    ]
    return rows


def _fig_gateway_abuse(d):
    big, flood = d["big_bodies"], d["half_open"]
    return [
        (
            f"{len(big['requests'])} bodies declaring {big['declared_mb']} MB",
            f"answered {', '.join(str(r['status']) for r in big['requests'])} within "
            f"{max(r['answer_s'] for r in big['requests'])} s; RSS rise {big['rss_rise_mb']} MB",
        ),
        (
            f"{flood['connections']} half-open connections",
            f"all dropped in {flood['all_dropped_s']} s; RSS rise {flood['rss_rise_mb']} MB; "
            f"{flood['gateway_process_threads']} threads",
        ),
        ("deployment under attack", f"{d['deployment']['rounds']} rounds, server exit {d['deployment']['server_rc']}"),
    ]


#: Key figures per benchmark; a result without an entry shows its top-level numbers.
FIGURES: dict[str, Callable[[dict], list[tuple[str, str]]]] = {
    "overhead": _fig_overhead,
    "memory": _fig_memory,
    "communication": _fig_communication,
    "deploy_latency": _fig_deploy_latency,
    "aggregation": _fig_aggregation,
    "privacy": _fig_privacy,
    "quality": _fig_quality,
    "gateway_abuse": _fig_gateway_abuse,
}


def _generic_figures(d: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [(k, number(v)) for k, v in d.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)]


def benchmark(name: str) -> str:
    """One result file: its key figures, every pass/fail flag, and its plots."""
    data = _result(name)
    try:
        figures = FIGURES.get(name, _generic_figures)(data)
    except (KeyError, TypeError, IndexError) as err:
        raise RuntimeError(f"benchmarks/results/{name}.json lacks what the docs show ({err!r})") from err
    out = [f"From `benchmarks/results/{name}.json`:\n", table(("figure", "value"), figures) + "\n"]
    flags = targets_met(data)
    if flags:
        out.append(table(("target", "met"), grouped_flags(flags)) + "\n")
    for png in sorted(RESULTS.glob(f"{name}_*.png")):
        out.append(f"![{png.stem}]({ASSETS}/{png.name})\n")
    return "\n".join(out)


def benchmarks_summary() -> str:
    """Every result file, with how many of its flags are met."""
    rows = []
    for name in result_names():
        flags = targets_met(_result(name))
        met = sum(v for _, v in flags)
        said = f"{met} of {len(flags)}" if flags else "—"
        rows.append([f"[`{name}`](#{name})", f"`benchmarks/{name}.py`", said])
    return table(("result", "script", "targets met"), rows)


def benchmarks_rest(page_markdown: str) -> str:
    """Sections for result files that the page does not place itself."""
    placed = set(re.findall(r"<!--\s*fedlora:benchmark\s+([\w-]+)\s*-->", page_markdown))
    rest = [n for n in result_names() if n not in placed]
    return "\n".join(f"### {name} {{#{name}}}\n\n{benchmark(name)}" for name in rest) or "(none)"


def communication_table() -> str:
    """Bytes per client in the last round (down / up) and final accuracy, every strategy x transport."""
    data = _result("communication")
    transports = list(next(iter(data["cells"].values())))
    rows = []
    for name, cells in sorted(data["cells"].items()):
        row = [code(name)]
        for t in transports:
            last, accuracy = cells[t]["rounds"][-1], cells[t]["final_accuracy"]
            row.append(f"{last['bytes_down_per_client']:,} / {last['bytes_up_per_client']:,} ({accuracy:.3f})")
        rows.append(row)
    return table(["strategy", *transports], rows)


def communication_ratios() -> str:
    """Bytes up against the same strategy on float32, and bytes to the accuracy target against fedavg's."""
    data = _result("communication")
    transports = list(next(iter(data["ratios"].values())))
    rows = []
    for name, ratios in sorted(data["ratios"].items()):
        to_target = data["cells"][name]
        rows.append(
            [code(name)]
            + [
                f"{number(ratios[t]['bytes_up_vs_own_float32'], 4)} / "
                + (
                    number(ratios[t]["bytes_to_target_vs_fedavg_float32"], 3)
                    if to_target[t]["bytes_to_target"]
                    else "—"
                )
                for t in transports
            ]
        )
    return table(["strategy", *transports], rows)


# -- code from the repository -----------------------------------------------------------------------


def python_source(path: str, *names: str) -> str:
    """The source of top-level classes or functions ``names`` of ``path`` (repository-relative)."""
    source = (ROOT / path).read_text(encoding="utf-8")
    tree = ast.parse(source)
    found = {}
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name in names:
            start = min([d.lineno for d in node.decorator_list] + [node.lineno])
            found[node.name] = "\n".join(source.splitlines()[start - 1 : node.end_lineno])
    missing = [n for n in names if n not in found]
    if missing:
        raise RuntimeError(f"{path} has no top-level {', '.join(missing)} (the docs include them)")
    body = "\n\n\n".join(found[n] for n in names)
    return f'```python title="{path}"\n{body}\n```'


# -- MkDocs events ----------------------------------------------------------------------------------

GENERATORS: dict[str, Callable[..., str]] = {
    "config-reference": config_reference,
    "presets": presets,
    "strategy-matrix": strategy_matrix,
    "strategies-reference": strategies_reference,
    "shared-options": shared_options,
    "strategy-support": strategy_support,
    "strategy-names": strategy_names,
    "strategy-bytes": strategy_bytes,
    "cli-reference": cli_reference,
    "benchmark": benchmark,
    "benchmarks-summary": benchmarks_summary,
    "communication-table": communication_table,
    "communication-ratios": communication_ratios,
    "python-source": python_source,
}


def render(markdown: str) -> str:
    """``markdown`` with every placeholder replaced by what its generator writes."""

    def replace(m: re.Match) -> str:
        name, args = m.group(1), m.group(2).split()
        if name == "benchmarks-rest":
            return benchmarks_rest(markdown)
        if name not in GENERATORS:
            raise KeyError(f"unknown generated part {name!r} (known: {', '.join(sorted(GENERATORS))})")
        return GENERATORS[name](*args)

    return PLACEHOLDER.sub(replace, markdown)


def on_files(files, config):
    """Publish the benchmark plots under ``assets/benchmarks/`` (they live in benchmarks/results/)."""
    from mkdocs.structure.files import File

    for png in sorted(RESULTS.glob("*.png")):
        files.append(File.generated(config, f"{ASSETS}/{png.name}", abs_src_path=str(png)))
    return files


def on_page_markdown(markdown, page, config, files):
    from mkdocs.exceptions import PluginError

    try:
        return render(markdown)
    except Exception as err:  # one line naming the page and the part, not a hook traceback
        raise PluginError(f"docs/{page.file.src_uri}: generating a part failed: {err}") from err


_HTML_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj|const):<code>(~?)([^<]+)</code>")


def on_page_content(html, page, config, files):
    """Sphinx roles in docstrings that mkdocstrings renders (``:class:`~a.B```) become code."""
    return _HTML_ROLE.sub(
        lambda m: f"<code>{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}</code>",
        html,
    )
