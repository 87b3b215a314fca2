"""load_roco, load_caption_dataset and the SkipManifest, on fixtures copied from the real ROCO text files."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import datasets
import pytest
from datasets import Dataset, DatasetDict
from PIL import Image

from medblip_peft.data.images import load_image
from medblip_peft.data.loaders import load_caption_dataset, load_roco
from medblip_peft.data.manifest import SkipManifest

FIXTURE = Path(__file__).parent / "fixtures" / "roco"
IDS = ["ROCO_00020", "ROCO_00027", "ROCO_00059", "ROCO_00062", "ROCO_02867", "ROCO_05014"]


def _image(path: Path, value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 8), value).save(path)
    return path


@pytest.fixture
def roco_root(tmp_path: Path) -> Path:
    """The fixture in ROCO's original layout, with an image for every row except ROCO_00027."""
    root = tmp_path / "roco"
    shutil.copytree(FIXTURE, root)
    for image_id in IDS:
        if image_id != "ROCO_00027":
            _image(root / "data" / "validation" / "radiology" / "images" / f"{image_id}.jpg")
    return root


# ------------------------------------------------------------------------------------------------- ROCO


def test_missing_image_is_dropped_recorded_and_counted(
    roco_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    manifest = SkipManifest()
    with caplog.at_level(logging.WARNING, logger="medblip_peft.data.loaders"):
        ds = load_roco(roco_root, "validation", manifest=manifest)
    assert ds["image_id"] == [i for i in IDS if i != "ROCO_00027"]
    assert [(r["id"], r["reason"]) for r in manifest.records] == [("ROCO_00027", "missing")]
    assert manifest.records[0]["path"].endswith("images/ROCO_00027.jpg")
    assert manifest.count == len(manifest) == 1 and manifest.summary() == {"missing": 1}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "kept 5 rows, skipped 1 {'missing': 1}" in warnings[0]


def test_roco_columns(roco_root: Path) -> None:
    rows = {row["image_id"]: row for row in load_roco(roco_root, "validation")}
    first = rows["ROCO_00020"]
    assert first["caption"].startswith(
        "Axial computed tomography scan of the pelvis"
    )  # leading space stripped
    assert first["caption"] == first["caption"].strip()
    assert first["keywords"][:3] == ["pelvi", "scan", "wall"]
    assert first["cuis"][:2] == ["C4300092", "C0040395"] and len(first["cuis"]) == 17
    assert first["semtype_ids"][:2] == ["T046", "T061"]
    assert first["semtypes"][:2] == ["Pathologic Function", "Therapeutic or Preventive Procedure"]
    assert len(first["semtype_ids"]) == len(first["semtypes"]) == 9
    assert first["license"] == "CC BY" and rows["ROCO_00059"]["license"] == "NO-CC CODE"
    assert "(A) – venous drainage" in rows["ROCO_00059"]["caption"]  # UTF-8 en dash decoded
    assert rows["ROCO_02867"]["cuis"] == [] and rows["ROCO_02867"]["semtypes"] == []  # "ROCO_ID<TAB>" rows
    assert rows["ROCO_05014"]["keywords"] == []
    assert Path(first["image"]).is_file()


@pytest.mark.parametrize("relative", ["", "data", "data/validation/radiology"])
def test_roco_root_forms(roco_root: Path, relative: str) -> None:
    assert len(load_roco(roco_root / relative, "validation")) == 5


def test_roco_text_only_and_missing_images_folder(tmp_path: Path) -> None:
    shutil.copytree(FIXTURE, tmp_path / "roco")
    ds = load_roco(tmp_path / "roco", "validation", require_images=False)
    assert ds["image_id"] == IDS and ds[0]["image"].endswith("images/ROCO_00020.jpg")
    with pytest.raises(FileNotFoundError, match="require_images=False"):
        load_roco(tmp_path / "roco", "validation")
    with pytest.raises(FileNotFoundError, match=r"no captions\.txt found"):
        load_roco(tmp_path / "roco", "train")


def test_manifest_file_is_written_per_record(roco_root: Path, tmp_path: Path) -> None:
    path = tmp_path / "run" / "skipped.jsonl"
    load_roco(roco_root, "validation", manifest=str(path))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["id"], r["reason"], r["stage"]) for r in lines] == [("ROCO_00027", "missing", "load")]


