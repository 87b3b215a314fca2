"""Synthetic radiology "phantoms": images whose findings and lesion positions are known exactly.

Each phantom is one of four modalities that look different (CT, MRI, radiograph, ultrasound), holds either no
lesion or one round lesion (a small nodule or a large mass, in one of four cells of one of four quadrants), and
comes with a caption drawn from a small grammar, the lesion's binary mask and its bounding box. They give tiny
models a real learning task (modality, side, level and finding must be read from the pixels) and explanations a
real grounding task (the lesion mask is the truth).

Sides follow the radiological convention: images are displayed as if facing the patient, so the patient's
**left** appears on the image's **right**. A caption that says "left" therefore describes a lesion whose
centre lies in the right half of the pixel array.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = ["FINDING_RADII", "MODALITIES", "PhantomLabels", "make_phantoms", "parse_phantom_caption"]

MODALITIES = ("CT", "MRI", "radiograph", "ultrasound")
SIDES = ("left", "right")
LEVELS = ("upper", "lower")

_MODALITY_PHRASES = {
    "CT": ["Axial CT", "CT scan", "Computed tomography image"],
    "MRI": ["MRI", "Axial MR image", "Magnetic resonance image"],
    "radiograph": ["Chest radiograph", "Plain X-ray", "Radiograph"],
    "ultrasound": ["Ultrasound image", "Sonographic image", "Ultrasound scan"],
}
_REGION = {"CT": "abdomen", "MRI": "brain", "radiograph": "chest", "ultrasound": "liver"}
# The finding word is read from the lesion's size, as in chest radiology (a nodule is small, a mass is large),
# so that every word of a lesion caption except the synonyms is decided by the pixels.
FINDING_RADII = {"nodule": (0.08, 0.10), "mass": (0.115, 0.135)}  # fractions of the image width
_VERBS = ["showing", "demonstrating", "with"]
_PLACES = ["zone", "region", "quadrant"]
_NORMAL = ["showing no focal lesion", "with no focal lesion", "demonstrating no focal lesion"]


@dataclass(frozen=True)
class PhantomLabels:
    """What a phantom caption says: modality, side, level and finding (``None`` when there is no lesion)."""

    modality: str | None
    side: str | None
    level: str | None
    finding: str | None = None


def _caption(
    rng: np.random.Generator, modality: str, side: str | None, level: str | None, finding: str | None
) -> str:
    head = f"{rng.choice(_MODALITY_PHRASES[modality])} of the {_REGION[modality]}"
    if side is None:
        return f"{head} {rng.choice(_NORMAL)}."
    return f"{head} {rng.choice(_VERBS)} a {finding} in the {level} {side} {rng.choice(_PLACES)}."


_MODALITY_PATTERNS = [
    ("CT", r"\b(ct|computed tomography)\b"),
    ("MRI", r"\b(mri|mr|magnetic resonance)\b"),
    ("radiograph", r"\b(radiograph|x-?ray|radiography)\b"),
    ("ultrasound", r"\b(ultrasound|sonographic|sonography)\b"),
]


def parse_phantom_caption(caption: str) -> PhantomLabels:
    """Read modality, side, level and finding back out of a (generated) caption in the phantom grammar."""
    text = caption.lower()
    modality = next((name for name, pat in _MODALITY_PATTERNS if re.search(pat, text)), None)
    side = next((s for s in SIDES if re.search(rf"\b{s}\b", text)), None)
    level = next((lv for lv in LEVELS if re.search(rf"\b{lv}\b", text)), None)
    finding = next((f for f in FINDING_RADII if re.search(rf"\b{f}\b", text)), None)
    return PhantomLabels(modality, side, level, finding)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    return xs, ys


def _body(modality: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """The modality's background anatomy, as float intensities in [0, 1]."""
    x, y = _grid(size)
    noise = rng.normal(0.0, 1.0, (size, size)).astype(np.float32)
    if modality == "CT":  # grey ellipse body, bright bony ring, black air outside
        r = ((x - 0.5) / 0.44) ** 2 + ((y - 0.5) / 0.38) ** 2
        img = np.where(r < 1, 0.42, 0.0) + np.where((r > 0.80) & (r < 1), 0.45, 0.0)
        img = img + 0.03 * noise
    elif modality == "MRI":  # round head, bright rim, smooth internal gradient
        r = ((x - 0.5) / 0.40) ** 2 + ((y - 0.5) / 0.45) ** 2
        img = np.where(r < 1, 0.25 + 0.25 * (1 - r), 0.0) + np.where((r > 0.85) & (r < 1), 0.5, 0.0)
        img = img + 0.02 * noise
    elif modality == "radiograph":  # bright body, two dark lung fields, bright spine
        img = np.full((size, size), 0.75, dtype=np.float32)
        for cx in (0.3, 0.7):
            lung = ((x - cx) / 0.17) ** 2 + ((y - 0.5) / 0.33) ** 2 < 1
            img = np.where(lung, 0.2, img)
        img = np.where(np.abs(x - 0.5) < 0.04, 0.95, img) + 0.04 * noise
    elif modality == "ultrasound":  # speckled fan sector from the top centre
        ang = np.arctan2(x - 0.5, y + 0.05)
        rad = np.hypot(x - 0.5, y + 0.05)
        fan = (np.abs(ang) < 0.75) & (rad > 0.12) & (rad < 1.02)
        # Mild speckle: strong enough to look like ultrasound, weak enough that a tiny model sees the lesion.
        speckle = rng.rayleigh(0.12, (size, size)).astype(np.float32)
        img = np.where(fan, 0.45 + speckle, 0.0)
    else:  # pragma: no cover - guarded by make_phantoms
        raise ValueError(modality)
    return img.astype(np.float32)


