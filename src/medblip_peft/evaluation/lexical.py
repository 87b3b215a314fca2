"""COCO-caption lexical metrics (BLEU-1…4, METEOR, ROUGE-L, CIDEr-D) computed by pycocoevalcap's own scorers.

Each function takes pycocoevalcap's tokenised ``gts``/``res`` dicts (see :func:`.text.tokenize_pairs`) and returns
a :class:`~.stats.MetricStats` whose point estimates are exactly what the pycocoevalcap scorer reports, plus the
per-image statistics needed to re-aggregate the metric on bootstrap resamples without re-running the scorer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np

from .stats import MetricStats

__all__ = ["BLEU_NAMES", "bleu_stats", "cider_stats", "meteor_session", "meteor_stats", "rouge_stats"]

Captions = dict[int, list[str]]

BLEU_NAMES = ("bleu_1", "bleu_2", "bleu_3", "bleu_4")
# pycocoevalcap's smoothing constants (bleu_scorer.py): they keep 0-match n-gram orders at ~0 instead of NaN.
_SMALL, _TINY = 1e-9, 1e-15


def _bleu_aggregate(sums: np.ndarray) -> np.ndarray:
    """Corpus BLEU-1…4 from summed ``[testlen, reflen, guess_1..4, correct_1..4]``, as BleuScorer computes it."""
    testlen, reflen = sums[..., 0], sums[..., 1]
    guess, correct = sums[..., 2:6], sums[..., 6:10]
    # cumprod multiplies left to right like BleuScorer's loop, so results agree to the last bit or two.
    prod = np.cumprod((correct + _TINY) / (guess + _SMALL), axis=-1)
    bleus = prod ** (1.0 / np.arange(1, 5))
    len_ratio = (testlen + _TINY) / (reflen + _SMALL)
    with np.errstate(divide="ignore", over="ignore"):
        brevity = np.where(len_ratio < 1, np.exp(1 - 1 / len_ratio), 1.0)
    return bleus * brevity[..., None]


def bleu_stats(gts: Captions, res: Captions) -> MetricStats:
    """BLEU-1…4 with the "closest reference length" brevity penalty, as ``pycocoevalcap.bleu.Bleu(4)``.

    The point estimate is BleuScorer's corpus score; per image we keep the n-gram guess/match counts and the
    closest reference length so that any resample's corpus BLEU is recomputed exactly from summed counts.
    """
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer

    scorer = BleuScorer(n=4)
    for i in gts:  # the same additions Bleu.compute_score makes
        scorer += (res[i][0], gts[i])
    corpus, _ = scorer.compute_score(option="closest", verbose=0)
    rows = []
    for comps in scorer.ctest:
        testlen = comps["testlen"]
        reflen = min((abs(r - testlen), r) for r in comps["reflen"])[1]  # BleuScorer's "closest" rule
        rows.append([testlen, reflen, *comps["guess"], *comps["correct"]])
    table = np.asarray(rows, dtype=float).reshape(len(rows), 10)
    return MetricStats(
        names=BLEU_NAMES,
        table=table,
        aggregate=_bleu_aggregate,
        point=dict(zip(BLEU_NAMES, corpus)),
        note="exact: corpus BLEU recomputed from the resample's summed n-gram counts",
    )


@contextlib.contextmanager
def meteor_session() -> Iterator[object]:
    """A pycocoevalcap ``Meteor`` whose Java subprocess is always shut down on exit.

    ``Meteor`` only stops its JVM in ``__del__``, which may run late or never (reference cycles, interpreter
    exit), leaving a 2 GB-heap process behind; this closes it deterministically.
    """
    from pycocoevalcap.meteor.meteor import Meteor

    meteor = Meteor()
    try:
        yield meteor
    finally:
        proc = meteor.meteor_p
        with meteor.lock:
            if proc.poll() is None:
                proc.stdin.close()
                proc.kill()
            proc.wait()
            # Release the pipes now rather than at garbage collection (avoids ResourceWarnings).
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()


def meteor_stats(gts: Captions, res: Captions, meteor: object | None = None) -> MetricStats:
    """METEOR 1.5 (``-l en -norm``) through pycocoevalcap's ``Meteor`` (needs Java).

    The point estimate is the scorer's corpus METEOR (computed by the jar from pooled alignment statistics);
    resamples use the mean of per-image METEOR scores, which the jar also reports (see ``docs/metrics.md``).

    Args:
        gts, res: Tokenised references and predictions.
        meteor: A running scorer from :func:`meteor_session`; when omitted, one is started and stopped here.
    """
    with contextlib.nullcontext(meteor) if meteor is not None else meteor_session() as scorer:
        corpus, per_image = scorer.compute_score(gts, res)
    return MetricStats.from_means(
        {"meteor": np.asarray(per_image)},
        point={"meteor": corpus},
        note="approximate: resamples average per-image METEOR; the point estimate is the jar's corpus METEOR",
    )


def rouge_stats(gts: Captions, res: Captions) -> MetricStats:
    """ROUGE-L (LCS F-measure, beta = 1.2, best reference per image) averaged over images."""
    from pycocoevalcap.rouge.rouge import Rouge

    corpus, per_image = Rouge().compute_score(gts, res)
    return MetricStats.from_means(
        {"rouge_l": np.asarray(per_image)}, point={"rouge_l": corpus}, note="exact: mean of per-image scores"
    )


def cider_stats(gts: Captions, res: Captions) -> MetricStats:
    """CIDEr-D (pycocoevalcap's ``Cider``: sigma = 6 length penalty, clipped counts, ×10) averaged over images.

    Document frequencies come from the references of the full evaluation set and are kept fixed on bootstrap
    resamples (re-deriving them per resample would cost a full CIDEr run each); paired permutation tests are
    exact because both systems share those references.
    """
    from pycocoevalcap.cider.cider import Cider

    corpus, per_image = Cider().compute_score(gts, res)
    return MetricStats.from_means(
        {"cider": np.asarray(per_image)},
        point={"cider": corpus},
        note="document frequencies fixed to the full set on bootstrap resamples",
    )
