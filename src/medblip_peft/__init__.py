"""medblip-peft: fine-tune BLIP to caption radiology images, correctly."""

__version__ = "0.1.0.dev0"
