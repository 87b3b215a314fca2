"""Caption datasets from ROCO's original layout, imagefolders, CSV/JSON(L) tables, ``datasets`` objects and the Hub.

Every loader returns a ``datasets.Dataset`` with an ``image`` column (a path string, or whatever the source
holds: a ``{"bytes", "path"}`` dict or a PIL image, all of which ``load_image`` decodes) and a ``caption``
column. Rows that cannot be used (missing image file, malformed or non-UTF-8 line, duplicate id, empty
caption) are dropped, each recorded in the ``SkipManifest``, and summarised in one warning per call: never
silently, and never by crashing. See ``docs/data.md``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset, DatasetDict, Value

from medblip_peft.data.manifest import SkipManifest, report_skips
from medblip_peft.data.roco import find_roco_dir, load_roco
from medblip_peft.templates.card import looks_like_path

__all__ = ["load_caption_dataset", "load_roco"]

logger = logging.getLogger(__name__)

_TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")
_ID_COLUMNS = ("image_id", "id")
_METADATA_FILES = ("metadata.jsonl", "metadata.csv")


# ------------------------------------------------------------------------------------------ generic entry


def load_caption_dataset(
    source: str | os.PathLike[str] | Dataset | DatasetDict,
    *,
    split: str = "train",
    image_column: str = "image",
    caption_column: str = "caption",
    manifest: SkipManifest | str | Path | None = None,
    require_images: bool = True,
) -> Dataset:
    """Load image-caption pairs from any supported source; training and evaluation both start here.

    ``source`` may be:

    * a ``datasets.Dataset`` (or a ``DatasetDict``, from which ``split`` is taken);
    * a ROCO folder (detected by ``captions.txt``; see ``load_roco``, whose column names are fixed);
    * an imagefolder: a folder with ``metadata.jsonl`` or ``metadata.csv`` (also looked for in ``<folder>/<split>/``)
      whose ``file_name`` column holds image paths relative to that folder;
    * a ``.csv``, ``.tsv``, ``.jsonl`` or ``.json`` file whose image paths are absolute or relative to the file's
      folder;
    * any other string that is not an existing path: a Hugging Face Hub dataset id, loaded with
      ``datasets.load_dataset(source, split=split)``.

    Returns a dataset whose ``image`` and ``caption`` columns come from ``image_column`` and ``caption_column``
    (``file_name`` is used when ``image_column="image"`` is absent); other columns are kept. Image features are
    cast to ``Image(decode=False)``, so rows hold ``{"bytes", "path"}`` dicts and decoding happens in
    ``load_image``, where a bad image is skipped and recorded instead of crashing the data loader.

    Raises:
        ValueError: a configured column or split is missing (the message lists the available ones), or every
            row was skipped.
        FileNotFoundError: ``source`` looks like a local path but does not exist.
    """
    manifest = SkipManifest.coerce(manifest)
    opts = {"manifest": manifest, "image_column": image_column, "caption_column": caption_column}
    opts["require_images"] = require_images
    if isinstance(source, (Dataset, DatasetDict)):
        return _from_dataset(_pick_split(source, split, "the given DatasetDict"), "the given dataset", **opts)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"load_caption_dataset() cannot read a {type(source).__name__}; pass a path, a Hub id or a Dataset"
        )
    path = Path(source).expanduser()
    if path.is_dir():
        if find_roco_dir(path, split, "radiology") is not None:
            return load_roco(path, split, manifest=manifest, require_images=require_images)
        for metadata in (folder / name for folder in (path / split, path) for name in _METADATA_FILES):
            if metadata.is_file():
                return _from_table_file(metadata, **opts)
        raise ValueError(
            f"{path} is neither a ROCO folder (no data/{split}/radiology/captions.txt or {split}/radiology/"
            f"captions.txt) nor an imagefolder (no metadata.jsonl or metadata.csv in it or in {split}/). Check "
            "split=, or add a metadata.jsonl with file_name and caption columns."
        )
    if path.is_file():
        if path.suffix.lower() not in _TABLE_SUFFIXES:
            raise ValueError(f"{path}: unsupported file type; pass one of {', '.join(_TABLE_SUFFIXES)}")
        return _from_table_file(path, **opts)
    text = os.fspath(source)
    if not isinstance(source, str) or _looks_like_local_path(text):
        raise FileNotFoundError(
            f"{text} does not exist. Check the path (a Hub dataset id looks like 'owner/name')."
        )
    logger.info("'%s' is not a local path: loading split %r from the Hugging Face Hub", text, split)
    loaded = datasets.load_dataset(text, split=split)
    return _from_dataset(_pick_split(loaded, split, text), text, **opts)


def _looks_like_local_path(text: str) -> bool:
    """A typo in a local path should say "not found", not fail later with a Hub network error. Hub ids are
    ``name`` or ``owner/name``: more than one slash, a leading ``/ . ~`` or a table suffix means a path."""
    return looks_like_path(text) or text.lower().endswith(_TABLE_SUFFIXES)


def _pick_split(source: Any, split: str, where: str) -> Dataset:
    if isinstance(source, DatasetDict):
        if split not in source:
            raise ValueError(
                f"split={split!r} not in {where}; available splits: {sorted(source)}. Pass split= with one of them."
            )
        return source[split]
    if not isinstance(source, Dataset):
        raise TypeError(
            f"{where} gave a {type(source).__name__}, not a datasets.Dataset (streaming is not supported)"
        )
    return source


def _resolve_columns(
    available: Sequence[str], image_column: str, caption_column: str, where: str
) -> tuple[str, str]:
    """Check the configured columns exist; ``file_name`` (the imagefolder convention) stands in for ``image``."""
    if image_column == "image" and "image" not in available and "file_name" in available:
        image_column = "file_name"
    for arg, name in (("image_column", image_column), ("caption_column", caption_column)):
        if name not in available:
            raise ValueError(
                f"`{arg}={name!r}` not found in {where}; available columns: {list(available)}. "
                f"Pass `{arg}=` with one of them."
            )
    return image_column, caption_column


def _from_dataset(
    ds: Dataset,
    where: str,
    *,
    manifest: SkipManifest,
    image_column: str,
    caption_column: str,
    require_images: bool,
    first_record: int | None = None,
) -> Dataset:
    first_record = manifest.count if first_record is None else first_record
    image_column, caption_column = _resolve_columns(ds.column_names, image_column, caption_column, where)
    for old, new in ((image_column, "image"), (caption_column, "caption")):
        if old != new:
            if new in ds.column_names:  # the configured column replaces a same-named one
                ds = ds.remove_columns(new)
            ds = ds.rename_column(old, new)
    feature = ds.features["image"]
    if isinstance(feature, datasets.Image) and feature.decode:
        ds = ds.cast_column("image", datasets.Image(decode=False))
    # Only path strings can be checked cheaply; reading an Image column would pull every image's bytes.
    check_files = (
        require_images and isinstance(feature, Value) and feature.dtype in ("string", "large_string")
    )
    images = ds["image"] if check_files else [None] * len(ds)
    keep = []
    for index, (image, caption, row_id) in enumerate(zip(images, ds["caption"], _row_ids(ds))):
        if caption is None or (isinstance(caption, str) and not caption.strip()):
            reason = "empty-caption"
        elif not isinstance(caption, str):
            reason = "malformed"  # e.g. a list of captions: pick a column of strings
        elif check_files and not (isinstance(image, str) and os.path.isfile(image)):
            reason = "missing"
        else:
            keep.append(index)
            continue
        manifest.add(id=row_id, path=image if isinstance(image, str) else None, reason=reason, stage="load")
    report_skips(manifest, first_record, where, kept=len(keep))
    return ds if len(keep) == len(ds) else ds.select(keep)


def _from_table_file(
    path: Path, *, manifest: SkipManifest, image_column: str, caption_column: str, **opts: Any
) -> Dataset:
    """A CSV/TSV/JSON(L) table as a dataset: image paths resolved against the table's folder, captions stripped."""
    first_record = manifest.count
    records = _read_records(path, manifest)
    available = list(dict.fromkeys(key for record in records for key in record))
    image_column, caption_column = _resolve_columns(available, image_column, caption_column, str(path))
    for record in records:
        if isinstance(record.get(image_column), str):
            record[image_column] = str(path.parent / record[image_column])  # an absolute path stays as it is
        if isinstance(record.get(caption_column), str):
            record[caption_column] = record[caption_column].strip()
    return _from_dataset(
        Dataset.from_dict({key: [record.get(key) for record in records] for key in available}),
        str(path),
        manifest=manifest,
        image_column=image_column,
        caption_column=caption_column,
        first_record=first_record,
        **opts,
    )


