"""Checks that explanations mean something: grounding on phantoms, and the model-randomisation test.

**Location tokens.** In a caption explained on a phantom, the location tokens are the WordPiece tokens whose
text (lower-cased) is one of the side words ``left``/``right``, the level words ``upper``/``lower``, or a
finding word of the phantom grammar (``mass``, ``nodule``, ``lesion``), except a finding word that is negated
(``no`` among the three words before it, as in "no focal lesion"): such a word asserts that nothing is there.
Only phantoms that carry a lesion count.

**Pointing game.** A location token scores a hit when the peak of its heatmap (`Explanation.peaks`: the
centre of its highest-scoring patch, first on ties) falls inside the lesion mask; a map with no positive
evidence is a miss. **Energy** is the
share of the map's (positive, upsampled) mass inside the mask. A uniformly random peak hits with probability
equal to the lesion's area fraction, which is also a uniform map's energy: that is the random baseline.

**Randomisation check** (Adebayo et al., 2018). An explanation that does not change when the weights it claims
to explain are destroyed explains the image, not the model. The check re-initialises the decoder's
cross-attention (or the whole model) on a deep copy, explains the *same* caption again (teacher-forced), and
reports the Spearman rank correlation between each token's patch scores before and after. A method passes
when the mean correlation is below `RANDOMIZATION_THRESHOLD` (0.5).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from medblip_peft.data.images import load_image

if TYPE_CHECKING:  # pragma: no cover
    from medblip_peft.caption import Captioner

__all__ = [
    "FINDING_WORDS",
    "LOCATION_WORDS",
    "RANDOMIZATION_THRESHOLD",
    "grounding_score",
    "location_token_indices",
    "randomization_check",
    "spearman",
]

LOCATION_WORDS = frozenset({"left", "right", "upper", "lower"})
FINDING_WORDS = frozenset({"mass", "nodule", "lesion"})
NEGATION_WINDOW = 3
RANDOMIZATION_THRESHOLD = 0.5
ALL_METHODS = (
    "cross_attention",
    "attention_rollout",
    "grad_x_attention",
    "attention_ig",
    "integrated_gradients",
    "occlusion",
)


def location_token_indices(tokens: Sequence[str]) -> list[int]:
    """Indices of the location tokens (see the module docstring) among a caption's WordPiece tokens."""
    words = [t.lower() for t in tokens]
    hits = []
    for i, word in enumerate(words):
        negated = "no" in words[max(0, i - NEGATION_WINDOW) : i]
        if word in LOCATION_WORDS or (word in FINDING_WORDS and not negated):
            hits.append(i)
    return hits


def _mask_array(mask: Any, size: tuple[int, int]) -> np.ndarray:
    pil = load_image(mask).convert("L")
    if pil.size != size:
        from PIL import Image

        pil = pil.resize(size, Image.NEAREST)
    return np.asarray(pil) > 127


def _tokens_of(captioner: Captioner, caption: str) -> list[str]:
    return captioner.processor.tokenizer.tokenize(caption)


