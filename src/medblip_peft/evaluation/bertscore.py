"""BERTScore through the ``bert-score`` package, loaded lazily and cached per configuration."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .stats import MetricStats

__all__ = ["BERTScoreConfig", "bertscore_stats"]

BERTSCORE_NAMES = ("bertscore_precision", "bertscore_recall", "bertscore_f1")


@dataclass(frozen=True)
class BERTScoreConfig:
    """Arguments forwarded to ``bert_score`` (same names, same meaning).

    Attributes:
        model_type: Hub id or local directory of the encoder, e.g. ``"roberta-large"`` (bert-score's English
            default) or ``"emilyalsentzer/Bio_ClinicalBERT"``.
        num_layers: Layer whose embeddings are compared.  Required for models bert-score has no tuned default
            for (any local path, Bio_ClinicalBERT).
        idf: Weight tokens by inverse document frequency computed on the references.
        rescale_with_baseline: Rescale with bert-score's shipped baseline for ``lang`` (or ``baseline_path``).
        lang: Language of the baseline; only used when rescaling.
        baseline_path: Custom baseline file (needed for models without a shipped baseline).
        batch_size: Encoding batch size.
        device: Torch device; ``None`` lets bert-score choose (CUDA when available).
    """

    model_type: str = "roberta-large"
    num_layers: int | None = None
    idf: bool = False
    rescale_with_baseline: bool = False
    lang: str = "en"
    baseline_path: str | None = None
    batch_size: int = 64
    device: str | None = None


# Loading an encoder takes seconds; keep the most recent scorer so repeated calls (CIs, several systems) reuse it.
_CACHE: dict[BERTScoreConfig, object] = {}


_NOT_AVAILABLE = (
    "BERTScore model {!r} is not available: it is not a local directory, not in the Hugging Face cache, and the "
    "Hub is unreachable (HF_HUB_OFFLINE or no network). Download it once with network access, or pass a local "
    "directory as `model_type` together with `num_layers`."
)


def _check_offline_availability(model_type: str) -> None:
    """Fail fast, with the fix in the message, instead of letting transformers retry the network."""
    from huggingface_hub import constants, try_to_load_from_cache

    if Path(model_type).is_dir() or not constants.is_offline_mode():
        return
    if not isinstance(try_to_load_from_cache(model_type, "config.json"), str):
        raise OSError(_NOT_AVAILABLE.format(model_type))


def _scorer(config: BERTScoreConfig):
    if config in _CACHE:
        return _CACHE[config]
    from bert_score import BERTScorer

    _check_offline_availability(config.model_type)
    kwargs = asdict(config)
    try:
        scorer = BERTScorer(**kwargs)
    except KeyError as err:
        raise ValueError(
            f"bert-score has no default layer for model {config.model_type!r}: pass `num_layers` "
            "(e.g. bertscore={'model_type': ..., 'num_layers': 6})"
        ) from err
    except OSError as err:
        raise OSError(_NOT_AVAILABLE.format(config.model_type)) from err
    _CACHE.clear()
    _CACHE[config] = scorer
    return scorer


def bertscore_stats(
    predictions: Sequence[str], references: Sequence[Sequence[str]], config: BERTScoreConfig | None = None
) -> MetricStats:
    """Per-image BERTScore precision, recall and F1 (max over an image's references, as bert-score does).

    Results equal ``bert_score.score(predictions, references, model_type=..., num_layers=..., idf=...,
    rescale_with_baseline=..., lang=...)`` on the same inputs.  Empty captions are the exception: bert-score
    cannot encode them (it crashes under transformers 5), so an empty prediction, or an image whose references
    are all empty, scores a raw 0 (then baseline-rescaled like every other score), and empty references are
    dropped from an image's reference group and from the IDF sentences.
    """
    config = config or BERTScoreConfig()
    scorer = _scorer(config)
    keep = [
        i
        for i, (p, refs) in enumerate(zip(predictions, references))
        if p.strip() and any(r.strip() for r in refs)
    ]
    raw = np.zeros((len(predictions), 3))
    if keep:
        cands = [predictions[i] for i in keep]
        refs = [[r for r in references[i] if r.strip()] for i in keep]
        if config.idf:
            with warnings.catch_warnings():  # "Overwriting the previous importance weights" is intended here
                warnings.simplefilter("ignore", UserWarning)
                scorer.compute_idf([r for group in refs for r in group])
        # bert-score treats list-of-lists as multiple references even when each group has one element.
        p, r, f = scorer.score(cands, refs, batch_size=config.batch_size)
        raw[keep] = np.column_stack([p.numpy(), r.numpy(), f.numpy()])
    if config.rescale_with_baseline and len(keep) < len(predictions):
        # Rescale the zeros of empty captions with the same affine map bert-score applied to the others.
        base = scorer.baseline_vals.numpy()
        missing = np.setdiff1d(np.arange(len(predictions)), keep)
        raw[missing] = (0.0 - base) / (1 - base)
    return MetricStats.from_means(dict(zip(BERTSCORE_NAMES, raw.T)), note="exact: mean of per-image scores")