def _lesion_centre(side: str, level: str, rng: np.random.Generator) -> tuple[float, float]:
    # Radiological convention: the patient's left is on the image's right. Each quadrant offers four centres,
    # at 1/8, 3/8, 5/8 or 7/8 of the width and height (the cell centres of a 4x4 grid, which is the demo
    # model's patch grid), jittered by up to 3% of the image. With four possible cells per quadrant the
    # lesion itself is the strongest evidence for its side and level: with one fixed spot per quadrant, a
    # model can equally well read which spots are *empty*, and its explanations then point away from the
    # lesion (measured: pointing game 0.00 for attention maps on the demo model; docs/explain.md).
    columns = (0.625, 0.875) if side == "left" else (0.125, 0.375)
    rows = (0.125, 0.375) if level == "upper" else (0.625, 0.875)
    jitter = rng.uniform(-0.03, 0.03, size=2)
    return float(rng.choice(columns) + jitter[0]), float(rng.choice(rows) + jitter[1])


def make_phantoms(
    n: int,
    *,
    seed: int = 0,
    image_size: int = 64,
    modalities: tuple[str, ...] = MODALITIES,
    normal_fraction: float = 0.2,
):
    """Build ``n`` phantoms as a ``datasets.Dataset``.

    Columns: ``image_id``, ``image`` (RGB), ``caption``, ``modality``, ``side`` and ``level`` (empty strings for
    lesion-free cases), ``mask`` (a binary L-mode image of the lesion) and ``lesion_box`` (``[x0, y0, x1, y1]`` in
    pixels, ``[-1, -1, -1, -1]`` when there is no lesion). The same ``seed`` always gives the same phantoms.
    """
    import datasets

    if n < 1:
        raise ValueError(f"`n` must be at least 1, got {n}.")
    if image_size < 16:
        raise ValueError(f"`image_size` must be at least 16 pixels, got {image_size}.")
    unknown = sorted(set(modalities) - set(MODALITIES))
    if unknown or not modalities:
        raise ValueError(f"`modalities` must be a non-empty subset of {MODALITIES}; got unknown {unknown}.")
    if not 0.0 <= normal_fraction < 1.0:
        raise ValueError(f"`normal_fraction` must be in [0, 1), got {normal_fraction}.")

    rng = np.random.default_rng(seed)
    features = datasets.Features(
        {
            "image_id": datasets.Value("string"),
            "image": datasets.Image(),
            "caption": datasets.Value("string"),
            "modality": datasets.Value("string"),
            "side": datasets.Value("string"),
            "level": datasets.Value("string"),
            "finding": datasets.Value("string"),
            "mask": datasets.Image(),
            "lesion_box": datasets.Sequence(datasets.Value("int32"), length=4),
        }
    )
    rows: dict[str, list] = {name: [] for name in features}
    x, y = _grid(image_size)
    for i in range(n):
        modality = str(modalities[i % len(modalities)])
        has_lesion = rng.random() >= normal_fraction
        side = str(rng.choice(SIDES)) if has_lesion else None
        level = str(rng.choice(LEVELS)) if has_lesion else None
        finding = str(rng.choice(list(FINDING_RADII))) if has_lesion else None
        img = _body(modality, image_size, rng)
        mask = np.zeros((image_size, image_size), dtype=bool)
        box = [-1, -1, -1, -1]
        if has_lesion:
            cx, cy = _lesion_centre(side, level, rng)
            radius = rng.uniform(*FINDING_RADII[finding])
            mask = (x - cx) ** 2 + (y - cy) ** 2 < radius**2
            # Bright on every modality: dense on CT and radiographs, hyperintense on MRI, hyperechoic on
            # ultrasound (a dark lesion would look like the black outside of the fan).
            img = np.where(mask, 1.0, img)
            ys_, xs_ = np.nonzero(mask)
            box = [int(xs_.min()), int(ys_.min()), int(xs_.max()) + 1, int(ys_.max()) + 1]
        pixels = (np.clip(img, 0, 1) * 255).astype(np.uint8)
        rows["image_id"].append(f"PHANTOM_{seed}_{i:05d}")
        rows["image"].append(Image.fromarray(pixels, mode="L").convert("RGB"))
        rows["caption"].append(_caption(rng, modality, side, level, finding))
        rows["modality"].append(modality)
        rows["side"].append(side or "")
        rows["level"].append(level or "")
        rows["finding"].append(finding or "")
        rows["mask"].append(Image.fromarray(mask.astype(np.uint8) * 255, mode="L"))
        rows["lesion_box"].append(box)
    return datasets.Dataset.from_dict(rows, features=features)
