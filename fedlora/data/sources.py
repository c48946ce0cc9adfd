"""Reading one source: a local csv/tsv/json/jsonl/parquet file, a directory of splits, a hub
dataset name, or a built-in ``synthetic:`` task; then checked, split and capped with only the
columns the run uses.

Nothing here knows about tasks or class ids (:mod:`fedlora.data.labels`) or clients
(:mod:`fedlora.data.partition`): a source comes back as plain ``datasets.Dataset`` objects whose
columns are renamed to the loaded names (``text``, ``label``, ``task``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fedlora.config import DataConfig, RunConfig, has_tasks, is_image_task, labelled
from fedlora.data.columns import values
from fedlora.errors import DataError

LOCAL_SUFFIXES = {".csv", ".tsv", ".json", ".jsonl", ".parquet"}
EVAL_STEMS = ("validation", "dev", "test")
SYNTHETIC_PREFIX = "synthetic:"


def _read_local(path: Path) -> Any:
    import pandas as pd
    from datasets import Dataset

    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            frame = pd.read_csv(path)
        elif suffix == ".tsv":
            # TSV corpora (GLUE) carry raw quotes inside sentences: no quote processing.
            frame = pd.read_csv(path, sep="\t", quoting=3, keep_default_na=False)
        elif suffix in (".json", ".jsonl"):
            text = path.read_text(encoding="utf-8").lstrip()
            frame = pd.read_json(path, lines=not text.startswith("["))
        elif suffix == ".parquet":
            frame = pd.read_parquet(path)
        else:
            raise DataError(f"data file {path}: unsupported format {suffix!r} (csv, tsv, json, jsonl, parquet)")
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - pandas raises many kinds; the user needs one line
        raise DataError(f"data file {path}: cannot read: {str(err).splitlines()[0]}") from None
    try:
        return Dataset.from_pandas(frame, preserve_index=False)
    except Exception as err:  # noqa: BLE001 - pyarrow refuses mixed cells (a list among strings)
        first = str(err).splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"data file {path}: cannot read its columns: {first}") from None


def check_cells(ds: Any, columns: list[tuple[str, str]], where: str) -> None:
    """A DataError (one line, naming the row and the config key) for a cell a column of this kind
    cannot hold: a text cell that is missing, empty, a number or a list/table; a label or task
    cell that is missing (it would otherwise become a class named "None").

    ``columns`` are ``(config key, column)`` pairs; the key's last part says the kind. An
    instruction's prompt and response are text; its input is text that may be missing or empty
    (no input); a chat's messages must be a conversation (:func:`fedlora.data.instruct.check_messages`).
    """
    from fedlora.data.instruct import check_messages

    for key, column in columns:
        if column not in ds.column_names or key.endswith("image_column"):  # images: resolve_images
            continue
        if key.endswith("messages_column"):
            for row, value in enumerate(values(ds, column)):
                problem = check_messages(value)
                if problem:
                    raise DataError(f"{where}: row {row + 1}: {column!r} {problem} (config key '{key}')")
            continue
        optional = key.endswith("input_column")
        text = optional or key.endswith(("text_column", "prompt_column", "response_column"))
        for row, value in enumerate(values(ds, column)):
            missing = value is None or (isinstance(value, float) and math.isnan(value))
            if missing or (text and isinstance(value, str) and not value.strip()):
                if optional:
                    continue
                raise DataError(f"{where}: row {row + 1} has no {column!r} (config key '{key}')")
            if isinstance(value, (list, dict)):
                raise DataError(f"{where}: row {row + 1}: {column!r} is a {type(value).__name__}, not a value")
            if text and not isinstance(value, str):
                raise DataError(
                    f"{where}: row {row + 1}: {column!r} is {value!r}, not text (config key '{key}' names the text)"
                )


def _find_in_dir(directory: Path, stems: tuple[str, ...]) -> Path | None:
    for stem in stems:
        for suffix in sorted(LOCAL_SUFFIXES):
            candidate = directory / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def _looks_local(path: str) -> bool:
    p = Path(path)
    return p.suffix.lower() in LOCAL_SUFFIXES or path.startswith((".", "/", "~")) or p.exists()


def _load_raw(cfg: DataConfig, seed: int, prefix: str = "data.") -> tuple[Any, Any | None, str]:
    """(train, eval or None, description) before column checks; messages name ``{prefix}path``."""
    from datasets import Dataset

    if cfg.path.startswith(SYNTHETIC_PREFIX):
        from fedlora.data.shapes import IMAGE_GENERATORS
        from fedlora.data.synthetic import GENERATORS

        kind = cfg.path[len(SYNTHETIC_PREFIX) :]
        generators = {**GENERATORS, **IMAGE_GENERATORS}
        if kind not in generators:
            known = ", ".join(SYNTHETIC_PREFIX + name for name in sorted(GENERATORS))
            known += "; images: " + ", ".join(SYNTHETIC_PREFIX + name for name in sorted(IMAGE_GENERATORS))
            raise DataError(f"{prefix}path: unknown synthetic task {kind!r} (known: {known})")
        generate = generators[kind]
        n_train = cfg.max_train_examples or 2400
        n_eval = cfg.max_eval_examples or 400
        train = Dataset.from_dict(generate(n_train, seed=seed))
        evals = Dataset.from_dict(generate(n_eval, seed=seed + 7919))
        return train, evals, cfg.path
    if _looks_local(cfg.path):
        path = Path(cfg.path).expanduser()
        if path.is_dir():
            train_file = _find_in_dir(path, ("train",))
            if train_file is None and _image_dir(path):
                return _read_image_dir(path, cfg, prefix)
            if train_file is None:
                raise DataError(f"{prefix}path: directory {path} has no train.csv/.tsv/.json/.jsonl/.parquet")
            eval_file = _find_in_dir(path, EVAL_STEMS)
            train = _read_local(train_file)
            evals = _read_local(eval_file) if eval_file and not cfg.eval_path else None
            return train, evals, str(train_file)
        if not path.is_file():
            raise DataError(f"{prefix}path: file not found: {path}")
        return _read_local(path), None, str(path)
    # A hub dataset name: the real loading code, which needs network access to the hub.
    from fedlora.model.hub import offline_unless_reachable

    offline_unless_reachable()  # no network: the local cache or a fast failure, not retries
    try:
        from datasets import load_dataset

        splits = load_dataset(cfg.path)
    except Exception as err:  # noqa: BLE001
        raise DataError(f"{prefix}path: cannot load hub dataset {cfg.path!r}: {str(err).splitlines()[0]}") from None
    if "train" not in splits:
        raise DataError(f"{prefix}path: hub dataset {cfg.path!r} has no 'train' split ({', '.join(splits)})")
    eval_name = cfg.eval_split or next((s for s in ("validation", "test") if s in splits), "")
    if cfg.eval_split and cfg.eval_split not in splits:
        raise DataError(f"{prefix}eval_split: {cfg.path!r} has no split {cfg.eval_split!r} ({', '.join(splits)})")
    return splits["train"], (splits[eval_name] if eval_name else None), cfg.path


def _image_dir(path: Path) -> bool:
    """Whether a directory holds images: a ``datasets`` folder (``save_to_disk``) or an image folder."""
    from fedlora.data.images import looks_like_image_folder

    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file() or looks_like_image_folder(path)


def _read_image_dir(path: Path, cfg: DataConfig, prefix: str) -> tuple[Any, Any | None, str]:
    """(train, eval or None, description) of an image folder or a ``datasets`` folder."""
    from fedlora.data.images import read_image_folder

    if not ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        train, evals = read_image_folder(path, cfg.image_column, cfg.label_column, prefix)
        return train, (evals if not cfg.eval_path else None), str(path)
    from datasets import DatasetDict, load_from_disk

    try:
        loaded = load_from_disk(str(path))
    except Exception as err:  # noqa: BLE001
        raise DataError(f"{prefix}path: cannot load the dataset folder {path}: {str(err).splitlines()[0]}") from None
    if not isinstance(loaded, DatasetDict):
        return loaded, None, str(path)
    if "train" not in loaded:
        raise DataError(f"{prefix}path: dataset folder {path} has no 'train' split ({', '.join(loaded)})")
    eval_name = cfg.eval_split or next((s for s in ("validation", "test") if s in loaded), "")
    return loaded["train"], (loaded[eval_name] if eval_name and not cfg.eval_path else None), str(path)


def _require_columns(ds: Any, columns: list[tuple[str, str]], where: str) -> None:
    for key, column in columns:
        if column not in ds.column_names:
            raise DataError(
                f"{where}: no column {column!r} (config key '{key}'); columns are: {', '.join(ds.column_names)}"
            )


def _folder_of(source: str) -> Path | None:
    """The folder a data file's relative image paths start from (None for a hub dataset)."""
    path = Path(source).expanduser()
    return path.parent.resolve() if path.is_file() else path.resolve() if path.is_dir() else None


