"""`Captioner`: load any medblip-peft checkpoint (full or LoRA, local or on the Hub) and caption images.

Generation defaults fit ROCO: beam search of 3, room for a 90th-percentile caption (37 words, about 64 BERT
WordPiece tokens), a minimum length, and `no_repeat_ngram_size=3` so that beams do not loop. A text prompt, when
the model was trained with one, is fed to the decoder and stripped from the decoded captions, so it never
leaks into scored text.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medblip_peft.data.collate import prompt_length
from medblip_peft.data.images import load_image
from medblip_peft.templates.card import METADATA_FILE, read_json

__all__ = ["DEFAULT_GENERATION", "METADATA_FILE", "Captioner", "auto_device", "load_blip"]


# 64 new tokens hold the 90th-percentile ROCO caption (37 words, 64 WordPiece tokens with [CLS]/[SEP]); the
# study's 20-token cap cut off 37% of the references.
DEFAULT_GENERATION: dict[str, Any] = {
    "num_beams": 3,
    "max_new_tokens": 64,
    "min_new_tokens": 5,
    "no_repeat_ngram_size": 3,
    "repetition_penalty": 1.0,
}


def auto_device(device: str | torch.device | None = None) -> torch.device:
    """`device` if given, else cuda, then mps, then cpu."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def read_metadata(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``medblip_peft.json`` a checkpoint was saved with, or ``{}``."""
    return read_json(Path(folder) / METADATA_FILE)


def load_blip(source: Any, *, processor=None, revision: str | None = None):
    """Return ``(model, processor, base_model_id)`` for a Hub id, a local path or a model object.

    A directory holding a peft adapter (``adapter_config.json``) is loaded onto its base model, which is itself
    resolved as a path or Hub id. Weights load from safetensors only; remote code is never trusted.
    """
    from transformers import BlipForConditionalGeneration, BlipProcessor

    from medblip_peft.hub import resolve_pretrained

    if isinstance(source, nn.Module):
        if processor is None:
            raise ValueError(
                "`processor` is required when `model` is a model object; pass the BlipProcessor that belongs to it "
                "(e.g. `BlipProcessor.from_pretrained(<same id>)`), or pass the model as a Hub id or path."
            )
        base = getattr(getattr(source, "config", None), "_name_or_path", None) or None
        return source, processor, base
    folder = resolve_pretrained(source, revision=revision)
    adapter_file = folder / "adapter_config.json"
    if adapter_file.is_file():
        from peft import PeftModel

        base_id = read_json(adapter_file).get("base_model_name_or_path")
        if not base_id:
            raise ValueError(
                f"{adapter_file} has no `base_model_name_or_path`; set it to the base BLIP's id or path."
            )
        base_model, base_processor, _ = load_blip(base_id)
        model = PeftModel.from_pretrained(base_model, folder, is_trainable=False)
        has_processor = (folder / "processor_config.json").is_file() or (
            folder / "preprocessor_config.json"
        ).is_file()
        return (
            model,
            processor or (BlipProcessor.from_pretrained(folder) if has_processor else base_processor),
            base_id,
        )
    model = BlipForConditionalGeneration.from_pretrained(folder, use_safetensors=True)
    processor = processor or BlipProcessor.from_pretrained(folder)
    base = read_metadata(folder).get("base_model") or str(source)
    return model, processor, base


