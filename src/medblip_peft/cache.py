"""Vision-feature cache: run a frozen vision tower once per image instead of once per image per epoch.

When nothing trainable feeds BLIP's vision tower (strategy ``decoder``, or LoRA on the text tower only) and the
pixels never change (no augmentation: this package has none yet, and the check below reads a future
``augment`` setting), the tower's ``last_hidden_state`` for an image is the same in every epoch. A first pass
computes it for every training row; the DataLoader then yields ``image_embeds`` instead of ``pixel_values`` and
the ViT (about 60% of a frozen-vision BLIP-base step) never runs again.

Correctness rules:

* The cache key hashes the vision tower's weights and config, the image-processor settings, the dataset
  fingerprint, the storage dtype and the autocast mode. An on-disk cache is used only when its recorded key
  matches exactly and it was written to the end, so a stale or half-written cache is never read.
* Data order and RNG consumption are unchanged: the cached DataLoader iterates a dataset of the same length with
  the same sampler and generator, and rows whose image fails to decode are dropped from their batch exactly as
  the pixel collator drops them (they are recorded in the manifest once, when the cache is built).
* A vision tower with active dropout would give different outputs in training mode, so the cache is off then.

Features live in RAM (a float tensor) or, with ``vision_cache_dir``, in a memory-mapped ``.npy`` file per key,
so datasets larger than RAM work. BLIP-base stores 577 x 768 values per image: 1.8 MB in float32, 0.9 MB in
float16/bfloat16.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medblip_peft.data.images import BadImageError, load_image

__all__ = [
    "CACHE_DTYPES",
    "CachedCaptionCollator",
    "TrainingFeed",
    "VisionFeatureCache",
    "cache_decision",
    "cache_key",
    "dataset_signature",
    "image_processor_signature",
    "length_grouped_sampler",
    "training_feed",
    "vision_state_hash",
]

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# numpy has no bfloat16: those caches are stored as int16 bit patterns and viewed back as bfloat16.
_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.int16}


# ---------------------------------------------------------------------------------------------------------
# When the cache is valid
# ---------------------------------------------------------------------------------------------------------
def cache_decision(prepared: Any, config: Any) -> tuple[bool, str]:
    """Whether `adapt()` caches vision features for this prepared model and config, and why (one sentence).

    ``config.cache_vision_features`` is ``None`` (auto: on when valid), ``True`` (on when valid; a warning
    explains a refusal) or ``False``. `prepared` is a `strategies.PreparedModel`.
    """
    from medblip_peft.strategies import blip_core

    requested = getattr(config, "cache_vision_features", None)
    if requested is False:
        return False, "vision-feature cache off: disabled by `cache_vision_features=False`"
    vision = blip_core(prepared.model).vision_model
    reason = None
    if not prepared.vision_frozen or any(p.requires_grad for p in vision.parameters()):
        reason = f"strategy {prepared.strategy!r} trains or adapts the vision tower, so its outputs change"
    elif getattr(
        config, "augment", False
    ):  # no augmentation exists yet; a future `augment` field turns it off
        reason = "image augmentation changes the pixels every epoch"
    elif any(isinstance(m, nn.Dropout) and m.p > 0 for m in vision.modules()):
        reason = "the vision tower has active dropout, so its training-mode outputs are random"
    if reason is not None:
        message = f"vision-feature cache off: {reason}"
        logger.log(logging.WARNING if requested else logging.INFO, message)
        return False, message
    message = f"vision-feature cache on: the vision tower is frozen under strategy {prepared.strategy!r}"
    logger.info(message)
    return True, message


# ---------------------------------------------------------------------------------------------------------
# The key
# ---------------------------------------------------------------------------------------------------------
def vision_state_hash(vision: nn.Module) -> str:
    """BLAKE2b of the vision tower's state dict (names, dtypes, shapes and bytes, in name order)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(vision.state_dict().items()):
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def image_processor_signature(image_processor: Any) -> str:
    """The image processor's settings (size, resampling, rescale, normalisation) as canonical JSON."""
    settings = image_processor.to_dict() if hasattr(image_processor, "to_dict") else vars(image_processor)
    return json.dumps(settings, sort_keys=True, default=str)