def _cap(ds: Any, cap: int, seed: int) -> Any:
    if cap and len(ds) > cap:
        return ds.shuffle(seed=seed).select(range(cap))
    return ds


# ---------------------------------------------------------------------------------------------
# Which columns a source is read with

# A column to load: (config key naming it, column in the source, name after loading, whether the
# evaluation data must have it too).
_Column = tuple[str, str, str, bool]


def _derived_columns(cfg: RunConfig) -> set[str]:
    """Columns made while loading, which ``partition_column`` may name without the data having them."""
    derived = {"labels"} if labelled(cfg.model.task) else set()
    if has_tasks(cfg.data):
        derived |= {"task", "task_id"}
    return derived


def partition_by(cfg: RunConfig) -> str:
    """The loaded column that ``data.partition_column`` names ("" when unset).

    The task column is loaded as ``task`` and the label column as ``labels``, so naming either by
    its name in the source means the loaded column.
    """
    d = cfg.data
    column = d.partition_column
    if not column:
        return ""
    if has_tasks(d) and column == d.task_column:
        return "task"
    if labelled(cfg.model.task) and not d.tasks and column == d.label_column:
        return "labels"
    return column


def format_columns(d: DataConfig, text_column: str, prefix: str = "data.") -> list[_Column]:
    """The columns holding the examples' text in ``d.format``: ``text_column`` loaded as ``text``;
    the instruction or messages columns under their own names (templates read them by the
    configured names). The instruction's input is optional (``in_eval`` False, and
    :func:`drop_absent_optional` removes it when the file lacks it: Dolly calls it ``context``)."""
    if d.format == "instruction":
        columns: list[_Column] = [(f"{prefix}prompt_column", d.prompt_column, d.prompt_column, True)]
        if d.input_column:
            columns.append((f"{prefix}input_column", d.input_column, d.input_column, False))
        columns.append((f"{prefix}response_column", d.response_column, d.response_column, True))
        return columns
    if d.format == "chat":
        return [(f"{prefix}messages_column", d.messages_column, d.messages_column, True)]
    return [(f"{prefix}text_column", text_column, "text", True)]


