"""load_image: every Pillow mode, numpy input, DICOM windowing and each bad-input category."""

from __future__ import annotations

import io
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medblip_peft.data.images import BAD_IMAGE_REASONS, BadImageError, load_image


def _encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _pixel(img: Image.Image, xy: tuple[int, int] = (0, 0)) -> tuple[int, ...]:
    assert img.mode == "RGB"
    return img.getpixel(xy)


# ------------------------------------------------------------------------------------------- Pillow modes


def test_grayscale_and_bilevel_become_rgb() -> None:
    assert _pixel(load_image(Image.new("L", (4, 4), 77))) == (77, 77, 77)
    assert _pixel(load_image(Image.new("1", (4, 4), 1))) == (255, 255, 255)


def test_rgba_is_composited_over_black() -> None:
    half = load_image(Image.new("RGBA", (4, 4), (200, 100, 50, 128)))
    assert _pixel(half) == pytest.approx((100, 50, 25), abs=1)
    # A fully transparent white pixel is background: black, as in a radiograph, not white.
    assert _pixel(load_image(Image.new("RGBA", (4, 4), (255, 255, 255, 0)))) == (0, 0, 0)


def test_la_is_composited_over_black() -> None:
    assert _pixel(load_image(Image.new("LA", (4, 4), (200, 128)))) == pytest.approx((100, 100, 100), abs=1)


def test_palette_transparency_survives_png_round_trip() -> None:
    img = Image.new("P", (4, 4), 0)
    img.putpalette([10, 200, 30, 255, 255, 255] + [0] * 762)
    img.putpixel((1, 1), 1)
    decoded = load_image(_png_with_transparency(img, index=1))
    assert _pixel(decoded, (0, 0)) == (10, 200, 30)  # opaque palette entry keeps its colour
    assert _pixel(decoded, (1, 1)) == (0, 0, 0)  # the transparent (white) entry is background


def _png_with_transparency(img: Image.Image, index: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", transparency=index)
    return buf.getvalue()


def test_cmyk_converts_to_rgb() -> None:
    assert _pixel(load_image(Image.new("CMYK", (4, 4), (0, 0, 0, 0)))) == (255, 255, 255)
    assert _pixel(load_image(Image.new("CMYK", (4, 4), (255, 0, 0, 0)))) == (0, 255, 255)


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_16bit_is_scaled_by_dtype_range_not_clipped(mode: str) -> None:
    values = np.array([[0, 32768, 65535], [1000, 32768, 65535]], dtype=">u2" if mode == "I;16B" else "<u2")
    img = Image.frombytes(mode, (3, 2), values.tobytes())
    if mode == "I;16":
        img = Image.open(io.BytesIO(_encode(img, "PNG")))  # the real case: a 16-bit PNG file
        assert img.mode == "I;16"
        assert img.convert("L").getpixel((1, 0)) == 255  # Pillow's naive conversion clips mid-gray to white
    out = np.asarray(load_image(img))
    assert out[0, :, 0].tolist() == [0, 128, 255]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_32bit_int_and_float_modes() -> None:
    as_16bit = Image.fromarray(
        np.full((2, 2), 32768, dtype=np.int32)
    )  # older Pillow reads 16-bit PNGs as "I"
    assert as_16bit.mode == "I"
    assert _pixel(load_image(as_16bit)) == (128, 128, 128)
    assert _pixel(load_image(Image.fromarray(np.full((2, 2), 0.25, dtype=np.float32)))) == (64, 64, 64)


# ------------------------------------------------------------------------------------------------- numpy


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.full((3, 3), 90, np.uint8), (90, 90, 90)),
        (np.full((3, 3, 1), 90, np.uint8), (90, 90, 90)),
        (np.dstack([np.full((3, 3), v, np.uint8) for v in (10, 20, 30)]), (10, 20, 30)),
        (np.dstack([np.full((3, 3), v, np.uint8) for v in (200, 100, 50, 128)]), (100, 50, 25)),
        (np.full((3, 3), 65535, np.uint16), (255, 255, 255)),
        (np.full((3, 3), 32768, np.uint16), (128, 128, 128)),
        (np.full((3, 3), 0.5, np.float32), (128, 128, 128)),
        (np.ones((3, 3), bool), (255, 255, 255)),
        (np.full((3, 5, 6), 40, np.uint8), (40, 40, 40)),  # channels-first C×H×W
    ],
)
def test_numpy_arrays(array: np.ndarray, expected: tuple[int, int, int]) -> None:
    assert _pixel(load_image(array)) == pytest.approx(expected, abs=1)


