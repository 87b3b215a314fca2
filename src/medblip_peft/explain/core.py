"""`explain()` and `Explanation`: which image patches each caption token rests on.

A caption is explained token by token. Whatever the method, the score for caption token *t* is about the
decoder's log-probability of that token given the image and the tokens before it (teacher forcing), so the
decoder position that matters is *t − 1*: the position whose output predicts *t*. Methods return one signed
score per vision patch (``raw_patch_heatmaps``); `Explanation` keeps those and derives normalised maps.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from medblip_peft.data.images import load_image

if TYPE_CHECKING:  # pragma: no cover
    from medblip_peft.caption import Captioner

__all__ = ["CaptionTarget", "Explanation", "explain", "normalise"]


@dataclass
class CaptionTarget:
    """One image and one caption, ready for attribution: the model, its inputs and the tokens to explain.

    ``input_ids`` is what the decoder sees in teacher forcing: ``[DEC]``, the prompt, the caption and
    ``[SEP]``. ``positions`` are the indices (into ``input_ids``) of the caption tokens being explained.
    """

    core: torch.nn.Module
    pixel_values: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    positions: torch.Tensor
    grid: tuple[int, int]
    black: torch.Tensor | None = None  # a black image after the processor's normalisation, (1, 3, 1, 1)

    @property
    def num_tokens(self) -> int:
        return int(self.positions.numel())

    def image_embeds(self, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """The vision tower's output for `pixel_values` (default: the explained image), ``(B, 1 + P, D)``."""
        pixels = self.pixel_values if pixel_values is None else pixel_values
        return self.core.vision_model(pixel_values=pixels).last_hidden_state

    def image_embeds_per_token(self) -> torch.Tensor:
        """The vision tower's output, run once without gradients and copied once per explained token,
        ``(T, 1 + P, D)``: batch row *t* is where the decoder-side methods explain token *t*."""
        with torch.no_grad():
            return self.image_embeds().expand(self.num_tokens, -1, -1).clone()

    def decode(self, image_embeds: torch.Tensor, *, output_attentions: bool = False):
        """The text decoder on `image_embeds` (batch B), with the caption repeated B times."""
        batch = image_embeds.shape[0]
        return self.core.text_decoder(
            input_ids=self.input_ids.expand(batch, -1),
            attention_mask=self.attention_mask.expand(batch, -1),
            encoder_hidden_states=image_embeds,
            output_attentions=output_attentions,
            return_dict=True,
        )

    def logprobs_from_embeds(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` log-probabilities of the explained tokens given the vision tower's output."""
        logits = self.decode(image_embeds).logits
        # Position p - 1 predicts the token at p.
        logp = logits[:, self.positions - 1].float().log_softmax(-1)
        ids = self.input_ids[0, self.positions].expand(image_embeds.shape[0], -1)
        return logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)

    def token_logprobs(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` log-probabilities from pixels: the forward function of the pixel-space Captum methods."""
        return self.logprobs_from_embeds(self.image_embeds(pixel_values))

    def cross_attention_modules(self) -> list[torch.nn.Module]:
        """The decoder's cross-attention cores (``BlipTextSelfAttention``), whose 2nd output is the attention."""
        return [layer.crossattention.self for layer in self.core.text_decoder.bert.encoder.layer]

    def attention_probability_modules(self) -> list[torch.nn.Module]:
        """Per decoder layer, the module whose output is the cross-attention that multiplies the values (the
        attention dropout, an identity at inference): hooking it changes what the decoder reads."""
        return [layer.crossattention.self.dropout for layer in self.core.text_decoder.bert.encoder.layer]


def normalise(raw: torch.Tensor) -> torch.Tensor:
    """Keep the positive evidence and scale each token's map so its peak is 1 (all-zero maps stay zero).

    Negative scores (a patch that lowers the token's probability) are dropped: every overlay answers the same
    question, "where is the evidence *for* this token", whatever the method's sign convention.
    """
    pos = raw.clamp(min=0).flatten(1)
    peak = pos.amax(1, keepdim=True)
    return torch.where(peak > 0, pos / peak.clamp(min=torch.finfo(pos.dtype).tiny), pos).view_as(raw)


@dataclass
class Explanation:
    """Per-token heatmaps for one caption of one image.

    ``raw_patch_heatmaps`` are the method's signed scores (tokens × grid rows × grid columns);
    ``patch_heatmaps`` are their positive part scaled to a peak of 1; ``heatmaps`` are those upsampled
    bilinearly to the image's own size (tokens × H × W). ``peaks`` give each token's heatmap peak as
    ``(x, y)`` pixel coordinates in the image, or ``None`` when the map holds no positive evidence.
    """

    caption: str
    tokens: list[str]
    token_indices: list[int]
    method: str
    raw_patch_heatmaps: np.ndarray
    patch_heatmaps: np.ndarray
    heatmaps: np.ndarray
    image: Any = field(repr=False)
    options: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def peaks(self) -> list[tuple[int, int] | None]:
        """Each token's peak: the centre, in image pixels ``(x, y)``, of its highest-scoring patch.

        The peak is read at patch resolution, not off the upsampled map: bilinear upsampling clamps at the
        borders, so a border patch would otherwise "peak" on the image edge rather than at its centre.
        ``None`` when the map holds no positive evidence.
        """
        _, rows, cols = self.patch_heatmaps.shape
        height, width = self.heatmaps.shape[1:]
        out: list[tuple[int, int] | None] = []
        for patch_map in self.patch_heatmaps:
            if patch_map.max() <= 0:
                out.append(None)
                continue
            row, col = np.unravel_index(int(patch_map.argmax()), patch_map.shape)
            out.append((int((col + 0.5) * width / cols), int((row + 0.5) * height / rows)))
        return out

    def to_dict(self) -> dict[str, Any]:
        """The numbers, JSON-ready (heatmaps at patch resolution; the upsampled ones follow from them)."""
        return {
            "caption": self.caption,
            "method": self.method,
            "options": {
                k: v for k, v in self.options.items() if isinstance(v, (int, float, str, bool, list))
            },
            "seconds": self.seconds,
            "image_size": [int(self.heatmaps.shape[2]), int(self.heatmaps.shape[1])],
            "tokens": [
                {
                    "token": tok,
                    "index": idx,
                    "peak_xy": list(peak) if peak is not None else None,
                    "patch_heatmap": np.round(norm, 6).tolist(),
                    "raw_patch_heatmap": raw.tolist(),
                }
                for tok, idx, peak, norm, raw in zip(
                    self.tokens, self.token_indices, self.peaks, self.patch_heatmaps, self.raw_patch_heatmaps
                )
            ],
        }

    def save(self, directory: str | Path) -> list[Path]:
        """Write one overlay PNG per token, ``grid.png`` and ``explanation.json``; needs the ``plots`` extra."""
        from medblip_peft.explain.render import save_explanation

        return save_explanation(self, directory)

    def plot(self, *, columns: int = 6):
        """A matplotlib `Figure` of every token's overlay (shown inline in notebooks)."""
        from medblip_peft.explain.render import grid_figure

        return grid_figure(self, columns=columns)


# ---------------------------------------------------------------------------------------------------------
def _caption_ids(
    captioner: Captioner, pixel_values: torch.Tensor, caption: str | None, generation
) -> torch.Tensor:
    """``[DEC] prompt caption [SEP]`` ids: generated by the model, or the given caption tokenised as in training."""
    tokenizer = captioner.processor.tokenizer
    if caption is None:
        with torch.no_grad():
            ids = captioner.generate_ids(pixel_values, **{"num_return_sequences": 1, **(generation or {})})[0]
        keep = ids != tokenizer.pad_token_id
        keep[0] = True  # drop the padding of beams that ended early, never the leading [DEC]
        return ids[keep].unsqueeze(0)
    from medblip_peft.data.collate import CaptionCollator

    collator = CaptionCollator(
        captioner.processor, prompt=captioner.prompt, with_pixels=False, max_length=512
    )
    return collator.encode_texts([caption])["input_ids"]


def _select(words: list[str], candidates: list[int], tokens: Sequence[int | str] | None) -> list[int]:
    if tokens is None:
        return candidates
    wanted_idx = {t for t in tokens if isinstance(t, int)}
    wanted_str = {t.lower() for t in tokens if isinstance(t, str)}
    bad = [t for t in wanted_idx if not 0 <= t < len(candidates)]
    if bad:
        raise ValueError(f"token indices {bad} are out of range for a caption of {len(candidates)} tokens.")
    return [p for i, p in enumerate(candidates) if i in wanted_idx or words[i].lower() in wanted_str]


def prepare(
    captioner: Captioner,
    image: Any,
    *,
    caption: str | None = None,
    tokens: Sequence[int | str] | None = None,
    generation: dict[str, Any] | None = None,
) -> tuple[CaptionTarget, str, list[str], list[int], Any]:
    """Build the `CaptionTarget` for `image` plus the caption text, token strings, their indices and the image."""
    from medblip_peft.data.collate import prompt_length
    from medblip_peft.strategies import blip_core

    pil = load_image(image)
    core = blip_core(captioner.model)
    param = next(core.parameters())
    pixel_values = captioner.preprocess([pil]).to(param.device, dtype=param.dtype)
    input_ids = _caption_ids(captioner, pixel_values, caption, generation).to(param.device)
    tokenizer = captioner.processor.tokenizer
    special = set(tokenizer.all_special_ids)
    start = 1 + prompt_length(tokenizer, captioner.prompt)
    candidates = [p for p in range(start, input_ids.shape[1]) if int(input_ids[0, p]) not in special]
    words = tokenizer.convert_ids_to_tokens([int(input_ids[0, p]) for p in candidates])
    chosen = _select(words, candidates, tokens)
    if not chosen:
        raise ValueError(f"Nothing to explain: the caption has no tokens matching {tokens!r}.")
    vision = core.config.vision_config
    side = vision.image_size // vision.patch_size
    processor = captioner.processor.image_processor
    mean, std = (
        torch.tensor(v, dtype=param.dtype).view(1, -1, 1, 1)
        for v in (processor.image_mean, processor.image_std)
    )
    target = CaptionTarget(
        core=core,
        pixel_values=pixel_values,
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        positions=torch.tensor(chosen, device=param.device),
        grid=(side, side),
        black=((0 - mean) / std).to(param.device),
    )
    text = captioner.decode(input_ids)[0] if caption is None else " ".join(caption.split())
    return (
        target,
        text,
        [words[candidates.index(p)] for p in chosen],
        [candidates.index(p) for p in chosen],
        pil,
    )


def explain(
    captioner: Captioner,
    image: Any,
    *,
    method: str = "attention_ig",
    caption: str | None = None,
    tokens: Sequence[int | str] | None = None,
    generation: dict[str, Any] | None = None,
    **options: Any,
) -> Explanation:
    """Explain a caption of `image`, token by token, with one attribution `method`.

    `captioner` is any `Captioner` (full, encoder, decoder or LoRA checkpoints; CPU or GPU). Without `caption`
    the model's own caption is generated (with the captioner's generation settings, overridden by
    `generation`) and explained; with `caption` that text is explained under teacher forcing. `tokens` limits
    the work to some caption tokens: integer indices into the caption's tokens and/or token strings.
    `options` go to the method (see `medblip_peft.explain.METHODS`, e.g. ``layers``, ``heads``, ``n_steps``,
    ``internal_batch_size``, ``baseline``); an option the method does not take is an error.
    """
    from medblip_peft.explain.methods import get_method

    spec = get_method(method)
    settings = spec.resolve(options)
    start = time.perf_counter()
    target, text, words, indices, pil = prepare(
        captioner, image, caption=caption, tokens=tokens, generation=generation
    )
    raw = spec.fn(target, **settings).detach().float()
    if raw.shape != (target.num_tokens, *target.grid):
        raise RuntimeError(
            f"method {method!r} returned {tuple(raw.shape)}, expected {(target.num_tokens, *target.grid)}"
        )
    norm = normalise(raw)
    width, height = pil.size
    upsampled = F.interpolate(norm.unsqueeze(1), size=(height, width), mode="bilinear", align_corners=False)
    return Explanation(
        caption=text,
        tokens=words,
        token_indices=indices,
        method=spec.name,
        raw_patch_heatmaps=raw.cpu().numpy(),
        patch_heatmaps=norm.cpu().numpy(),
        heatmaps=upsampled.squeeze(1).clamp(0, 1).cpu().numpy(),
        image=pil,
        options=settings,
        seconds=time.perf_counter() - start,
    )
