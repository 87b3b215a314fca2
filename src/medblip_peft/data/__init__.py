"""Data: ROCO and generic caption loaders, robust image decoding, phantoms and the collator."""

from medblip_peft.data.phantoms import MODALITIES, PhantomLabels, make_phantoms, parse_phantom_caption

__all__ = ["MODALITIES", "PhantomLabels", "make_phantoms", "parse_phantom_caption"]
