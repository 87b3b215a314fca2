"""Data: ROCO and generic caption loaders, robust image decoding, phantoms and the collator."""

from medblip_peft.data.collate import IGNORE_INDEX, CaptionCollator
from medblip_peft.data.images import BAD_IMAGE_REASONS, BadImageError, load_image
from medblip_peft.data.loaders import load_caption_dataset, load_roco
from medblip_peft.data.manifest import SkipManifest
from medblip_peft.data.phantoms import MODALITIES, PhantomLabels, make_phantoms, parse_phantom_caption

__all__ = [
    "BAD_IMAGE_REASONS",
    "IGNORE_INDEX",
    "MODALITIES",
    "BadImageError",
    "CaptionCollator",
    "PhantomLabels",
    "SkipManifest",
    "load_caption_dataset",
    "load_image",
    "load_roco",
    "make_phantoms",
    "parse_phantom_caption",
]
