"""Evaluation of radiology captions: COCO lexical metrics, BERTScore, clinical concepts and statistics.

The entry point is :func:`score_captions`; see ``docs/metrics.md`` for what every number means.
"""

from .bertscore import BERTScoreConfig
from .hf_metrics import caption_metric_path
from .lexicon import Concept, Mention, RadiologyLexicon, default_lexicon
from .scoring import (
    DEFAULT_METRICS,
    METRIC_FAMILIES,
    CaptionStats,
    caption_stats,
    compare_systems,
    score_captions,
    score_systems,
)
from .stats import MetricStats, PairedTest, bootstrap_ci, paired_test
from .text import NORMALIZERS

__all__ = [
    "BASELINES",
    "DEFAULT_METRICS",
    "METRIC_FAMILIES",
    "NORMALIZERS",
    "BERTScoreConfig",
    "CaptionStats",
    "CaptionerLike",
    "Concept",
    "GeminiCaptioner",
    "Mention",
    "MetricStats",
    "PairedTest",
    "RadiologyLexicon",
    "Report",
    "ablate",
    "bootstrap_ci",
    "caption_metric_path",
    "caption_stats",
    "compare",
    "compare_systems",
    "default_lexicon",
    "load_baseline",
    "paired_test",
    "score_captions",
    "score_systems",
]

# The comparison API imports torch and transformers, which scoring alone does not need: load it on first use.
_LAZY = {
    "BASELINES": ".baselines",
    "CaptionerLike": ".baselines",
    "load_baseline": ".baselines",
    "GeminiCaptioner": ".gemini",
    "ablate": ".compare",
    "compare": ".compare",
    "Report": ".tables",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
