"""``score_captions`` and friends: one entry point over the lexical, BERTScore and clinical metrics.

Metric families are looked up in :data:`METRIC_FAMILIES` (a registry, not an if/elif chain); each returns a
:class:`~.stats.MetricStats`, so point estimates, bootstrap intervals and paired tests share one code path.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .bertscore import BERTScoreConfig, bertscore_stats
from .clinical import clinical_stats
from .lexical import bleu_stats, cider_stats, meteor_session, meteor_stats, rouge_stats
from .lexicon import RadiologyLexicon
from .stats import MetricStats, PairedTest, bootstrap_ci, paired_test
from .text import java_available, normalize_captions, tokenize_pairs

__all__ = [
    "DEFAULT_METRICS",
    "METRIC_FAMILIES",
    "CaptionStats",
    "caption_stats",
    "compare_systems",
    "score_captions",
    "score_systems",
]

#: Families computed by default: everything that needs no model download.  BERTScore is opt-in.
DEFAULT_METRICS = ("bleu", "meteor", "rouge", "cider", "clinical")
_LEXICAL = frozenset({"bleu", "meteor", "rouge", "cider"})


@dataclass
class _Inputs:
    """Normalised inputs handed to every metric family; ``gts``/``res`` exist when a lexical metric is requested."""

    predictions: list[str]
    references: list[list[str]]
    gts: dict[int, list[str]] | None
    res: dict[int, list[str]] | None
    bertscore: BERTScoreConfig
    lexicon: RadiologyLexicon | None
    meteor: object | None = None  # a running pycocoevalcap Meteor, started early (see caption_stats)


#: Registry of metric families: name -> function of the prepared inputs.
METRIC_FAMILIES: dict[str, Callable[[_Inputs], MetricStats]] = {
    "bleu": lambda x: bleu_stats(x.gts, x.res),
    "meteor": lambda x: meteor_stats(x.gts, x.res, x.meteor),
    "rouge": lambda x: rouge_stats(x.gts, x.res),
    "cider": lambda x: cider_stats(x.gts, x.res),
    "bertscore": lambda x: bertscore_stats(x.predictions, x.references, x.bertscore),
    "clinical": lambda x: clinical_stats(x.predictions, x.references, x.lexicon),
}


@dataclass
class CaptionStats:
    """Per-image statistics of every requested metric family, plus how they were computed.

    Attributes:
        families: ``{family: MetricStats}`` in request order.
        tokenizer: ``"ptb"``, ``"regex"`` (no Java) or ``None`` (no lexical metric requested).
        normalize: The normalisation preset applied.
        skipped: Families requested but not computed (METEOR without Java).
    """

    families: dict[str, MetricStats]
    tokenizer: str | None
    normalize: str
    skipped: list[str] = field(default_factory=list)

    @property
    def n_images(self) -> int:
        return next(iter(self.families.values())).n_images if self.families else 0

    def scores(self) -> dict[str, float]:
        """Flat ``{metric_name: value}`` over all families."""
        out: dict[str, float] = {}
        for fam in self.families.values():
            out.update(fam.scores())
        return out

    def as_dict(self, *, n_resamples: int = 0, confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
        """Scores plus metadata, and a ``"ci"`` dict of ``{metric: (low, high)}`` when ``n_resamples > 0``."""
        out: dict[str, Any] = self.scores()
        out.update(
            n_images=self.n_images,
            tokenizer=self.tokenizer,
            normalize=self.normalize,
            skipped=list(self.skipped),
        )
        if n_resamples:
            out["ci"] = bootstrap_ci(
                list(self.families.values()), n_resamples=n_resamples, confidence=confidence, seed=seed
            )
            out.update(ci_confidence=confidence, ci_resamples=n_resamples, ci_seed=seed)
        return out


def _as_reference_lists(references: Sequence[str] | Sequence[Sequence[str]]) -> list[list[str]]:
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    for i, group in enumerate(refs):
        if not group or not all(isinstance(r, str) for r in group):
            raise ValueError(
                f"references[{i}] must be a string or a non-empty list of strings, got {group!r}"
            )
    return refs


def caption_stats(
    predictions: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
    *,
    metrics: Sequence[str] = DEFAULT_METRICS,
    normalize: str = "default",
    tokenizer: str = "auto",
    bertscore: BERTScoreConfig | Mapping[str, Any] | None = None,
    lexicon: RadiologyLexicon | None = None,
) -> CaptionStats:
    """Compute per-image statistics for each requested metric family (the engine behind :func:`score_captions`)."""
    if isinstance(predictions, str) or not all(isinstance(p, str) for p in predictions):
        raise TypeError("`predictions` must be a sequence of strings, one caption per image")
    refs = _as_reference_lists(references)
    if len(predictions) != len(refs):
        raise ValueError(f"got {len(predictions)} predictions but {len(refs)} reference groups")
    if not refs:
        raise ValueError("cannot score an empty set of captions")
    if isinstance(metrics, str):  # metrics="bleu" means one family, not the letters b, l, e, u
        metrics = [metrics]
    unknown = [m for m in metrics if m not in METRIC_FAMILIES]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {sorted(METRIC_FAMILIES)}")
    metrics = list(dict.fromkeys(metrics))  # de-duplicate, keep order
    preds = normalize_captions(predictions, normalize)
    refs = [normalize_captions(group, normalize) for group in refs]
    skipped = []
    if "meteor" in metrics and not java_available():
        warnings.warn(
            "METEOR needs Java (pycocoevalcap runs meteor-1.5.jar) and no `java` is on PATH: METEOR is skipped.",
            UserWarning,
            stacklevel=2,
        )
        metrics.remove("meteor")
        skipped.append("meteor")
    if isinstance(bertscore, Mapping):
        bertscore = BERTScoreConfig(**bertscore)
    with contextlib.ExitStack() as stack:
        # METEOR's JVM spends ~7 s loading WordNet and paraphrase tables.  Starting it first lets that load run
        # in its own process while the tokenizer and the Python-side metrics work; METEOR is scored last.
        meteor = stack.enter_context(meteor_session()) if "meteor" in metrics else None
        gts = res = None
        tokenizer_used = None
        if _LEXICAL.intersection(metrics):
            gts, res, tokenizer_used = tokenize_pairs(preds, refs, tokenizer)
        inputs = _Inputs(preds, refs, gts, res, bertscore or BERTScoreConfig(), lexicon, meteor)
        computed = {
            name: METRIC_FAMILIES[name](inputs) for name in sorted(metrics, key=lambda m: m == "meteor")
        }
    families = {name: computed[name] for name in metrics}  # back in request order
    return CaptionStats(families, tokenizer_used, normalize, skipped)


def score_captions(
    predictions: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
    *,
    metrics: Sequence[str] = DEFAULT_METRICS,
    normalize: str = "default",
    tokenizer: str = "auto",
    bertscore: BERTScoreConfig | Mapping[str, Any] | None = None,
    lexicon: RadiologyLexicon | None = None,
    n_resamples: int = 0,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Score generated captions against references.

    Args:
        predictions: One generated caption per image.
        references: One reference caption per image, or a list of references per image.
        metrics: Metric families from :data:`METRIC_FAMILIES`: ``"bleu"`` (BLEU-1…4), ``"meteor"``,
            ``"rouge"`` (ROUGE-L), ``"cider"`` (CIDEr-D), ``"bertscore"`` (opt-in: it loads a model) and
            ``"clinical"`` (lexicon concepts).  Default: all but BERTScore.
        normalize: Text preset applied to both sides first: ``"default"`` (unchanged) or ``"imageclef"``
            (lowercase, numbers → "number", no punctuation).
        tokenizer: ``"auto"`` (PTB via Java, else the regex fallback with a warning), ``"ptb"`` or ``"regex"``.
        bertscore: :class:`BERTScoreConfig` or a dict of its fields (``model_type``, ``num_layers``, ``idf``,
            ``rescale_with_baseline``, …); default roberta-large, layer 17, as bert-score does.
        lexicon: Concept lexicon for the clinical metric; defaults to the shipped radiology lexicon.
        n_resamples: Bootstrap resamples for 95% (``confidence``) intervals; 0 disables them.
        confidence: Coverage of the intervals.
        seed: Seed of the bootstrap.

    Returns:
        A flat dict ``{"bleu_1": ..., "bleu_4": ..., "meteor": ..., "rouge_l": ..., "cider": ...,
        "clinical_micro_f1": ..., ...}`` of floats (NaN where a ratio is undefined), with the metadata
        ``n_images``, ``tokenizer`` (``"ptb"``/``"regex"``/``None``), ``normalize`` and ``skipped``; and, when
        ``n_resamples > 0``, ``"ci": {metric: (low, high)}`` plus ``ci_confidence``/``ci_resamples``/``ci_seed``.

    Example:
        >>> scores = score_captions(["CT of the right kidney"], ["CT of the left kidney."], metrics=["rouge", "clinical"])
        >>> round(scores["rouge_l"], 3), scores["clinical_laterality_conflict_rate"]
        (0.8, 1.0)
    """
    stats = caption_stats(
        predictions,
        references,
        metrics=metrics,
        normalize=normalize,
        tokenizer=tokenizer,
        bertscore=bertscore,
        lexicon=lexicon,
    )
    return stats.as_dict(n_resamples=n_resamples, confidence=confidence, seed=seed)