def test_malformed_caption_lines_are_recorded_not_fatal(tmp_path: Path) -> None:
    folder = tmp_path / "validation" / "radiology"
    folder.mkdir(parents=True)
    (folder / "captions.txt").write_bytes(
        b"ROCO_00001\t Chest radiograph.\n"
        b"ROCO_00002 no tab here\n"
        b"ROCO_00003\t Caf\xe9 au lait spots.\n"  # Latin-1, not UTF-8
        b"ROCO_00001\t A second caption for the same id.\n"
        b"ROCO_00005\t   \n"
        b"\n"
        b"ROCO_00006\t Axial CT.\r\n"
    )
    manifest = SkipManifest()
    ds = load_roco(tmp_path, "validation", manifest=manifest, require_images=False)
    assert ds["image_id"] == ["ROCO_00001", "ROCO_00006"]
    assert ds["caption"] == ["Chest radiograph.", "Axial CT."]
    assert [(r["id"], r["reason"], r["path"].rsplit(":", 1)[1]) for r in manifest.records] == [
        (None, "malformed", "2"),
        ("ROCO_00003", "non-utf8", "3"),
        ("ROCO_00001", "duplicate", "4"),
        ("ROCO_00005", "empty-caption", "5"),
    ]
    assert manifest.summary() == {"duplicate": 1, "empty-caption": 1, "malformed": 1, "non-utf8": 1}
    assert ds[0]["keywords"] == [] and ds[0]["license"] is None  # absent side files


def test_all_rows_skipped_is_an_error(roco_root: Path) -> None:
    shutil.rmtree(roco_root / "data" / "validation" / "radiology" / "images")
    (roco_root / "data" / "validation" / "radiology" / "images").mkdir()
    manifest = SkipManifest()
    with pytest.raises(ValueError, match="kept 0 rows, skipped 6"):
        load_roco(roco_root, "validation", manifest=manifest)
    assert manifest.summary() == {"missing": 6}


# ------------------------------------------------------------------------------------ load_caption_dataset


def test_roco_folder_is_detected(roco_root: Path) -> None:
    manifest = SkipManifest()
    ds = load_caption_dataset(roco_root, split="validation", manifest=manifest)
    assert len(ds) == 5 and {"image", "caption", "cuis"} <= set(ds.column_names)
    assert manifest.summary() == {"missing": 1}


