"""Baseline captioners behind one protocol: images in, one caption per image out.

The study compares fine-tuned BLIP with zero-shot BLIP (base and large), BLIP-2, InstructBLIP, ViT-GPT2 and
Gemini 1.5 Flash. Every one of them is a :class:`CaptionerLike`, so :func:`medblip_peft.evaluation.tables.compare`
runs them all the same way. :func:`load_baseline` takes a registry name (:data:`BASELINES`), a Hub repo id or a
local folder; for ids and folders the family is read from ``config.json``'s ``model_type``, so a fine-tuned
medblip-peft checkpoint (full or LoRA) loads through the same call.

Loading rules, for every family: weights come from safetensors only (``use_safetensors=True``; Hub snapshots go
through :func:`medblip_peft.hub.resolve_pretrained`, which never fetches pickles), remote code is never trusted,
and image processors are the PIL ones (``backend="pil"``), so torchvision is never needed. All Hugging Face
baselines decode with the same settings as :class:`~medblip_peft.caption.Captioner` (``DEFAULT_GENERATION``),
so differences between systems come from the models, not from decoding.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from medblip_peft.caption import DEFAULT_GENERATION, Captioner, auto_device
from medblip_peft.data.images import load_image

__all__ = [
    "BASELINES",
    "DEFAULT_INSTRUCTION",
    "FAMILIES",
    "BaselineSpec",
    "CaptionerLike",
    "HFCaptioner",
    "VisionEncoderDecoderCaptioner",
    "load_baseline",
]

#: The instruction the study gave InstructBLIP.
DEFAULT_INSTRUCTION = "Describe the clinical findings in this medical scan."


@runtime_checkable
class CaptionerLike(Protocol):
    """Anything that captions images: a list of images in, a list of captions (one per image, in order) out.

    Images are whatever :func:`medblip_peft.data.images.load_image` accepts (PIL images, paths, bytes, arrays,
    ``datasets`` image dicts). Keyword arguments are generation overrides and may be ignored. A captioner may
    expose ``failures`` (a list of dicts with at least ``index`` and ``error``) for images it could not caption;
    those images get an empty caption, so the output always has one entry per input.
    """

    name: str

    def __call__(self, images: Sequence[Any], **kwargs: Any) -> list[str]: ...


# --------------------------------------------------------------------------------------------- HF models
class HFCaptioner:
    """A Hugging Face vision-language model whose processor takes ``images=`` and ``text=`` (BLIP-2, InstructBLIP).

    The same prompt is given for every image, so a batch is never padded. For decoder-only language models
    (OPT, Vicuna) ``generate`` returns the prompt tokens first; they are cut off so the prompt never reaches a
    score. Encoder-decoder language models (Flan-T5) return new tokens only.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Any,
        *,
        name: str,
        prompt: str = "",
        device: str | torch.device | None = None,
        batch_size: int = 8,
        generation: dict[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.device = auto_device(device)
        self.model = model.to(self.device).eval()
        self.processor = processor
        self.prompt = prompt
        self.batch_size = batch_size
        self.generation = {**DEFAULT_GENERATION, **(generation or {})}

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    def encode(self, images: list[Any]) -> dict[str, torch.Tensor]:
        """Processor outputs for one batch of decoded RGB images, on the model's device and dtype."""
        inputs = self.processor(images=images, text=[self.prompt] * len(images), return_tensors="pt")
        dtype = next(self.model.parameters()).dtype
        return {k: v.to(self.device, dtype=dtype if v.is_floating_point() else None) for k, v in inputs.items()}

    def decode(self, sequences: torch.Tensor, inputs: dict[str, torch.Tensor]) -> list[str]:
        text_config = getattr(self.model.config, "text_config", None)
        if "input_ids" in inputs and not getattr(text_config, "is_encoder_decoder", False):
            sequences = sequences[:, inputs["input_ids"].shape[1] :]
        texts = self.tokenizer.batch_decode(sequences, skip_special_tokens=True)
        return [" ".join(t.split()) for t in texts]

    @torch.inference_mode()
    def __call__(self, images: Sequence[Any], *, batch_size: int | None = None, **overrides: Any) -> list[str]:
        """Caption ``images`` (anything ``load_image`` reads); ``overrides`` replace generation settings."""
        items = list(images)
        size = batch_size or self.batch_size
        captions: list[str] = []
        for start in range(0, len(items), size):
            inputs = self.encode([load_image(img) for img in items[start : start + size]])
            sequences = self.model.generate(**inputs, **{**self.generation, **overrides})
            captions.extend(self.decode(sequences, inputs))
        return captions


class VisionEncoderDecoderCaptioner(HFCaptioner):
    """ViT-GPT2 and other ``VisionEncoderDecoderModel`` captioners: an image processor plus a tokenizer.

    ``processor`` is a ``(image_processor, tokenizer)`` pair; there is no text prompt. The decoder's output
    starts with its start token, which ``skip_special_tokens`` removes.
    """

    @property
    def tokenizer(self) -> Any:
        return self.processor[1]

    def encode(self, images: list[Any]) -> dict[str, torch.Tensor]:
        pixels = self.processor[0](images=images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels.to(self.device, dtype=next(self.model.parameters()).dtype)}


# ------------------------------------------------------------------------------------------------ loaders
def _folder(source: str | Path, revision: str | None) -> Path:
    from medblip_peft.hub import resolve_pretrained

    return resolve_pretrained(source, revision=revision)


def _weights_kwargs(device: torch.device, dtype: torch.dtype | None) -> dict[str, Any]:
    # Half precision on CUDA keeps BLIP-2 (3.9 B parameters) and InstructBLIP (8 B) inside one GPU; CPUs and
    # MPS stay in float32, where float16 matmuls are slow or unsupported.
    chosen = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    return {"use_safetensors": True, "trust_remote_code": False, "dtype": chosen}


def _load_blip(folder: Path, *, name: str, device: torch.device, dtype: torch.dtype | None, **kw: Any):
    # A zero-shot BLIP is a Captioner on the base weights; fine-tuned checkpoints (LoRA too) load the same way.
    captioner = Captioner.from_pretrained(folder, device=device, **kw)
    if dtype is not None:
        captioner.model.to(dtype)
    captioner.name = name
    return captioner


def _load_qformer_vlm(model_cls: str, processor_cls: str, default_prompt: str) -> Callable[..., HFCaptioner]:
    """Loader for a Q-Former model (BLIP-2, InstructBLIP): the classes differ, the code path does not."""

    def load(
        folder: Path,
        *,
        name: str,
        device: torch.device,
        dtype: torch.dtype | None,
        prompt: str | None = None,
        **kw: Any,
    ) -> HFCaptioner:
        import transformers

        model = getattr(transformers, model_cls).from_pretrained(folder, **_weights_kwargs(device, dtype))
        processor = getattr(transformers, processor_cls).from_pretrained(folder, backend="pil")
        if getattr(processor, "num_query_tokens", None) is None:  # older repos: expand <image> from the config
            processor.num_query_tokens = model.config.num_query_tokens
        prompt = default_prompt if prompt is None else prompt
        return HFCaptioner(model, processor, name=name, prompt=prompt, device=device, **kw)

    load.__doc__ = f"Load a {model_cls} and its {processor_cls} (PIL image processor) from a folder."
    return load


def _load_vision_encoder_decoder(
    folder: Path, *, name: str, device: torch.device, dtype: torch.dtype | None, **kw: Any
) -> VisionEncoderDecoderCaptioner:
    """Load a ``VisionEncoderDecoderModel`` (ViT encoder) with ``ViTImageProcessorPil`` and its tokenizer."""
    from transformers import AutoTokenizer, VisionEncoderDecoderModel, ViTImageProcessorPil

    model = VisionEncoderDecoderModel.from_pretrained(folder, **_weights_kwargs(device, dtype))
    image_processor = ViTImageProcessorPil.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    # GPT-2 has no pad token; generate() needs one to pad finished beams.
    if model.generation_config.pad_token_id is None:
        pad = tokenizer.pad_token_id
        model.generation_config.pad_token_id = pad if pad is not None else model.config.decoder.eos_token_id
    return VisionEncoderDecoderCaptioner(model, (image_processor, tokenizer), name=name, device=device, **kw)


def _load_gemini(source: str, *, name: str, **kw: Any):
    from .gemini import GeminiCaptioner

    return GeminiCaptioner(model=source, name=name, **kw)


#: Family name -> loader ``(folder, *, name, device, dtype, **kw) -> CaptionerLike``.
FAMILIES: dict[str, Callable[..., CaptionerLike]] = {
    "blip": _load_blip,
    "blip2": _load_qformer_vlm("Blip2ForConditionalGeneration", "Blip2Processor", ""),
    "instructblip": _load_qformer_vlm(
        "InstructBlipForConditionalGeneration", "InstructBlipProcessor", DEFAULT_INSTRUCTION
    ),
    "vision-encoder-decoder": _load_vision_encoder_decoder,
    "gemini": _load_gemini,
}

#: ``config.json`` ``model_type`` -> family, for Hub ids and folders that are not registry names.
_MODEL_TYPES = {
    "blip": "blip",
    "blip-2": "blip2",
    "instructblip": "instructblip",
    "vision-encoder-decoder": "vision-encoder-decoder",
}


@dataclass(frozen=True)
class BaselineSpec:
    """A registered baseline: which loader family, which model, and default loader keyword arguments."""

    family: str
    model_id: str
    description: str
    defaults: dict[str, Any] = field(default_factory=dict)


#: Known baselines by short name (the study's systems).
BASELINES: dict[str, BaselineSpec] = {
    "blip-base": BaselineSpec("blip", "Salesforce/blip-image-captioning-base", "BLIP base, zero-shot"),
    "blip-large": BaselineSpec("blip", "Salesforce/blip-image-captioning-large", "BLIP large, zero-shot"),
    "blip2": BaselineSpec("blip2", "Salesforce/blip2-opt-2.7b", "BLIP-2 with OPT-2.7B, zero-shot"),
    "instructblip": BaselineSpec(
        "instructblip", "Salesforce/instructblip-vicuna-7b", "InstructBLIP (Vicuna-7B) with an instruction"
    ),
    "vit-gpt2": BaselineSpec(
        "vision-encoder-decoder", "nlpconnect/vit-gpt2-image-captioning", "ViT encoder, GPT-2 decoder"
    ),
    "gemini": BaselineSpec(
        "gemini", "gemini-1.5-flash", "Gemini via google-genai (API key from the environment)",
        {"temperature": 0.4, "top_p": 0.9},
    ),
}


def _family_of(folder: Path) -> str:
    """The loader family of a local folder: a peft adapter is a BLIP; otherwise ``config.json`` decides."""
    if (folder / "adapter_config.json").is_file():
        return "blip"
    config = folder / "config.json"
    model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type") if config.is_file() else None
    if model_type not in _MODEL_TYPES:
        raise ValueError(
            f"{folder} holds model_type={model_type!r}; load_baseline knows {sorted(_MODEL_TYPES)} "
            f"(or a registry name: {sorted(BASELINES)})."
        )
    return _MODEL_TYPES[model_type]


def load_baseline(
    name_or_id: str | Path,
    *,
    model_id: str | None = None,
    name: str | None = None,
    revision: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **kwargs: Any,
) -> CaptionerLike:
    """Load a captioner by registry name (:data:`BASELINES`), Hub repo id or local folder.

    Args:
        name_or_id: ``"blip-base"``, ``"blip-large"``, ``"blip2"``, ``"instructblip"``, ``"vit-gpt2"``,
            ``"gemini"``; or a Hub id / folder of a BLIP (fine-tuned or LoRA too), BLIP-2, InstructBLIP or
            vision-encoder-decoder model, recognised by its ``config.json``.
        model_id: Use another checkpoint (or Gemini model name) for a registry name, e.g.
            ``load_baseline("instructblip", model_id="Salesforce/instructblip-flan-t5-xl")``.
        name: The captioner's ``name`` (default: ``name_or_id``).
        revision: Hub revision of the weights.
        device: ``cuda``, ``mps`` or ``cpu`` (default: the best available).
        dtype: Weights' dtype (default float16 on CUDA, float32 elsewhere).
        **kwargs: Passed to the captioner: ``prompt`` (InstructBLIP's instruction, BLIP-2's text prefix),
            ``batch_size``, ``generation`` (dict of generate() settings); for Gemini, see
            :class:`~medblip_peft.evaluation.gemini.GeminiCaptioner`.
    """
    key = str(name_or_id)
    spec = BASELINES.get(key)
    if spec is not None:
        family, source, kwargs = spec.family, model_id or spec.model_id, {**spec.defaults, **kwargs}
    else:
        family, source = None, key
    if family == "gemini":
        return FAMILIES[family](source, name=name or key, **kwargs)
    folder = _folder(source, revision)
    family = family or _family_of(folder)
    return FAMILIES[family](folder, name=name or key, device=auto_device(device), dtype=dtype, **kwargs)
