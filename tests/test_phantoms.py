"""Phantoms: deterministic, radiologically oriented, captions that say what the pixels show."""

from __future__ import annotations

import numpy as np
import pytest

from medblip_peft.data import MODALITIES, make_phantoms, parse_phantom_caption


@pytest.fixture(scope="module")
def ds():
    return make_phantoms(40, seed=5, image_size=64)


def test_same_seed_same_phantoms_other_seed_differs(ds):
    again = make_phantoms(40, seed=5, image_size=64)
    assert again["caption"] == ds["caption"]
    assert np.array_equal(np.asarray(again[3]["image"]), np.asarray(ds[3]["image"]))
    assert make_phantoms(40, seed=6, image_size=64)["caption"] != ds["caption"]


def test_captions_state_the_truth(ds):
    for row in ds:
        got = parse_phantom_caption(row["caption"])
        assert got.modality == row["modality"]
        assert (got.side or "", got.level or "") == (row["side"], row["level"])
        assert (got.finding or "") == row["finding"]
        if not row["side"]:
            assert "no focal lesion" in row["caption"]


def test_patient_left_is_on_the_image_right_and_masks_match_boxes(ds):
    lesions = [row for row in ds if row["side"]]
    assert {r["side"] for r in lesions} == {"left", "right"}
    for row in lesions:
        mask = np.asarray(row["mask"]) > 0
        ys, xs = np.nonzero(mask)
        x0, y0, x1, y1 = row["lesion_box"]
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)
        cx, cy = xs.mean() / 63, ys.mean() / 63
        assert (cx > 0.5) == (row["side"] == "left"), "radiological convention: patient's left on image right"
        assert (cy < 0.5) == (row["level"] == "upper")
        pixels = np.asarray(row["image"].convert("L"), dtype=float)
        assert pixels[mask].mean() > pixels[~mask].mean() + 40, "the lesion is visible"
    for row in ds:
        if not row["side"]:
            assert not np.asarray(row["mask"]).any() and row["lesion_box"] == [-1, -1, -1, -1]


def test_finding_word_follows_lesion_size_and_lesions_fill_their_grid_cell():
    # The finding word must be readable from the pixels (nodule small, mass large), and each lesion centre
    # must sit in one of the four 4x4-grid cells of its quadrant, so a patch-level peak can land inside it.
    rows = [r for r in make_phantoms(200, seed=11, image_size=64) if r["side"]]
    areas = {"nodule": [], "mass": []}
    cells = set()
    for row in rows:
        mask = np.asarray(row["mask"]) > 0
        areas[row["finding"]].append(mask.sum())
        ys, xs = np.nonzero(mask)
        cell = (int(ys.mean() // 16), int(xs.mean() // 16))
        cells.add((row["side"], row["level"], cell))
        assert mask.reshape(4, 16, 4, 16).any(axis=(1, 3))[cell], "the centre's own grid cell holds lesion"
    assert max(areas["nodule"]) < min(areas["mass"]), "nodules and masses do not overlap in size"
    # 4 quadrants x 4 cells, each quadrant's cells on its own side and level
    assert len(cells) == 16
    for side, level, (r, c) in cells:
        assert (c >= 2) == (side == "left") and (r < 2) == (level == "upper")


def test_modalities_look_different(ds):
    means = {}
    for modality in MODALITIES:
        imgs = [np.asarray(r["image"].convert("L"), dtype=float) for r in ds if r["modality"] == modality]
        means[modality] = np.mean(imgs, axis=0)
    for a in MODALITIES:
        for b in MODALITIES:
            if a < b:
                assert np.abs(means[a] - means[b]).mean() > 20, (a, b)


@pytest.mark.parametrize(("kwargs", "field"), [({"n": 0}, "`n`"), ({"n": 2, "image_size": 8}, "`image_size`"),
                                               ({"n": 2, "modalities": ("PET",)}, "`modalities`"),
                                               ({"n": 2, "normal_fraction": 1.0}, "`normal_fraction`")])
def test_bad_arguments_name_the_field(kwargs, field):
    n = kwargs.pop("n")
    with pytest.raises(ValueError, match=field):
        make_phantoms(n, **kwargs)