def test_signed_values_outside_any_dtype_range_are_min_max_windowed() -> None:
    hu = np.array([[-1000, 0], [1000, 3000]], dtype=np.int16)  # CT Hounsfield units
    out = np.asarray(load_image(hu))[..., 0]
    assert out[0, 0] == 0 and out[1, 1] == 255
    assert 0 < out[0, 1] < out[1, 0] < 255


@pytest.mark.parametrize("shape", [(2, 2, 2), (2, 2, 5, 1), (4,)])
def test_unsupported_array_shapes(shape: tuple[int, ...]) -> None:
    with pytest.raises(BadImageError) as info:
        load_image(np.zeros(shape, np.uint8))
    assert info.value.reason == "unsupported" and info.value.path is None


# ---------------------------------------------------------------------------------------- sources & errors


def test_path_bytes_and_datasets_dict_sources(tmp_path: Path) -> None:
    data = _encode(Image.new("RGB", (5, 4), (1, 2, 3)))
    path = tmp_path / "x.png"
    path.write_bytes(data)
    for source in (
        path,
        str(path),
        data,
        {"bytes": data, "path": "elsewhere.png"},
        {"bytes": None, "path": str(path)},
    ):
        img = load_image(source)
        assert img.size == (5, 4) and _pixel(img) == (1, 2, 3)
    with pytest.raises(TypeError, match="cannot read a int"):
        load_image(3)