def score_systems(
    systems: Mapping[str, Sequence[str]],
    references: Sequence[str] | Sequence[Sequence[str]],
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    **kwargs: Any,
) -> dict[str, dict[str, Any]]:
    """Score several systems on the same images, each with bootstrap intervals, for a results table.

    Every system is resampled with the same seed, hence the same image draws, so intervals are comparable.
    ``kwargs`` are passed to :func:`caption_stats` (``metrics``, ``normalize``, ``bertscore``, …).

    Returns:
        ``{system_name: score_captions-style dict with "ci"}``.
    """
    return {
        name: caption_stats(preds, references, **kwargs).as_dict(
            n_resamples=n_resamples, confidence=confidence, seed=seed
        )
        for name, preds in systems.items()
    }


def compare_systems(
    predictions_a: Sequence[str],
    predictions_b: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
    *,
    method: str = "permutation",
    n_resamples: int = 10000,
    seed: int = 0,
    **kwargs: Any,
) -> dict[str, PairedTest]:
    """Paired test of "system A beats system B" on the same images, for every metric.

    ``method`` is ``"permutation"`` (approximate randomisation, default) or ``"bootstrap"`` (paired bootstrap);
    see :func:`.stats.paired_test`.  ``kwargs`` are passed to :func:`caption_stats`.

    Returns:
        ``{metric_name: PairedTest}`` with both scores, the delta and a two-sided p-value.
    """
    stats_a = caption_stats(predictions_a, references, **kwargs)
    stats_b = caption_stats(predictions_b, references, **kwargs)
    out: dict[str, PairedTest] = {}
    for name, fam in stats_a.families.items():
        out.update(
            paired_test(fam, stats_b.families[name], method=method, n_resamples=n_resamples, seed=seed)
        )
    return out