class Captioner:
    """Caption radiology images with a (fine-tuned) BLIP.

    >>> captioner = Captioner.from_pretrained("path/or/org-name")        # doctest: +SKIP
    >>> captioner(["scan1.png", "scan2.jpg"], num_beams=1)                # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        processor,
        *,
        prompt: str | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 16,
        generation: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self.device = auto_device(device)
        self.model = model.to(self.device).eval()
        self.processor = processor
        self.prompt = prompt.strip() if prompt else None
        self.batch_size = batch_size
        self.generation = {**DEFAULT_GENERATION, **(generation or {})}
        self.metadata = dict(metadata or {})

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike[str],
        *,
        revision: str | None = None,
        device: str | torch.device | None = None,
        **kwargs: Any,
    ) -> Captioner:
        """Load a full checkpoint or a LoRA adapter from a directory or a Hub repo id."""
        from medblip_peft.hub import resolve_pretrained

        folder = resolve_pretrained(path_or_repo_id, revision=revision)
        model, processor, _ = load_blip(folder)
        metadata = read_metadata(folder)
        kwargs.setdefault("prompt", metadata.get("prompt"))
        return cls(model, processor, device=device, metadata=metadata, **kwargs)

    # ----------------------------------------------------------------------------------------------------
    def _prompt_ids(self, n: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not self.prompt:
            return None, None
        enc = self.processor.tokenizer([self.prompt] * n, return_tensors="pt")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def generate_ids(self, pixel_values: torch.Tensor, **overrides: Any) -> torch.Tensor:
        """Raw generated token ids (prompt included) for a batch of preprocessed images."""
        from medblip_peft.strategies import blip_core

        settings = {**self.generation, **overrides}
        input_ids, attention_mask = self._prompt_ids(pixel_values.shape[0])
        # Generation runs on the unwrapped BLIP: peft injects LoRA layers in place, so they are used, and BLIP's
        # own generate() (which swaps [CLS] for [DEC]) is the one that runs.
        core = blip_core(self.model)
        return core.generate(
            pixel_values=pixel_values.to(self.device, dtype=next(core.parameters()).dtype),
            input_ids=input_ids,
            attention_mask=attention_mask,
            **settings,
        )

    def decode(self, sequences: torch.Tensor) -> list[str]:
        """Decode generated ids, dropping [DEC] and the prompt tokens, so the prompt never reaches a score."""
        skip = 1 + prompt_length(self.processor.tokenizer, self.prompt)
        texts = self.processor.tokenizer.batch_decode(sequences[:, skip:], skip_special_tokens=True)
        return [" ".join(t.split()) for t in texts]

    def preprocess(self, images: Sequence[Any]) -> torch.Tensor:
        pil = [load_image(img) for img in images]
        return self.processor.image_processor(images=pil, return_tensors="pt")["pixel_values"]

    @torch.inference_mode()
    def __call__(
        self,
        images: Any,
        *,
        batch_size: int | None = None,
        progress: bool = False,
        **generation_overrides: Any,
    ) -> list[str]:
        """Caption one image or a sequence of images (PIL images, paths, bytes or numpy arrays).

        Always returns a list of captions, one per image, in input order. Keyword arguments override the
        generation settings (e.g. ``num_beams=1`` for greedy decoding).
        """
        single = not isinstance(images, (list, tuple)) and not _is_batch_array(images)
        items = [images] if single else list(images)
        size = batch_size or self.batch_size
        captions: list[str] = []
        batches: Iterable[int] = range(0, len(items), size)
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, total=-(-len(items) // size), desc="captioning", unit="batch")
        for start in batches:
            pixel_values = self.preprocess(items[start : start + size])
            captions.extend(self.decode(self.generate_ids(pixel_values, **generation_overrides)))
        return captions

    # ----------------------------------------------------------------------------------------------------
    def save_pretrained(
        self, save_directory: str | os.PathLike[str], *, metadata: dict[str, Any] | None = None
    ) -> Path:
        """Write the model (full weights, or the adapter only for peft), processor and metadata as safetensors."""
        from medblip_peft.train import save_checkpoint

        return save_checkpoint(
            self.model,
            self.processor,
            save_directory,
            {**self.metadata, **(metadata or {}), "prompt": self.prompt},
        )

    def push_to_hub(self, repo_id: str, *, private: bool = True, **kwargs: Any):
        """Save to a temporary folder and push it with `medblip_peft.hub.push_to_hub` (private by default)."""
        import tempfile

        from medblip_peft.hub import push_to_hub

        with tempfile.TemporaryDirectory(prefix="medblip-push-") as tmp:
            self.save_pretrained(tmp)
            return push_to_hub(tmp, repo_id, private=private, **kwargs)


def _is_batch_array(images: Any) -> bool:
    # A 4-D array is a batch of images; 2-D/3-D is a single image.
    return hasattr(images, "ndim") and images.ndim == 4
