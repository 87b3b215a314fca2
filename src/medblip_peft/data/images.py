"""Robust image decoding: every supported input becomes an RGB ``PIL.Image``, every bad one a ``BadImageError``.

Radiology images arrive as 8-bit JPEGs (ROCO), 16-bit PNGs exported from PACS, DICOM files, numpy arrays and
``datasets`` image dicts. ``load_image`` turns all of them into the RGB image BLIP's processor expects, with
intensity rules that keep the anatomy visible (see ``docs/data.md``):

* 16-bit images are scaled by the dtype's full range (``v * 255 / 65535``), not clipped: Pillow's own
  ``convert("L")`` clips every value above 255 to white. A fixed scale (rather than a per-image min-max window)
  keeps intensities comparable between images and is defined for flat images; 12-bit data stored in 16-bit
  PNGs comes out dark, so window such data before export, or use DICOM, which carries its own window.
* Transparent pixels are composited over **black**, the background of radiographs, CT and MR.
* DICOM pixels go through the file's modality LUT (rescale slope/intercept) and VOI window, and MONOCHROME1
  (where high values are dark) is inverted.

Failures raise ``BadImageError`` with a ``reason`` category, so that loaders and the collator can skip the
sample and record it in the ``SkipManifest`` instead of crashing a training run.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["BAD_IMAGE_REASONS", "BadImageError", "load_image"]

logger = logging.getLogger(__name__)

_RELOAD = "re-download or re-export it, or drop the row (the loaders record such rows in the skip manifest)"

#: Each ``BadImageError.reason`` and the fix its message suggests.
BAD_IMAGE_REASONS: dict[str, str] = {
    "missing": "check the path (relative paths are resolved against the metadata file's folder) or fetch the image",
    "zero-byte": f"the file is empty, usually an interrupted download: {_RELOAD}",
    "truncated": f"the file ends early, usually an interrupted download: {_RELOAD}",
    "corrupt": f"the file has an image header but its data cannot be decoded: {_RELOAD}",
    "not-an-image": f"the content is not an image (a failed download often saves an HTML page as .jpg): {_RELOAD}",
    "decompression-bomb": (
        "if the file is trusted, raise load_image(max_pixels=...) (and PIL.Image.MAX_IMAGE_PIXELS for images over "
        "twice that limit), or downscale the image"
    ),
    "too-small": "an image this small carries nothing for a 384-pixel vision encoder: drop the row, or lower min_size",
    "unsupported": "convert the image to PNG/JPEG first, or install the decoder named above",
    "dicom-extra-missing": 'DICOM decoding needs pydicom: pip install "medblip-peft[dicom]"',
}

_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}
_DICOM_SUFFIXES = {".dcm", ".dicom"}
# Headers of formats Pillow reads: bytes that start like an image but fail to decode are "corrupt", anything
# else is "not-an-image".
_MAGIC = (
    b"\xff\xd8\xff",
    b"\x89PNG\r\n\x1a\n",
    b"GIF8",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
    b"RIFF",
    b"\x00\x00\x00\x0cjP",
)


class BadImageError(ValueError):
    """An image that cannot be used. ``reason`` is one of ``BAD_IMAGE_REASONS``; ``path`` is the file, or
    ``None`` for in-memory input. The message names the file, says what is wrong and how to fix it."""

    def __init__(self, path: str | None, reason: str, detail: str | None = None) -> None:
        self.path = path
        self.reason = reason
        self.detail = detail
        what = path if path is not None else "<in-memory image>"
        fix = BAD_IMAGE_REASONS.get(reason, _RELOAD)
        super().__init__(f"{what}: bad image ({reason}){': ' + detail if detail else ''}. Fix: {fix}.")

    def __reduce__(self) -> tuple[type[BadImageError], tuple[str | None, str, str | None]]:
        # Data-loader workers pickle exceptions back to the main process; the default reduce would call
        # __init__ with the message alone.
        return type(self), (self.path, self.reason, self.detail)


def load_image(source: Any, *, max_pixels: int | None = 50_000_000, min_size: int = 2) -> Image.Image:
    """Decode ``source`` into an RGB ``PIL.Image.Image``.

    Args:
        source: a PIL image; a path (``str`` or ``os.PathLike``); raw encoded ``bytes``; a ``datasets``-style
            dict ``{"bytes": ..., "path": ...}`` (bytes win when both are set); or a numpy array of shape
            H×W, H×W×1, H×W×3 or H×W×4 (channels-first C×H×W is transposed), dtype uint8, uint16, bool,
            float in [0, 1] (other ranges and signed integers: see ``docs/data.md``).
        max_pixels: reject images with more pixels than this as decompression bombs, before decoding them;
            ``None`` disables this check (Pillow still refuses images over ``2 * PIL.Image.MAX_IMAGE_PIXELS``).
        min_size: reject images narrower or shorter than this many pixels ("too-small").

    Raises:
        BadImageError: the image is missing, empty, truncated, corrupt, not an image, too large, too small, or a
            DICOM file while pydicom is not installed.
        TypeError: ``source`` is none of the supported types (a programming error, not bad data).
    """
    if isinstance(source, Image.Image):
        label = getattr(source, "filename", None) or None
        _check_size(source.size, label, max_pixels, min_size)
        return _to_rgb(_force_load(source, label), label)
    if isinstance(source, np.ndarray):
        return _to_rgb(_array_to_image(source, max_pixels, min_size), None)
    if isinstance(source, dict):
        if source.get("bytes") is not None:
            return _decode_bytes(bytes(source["bytes"]), source.get("path"), max_pixels, min_size)
        if source.get("path") is not None:
            return load_image(source["path"], max_pixels=max_pixels, min_size=min_size)
        raise BadImageError(None, "missing", "the image dict has neither 'bytes' nor 'path'")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode_bytes(bytes(source), None, max_pixels, min_size)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            data = path.read_bytes()
        except FileNotFoundError as err:
            raise BadImageError(str(path), "missing", "no such file") from err
        except IsADirectoryError as err:
            raise BadImageError(str(path), "not-an-image", "this is a directory") from err
        return _decode_bytes(data, str(path), max_pixels, min_size)
    raise TypeError(
        f"load_image() cannot read a {type(source).__name__}; pass a PIL image, a path, bytes, "
        "a {'bytes': ..., 'path': ...} dict or a numpy array"
    )


def _check_size(size: tuple[int, int], label: str | None, max_pixels: int | None, min_size: int) -> None:
    """Reject bombs before decoding (only the header has been read) and images below ``min_size``."""
    width, height = size
    if max_pixels is not None and width * height > max_pixels:
        raise BadImageError(
            label, "decompression-bomb", f"{width}×{height} pixels exceeds max_pixels={max_pixels}"
        )
    if width < min_size or height < min_size:
        raise BadImageError(label, "too-small", f"{width}×{height} is below min_size={min_size}")


def _decode_bytes(data: bytes, label: str | None, max_pixels: int | None, min_size: int) -> Image.Image:
    if not data:
        raise BadImageError(label, "zero-byte", "0 bytes")
    is_dicom = data[128:132] == b"DICM" or (
        label is not None and Path(label).suffix.lower() in _DICOM_SUFFIXES
    )
    if is_dicom:
        return _to_rgb(_decode_dicom(data, label, max_pixels, min_size), label)
    with warnings.catch_warnings():
        # Pillow warns from MAX_IMAGE_PIXELS up; we enforce our own max_pixels just below instead.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as err:
            raise BadImageError(label, "decompression-bomb", str(err)) from err
        except UnidentifiedImageError as err:
            raise BadImageError(label, *_classify_unidentified(data)) from err
        except Exception as err:  # a decoder fed hostile bytes can raise almost anything
            raise _decode_error(label, err) from err
    _check_size(img.size, label, max_pixels, min_size)
    img = _force_load(img, label)
    try:
        # Phone photos of films and some scanners store rotation in EXIF; laterality depends on honouring it.
        img = ImageOps.exif_transpose(img)
    except Exception as err:  # a broken EXIF block must not reject pixels that decoded fine
        logger.debug("ignoring unreadable EXIF orientation in %s: %s", label, err)
    return _to_rgb(img, label)


def _force_load(img: Image.Image, label: str | None) -> Image.Image:
    """Decode the pixels now: ``Image.open`` only reads the header, so truncation would surface much later."""
    try:
        img.load()
    except Exception as err:
        raise _decode_error(label, err) from err
    return img


def _decode_error(label: str | None, err: Exception) -> BadImageError:
    message = str(err) or type(err).__name__
    truncated = isinstance(err, EOFError) or "truncated" in message.lower()
    return BadImageError(label, "truncated" if truncated else "corrupt", message)


def _classify_unidentified(data: bytes) -> tuple[str, str]:
    """Tell bytes that start like an image ("corrupt") from text or unknown content ("not-an-image")."""
    if data.startswith(_MAGIC):
        return "corrupt", "it starts with an image header but Pillow cannot identify the rest"
    head = data[:64]
    if b"\x00" not in head:
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError:
            pass
        else:
            return "not-an-image", f"the file is text, starting {text.strip()[:40]!r}"
    return "not-an-image", "unrecognised format"


def _to_rgb(img: Image.Image, label: str | None) -> Image.Image:
    """Convert any Pillow mode to RGB with the intensity rules in the module docstring."""
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT_MODES or img.mode in ("I", "F"):
        # np.asarray honours the byte order of I;16B, so both endiannesses scale identically.
        return Image.fromarray(_to_uint8(np.asarray(img))).convert("RGB")
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGB", img.size, (0, 0, 0))
        background.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
        return background
    try:
        return img.convert("RGB")  # 1, L, P without transparency, CMYK, YCbCr, LAB, HSV
    except Exception as err:
        raise BadImageError(
            label, "unsupported", f"cannot convert Pillow mode {img.mode!r} to RGB: {err}"
        ) from err


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale an intensity array to uint8.

    * uint8 is kept; bool maps to 0/255; other unsigned integers scale by their dtype's full range.
    * floats within [0, 1] scale by 255.
    * signed integers (Pillow's 32-bit "I" mode, int16 CT values): values within [0, 255] are taken as 8-bit
      and within [0, 65535] as 16-bit (older Pillow decodes 16-bit PNGs to "I"); anything else, like floats
      outside [0, 1], has no dtype range to use and is min-max windowed. NaN and ±inf become the minimum.
    """
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if arr.dtype.kind == "u":
        return np.rint(arr.astype(np.float64) * (255.0 / np.iinfo(arr.dtype).max)).astype(np.uint8)
    values = arr.astype(np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(arr.shape, np.uint8)
    lo, hi = float(values[finite].min()), float(values[finite].max())
    values[~finite] = lo
    if arr.dtype.kind == "f" and lo >= 0.0 and hi <= 1.0:
        scale, lo = 255.0, 0.0
    elif arr.dtype.kind == "i" and lo >= 0 and hi <= 65535:
        scale, lo = (1.0 if hi <= 255 else 255.0 / 65535.0), 0.0
    else:
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return np.rint(np.clip((values - lo) * scale, 0, 255)).astype(np.uint8)


def _array_to_image(arr: np.ndarray, max_pixels: int | None, min_size: int) -> Image.Image:
    """An H×W (×1/3/4) array as an L, RGB or RGBA image; C×H×W (e.g. from a tensor) is transposed first."""
    if arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4) and arr.shape[0] in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise BadImageError(
            None, "unsupported", f"array of shape {arr.shape} is not H×W, H×W×1, H×W×3 or H×W×4"
        )
    if arr.dtype.kind not in "biuf":
        raise BadImageError(None, "unsupported", f"array dtype {arr.dtype} is not numeric")
    _check_size((arr.shape[1], arr.shape[0]), None, max_pixels, min_size)
    # uint8 H×W, H×W×3 and H×W×4 arrays map to L, RGB and RGBA; RGBA is then composited by _to_rgb.
    return Image.fromarray(np.ascontiguousarray(_to_uint8(arr)))


