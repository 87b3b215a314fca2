"""The bad-input catalogue end to end: one generated fixture per case in a ROCO-layout dataset, trained
through `adapt()`. Every bad sample is one line of ``skipped.jsonl`` (however many epochs meet it) and is
counted; every good one, in every odd format, is trained on; nothing crashes; ``max_bad_fraction`` stops
broken datasets; and ``docs/reliability.md`` documents each case.
"""

from __future__ import annotations

import io
import json
import struct
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medblip_peft import adapt, checkpointing
from medblip_peft.checkpointing import TooManyBadSamplesError
from medblip_peft.data.collate import CaptionCollator
from medblip_peft.data.images import BadImageError, load_image

DOCS = Path(__file__).parent.parent / "docs" / "reliability.md"
LONG_CAPTION = " ".join(["axial ct of the abdomen showing a mass in the left upper zone"] * 12)


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _picture(seed: int, mode: str = "L") -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 255, (32, 32), np.uint8)
    return Image.fromarray(pixels, mode="L").convert(mode)


def _bomb() -> bytes:
    """A PNG whose header claims 10000×10000 pixels: rejected from the header, before any decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 10_000, 10_000, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )


def _corrupt_png() -> bytes:
    png = bytearray(_encode(_picture(1), "PNG"))
    png[60:160] = bytes(100)  # the compressed pixel stream is zeroed; header and IEND stay intact
    return bytes(png)


def _dicom() -> bytes:
    from test_images import _CT, _CT_WINDOW, _dicom_bytes

    return _dicom_bytes(np.tile(_CT, (8, 8)), **_CT_WINDOW)


# case -> (image bytes, or None for no file; the captions.txt text after the tab, or None for a plain caption;
# the manifest reason, or None when the sample must be trained on). One row per case, its id from its name.
Case = tuple[Callable[[], bytes | None], bytes | None, str | None]
CASES: dict[str, Case] = {
    "corrupt JPEG": (lambda: _encode(_picture(2), "JPEG")[:200] + bytes(600) + b"\xff\xd9", None, "corrupt"),
    "corrupt PNG": (_corrupt_png, None, "corrupt"),
    "truncated file": (lambda: _encode(_picture(3), "JPEG")[:300], None, "truncated"),
    "zero-byte file": (lambda: b"", None, "zero-byte"),
    "missing file": (lambda: None, None, "missing"),
    "non-image with an image extension": (lambda: b"<!DOCTYPE html><html>404</html>", None, "not-an-image"),
    "decompression bomb": (_bomb, None, "decompression-bomb"),
    "1x1 image": (lambda: _encode(Image.new("L", (1, 1)), "PNG"), None, "too-small"),
    "16-bit grayscale PNG": (
        lambda: _encode(Image.fromarray(np.full((32, 32), 40_000, np.uint16)), "PNG"),
        None,
        None,
    ),
    "CMYK": (lambda: _encode(_picture(4, "CMYK"), "JPEG"), None, None),
    "RGBA": (lambda: _encode(_picture(5, "RGBA"), "PNG"), None, None),
    "palette": (lambda: _encode(_picture(6, "P"), "PNG"), None, None),
    "DICOM": (_dicom, None, None),
    "empty caption": (lambda: _encode(_picture(7), "JPEG"), b"", "empty-caption"),
    "whitespace-only caption": (lambda: _encode(_picture(8), "JPEG"), b" \t  ", "empty-caption"),
    "caption longer than the maximum": (
        lambda: _encode(_picture(9), "JPEG"),
        b" " + LONG_CAPTION.encode(),
        None,
    ),
    "non-UTF-8 bytes in captions.txt": (lambda: _encode(_picture(10), "JPEG"), b" ct l\xe9sion", "non-utf8"),
    "duplicate image id": (lambda: _encode(_picture(11), "JPEG"), None, "duplicate"),
    "captions.txt line without a tab": (lambda: _encode(_picture(12), "JPEG"), None, "malformed"),
}
GOOD_ROWS = 8
COLLATE_STAGE = {"corrupt", "truncated", "zero-byte", "not-an-image", "decompression-bomb", "too-small"}


def _id(case: str) -> str:
    return "ROCO_" + "".join(c if c.isalnum() else "_" for c in case)


def build_roco(root: Path) -> tuple[dict[str, str], int]:
    """Write the catalogue in ROCO's layout (every image named .jpg, as in ROCO). Returns id -> caption of the
    rows that must be trained on, and how many rows the loaded dataset holds (those, and undecodable ones)."""
    folder = root / "data" / "train" / "radiology"
    (folder / "images").mkdir(parents=True)
    lines: list[bytes] = []
    trained: dict[str, str] = {}
    for i in range(GOOD_ROWS):
        image_id = f"ROCO_GOOD_{i}"
        _picture(100 + i, "RGB").save(folder / "images" / f"{image_id}.jpg")
        trained[image_id] = f"chest radiograph {i} showing a nodule"
        lines.append(f"{image_id}\t {trained[image_id]}".encode())
    for case, (make_image, text, reason) in CASES.items():
        image_id = _id(case)
        data = make_image()
        if data is not None:
            (folder / "images" / f"{image_id}.jpg").write_bytes(data)
        text = text if text is not None else f" axial ct {case.lower()}".encode()
        if case == "captions.txt line without a tab":
            lines.append(image_id.encode() + b" " + text)
            continue
        lines.append(image_id.encode() + b"\t" + text)
        if case == "duplicate image id":  # the first line is kept; the repeated id is the bad sample
            lines.append(image_id.encode() + b"\t another caption for the same image")
        if reason is None or case == "duplicate image id":
            trained[image_id] = text.decode().strip()
    (folder / "captions.txt").write_bytes(b"\n".join(lines) + b"\n")
    undecodable = sum(reason in COLLATE_STAGE for _, _, reason in CASES.values())
    return trained, len(trained) + undecodable


@pytest.fixture
def captions_seen(monkeypatch) -> list[str]:
    """Every caption the collator batches (before truncation)."""
    seen: list[str] = []
    real = CaptionCollator.encode_texts

    def recording(self, captions):
        seen.extend(captions)
        return real(self, captions)

    monkeypatch.setattr(CaptionCollator, "encode_texts", recording)
    return seen


def test_catalogue_through_adapt(tmp_path, tiny, quick, captions_seen):
    trained, rows = build_roco(tmp_path / "roco")
    model, processor = tiny
    settings = {**quick, "max_steps": None, "num_epochs": 2, "batch_size": 9, "max_caption_tokens": 48}
    result = adapt(model, str(tmp_path / "roco"), strategy="decoder", processor=processor,
                   output_dir=tmp_path / "out", max_bad_fraction=None, **settings)  # fmt: skip

    lines = [json.loads(x) for x in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    expected = {case: reason for case, (_, _, reason) in CASES.items() if reason is not None}
    by_reason = sorted(((r["reason"], r["id"]) for r in lines), key=str)
    # A line without a tab has no trustworthy id: its record names the file and line instead (checked below).
    ids = {case: None if reason == "malformed" else _id(case) for case, reason in expected.items()}
    assert by_reason == sorted(((reason, ids[case]) for case, reason in expected.items()), key=str)
    assert len(lines) == len(expected)  # one line per bad sample, though both epochs met the bad images
    for record in lines:
        assert record["path"] and set(record) == {"id", "path", "reason", "stage", "detail"}
    captions_file = tmp_path / "roco" / "data" / "train" / "radiology" / "captions.txt"
    numbered = enumerate(captions_file.read_bytes().splitlines(), 1)
    no_tab = next(
        n for n, line in numbered if line.startswith(_id("captions.txt line without a tab").encode())
    )
    assert next(r for r in lines if r["reason"] == "malformed")["path"] == f"{captions_file}:{no_tab}"
    assert result.skipped == result.metrics["skipped_samples"] == len(expected)
    # Every good sample, whatever its format, was trained on in both epochs; nothing else was.
    assert sorted(set(captions_seen)) == sorted(trained.values())
    assert len(captions_seen) == 2 * len(trained)
    assert result.truncated_captions == 2  # the long caption, truncated (and counted) in each epoch
    assert len([h for h in result.history if "loss" in h]) == 2 * -(-rows // 9)  # every batch trained


def test_dicom_without_the_extra_is_a_clear_error(monkeypatch):
    data = _dicom()
    monkeypatch.setitem(sys.modules, "pydicom", None)  # `import pydicom` now raises ImportError
    with pytest.raises(BadImageError, match=r'pip install "medblip-peft\[dicom\]"') as info:
        load_image({"bytes": data, "path": "/data/ct.jpg"})
    assert info.value.reason == "dicom-extra-missing" and "/data/ct.jpg" in str(info.value)


def test_max_bad_fraction_stops_at_load(tmp_path, tiny, quick):
    build_roco(tmp_path / "roco")
    model, processor = tiny
    with pytest.raises(
        TooManyBadSamplesError, match=r"skipped as bad, more than max_bad_fraction=0\.01.*skipped\.jsonl"
    ):
        adapt(model, str(tmp_path / "roco"), strategy="decoder", processor=processor,
              output_dir=tmp_path / "out", max_bad_fraction=0.01, **quick)  # fmt: skip
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_max_bad_fraction_stops_mid_training_on_undecodable_images(tmp_path, tiny, quick, monkeypatch):
    """Decode failures surface only in the collator: the run stops at the first step past the threshold."""
    root = tmp_path / "jsonl"
    root.mkdir()
    rows = []
    for i in range(12):
        name = f"img{i}.png"
        data = b"" if i % 4 == 0 else _encode(_picture(i), "PNG")  # 3 of 12 are zero-byte files
        (root / name).write_bytes(data)
        rows.append(json.dumps({"image": name, "caption": f"ct scan {i}", "id": f"row{i}"}))
    (root / "data.jsonl").write_text("\n".join(rows))
    checks: list[int] = []
    real_check = checkpointing.check_bad_fraction

    def recording_check(bad, total, limit, path):
        checks.append(bad)
        real_check(bad, total, limit, path)

    monkeypatch.setattr(checkpointing, "check_bad_fraction", recording_check)
    model, processor = tiny
    with pytest.raises(TooManyBadSamplesError, match=r"of 12 samples"):
        # "full" trains the vision tower, so no vision-feature cache decodes every image up front.
        adapt(model, str(root / "data.jsonl"), strategy="full", processor=processor,
              output_dir=tmp_path / "out", max_bad_fraction=0.1, **{**quick, "batch_size": 4})  # fmt: skip
    assert not (tmp_path / "out" / "model.safetensors").exists()
    recorded = [json.loads(r) for r in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert recorded and {r["reason"] for r in recorded} == {"zero-byte"}
    # Loading found nothing wrong (0 bad); a check after an optimizer step found more than 10% and stopped.
    assert checks[0] == 0 and checks[-1] / 12 > 0.1 and len(checks) >= 2


def test_every_case_is_documented():
    table = DOCS.read_text(encoding="utf-8")
    for case, (_, _, reason) in CASES.items():
        assert f"| {case} |" in table, f"{case!r} is missing from the bad-input table in {DOCS.name}"
        if reason is not None:
            assert f"`{reason}`" in table


def test_manifest_keeps_one_line_per_sample_across_epochs_and_resumes(tmp_path):
    from medblip_peft.data.manifest import SkipManifest

    path = tmp_path / "skipped.jsonl"
    first = SkipManifest(path)
    for _ in range(3):  # e.g. three epochs meet the same bad image
        first.add(id="a", path="a.jpg", reason="truncated", stage="collate")
    first.add(id="a", path="a.jpg", reason="corrupt", stage="collate")  # another reason is another record
    first.add(id=None, path=None, reason="empty-caption")  # cannot be told apart from others: always added
    first.add(id=None, path=None, reason="empty-caption")
    assert first.count == 4 and len(path.read_text().splitlines()) == 4

    resumed = SkipManifest.load(path)  # a resumed run re-reads the data and meets the same samples again
    resumed.add(id="a", path="a.jpg", reason="truncated", stage="collate")
    resumed.add(id="b", path="b.jpg", reason="missing", stage="load")
    assert resumed.count == 5 and len(path.read_text().splitlines()) == 5
