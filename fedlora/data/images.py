"""Image examples: where users keep them, checked at load, decoded lazily per batch.

A source's image column (``data.image_column``) may hold a path (relative to the data file), the
encoded bytes, or a dataset's ``Image`` feature; an image folder (``root/<label>/*.png``, with
``train/`` and ``val/``/``test/`` splits when present) is read as a table of paths
(:func:`read_image_folder`). Whatever the source, the column is normalised at load time to
``{"bytes", "path"}`` cells (the ``datasets`` Image storage, never decoded) and every image's
header is read (:func:`resolve_images`: PIL reads only the header, so this is cheap even for
100k files). A bad image is one line naming the file, the row and the key.

Pixels exist only per batch: :class:`ImageExamples` decodes the rows of a step, converts them to
RGB, optionally augments them and runs the model's processor (resize, normalise). A file that
still fails to decode during training is skipped with one line and replaced by the next good row.
"""

from __future__ import annotations

import io
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedlora.data.columns import values
from fedlora.errors import DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
#: Split folders of an image folder: training, then the held-out split (the first found).
TRAIN_DIR = "train"
EVAL_DIRS = ("val", "validation", "test")
IMAGE = "image"  # the loaded column's name, as text is loaded as ``text``
#: The smallest side fraction a random crop of ``data.augment`` keeps.
CROP_MIN = 0.85


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def looks_like_image_folder(root: Path) -> bool:
    """Whether ``root`` is laid out as ``<label>/`` folders (or ``train/<label>/``) of images."""
    top = root / TRAIN_DIR if (root / TRAIN_DIR).is_dir() else root
    return any(_images_in(folder) for folder in _class_folders(top))


def _folder_split(root: Path, image_column: str, label_column: str, prefix: str) -> Any:
    """One split of an image folder as a table of absolute paths and class names."""
    from datasets import Dataset

    paths, labels = [], []
    for folder in _class_folders(root):
        found = _images_in(folder)
        if not found:
            raise DataError(f"{prefix}path: class folder {folder} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        paths += [str(p.resolve()) for p in found]
        labels += [folder.name] * len(found)
    if not paths:
        raise DataError(f"{prefix}path: image folder {root} has no <label>/ folders of images")
    return Dataset.from_dict({image_column: paths, label_column: labels})


def read_image_folder(root: Path, image_column: str, label_column: str, prefix: str = "data.") -> tuple[Any, Any]:
    """(train, held-out or None) of an image folder: ``root/<label>/*`` or ``root/train/<label>/*``
    with ``root/val|validation|test/<label>/*``; each a table of ``image_column`` (paths) and
    ``label_column`` (the folder names)."""
    if not (root / TRAIN_DIR).is_dir():
        return _folder_split(root, image_column, label_column, prefix), None
    train = _folder_split(root / TRAIN_DIR, image_column, label_column, prefix)
    held = next((root / name for name in EVAL_DIRS if (root / name).is_dir()), None)
    return train, (_folder_split(held, image_column, label_column, prefix) if held else None)


# ---------------------------------------------------------------------------------------------
# The image column, normalised and checked at load time


def _cell(value: Any, base: Path | None) -> tuple[bytes | None, str | None] | str:
    """``(bytes, path)`` of one image cell, or a message saying why it is no image reference."""
    if isinstance(value, dict):  # a datasets Image feature's storage (or a parquet written by one)
        data, path = value.get("bytes"), value.get("path")
        if data is None and not path:
            return "holds neither image bytes nor a path"
        value = data if data is not None else path
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "is empty"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), None
    if isinstance(value, str) and value.strip():
        path = Path(value).expanduser()
        if not path.is_absolute() and base is not None:
            path = base / path
        return None, str(path)
    return f"holds a {type(value).__name__} ({str(value)[:40]!r}), neither a path nor image bytes"


def open_image(data: bytes | None, path: str | None) -> Any:
    """The image of a normalised cell, opened lazily (PIL reads the header only)."""
    from PIL import Image

    return Image.open(io.BytesIO(data) if data is not None else path)


def _check_header(data: bytes | None, path: str | None) -> str:
    """Why the image cannot be read ("" when its header is fine)."""
    if path is not None and data is None and not Path(path).is_file():
        return f"image file not found: {path}"
    try:
        with open_image(data, path) as img:
            width, height = img.size
    except Exception as err:  # noqa: BLE001 - PIL raises several kinds for a file that is no image
        what = path if data is None else "its bytes"
        return f"{what} is not an image PIL can read ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
    return "" if width > 0 and height > 0 else f"{path or 'the image'} is empty ({width} x {height})"