def drop_absent_optional(columns: list[Any], ds: Any) -> list[Any]:
    """``columns`` without the optional ones (an instruction's input) that ``ds`` does not have."""
    return [c for c in columns if not c[0].endswith("input_column") or c[1] in ds.column_names]


def _source_columns(cfg: RunConfig, prefix: str, text_column: str, label_column: str) -> list[_Column]:
    d = cfg.data
    if is_image_task(cfg.model.task):  # the image instead of the text (image runs are single-task)
        columns: list[_Column] = [(f"{prefix}image_column", d.image_column, "image", True)]
    else:
        columns = format_columns(d, text_column, prefix)
    if labelled(cfg.model.task):
        columns.append((f"{prefix}label_column", label_column, "label", True))
    if d.task_column:
        columns.append(("data.task_column", d.task_column, "task", True))
    by = partition_by(cfg)
    if by and by not in _derived_columns(cfg):
        # A column of the source itself: kept under its own name, which must not be one we make.
        if by in {new for _, _, new, _ in columns}:
            raise DataError(
                f"data.partition_column: column {by!r} clashes with a column made while loading; rename it in the data"
            )
        columns.append(("data.partition_column", by, by, False))
    return columns


def _load_source(src: DataConfig, seed: int, columns: list[_Column], prefix: str) -> tuple[Any, Any, str]:
    """One source read, checked, split and capped, with only ``columns``, renamed.

    ``src`` is ``data`` itself or one ``data.tasks[i]`` (as a DataConfig); messages name config
    keys with ``prefix``.
    """
    train, evals, source = _load_raw(src, seed, prefix)
    columns = drop_absent_optional(columns, train)
    if src.eval_path:
        path = Path(src.eval_path).expanduser()
        if not path.is_file():
            raise DataError(f"{prefix}eval_path: file not found: {path}")
        evals = _read_local(path)
    _require_columns(train, [(key, col) for key, col, _, _ in columns], f"data file {source}")
    check_cells(train, [(key, col) for key, col, _, _ in columns], f"data file {source}")
    if evals is not None:
        _require_columns(evals, [(key, col) for key, col, _, in_eval in columns if in_eval], "evaluation data")
        check_cells(evals, [(key, col) for key, col, _, in_eval in columns if in_eval], "evaluation data")
    else:
        if len(train) < 2:
            raise DataError(
                f"data file {source}: {len(train)} example(s); a run needs at least 2 (training and held-out), "
                f"or a held-out file ({prefix}eval_path)"
            )
        split = train.train_test_split(test_size=src.eval_fraction, seed=seed, shuffle=True)
        train, evals = split["train"], split["test"]
    train, evals = _cap(train, src.max_train_examples, seed), _cap(evals, src.max_eval_examples, seed)
    image = next((col for key, col, _, _ in columns if key.endswith("image_column")), "")
    if image:  # after the caps: only the images a run uses are checked
        from fedlora.data.images import class_names, resolve_images

        label = next((col for key, col, _, _ in columns if key.endswith("label_column")), "")
        if label:
            train, evals = class_names(train, label), class_names(evals, label)
        key = f"{prefix}image_column"
        train = resolve_images(train, image, _folder_of(source), f"data file {source}", key)
        held = Path(src.eval_path).expanduser() if src.eval_path else Path(source)
        evals = resolve_images(evals, image, _folder_of(str(held)), "evaluation data", key)

    keep = list(dict.fromkeys(col for _, col, _, _ in columns))
    train = train.select_columns(keep)
    evals = evals.select_columns([c for c in keep if c in evals.column_names])
    renames = {col: new for _, col, new, _ in columns if col != new}
    train = train.rename_columns(renames)
    evals = evals.rename_columns({c: n for c, n in renames.items() if c in evals.column_names})
    return train, evals, source