def dataset_signature(dataset: Any) -> str:
    """`datasets`' content fingerprint when the dataset has one, else a hash of its ids and image paths."""
    fingerprint = getattr(dataset, "_fingerprint", None)
    if fingerprint:
        return f"fingerprint:{fingerprint}:{len(dataset)}"
    digest = hashlib.blake2b(digest_size=16)
    for i in range(len(dataset)):
        row = dataset[i]
        image = row.get("image")
        path = (
            image
            if isinstance(image, str)
            else (image or {}).get("path")
            if isinstance(image, dict)
            else None
        )
        digest.update(f"{row.get('image_id', i)}|{path}|{row.get('caption')}\n".encode())
    return f"rows:{digest.hexdigest()}:{len(dataset)}"


def cache_key(
    vision: nn.Module,
    image_processor: Any,
    dataset: Any,
    *,
    dtype: str = "float32",
    mixed_precision: str = "no",
) -> str:
    """The hex key under which a dataset's vision features are valid."""
    config = getattr(vision, "config", None)
    parts = {
        "format": CACHE_FORMAT,
        "weights": vision_state_hash(vision),
        "vision_config": config.to_json_string() if hasattr(config, "to_json_string") else repr(config),
        "image_processor": image_processor_signature(image_processor),
        "dataset": dataset_signature(dataset),
        "dtype": dtype,
        "mixed_precision": mixed_precision,
    }
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=16).hexdigest()