def _bad_file(tmp_path: Path, case: str) -> Path:
    jpeg = _encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)), "JPEG")
    png = bytearray(_encode(Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64), np.uint8))))
    png[100:200] = bytes(100)  # zero the compressed pixel stream; header and IEND stay intact
    contents = {
        "truncated": jpeg[: len(jpeg) // 2],
        "zero-byte": b"",
        "corrupt": bytes(png),
        "not-an-image": b"<!DOCTYPE html><html><body>404 Not Found</body></html>",
    }
    path = tmp_path / f"{case}.{'png' if case == 'corrupt' else 'jpg'}"
    if case in contents:
        path.write_bytes(contents[case])
    return path


@pytest.mark.parametrize("reason", ["missing", "zero-byte", "truncated", "corrupt", "not-an-image"])
def test_bad_files_raise_with_reason_path_and_fix(tmp_path: Path, reason: str) -> None:
    path = _bad_file(tmp_path, reason)
    with pytest.raises(BadImageError) as info:
        load_image(path)
    err = info.value
    assert err.reason == reason
    assert err.path == str(path)
    assert str(path) in str(err) and "Fix:" in str(err)
    assert isinstance(err, ValueError)


def test_text_content_is_quoted_in_the_message(tmp_path: Path) -> None:
    with pytest.raises(BadImageError, match="DOCTYPE html"):
        load_image(_bad_file(tmp_path, "not-an-image"))


def test_decompression_bomb_is_rejected_before_decoding() -> None:
    data = _encode(Image.new("L", (100, 100)))
    with pytest.raises(BadImageError) as info:
        load_image(data, max_pixels=5_000)
    assert info.value.reason == "decompression-bomb" and "max_pixels=5000" in str(info.value)
    assert load_image(data, max_pixels=None).size == (100, 100)
    assert load_image(data, max_pixels=10_000).size == (100, 100)


def test_pillow_own_bomb_error_is_mapped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow itself refuses images over twice this
    with pytest.raises(BadImageError) as info:
        load_image(_encode(Image.new("L", (30, 30))), max_pixels=None)
    assert info.value.reason == "decompression-bomb"


@pytest.mark.parametrize("size", [(1, 1), (1, 50), (50, 1)])
def test_too_small_images_are_rejected(size: tuple[int, int]) -> None:
    with pytest.raises(BadImageError) as info:
        load_image(_encode(Image.new("L", size)))
    assert info.value.reason == "too-small"
    assert load_image(Image.new("L", (2, 2))).size == (2, 2)


def test_bad_image_error_survives_pickling() -> None:
    err = pickle.loads(pickle.dumps(BadImageError("a.jpg", "truncated", "3 bytes short")))
    assert (err.path, err.reason, err.detail) == ("a.jpg", "truncated", "3 bytes short")
    assert str(err) == str(BadImageError("a.jpg", "truncated", "3 bytes short"))


def test_every_reason_has_a_fix() -> None:
    for reason, fix in BAD_IMAGE_REASONS.items():
        assert fix in str(BadImageError("f.png", reason))


# ------------------------------------------------------------------------------------------------- DICOM


def _dicom_bytes(pixels: np.ndarray, **attributes: object) -> bytes:
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    for name, value in attributes.items():
        setattr(ds, name, value)
    ds.PixelData = pixels.astype("<u2").tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# Stored values of a CT slice with intercept -1000, i.e. -1000, -160, 40, 140 and 240 HU.
_CT = np.array([[0, 840, 1040, 1140], [1240, 1240, 1240, 4095]], dtype=np.uint16)
_CT_WINDOW = {"RescaleSlope": 1, "RescaleIntercept": -1000, "WindowCenter": 40, "WindowWidth": 400}


def test_dicom_applies_rescale_and_window(tmp_path: Path) -> None:
    path = tmp_path / "ct.dcm"
    path.write_bytes(_dicom_bytes(_CT, **_CT_WINDOW))
    out = np.asarray(load_image(path))[..., 0]
    # Soft-tissue window 40±200 HU: air and fat are black, 40 HU mid-gray, 240 HU and above white.
    assert out[0].tolist() == [0, 0, 128, 192]
    assert out[1].tolist() == [255, 255, 255, 255]


def test_dicom_window_matches_pydicom(tmp_path: Path) -> None:
    pixels = pytest.importorskip("pydicom.pixels")
    import pydicom

    data = _dicom_bytes(_CT, **_CT_WINDOW)
    ds = pydicom.dcmread(io.BytesIO(data))
    windowed = pixels.apply_voi_lut(pixels.apply_modality_lut(ds.pixel_array, ds), ds)
    lo, hi = -1000.0, 4095.0 - 1000.0  # pydicom's output range: the stored range after rescale
    expected = np.rint((windowed - lo) / (hi - lo) * 255)
    assert np.abs(np.asarray(load_image(data))[..., 0] - expected).max() <= 1


def test_dicom_without_window_uses_stored_range_and_monochrome1_inverts() -> None:
    plain = np.asarray(load_image(_dicom_bytes(_CT)))[..., 0]
    assert plain[0].tolist() == [0, 52, 65, 71]  # v * 255 / 4095 for 12 stored bits
    inverted = np.asarray(load_image(_dicom_bytes(_CT, PhotometricInterpretation="MONOCHROME1")))[..., 0]
    assert (inverted.astype(int) == 255 - plain).all()


def test_dicom_detected_by_preamble_without_suffix(tmp_path: Path) -> None:
    path = tmp_path / "scan.bin"
    path.write_bytes(_dicom_bytes(_CT, **_CT_WINDOW))
    assert np.asarray(load_image(path))[0, 2, 0] == 128


def test_dicom_without_pydicom_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ct.dcm"
    path.write_bytes(bytes(128) + b"DICM" + bytes(64))  # no pydicom needed to write the preamble
    monkeypatch.setitem(sys.modules, "pydicom", None)  # makes `import pydicom` raise ImportError
    with pytest.raises(BadImageError) as info:
        load_image(path)
    assert info.value.reason == "dicom-extra-missing"
    assert 'pip install "medblip-peft[dicom]"' in str(info.value) and str(path) in str(info.value)