def _read_records(path: Path, manifest: SkipManifest) -> list[dict[str, Any]]:
    """Rows of a CSV/TSV/JSON/JSONL file. Rows with undecodable bytes or invalid JSON are skipped and recorded."""
    raw = path.read_bytes()
    try:
        text, lossy = raw.decode("utf-8-sig"), False
    except UnicodeDecodeError:
        text, lossy = raw.decode("utf-8-sig", errors="replace"), True
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records: list[Any] = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    manifest.add(
                        id=None, path=f"{path}:{lineno}", reason="malformed", stage="parse", detail=str(err)
                    )
    elif suffix == ".json":
        data = json.loads(text)
        # Both record lists ([{...}, ...]) and column dicts ({"image": [...], "caption": [...]}) are accepted.
        records = (
            data if isinstance(data, list) else [dict(zip(data, values)) for values in zip(*data.values())]
        )
    else:
        records = list(csv.DictReader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ","))
    good: list[dict[str, Any]] = []
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            reason = "malformed"  # e.g. a JSON list holding a bare string
        elif lossy and "\ufffd" in json.dumps(record, ensure_ascii=False):
            reason = "non-utf8"  # see roco.py's caption parser: a caption with "�" is skipped, not trained on
        else:
            good.append(record)
            continue
        manifest.add(id=None, path=f"{path} row {index}", reason=reason, stage="parse")
    return good


def _row_ids(ds: Dataset) -> list[str | None]:
    """Ids for manifest records, from an ``image_id`` or ``id`` column when there is one."""
    for name in _ID_COLUMNS:
        if name in ds.column_names:
            return [None if v is None else str(v) for v in ds[name]]
    return [None] * len(ds)