def test_imagefolder_with_metadata_jsonl(tmp_path: Path) -> None:
    _image(tmp_path / "imgs" / "a.png")
    _image(tmp_path / "imgs" / "b.png")
    rows = [
        {"file_name": "imgs/a.png", "text": "  MRI of the brain. ", "site": 1},
        {"file_name": "imgs/b.png", "text": "CT of the chest."},
        {"file_name": "imgs/gone.png", "text": "Lost."},
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    manifest = SkipManifest()
    ds = load_caption_dataset(tmp_path, caption_column="text", manifest=manifest)
    assert ds["caption"] == ["MRI of the brain.", "CT of the chest."]
    assert ds[0]["image"] == str(tmp_path / "imgs" / "a.png") and ds[0]["site"] == 1
    assert "file_name" not in ds.column_names and "text" not in ds.column_names
    assert manifest.summary() == {"malformed": 1, "missing": 1}
    assert load_image(ds[1]["image"]).size == (8, 8)


def test_imagefolder_split_subfolder_with_metadata_csv(tmp_path: Path) -> None:
    _image(tmp_path / "test" / "x.png")
    (tmp_path / "test" / "metadata.csv").write_text("file_name,caption\nx.png,Ultrasound of the liver.\n")
    ds = load_caption_dataset(tmp_path, split="test")
    assert ds["caption"] == ["Ultrasound of the liver."] and ds[0]["image"] == str(
        tmp_path / "test" / "x.png"
    )


def test_csv_with_relative_and_absolute_paths(tmp_path: Path) -> None:
    absolute = _image(tmp_path / "elsewhere" / "abs.png")
    _image(tmp_path / "data" / "rel.png")
    table = tmp_path / "data" / "pairs.csv"
    table.write_text(
        f"img,report,id\nrel.png,Relative.,r1\n{absolute},Absolute.,r2\nnope.png,Missing.,r3\nrel.png,,r4\n"
    )
    manifest = SkipManifest()
    ds = load_caption_dataset(table, image_column="img", caption_column="report", manifest=manifest)
    assert ds["image"] == [str(tmp_path / "data" / "rel.png"), str(absolute)]
    assert ds["caption"] == ["Relative.", "Absolute."] and ds["id"] == ["r1", "r2"]
    assert [(r["id"], r["reason"]) for r in manifest.records] == [("r3", "missing"), ("r4", "empty-caption")]


def test_json_records_and_text_only(tmp_path: Path) -> None:
    path = tmp_path / "pairs.json"
    records = [{"image": "a.png", "caption": "One."}, {"image": "b.png", "caption": "Two.", "view": "PA"}]
    path.write_text(json.dumps(records))
    ds = load_caption_dataset(path, require_images=False)
    assert ds["caption"] == ["One.", "Two."] and ds["view"] == [None, "PA"]  # keys beyond the first row kept


def test_non_utf8_row_in_table_is_skipped(tmp_path: Path) -> None:
    _image(tmp_path / "a.png")
    path = tmp_path / "pairs.csv"
    path.write_bytes(b"image,caption\na.png,Good.\na.png,Caf\xe9.\n")
    manifest = SkipManifest()
    assert load_caption_dataset(path, manifest=manifest)["caption"] == ["Good."]
    assert manifest.summary() == {"non-utf8": 1}


def test_bad_column_name_lists_available_columns(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("img,caption\na.png,A.\n")
    with pytest.raises(ValueError) as info:
        load_caption_dataset(path, image_column="img", caption_column="text")
    message = str(info.value)
    assert "`caption_column='text'` not found in" in message and str(path) in message
    assert "available columns: ['img', 'caption']" in message and "Pass `caption_column=`" in message


def test_dataset_source_is_renamed_checked_and_not_decoded(tmp_path: Path) -> None:
    png = tmp_path / "a.png"
    _image(png, 50)
    raw = {"bytes": png.read_bytes(), "path": None}
    ds = Dataset.from_dict(
        {"picture": [raw, raw], "report": ["A.", "  "], "image_id": ["k1", "k2"]},
        features=datasets.Features(
            {
                "picture": datasets.Image(),
                "report": datasets.Value("string"),
                "image_id": datasets.Value("string"),
            }
        ),
    )
    manifest = SkipManifest()
    out = load_caption_dataset(
        DatasetDict({"validation": ds}), split="validation", image_column="picture",
        caption_column="report", manifest=manifest,
    )  # fmt: skip
    assert out.column_names == ["image", "caption", "image_id"] and len(out) == 1
    assert out.features["image"].decode is False and isinstance(out[0]["image"], dict)
    assert load_image(out[0]["image"]).getpixel((0, 0)) == (50, 50, 50)
    assert [(r["id"], r["reason"]) for r in manifest.records] == [("k2", "empty-caption")]
    with pytest.raises(ValueError, match=r"available splits: \['validation'\]"):
        load_caption_dataset(DatasetDict({"validation": ds}), split="train")


def test_dataset_with_path_strings_drops_missing_files(tmp_path: Path) -> None:
    present = str(_image(tmp_path / "a.png"))
    ds = Dataset.from_dict({"image": [present, str(tmp_path / "b.png")], "caption": ["A.", "B."]})
    manifest = SkipManifest()
    assert load_caption_dataset(ds, manifest=manifest)["image"] == [present]
    assert [(r["path"], r["reason"]) for r in manifest.records] == [(str(tmp_path / "b.png"), "missing")]


def test_hub_id_goes_to_load_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_load_dataset(path: str, split: str | None = None) -> Dataset:
        calls.append((path, split))
        return Dataset.from_dict({"image": [None], "text": ["From the Hub."]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_caption_dataset("someone/ROCO-radiology", split="validation", caption_column="text")
    assert calls == [("someone/ROCO-radiology", "validation")] and ds["caption"] == ["From the Hub."]


@pytest.mark.parametrize("source", ["./missing.csv", "/no/such/dir", "pairs.jsonl", "data/roco/train"])
def test_local_looking_paths_are_not_sent_to_the_hub(source: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("Hub must not be called"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_caption_dataset(source)


# ----------------------------------------------------------------------------------------------- manifest


def test_manifest_write_flag_coerce_and_load(tmp_path: Path) -> None:
    path = tmp_path / "skipped.jsonl"
    owner = SkipManifest(path)
    owner.add(id="a", path="a.jpg", reason="truncated", stage="collate", detail="image file is truncated")
    assert json.loads(path.read_text()) == owner.records[0]  # on disk before the next sample
    worker = SkipManifest(path, write=False)
    worker.add(id="b", path=None, reason="missing")
    assert len(path.read_text().splitlines()) == 1 and worker.count == 1
    assert SkipManifest.coerce(owner) is owner and SkipManifest.coerce(None).path is None
    assert SkipManifest.coerce(str(path)).path == path
    assert bool(SkipManifest()) is True  # `manifest or SkipManifest()` must keep an empty caller manifest
    assert SkipManifest.load(path).records == owner.records
    with pytest.raises(TypeError):
        SkipManifest.coerce(3)
