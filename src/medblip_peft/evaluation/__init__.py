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
    "DEFAULT_METRICS",
    "METRIC_FAMILIES",
    "NORMALIZERS",
    "BERTScoreConfig",
    "CaptionStats",
    "Concept",
    "Mention",
    "MetricStats",
    "PairedTest",
    "RadiologyLexicon",
    "bootstrap_ci",
    "caption_metric_path",
    "caption_stats",
    "compare_systems",
    "default_lexicon",
    "paired_test",
    "score_captions",
    "score_systems",
]