def resolve_images(ds: Any, column: str, base: Path | None, where: str, key: str = "data.image_column") -> Any:
    """``ds`` with ``column`` as ``{"bytes", "path"}`` cells (paths made absolute against ``base``,
    the data file's folder), every image's header checked; an ``Image`` feature is read undecoded.

    Raises
    ------
    DataError
        One line naming the row, the file and ``key``: an empty cell, one holding neither a path
        nor bytes, a missing file, a file that is not an image.
    """
    from datasets import Image

    if isinstance(ds.features.get(column), Image):
        ds = ds.cast_column(column, Image(decode=False))  # reading the column must not decode it
    cells = []
    for row, value in enumerate(values(ds, column)):
        got = _cell(value, base)
        if isinstance(got, str):
            raise DataError(f"{where}: row {row + 1}: {column!r} {got} (config key '{key}')")
        problem = _check_header(*got)
        if problem:
            raise DataError(f"{where}: row {row + 1}: {problem} (config key '{key}')")
        cells.append({"bytes": got[0], "path": got[1]})
    # Added before the old one goes: a dataset left with no column would have no rows either.
    staged = f"{column}.resolved"
    return ds.add_column(staged, cells).remove_columns(column).rename_column(staged, column)


# ---------------------------------------------------------------------------------------------
# Batches


def augmented(img: Any) -> Any:
    """``data.augment``'s light augmentation of one RGB image: a horizontal flip (p = 0.5) and a
    random crop keeping at least :data:`CROP_MIN` of each side (drawn from torch's seeded RNG)."""
    from PIL import ImageOps

    if float(torch.rand(())) < 0.5:
        img = ImageOps.mirror(img)
    width, height = img.size
    keep = CROP_MIN + (1 - CROP_MIN) * float(torch.rand(()))
    w, h = max(1, round(width * keep)), max(1, round(height * keep))
    left = int(torch.randint(0, width - w + 1, ()))
    top = int(torch.randint(0, height - h + 1, ()))
    return img.crop((left, top, left + w, top + h))


@dataclass
class ImageExamples:
    """A dataset's images (undecoded), labels and, for CLIP, the class prompts: batches decode.

    Plays the part :class:`~fedlora.data.batching.Encoded` plays for text: ``len``,
    :meth:`subset` and :meth:`collate` (which :func:`~fedlora.data.batching.collate` and
    :func:`~fedlora.data.batching.subset` call).

    Attributes
    ----------
    ds : datasets.Dataset
        With the loaded ``image`` column (:func:`resolve_images` cells).
    labels : list of int
        Class ids by row.
    processor : object
        The model's image processor (or CLIP processor): resize, crop, normalise.
    prompts : dict of str to Tensor, optional
        CLIP: the tokenized prompt of every class (``input_ids``, ``attention_mask``), sent
        with every batch; None for an image classifier.
    augment : bool
        Augment each decoded image (:func:`augmented`): training data only.
    """

    ds: Any
    labels: list[int]
    processor: Any
    prompts: dict[str, torch.Tensor] | None = None
    augment: bool = False
    task_ids: list[int] | None = None
    skipped: set[int] = field(default_factory=set)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: list[int]) -> ImageExamples:
        indices = list(indices)
        return ImageExamples(
            self.ds.select(indices), [self.labels[i] for i in indices], self.processor, self.prompts, self.augment
        )

    def _decode(self, row: int) -> Any:
        """Row ``row``'s image as RGB, or None (said once per row) when it fails to decode."""
        if row in self.skipped:
            return None
        cell = self.ds[row][IMAGE]
        try:
            with open_image(cell["bytes"], cell["path"]) as img:
                img.load()
                return img.convert("RGB")  # grayscale, palette and RGBA images become RGB
        except Exception as err:  # noqa: BLE001 - a file changed or truncated since it was checked
            self.skipped.add(row)
            what = cell["path"] or f"row {row + 1}'s bytes"
            print(f"fedlora: skipped image {what}: {str(err).splitlines()[0] if str(err) else err!r}", file=sys.stderr)
            return None

    def _good(self, row: int) -> tuple[int, Any]:
        """The first row from ``row`` on (cyclically) whose image decodes, and that image."""
        for offset in range(len(self)):
            candidate = (row + offset) % len(self)
            img = self._decode(candidate)
            if img is not None:
                return candidate, img
        raise DataError(f"no image of these {len(self)} examples decodes (see the lines above)")

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """The batch of rows ``indices``: ``pixel_values``, ``labels`` and the class prompts."""
        rows, images = zip(*(self._good(i) for i in indices))
        if self.augment:
            images = [augmented(img) for img in images]
        batch = {"pixel_values": self.processor(images=list(images), return_tensors="pt")["pixel_values"]}
        batch["labels"] = torch.tensor([self.labels[r] for r in rows], dtype=torch.long)
        if self.prompts is not None:
            batch.update(self.prompts)
        return batch