# ---------------------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------------------
class VisionFeatureCache:
    """Vision-tower outputs for every row of a dataset, in RAM or in a memory-mapped ``.npy`` file.

    ``cache[indices]`` returns the float32 features of those rows, shape ``(len(indices), tokens, hidden)``.
    `bad` holds the rows whose image could not be decoded (their features are zeros and never used).
    """

    def __init__(
        self,
        key: str,
        *,
        dtype: str,
        bad: Sequence[int] = (),
        tensor: torch.Tensor | None = None,
        path: Path | None = None,
    ) -> None:
        self.key, self.dtype, self.bad = key, dtype, frozenset(int(i) for i in bad)
        self._tensor, self.path = tensor, path
        self._memmap: np.ndarray | None = None

    # A memmap must not be pickled into DataLoader workers (numpy would copy the whole array): workers reopen it.
    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_memmap": None}

    def _array(self) -> np.ndarray:
        if self._memmap is None:
            self._memmap = np.load(self.path, mmap_mode="r")
        return self._memmap

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._tensor.shape) if self._tensor is not None else tuple(self._array().shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * CACHE_DTYPES[self.dtype].itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, indices: torch.Tensor | Sequence[int]) -> torch.Tensor:
        index = torch.as_tensor(indices, dtype=torch.long)
        if self._tensor is not None:
            values = self._tensor[index]
        else:
            values = torch.from_numpy(np.ascontiguousarray(self._array()[index.numpy()]))
            if self.dtype == "bfloat16":
                values = values.view(torch.bfloat16)
        return values.float()

    # -- disk ------------------------------------------------------------------------------------------------
    @staticmethod
    def _files(directory: str | os.PathLike[str], key: str) -> tuple[Path, Path]:
        directory = Path(directory)
        return directory / f"vision-{key}.npy", directory / f"vision-{key}.json"

    @classmethod
    def load(cls, directory: str | os.PathLike[str], key: str) -> VisionFeatureCache | None:
        """The complete on-disk cache written under exactly `key`, or ``None`` (a miss)."""
        data, meta_file = cls._files(directory, key)
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if meta.get("key") != key or not meta.get("complete") or meta.get("format") != CACHE_FORMAT:
            return None
        cache = cls(key, dtype=meta["dtype"], bad=meta.get("bad", ()), path=data)
        try:
            if list(cache.shape) != meta["shape"]:
                return None
        except (OSError, ValueError):
            return None
        return cache

    # -- building --------------------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        vision: nn.Module,
        image_processor: Any,
        dataset: Any,
        *,
        key: str,
        dtype: str = "float32",
        directory: str | os.PathLike[str] | None = None,
        device: torch.device | str = "cpu",
        batch_size: int = 16,
        num_workers: int = 0,
        autocast: Callable[[], Any] = contextlib.nullcontext,
        manifest: Any = None,
        accelerator: Any = None,
        progress: bool = False,
    ) -> VisionFeatureCache:
        """Compute ``vision(pixel_values).last_hidden_state`` for every row of `dataset` (batched, no autograd).

        In RAM every process computes all rows. On disk the rows are split between processes, each writes its
        share into one memory-mapped file, and the main process marks it complete only after all have finished.
        """
        world = getattr(accelerator, "num_processes", 1)
        rank = getattr(accelerator, "process_index", 0)
        main = getattr(accelerator, "is_main_process", True)
        n = len(dataset)
        tokens, hidden = _output_shape(vision)
        shape = (n, tokens, hidden)
        mine = list(range(n)) if directory is None else list(range(rank, n, world))
        if directory is None:
            tensor = torch.zeros(shape, dtype=CACHE_DTYPES[dtype])
            store: Any = tensor
        else:
            data, meta_file = cls._files(directory, key)
            partial = data.with_suffix(".partial.npy")
            if main:
                data.parent.mkdir(parents=True, exist_ok=True)
                meta_file.unlink(missing_ok=True)  # whatever was there is not this key's complete cache
                np.lib.format.open_memmap(partial, mode="w+", dtype=_NUMPY_DTYPES[dtype], shape=shape).flush()
            _wait(accelerator)
            store = np.load(partial, mmap_mode="r+")
        bad: list[int] = []
        was_training = vision.training
        vision.eval()
        loader = torch.utils.data.DataLoader(
            _Rows(dataset, mine),
            batch_size=batch_size,
            collate_fn=functools.partial(_decode, image_processor=image_processor),
            num_workers=num_workers,
            # A DataLoader draws its workers' base seed from its generator, by default the global RNG; a
            # private one leaves the global stream (dropout masks, LoRA init) exactly as without the cache.
            generator=torch.Generator(),
        )
        if progress and main:
            from tqdm.auto import tqdm

            loader = tqdm(loader, desc="caching vision features", unit="batch")
        with torch.no_grad():
            for indices, pixel_values, failures in loader:
                for index, row_id, err in failures:
                    bad.append(index)
                    if manifest is not None:
                        manifest.add(id=row_id, path=err.path, reason=err.reason, stage="cache")
                if not indices:
                    continue
                with autocast():
                    out = vision(pixel_values=pixel_values.to(device)).last_hidden_state
                out = out.to("cpu", CACHE_DTYPES[dtype])
                if directory is None:
                    store[torch.tensor(indices)] = out
                else:
                    values = out.view(torch.int16) if dtype == "bfloat16" else out
                    store[np.asarray(indices)] = values.numpy()
        vision.train(was_training)
        if directory is None:
            return cls(key, dtype=dtype, bad=bad, tensor=tensor)
        store.flush()
        del store
        bad = _gather_ints(bad, accelerator)
        _wait(accelerator)
        if main:
            os.replace(partial, data)
            meta = {
                "format": CACHE_FORMAT,
                "key": key,
                "dtype": dtype,
                "shape": list(shape),
                "bad": sorted(bad),
            }
            # The metadata is written last: a cache without it (an interrupted build) is a miss.
            meta_file.write_text(json.dumps({**meta, "complete": True}), encoding="utf-8")
        _wait(accelerator)
        return cls(key, dtype=dtype, bad=bad, path=data)


class _Rows(torch.utils.data.Dataset):
    """Rows `indices` of a dataset, each with its position: the cache pass decodes images in workers."""

    def __init__(self, dataset: Any, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, dict[str, Any]]:
        return self.indices[i], self.dataset[self.indices[i]]


def _decode(rows: list[tuple[int, dict[str, Any]]], image_processor: Any):
    indices, images, failures = [], [], []
    for index, row in rows:
        try:
            images.append(load_image(row["image"]))
            indices.append(index)
        except BadImageError as err:
            failures.append((index, row.get("image_id"), err))
    pixels = image_processor(images=images, return_tensors="pt")["pixel_values"] if images else None
    return indices, pixels, failures


