"""Turning rows of (image, caption) into a BLIP training batch, correctly.

The study's training code had three bugs that this collator exists to prevent:

* padding was counted in the loss: here every padded position has label -100;
* captions began with [CLS] during training while `generate()` begins them with [DEC]: here the first input
  token is the tokenizer's BOS ([DEC]), exactly what `BlipForConditionalGeneration.generate` feeds;
* prompts were scored as if the model had to predict them: here prompt tokens have label -100 too.

Padding is dynamic (to the longest caption in the batch), not to a fixed 128 tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from medblip_peft.data.images import BadImageError, load_image
from medblip_peft.data.manifest import SkipManifest

__all__ = ["IGNORE_INDEX", "CaptionCollator", "prompt_length"]

IGNORE_INDEX = -100  # torch's CrossEntropyLoss default ignore_index


def prompt_length(tokenizer, prompt: str | None) -> int:
    """Number of WordPiece tokens of `prompt` (no special tokens); 0 without a prompt."""
    return len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) if prompt else 0


class CaptionCollator:
    """Collate dataset rows (dicts with ``image`` and ``caption``) into BLIP inputs with masked labels.

    Rows whose image cannot be decoded, or whose caption is empty, are left out of the batch and recorded in
    `manifest` (never silently). Captions longer than `max_length` tokens are truncated and counted in
    `truncated`. When every row of a batch is bad the collator returns ``None`` and the loop skips it.
    """

    def __init__(
        self,
        processor,
        *,
        max_length: int = 96,
        prompt: str | None = None,
        manifest: SkipManifest | None = None,
        with_pixels: bool = True,
    ) -> None:
        self.image_processor = processor.image_processor
        self.tokenizer = processor.tokenizer
        self.max_length = max_length
        self.prompt = prompt.strip() if prompt else None
        self.n_prompt = prompt_length(self.tokenizer, self.prompt)
        if 1 + self.n_prompt + 2 > max_length:
            raise ValueError(
                f"The prompt takes {self.n_prompt} tokens, which leaves no room for a caption within "
                f"`max_caption_tokens={max_length}`; shorten the prompt or raise `max_caption_tokens`."
            )
        self.manifest = manifest if manifest is not None else SkipManifest()
        self.with_pixels = with_pixels
        self.truncated = 0
        bos, sep, pad = self.tokenizer.bos_token_id, self.tokenizer.sep_token_id, self.tokenizer.pad_token_id
        if bos is None or sep is None or pad is None:
            raise ValueError(
                "The tokenizer needs BLIP's special tokens: a bos_token ([DEC]), sep_token ([SEP]) and pad_token "
                "([PAD]). Load the processor that belongs to the BLIP checkpoint."
            )
        self.bos_id, self.sep_id, self.pad_id = bos, sep, pad

    def _row_id(self, row: dict[str, Any]) -> str | None:
        value = row.get("image_id", row.get("id"))
        return None if value is None else str(value)

    def encode_texts(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token ids, attention mask and labels for captions (with the prompt in front, when set)."""
        texts = [f"{self.prompt} {c}" if self.prompt else c for c in captions]
        encoded = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        rows = []
        for ids in encoded:
            if len(ids) > self.max_length:
                self.truncated += 1
                ids = [*ids[: self.max_length - 1], self.sep_id]
            rows.append(ids)
        longest = max(len(ids) for ids in rows)
        input_ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, ids in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, : len(ids)] = 1
        # generate() starts from [DEC]; the tokenizer put [CLS] there.
        input_ids[:, 0] = self.bos_id
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        labels[:, : 1 + self.n_prompt] = IGNORE_INDEX  # [DEC] and the prompt are given, never predicted
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def __call__(
        self, rows: Sequence[dict[str, Any]], *, with_pixels: bool | None = None
    ) -> dict[str, Any] | None:
        """Collate `rows`; ``with_pixels=False`` (default: the constructor's setting) skips the images, for
        batches whose image features come from the vision-feature cache."""
        with_pixels = self.with_pixels if with_pixels is None else with_pixels
        images, captions, kept = [], [], []
        for row in rows:
            caption = row.get("caption")
            if not isinstance(caption, str) or not caption.strip():
                self.manifest.add(
                    id=self._row_id(row),
                    path=_path_of(row.get("image")),
                    reason="empty-caption",
                    stage="collate",
                )
                continue
            if with_pixels:
                try:
                    images.append(load_image(row["image"]))
                except BadImageError as err:
                    self.manifest.add(id=self._row_id(row), path=err.path, reason=err.reason, stage="collate")
                    continue
            captions.append(caption.strip())
            kept.append(row)
        if not captions:
            return None
        batch: dict[str, Any] = self.encode_texts(captions)
        if with_pixels:
            batch["pixel_values"] = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        if "__index__" in kept[0]:
            batch["index"] = torch.tensor([r["__index__"] for r in kept], dtype=torch.long)
        return batch


def _path_of(image: Any) -> str | None:
    if isinstance(image, str):
        return image
    if isinstance(image, dict):
        return image.get("path")
    return getattr(image, "filename", None) or None