def class_prompts(processor: Any, labels: list[str], template: str) -> dict[str, torch.Tensor]:
    """CLIP's text inputs: ``template`` with each class name for ``{label}``, tokenized by the
    model's processor (SigLIP was trained on prompts padded to its maximum length)."""
    texts = [template.replace("{label}", name) for name in labels]
    padding: Any = "max_length" if "siglip" in type(processor).__name__.lower() else True
    tokens = processor(text=texts, padding=padding, truncation=True, return_tensors="pt")
    return {k: tokens[k] for k in ("input_ids", "attention_mask") if k in tokens}


def encode_images(
    ds: Any, processor: Any, task: str, labels: list[str], template: str, augment: bool = False
) -> ImageExamples:
    """``ds`` (loaded ``image`` and ``labels`` columns) as :class:`ImageExamples` for ``task``."""
    prompts = class_prompts(processor, labels, template) if task == "clip" else None
    return ImageExamples(ds, list(ds["labels"]), processor, prompts, augment)


def read_device_images(data: Any, path: Path) -> Any:
    """A device's own images (``fedlora-client --data``): an image folder (its ``train/`` split
    when it has one) or a csv/jsonl/parquet file, with ``image`` and ``label`` (strings) columns,
    every header checked.

    Raises
    ------
    DataError
        One line naming the file (and row) and the key, as for the server's data.
    """
    from fedlora.data.labels import _as_str
    from fedlora.data.sources import _read_local, _require_columns

    if path.is_dir():
        ds, _ = read_image_folder(path, data.image_column, data.label_column, "--data ")
        where, base = f"--data {path}", None
    elif path.is_file():
        ds, where, base = _read_local(path), f"data file {path}", path.parent.resolve()
    else:
        raise DataError(f"--data {path}: no such file or folder")
    _require_columns(ds, [("data.image_column", data.image_column), ("data.label_column", data.label_column)], where)
    if len(ds) == 0:
        raise DataError(f"{where}: no examples")
    ds = resolve_images(ds.select_columns([data.image_column, data.label_column]), data.image_column, base, where)
    renames = {c: n for c, n in ((data.image_column, IMAGE), (data.label_column, "label")) if c != n}
    return _as_str(ds.rename_columns(renames), "label")


def encode_examples(ds: Any, run: Any, tokenizer: Any, labels: list[str], *, train: bool = False) -> Any:
    """``ds`` ready for batching for ``run``'s model: :class:`ImageExamples` for an image task
    (augmented when ``train`` and ``data.augment``), else tokenized text
    (:func:`fedlora.data.instruct.encode_rows`). ``tokenizer`` is the loaded model's tokenizer
    or processor; ``labels`` the run's class names (CLIP's prompts)."""
    from fedlora.config import is_image_task
    from fedlora.data.instruct import encode_rows

    if not is_image_task(run.model.task):
        return encode_rows(ds, run.data, tokenizer, run.model.max_length)
    augment = train and run.data.augment
    return encode_images(ds, tokenizer, run.model.task, labels, run.data.prompt_template, augment)


def class_names(ds: Any, column: str) -> Any:
    """``ds`` with a ``ClassLabel`` column (a hub dataset's integer labels) as its class names:
    CLIP's prompts need "cat", not "3"."""
    from datasets import ClassLabel, Value

    feature = ds.features.get(column)
    if not isinstance(feature, ClassLabel):
        return ds
    names = feature.names
    features = ds.features.copy()
    features[column] = Value("string")
    return ds.map(lambda b: {column: [names[i] for i in b[column]]}, batched=True, features=features)


def check_device_folder(path: Path) -> None:
    """``fedlora-client --data`` naming a folder: it must be an image folder whose every image
    reads (its header), checked before the device connects; a DataError (one line) otherwise."""
    if not looks_like_image_folder(path):
        raise DataError(f"--data {path}: a folder must hold <label>/ folders of images (or train/<label>/)")
    from fedlora.config import DataConfig

    read_device_images(DataConfig(), path)