def _output_shape(vision: nn.Module) -> tuple[int, int]:
    config = vision.config
    return (config.image_size // config.patch_size) ** 2 + 1, config.hidden_size  # patches + [CLS]


def _wait(accelerator: Any) -> None:
    if accelerator is not None and getattr(accelerator, "num_processes", 1) > 1:
        accelerator.wait_for_everyone()


def _gather_ints(values: list[int], accelerator: Any) -> list[int]:
    if accelerator is None or getattr(accelerator, "num_processes", 1) == 1:
        return values
    from accelerate.utils import gather_object

    return sorted(set(gather_object(values)))


# ---------------------------------------------------------------------------------------------------------
# Feeding the training loop
# ---------------------------------------------------------------------------------------------------------
class _Indexed(torch.utils.data.Dataset):
    """The caption rows of a dataset with their position as ``__index__`` (no image column is read)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.dataset[i], "__index__": i}


class CachedCaptionCollator:
    """Text batches from a `CaptionCollator` plus ``image_embeds`` looked up in a `VisionFeatureCache`.

    Rows whose image failed to decode when the cache was built are dropped, as the pixel collator drops them.
    """

    def __init__(self, collator: Any, cache: VisionFeatureCache) -> None:
        self.collator, self.cache = collator, cache

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
        rows = [row for row in rows if row["__index__"] not in self.cache.bad]
        batch = self.collator(rows, with_pixels=False)
        if batch is None:
            return None
        batch["image_embeds"] = self.cache[batch.pop("index")]
        return batch


def length_grouped_sampler(dataset: Any, tokenizer: Any, batch_size: int, generator: torch.Generator):
    """A sampler that puts captions of similar token length in the same batch (less padding), randomised
    by `generator` (transformers' `LengthGroupedSampler` on WordPiece lengths)."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    lengths = [len(ids) for ids in tokenizer(list(dataset["caption"]), add_special_tokens=True)["input_ids"]]
    return LengthGroupedSampler(batch_size, lengths=lengths, generator=generator)


@dataclass
class TrainingFeed:
    """What the training DataLoader is built from: rows, collate function, optional sampler, and the cache."""

    dataset: Any
    collate_fn: Callable[[Sequence[dict[str, Any]]], dict[str, Any] | None]
    sampler: Any = None
    cache: VisionFeatureCache | None = None
    reason: str = ""


def training_feed(
    dataset: Any,
    collator: Any,
    prepared: Any,
    image_processor: Any,
    config: Any,
    *,
    accelerator: Any = None,
    manifest: Any = None,
    generator: torch.Generator | None = None,
) -> TrainingFeed:
    """The training rows and collate function for `adapt()`: cached ``image_embeds`` when the cache is valid
    (loaded from ``config.vision_cache_dir`` on a key hit, else built), pixels otherwise."""
    from medblip_peft.strategies import blip_core

    keep = [c for c in ("image", "caption", "image_id") if c in dataset.column_names]
    rows = dataset.select_columns(keep)
    sampler = (
        length_grouped_sampler(rows, collator.tokenizer, config.batch_size, generator)
        if getattr(config, "group_by_length", False)
        else None
    )
    use, reason = cache_decision(prepared, config)
    if not use:
        return TrainingFeed(rows, collator, sampler, None, reason)
    vision = blip_core(prepared.model).vision_model
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    vision.to(device)
    dtype = getattr(config, "vision_cache_dtype", "float32")
    precision = getattr(config, "mixed_precision", "no")
    key = cache_key(vision, image_processor, rows, dtype=dtype, mixed_precision=precision)
    directory = getattr(config, "vision_cache_dir", None)
    cache = VisionFeatureCache.load(directory, key) if directory else None
    if cache is None:
        cache = VisionFeatureCache.build(
            vision,
            image_processor,
            rows,
            key=key,
            dtype=dtype,
            directory=directory,
            device=device,
            batch_size=getattr(config, "eval_batch_size", None) or config.batch_size,
            num_workers=getattr(config, "num_workers", 0),
            autocast=accelerator.autocast if accelerator is not None else contextlib.nullcontext,
            manifest=manifest,
            accelerator=accelerator,
            progress=getattr(config, "progress", False),
        )
        reason += f"; built {len(cache)} images ({cache.nbytes / 2**20:.0f} MiB, {dtype})"
    else:
        reason += f"; loaded {len(cache)} images from {cache.path}"
    logger.info(reason)
    text_rows = rows.select_columns([c for c in keep if c != "image"])
    return TrainingFeed(_Indexed(text_rows), CachedCaptionCollator(collator, cache), sampler, cache, reason)
