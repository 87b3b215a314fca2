"""ROCO in its original layout (razorx89/ROCO): ``captions.txt``, keywords, CUIs, semantic types, licences.

Rows that cannot be used (missing image file, malformed or non-UTF-8 line, duplicate id, empty caption) are
dropped, each recorded in the ``SkipManifest``, and summarised in one warning per call. See ``docs/data.md``.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import datasets
from datasets import Dataset, Features, Value

from medblip_peft.data.manifest import SkipManifest, report_skips

__all__ = ["find_roco_dir", "load_roco"]

logger = logging.getLogger(__name__)

_ROCO_FEATURES = Features(
    {
        "image_id": Value("string"),
        "image": Value("string"),
        "caption": Value("string"),
        "keywords": datasets.Sequence(Value("string")),
        "cuis": datasets.Sequence(Value("string")),
        "semtype_ids": datasets.Sequence(Value("string")),
        "semtypes": datasets.Sequence(Value("string")),
        "license": Value("string"),
    }
)
_SEMTYPE_ID = re.compile(r"T\d{3}")


def load_roco(
    root: str | Path,
    split: str = "train",
    *,
    subset: str = "radiology",
    manifest: SkipManifest | str | Path | None = None,
    require_images: bool = True,
) -> Dataset:
    """Load one split of ROCO in its original (razorx89/ROCO) layout.

    Args:
        root: the dataset root (holding ``data/<split>/<subset>/``), a folder holding ``<split>/<subset>/``,
            or the ``<split>/<subset>`` folder itself (the one with ``captions.txt``).
        split: ``"train"``, ``"validation"`` or ``"test"``.
        subset: ``"radiology"`` or ``"non-radiology"``.
        manifest: where skipped rows are recorded (a ``SkipManifest``, a ``skipped.jsonl`` path, or ``None``
            for an in-memory one).
        require_images: drop (and record) rows whose ``images/<ROCO_ID>.jpg`` is missing. ``False`` keeps every
            row, for text-only use of the caption files.

    Returns:
        A dataset in ``captions.txt`` order with the columns ``image_id``, ``image`` (the path string),
        ``caption`` (stripped), ``keywords``, ``cuis``, ``semtype_ids`` (UMLS type codes such as ``T060``),
        ``semtypes`` (their names, aligned with ``semtype_ids``) and ``license`` (``None`` when unknown). Rows
        absent from a side file get empty lists.

    Raises:
        FileNotFoundError: no ``captions.txt`` under ``root``, or ``require_images=True`` and the ``images``
            folder does not exist.
        ValueError: every row was skipped.
    """
    manifest = SkipManifest.coerce(manifest)
    first_record = manifest.count
    folder = find_roco_dir(Path(root).expanduser(), split, subset)
    if folder is None:
        tried = ", ".join(
            str(Path(root) / p / "captions.txt") for p in (f"data/{split}/{subset}", f"{split}/{subset}", ".")
        )
        raise FileNotFoundError(
            f"load_roco: no captions.txt found; tried {tried}. Pass the ROCO root (with data/<split>/<subset>/) "
            "or the <split>/<subset> folder itself, and check split= and subset=."
        )
    images_dir = folder / "images"
    if require_images and not images_dir.is_dir():
        raise FileNotFoundError(
            f"load_roco: {images_dir} does not exist; ROCO's text files ship without the images. Fetch them "
            "(scripts/fetch.py in the ROCO repository), or pass require_images=False to use the captions only."
        )

    captions = _parse_captions(folder / "captions.txt", manifest)
    keywords = _parse_side_file(folder / "keywords.txt")
    cuis = _parse_side_file(folder / "cuis.txt")
    semtypes = _parse_side_file(folder / "semtypes.txt")
    licenses = _parse_licences(folder / "licences.txt")
    # One directory listing instead of one stat() per row: ROCO's train split has 65k images in one folder.
    present = {e.name for e in os.scandir(images_dir)} if images_dir.is_dir() else set()

    missing = {i for i in captions if require_images and f"{i}.jpg" not in present}
    for image_id in (i for i in captions if i in missing):  # in file order
        manifest.add(id=image_id, path=str(images_dir / f"{image_id}.jpg"), reason="missing", stage="load")
    ids = [i for i in captions if i not in missing]
    semtype_pairs = [_split_semtypes(semtypes.get(i, [])) for i in ids]
    columns = {
        "image_id": ids,
        "image": [str(images_dir / f"{i}.jpg") for i in ids],
        "caption": [captions[i] for i in ids],
        "keywords": [keywords.get(i, []) for i in ids],
        "cuis": [cuis.get(i, []) for i in ids],
        "semtype_ids": [codes for codes, _ in semtype_pairs],
        "semtypes": [names for _, names in semtype_pairs],
        "license": [licenses.get(i) for i in ids],
    }
    report_skips(manifest, first_record, f"load_roco({folder})", kept=len(ids))
    return Dataset.from_dict(columns, features=_ROCO_FEATURES)


def find_roco_dir(root: Path, split: str, subset: str) -> Path | None:
    for candidate in (root / "data" / split / subset, root / split / subset, root):
        if (candidate / "captions.txt").is_file():
            if candidate == root and (root.name, root.parent.name) != (subset, split):
                logger.info(
                    "ROCO: reading %s directly; split=%r and subset=%r were not needed", root, split, subset
                )
            return candidate
    return None


def _raw_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """Non-blank lines as bytes, without line endings (CRLF too), with 1-based line numbers."""
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            line = raw.rstrip(b"\r\n")
            if line.strip():
                yield lineno, line


def _parse_captions(path: Path, manifest: SkipManifest) -> dict[str, str]:
    """``ROCO_ID<TAB> caption`` lines. Malformed, non-UTF-8, empty and duplicate lines are skipped and recorded.

    Non-UTF-8 lines are skipped rather than decoded with replacement characters: a caption is a training target,
    and a model taught to emit "�" is worse than one trained on a few rows fewer.
    """
    captions: dict[str, str] = {}
    for lineno, line in _raw_lines(path):
        raw_id, tab, raw_caption = line.partition(b"\t")
        image_id: str | None = raw_id.strip().decode("utf-8", errors="replace") or None
        detail = None
        try:
            caption = raw_caption.decode("utf-8").strip()
        except UnicodeDecodeError as err:
            caption, reason, detail = "", "non-utf8", str(err)
        else:
            reason = "empty-caption" if not caption else "duplicate" if image_id in captions else ""
        if not tab or image_id is None:
            image_id, reason = None, "malformed"
            detail = f"expected 'ROCO_ID<TAB>caption', got {line[:60].decode('utf-8', errors='replace')!r}"
        if reason:  # a duplicate keeps the first caption with its id
            manifest.add(id=image_id, path=f"{path}:{lineno}", reason=reason, stage="parse", detail=detail)
        else:
            captions[image_id] = caption
    return captions


def _parse_side_file(path: Path) -> dict[str, list[str]]:
    """``ROCO_ID<TAB><TAB>a<TAB>b…`` lines as id → items; a missing file gives an empty mapping.

    These are auxiliary labels, not training targets, so undecodable bytes are replaced rather than the row
    dropped. The first line for an id wins, as in ``captions.txt``.
    """
    if not path.is_file():
        logger.info("ROCO: %s is absent; its column will hold empty lists", path)
        return {}
    items: dict[str, list[str]] = {}
    for _, line in _raw_lines(path):
        parts = line.decode("utf-8", errors="replace").split("\t")
        items.setdefault(parts[0].strip(), [p.strip() for p in parts[1:] if p.strip()])
    return items


def _split_semtypes(items: list[str]) -> tuple[list[str], list[str]]:
    """``[T060, Diagnostic Procedure, T023, Body Part…]`` → aligned ``(codes, names)``; a code without a name
    gets ``""`` so that the lists stay aligned."""
    codes: list[str] = []
    names: list[str] = []
    for i, item in enumerate(items):
        if _SEMTYPE_ID.fullmatch(item):
            following = items[i + 1] if i + 1 < len(items) else ""
            codes.append(item)
            names.append("" if _SEMTYPE_ID.fullmatch(following) else following)
    return codes, names


def _parse_licences(path: Path) -> dict[str, str]:
    """``ROCO_ID,PMC_ID,CC`` CSV (with a header) as id → licence, e.g. ``CC BY``."""
    if not path.is_file():
        return {}
    text = path.read_bytes().decode("utf-8", errors="replace")
    return {
        row[0].strip(): row[2].strip()
        for row in csv.reader(io.StringIO(text))
        if len(row) >= 3 and row[0] != "ROCO_ID"
    }