def _decode_dicom(data: bytes, label: str | None, max_pixels: int | None, min_size: int) -> Image.Image:
    """Decode a DICOM file to an 8-bit L (monochrome) or RGB image, applying its own display transform."""
    try:
        import pydicom
    except ImportError as err:
        raise BadImageError(
            label, "dicom-extra-missing", "this is a DICOM file and pydicom is not installed"
        ) from err
    try:
        from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut  # pydicom >= 3
    except ImportError:  # pydicom 2.x
        from pydicom.pixel_data_handlers.util import apply_color_lut, apply_modality_lut, apply_voi_lut
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as err:
        raise _decode_error(label, err) from err
    if not any(key in ds for key in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise BadImageError(
            label, "not-an-image", "the DICOM file has no pixel data (a report or a DICOMDIR?)"
        )
    _check_size((int(ds.get("Columns", 0)), int(ds.get("Rows", 0))), label, max_pixels, min_size)
    try:
        arr = ds.pixel_array
    except (NotImplementedError, RuntimeError) as err:
        # No pixel handler for this transfer syntax (e.g. JPEG 2000 without pylibjpeg); pydicom's message names
        # the package to install.
        raise BadImageError(label, "unsupported", str(err)) from err
    except Exception as err:
        raise _decode_error(label, err) from err
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        arr = arr[0]  # a multi-frame series is represented by its first frame
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        return Image.fromarray(_to_uint8(apply_color_lut(arr, ds)))
    if arr.ndim == 3:  # RGB (pydicom 3 has already converted YBR to RGB): scale by the stored bit depth
        top = float(2 ** int(ds.get("BitsStored", 8)) - 1)
        return Image.fromarray(
            np.rint(np.clip(arr.astype(np.float64) * (255.0 / top), 0, 255)).astype(np.uint8)
        )
    modality = apply_modality_lut(arr, ds)
    unit = _dicom_voi(np.asarray(modality, dtype=np.float64), modality, ds, apply_voi_lut)
    if photometric == "MONOCHROME1":  # low values are bright in MONOCHROME1
        unit = 1.0 - unit
    return Image.fromarray(np.rint(unit * 255.0).astype(np.uint8))


def _dicom_voi(values: np.ndarray, modality: np.ndarray, ds: Any, apply_voi_lut: Any) -> np.ndarray:
    """Map modality-LUT output to [0, 1]: the file's window (PS3.3 C.11.2.1.2), else its VOI LUT, else the full
    stored range (the DICOM counterpart of the 16-bit dtype-range rule)."""
    center, width = _first_number(ds.get("WindowCenter")), _first_number(ds.get("WindowWidth"))
    if center is not None and width is not None and width > 0:
        function = str(ds.get("VOILUTFunction", "LINEAR")).upper()
        if function == "SIGMOID":
            return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
        if function == "LINEAR_EXACT":
            return np.clip((values - center) / width + 0.5, 0.0, 1.0)
        # LINEAR: the standard shifts the centre by 0.5 and shrinks the width by 1.
        return np.clip((values - (center - 0.5)) / max(width - 1.0, 1e-6) + 0.5, 0.0, 1.0)
    if ds.get("VOILUTSequence"):
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        lut_out = np.asarray(apply_voi_lut(modality, ds, prefer_lut=True), dtype=np.float64)
        return np.clip(lut_out / float(2**bits - 1), 0.0, 1.0)
    if values.dtype.kind == "f" and "PixelData" not in ds:  # float pixel data has no stored bit range
        return _to_uint8(values).astype(np.float64) / 255.0
    if ds.get("ModalityLUTSequence"):
        lo, hi = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    else:
        bits = int(ds.get("BitsStored", 16))
        signed = int(ds.get("PixelRepresentation", 0)) == 1
        stored = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
        lo, hi = sorted(v * slope + intercept for v in stored)
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(values)


def _first_number(value: Any) -> float | None:
    """WindowCenter/WindowWidth may hold several alternatives; the first is the default view."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else None
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None
