"""The skip manifest: every sample that was dropped, with why, so that nothing is dropped silently.

Loaders record rows they drop while reading a dataset (missing image file, malformed line, duplicate id, empty
caption, ...) and the collator records images that fail to decode during training; each sample once per run,
however many epochs meet it. When the manifest has a path, each record is appended to that JSON Lines file at
once, so the record survives a crash mid-epoch.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter
from pathlib import Path
from typing import Any

__all__ = ["SkipManifest", "report_skips"]

logger = logging.getLogger("medblip_peft.data")


class SkipManifest:
    """Records of skipped samples, optionally mirrored line by line to a ``skipped.jsonl`` file.

    Args:
        path: the JSON Lines file to append records to, or ``None`` to keep them in memory only. The file is
            opened in append mode and never truncated, so a resumed run continues the same file.
        write: whether this process writes to ``path``. Pass ``write=False`` in data-loader workers and
            non-main distributed ranks: only the process that owns the run directory should write to it,
            otherwise ranks would interleave duplicate lines.

    Each record is a dict with the keys ``id``, ``path``, ``reason``, ``stage`` and ``detail``.
    ``records`` holds only what this object recorded (not older lines already in the file; see ``load``).
    """

    def __init__(self, path: str | Path | None = None, *, write: bool = True) -> None:
        self.path = Path(path) if path is not None else None
        self.write = write
        self._records: list[dict[str, Any]] = []
        self._seen: dict[tuple[Any, Any, Any], dict[str, Any]] = {}
        # The collator may record from several threads (e.g. a threaded prefetcher); the lock keeps records and
        # file lines in the same order and lines whole.
        self._lock = threading.Lock()

    def add(
        self,
        *,
        id: str | None,
        path: str | None,
        reason: str,
        stage: str = "load",
        detail: str | None = None,
    ) -> dict[str, Any]:
        """Record one skipped sample and return the record.

        Args:
            id: the sample's id (e.g. ``ROCO_00020``), or ``None`` when the source has none.
            path: the image file, or ``file:line`` for a text line that could not be parsed.
            reason: a short category (``"missing"``, ``"truncated"``, ``"duplicate"``, ...); ``summary``
                counts by it.
            stage: where it was skipped, e.g. ``"parse"`` (reading caption files), ``"load"`` (building the
                dataset: missing image files) or ``"collate"`` (the image failed to decode in a batch).
            detail: optional free text, e.g. the decoder's error message.

        A sample is recorded once per manifest: adding the same ``(id, path, reason)`` again (the collator meets
        a bad image every epoch; a resumed run re-reads the caption files) returns the first record and writes
        nothing. Records with neither an id nor a path cannot be told apart and are always added.
        """
        record = {"id": id, "path": path, "reason": reason, "stage": stage, "detail": detail}
        key = (id, path, reason)
        with self._lock:
            if id is not None or path is not None:
                if key in self._seen:
                    return self._seen[key]
                self._seen[key] = record
            self._records.append(record)
            if self.path is not None and self.write:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                # One open/append/close per record: slower than a held handle, but every line is on disk
                # before the next sample is processed, and no handle is left open across fork().
                with self.path.open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        return record

    @property
    def records(self) -> list[dict[str, Any]]:
        """A copy of the records, oldest first."""
        with self._lock:
            return list(self._records)

    @property
    def count(self) -> int:
        """How many samples were recorded."""
        return len(self._records)

    def __len__(self) -> int:
        return len(self._records)

    def __bool__(self) -> bool:
        # Without this an empty manifest would be falsy (because of __len__), and the common idiom
        # `manifest = manifest or SkipManifest()` would silently replace the caller's manifest with a new one.
        return True

    def __repr__(self) -> str:
        return f"SkipManifest(path={self.path!r}, count={self.count}, summary={self.summary()})"

    def summary(self) -> dict[str, int]:
        """Counts per reason, sorted by reason: e.g. ``{"duplicate": 1, "missing": 3}``."""
        with self._lock:
            counts = Counter(r["reason"] for r in self._records)
        return dict(sorted(counts.items()))

    @classmethod
    def coerce(cls, x: SkipManifest | str | Path | None) -> SkipManifest:
        """Return ``x`` itself when it is a manifest, a manifest writing to ``x`` when it is a path, or an
        in-memory manifest when it is ``None``."""
        if isinstance(x, cls):
            return x
        if x is None:
            return cls()
        if isinstance(x, (str, Path)):
            return cls(x)
        raise TypeError(f"manifest must be a SkipManifest, a path or None, not {type(x).__name__}")

    @classmethod
    def load(cls, path: str | Path, *, write: bool = True) -> SkipManifest:
        """Read an existing ``skipped.jsonl`` into a manifest that keeps appending to the same file."""
        manifest = cls(path, write=write)
        p = Path(path)
        if p.exists():
            with p.open(encoding="utf-8") as fh:
                manifest._records = [json.loads(line) for line in fh if line.strip()]
            manifest._seen = {(r["id"], r["path"], r["reason"]): r for r in manifest._records}
        return manifest


def report_skips(manifest: SkipManifest, first_record: int, where: str, *, kept: int) -> None:
    """One warning line per load with the skip counts by reason; an error when nothing is left."""
    skipped = manifest.records[first_record:]
    if not skipped:
        return
    counts = dict(sorted(Counter(r["reason"] for r in skipped).items()))
    saved = f"in {manifest.path}" if manifest.path is not None else "in the in-memory skip manifest"
    message = f"{where}: kept {kept} rows, skipped {len(skipped)} {counts}; each is recorded {saved}"
    if kept == 0:
        raise ValueError(
            f"{message}. Nothing is left to train on: check the image folder and the caption column."
        )
    logger.warning(message)