def grounding_score(
    captioner: Captioner,
    dataset: Any,
    *,
    methods: Sequence[str] = ALL_METHODS,
    teacher_forced: bool = False,
    generation: dict[str, Any] | None = None,
    method_options: dict[str, dict[str, Any]] | None = None,
    max_items: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Pointing game and energy-in-mask of each method on lesion-bearing phantoms.

    `dataset` rows need ``image`` and ``mask`` (and ``caption`` when `teacher_forced`); rows whose mask is
    empty are skipped. Without `teacher_forced` the model's own caption is explained (greedy decoding unless
    `generation` says otherwise), so a token counts even when the model got the side wrong. Returns
    ``{"methods": {name: {"pointing_game", "energy", "tokens", "seconds_per_caption"}}, "baseline":
    {"pointing_game", "energy"}, "images", "images_without_location_tokens", "tokens", "per_word"}``; ``per_word``
    gives each method's pointing game per location word.
    """
    from medblip_peft.explain.core import explain

    options = method_options or {}
    stats = {m: {"hits": 0, "energy": 0.0, "seconds": 0.0, "captions": 0} for m in methods}
    per_word: dict[str, dict[str, list[int]]] = {m: {} for m in methods}
    area_sum, n_tokens, n_images, n_silent = 0.0, 0, 0, 0
    rows: Iterable[Any] = (
        dataset if max_items is None else dataset.select(range(min(max_items, len(dataset))))
    )
    if progress:
        from tqdm.auto import tqdm

        rows = tqdm(rows, desc="grounding", unit="image")
    for row in rows:
        image = load_image(row["image"])
        mask = _mask_array(row["mask"], image.size)
        if not mask.any():
            continue
        caption = row["caption"] if teacher_forced else None
        if caption is None:
            caption = captioner([image], **{"num_beams": 1, **(generation or {})})[0]
        picks = location_token_indices(_tokens_of(captioner, caption))
        if not picks:  # e.g. "no focal lesion" on a lesion-bearing phantom: nothing to point with
            n_silent += 1
            continue
        n_images += 1
        n_tokens += len(picks)
        area_sum += float(mask.mean()) * len(picks)
        for name in methods:
            exp = explain(
                captioner, image, method=name, caption=caption, tokens=picks, **options.get(name, {})
            )
            stats[name]["seconds"] += exp.seconds
            stats[name]["captions"] += 1
            for token, heat, peak in zip(exp.tokens, exp.heatmaps, exp.peaks):
                hit = peak is not None and bool(mask[peak[1], peak[0]])
                stats[name]["hits"] += hit
                total = float(heat.sum())
                stats[name]["energy"] += float(heat[mask].sum()) / total if total > 0 else 0.0
                per_word[name].setdefault(token, []).append(int(hit))
    denom = max(n_tokens, 1)
    return {
        "methods": {
            name: {
                "pointing_game": s["hits"] / denom,
                "energy": s["energy"] / denom,
                "tokens": n_tokens,
                "seconds_per_caption": s["seconds"] / max(s["captions"], 1),
            }
            for name, s in stats.items()
        },
        "baseline": {"pointing_game": area_sum / denom, "energy": area_sum / denom},
        "images": n_images,
        "images_without_location_tokens": n_silent,
        "tokens": n_tokens,
        "per_word": {m: {w: float(np.mean(h)) for w, h in words.items()} for m, words in per_word.items()},
    }


# --- randomisation ------------------------------------------------------------------------------------------
def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their ranks), as Spearman's rho needs."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two score arrays (0.0 when either is constant)."""
    ra, rb = _ranks(np.ravel(a)), _ranks(np.ravel(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(np.sqrt((ra**2).sum() * (rb**2).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else 0.0


def _reinitialise(module: nn.Module, generator: torch.Generator) -> None:
    """Fresh random weights for every parameter under `module` (LoRA adapters included): N(0, 0.02) for
    matrices and embeddings, as BLIP initialises them, and the identity for norm layers."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif param.ndim == 1:  # LayerNorm weight, class/position scalars
                param.fill_(1.0)
            else:
                noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
                param.copy_(noise.mul_(0.02).to(param))


def _randomised_copy(captioner: Captioner, target: str, seed: int) -> Captioner:
    from medblip_peft.caption import Captioner
    from medblip_peft.strategies import blip_core

    model = copy.deepcopy(captioner.model)
    core = blip_core(model)
    generator = torch.Generator().manual_seed(seed)
    if target == "cross_attention":
        for layer in core.text_decoder.bert.encoder.layer:
            _reinitialise(layer.crossattention, generator)
    elif target == "model":
        _reinitialise(core, generator)
    else:
        raise ValueError(f"`target` must be 'cross_attention' or 'model', got {target!r}.")
    return Captioner(
        model,
        captioner.processor,
        prompt=captioner.prompt,
        device=captioner.device,
        generation=captioner.generation,
    )


def randomization_check(
    captioner: Captioner,
    images: Sequence[Any],
    *,
    methods: Sequence[str] = ALL_METHODS,
    target: str = "cross_attention",
    captions: Sequence[str] | None = None,
    seed: int = 0,
    threshold: float = RANDOMIZATION_THRESHOLD,
    method_options: dict[str, dict[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Spearman correlation of each method's patch scores before and after re-initialising `target`.

    ``target="cross_attention"`` re-initialises the decoder's cross-attention blocks; ``"model"`` every weight.
    The same captions (the model's own greedy captions unless `captions` are given) are explained before and
    after. Returns ``{method: {"spearman": mean, "per_image": [...], "passed": mean < threshold}}``.
    """
    from medblip_peft.explain.core import explain

    options = method_options or {}
    texts = list(captions) if captions is not None else captioner(list(images), num_beams=1)
    randomised = _randomised_copy(captioner, target, seed)
    report: dict[str, dict[str, Any]] = {}
    for name in methods:
        start = time.perf_counter()
        per_image = []
        for image, text in zip(images, texts):
            kwargs = {"method": name, "caption": text, **options.get(name, {})}
            before = explain(captioner, image, **kwargs).raw_patch_heatmaps
            after = explain(randomised, image, **kwargs).raw_patch_heatmaps
            per_image.append(float(np.mean([spearman(b, a) for b, a in zip(before, after)])))
        mean = float(np.mean(per_image))
        report[name] = {
            "spearman": mean,
            "per_image": per_image,
            "passed": mean < threshold,
            "seconds": time.perf_counter() - start,
        }
    return report
