"""Per-image sufficient statistics, bootstrap confidence intervals and paired significance tests.

Every metric in this package is expressed as a :class:`MetricStats`: a table with one row of additive statistics
per image and a vectorised ``aggregate`` that turns column sums into scores.  A mean-type metric (ROUGE-L,
per-image CIDEr, BERTScore) stores ``[score, 1]``; corpus BLEU stores its n-gram match and length counts, so a
resample's BLEU is *recomputed exactly* from the resample's summed counts instead of averaging sentence BLEU.

With that shape, a bootstrap resample is a vector of multiplicities ``w`` and its statistics are ``w @ table``:
thousands of resamples of 8,180 images take well under a second, and no scorer (or Java process) is re-run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

__all__ = ["MetricStats", "PairedTest", "bootstrap_ci", "paired_test", "ratio"]

# Resamples are processed in blocks so that the (block, n_images) weight matrix stays small in memory.
_BLOCK = 256


def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` elementwise, NaN where ``den == 0`` (an undefined rate, not a zero score)."""
    num = np.asarray(num, dtype=float)
    den = np.asarray(den, dtype=float)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _mean_aggregate(sums: np.ndarray) -> np.ndarray:
    # The last column of a mean-type table counts images, so every other column divided by it is a mean.
    return ratio(sums[..., :-1], sums[..., -1:])


@dataclass(frozen=True)
class MetricStats:
    """Additive per-image statistics of one metric family.

    Attributes:
        names: Output metric names, in the order ``aggregate`` returns them.
        table: ``(n_images, k)`` array of per-image statistics whose column sums determine the scores.
        aggregate: Maps sums of shape ``(..., k)`` to scores of shape ``(..., len(names))``.
        point: Optional exact point estimates that override ``aggregate(table.sum(0))`` (used for METEOR,
            whose corpus score comes from the Java scorer; see ``docs/metrics.md``).
        note: Free text explaining how resamples are re-aggregated (surfaced in the documentation).
    """

    names: tuple[str, ...]
    table: np.ndarray
    aggregate: Callable[[np.ndarray], np.ndarray]
    point: Mapping[str, float] | None = None
    note: str = ""

    @classmethod
    def from_means(cls, per_image: Mapping[str, np.ndarray], **kwargs) -> MetricStats:
        """Build a mean-type metric from per-image scores (one array per output name)."""
        names = tuple(per_image)
        cols = [np.asarray(v, dtype=float) for v in per_image.values()]
        table = np.column_stack([*cols, np.ones_like(cols[0])])
        return cls(names=names, table=table, aggregate=_mean_aggregate, **kwargs)

    @property
    def n_images(self) -> int:
        return int(self.table.shape[0])

    def scores(self) -> dict[str, float]:
        """Point estimates on the full sample."""
        values = self.aggregate(self.table.sum(axis=0))
        out = {name: float(v) for name, v in zip(self.names, values)}
        if self.point:
            out.update({k: float(v) for k, v in self.point.items()})
        return out

    def resampled(self, weights: np.ndarray) -> np.ndarray:
        """Scores for each row of ``weights`` (``(b, n_images)`` multiplicities); returns ``(b, len(names))``."""
        return self.aggregate(weights @ self.table)


def _block_sizes(total: int):
    """Split ``total`` resamples into blocks of at most ``_BLOCK``."""
    for start in range(0, total, _BLOCK):
        yield min(_BLOCK, total - start)


def _bootstrap_blocks(n: int, n_resamples: int, rng: np.random.Generator):
    """Yield ``(block, n)`` multiplicity matrices of a non-parametric bootstrap over ``n`` images."""
    for b in _block_sizes(n_resamples):
        idx = rng.integers(0, n, size=(b, n))
        # bincount per row turns index draws into multiplicities; offsetting rows keeps it one call.
        counts = np.bincount((idx + n * np.arange(b)[:, None]).ravel(), minlength=b * n).reshape(b, n)
        yield counts.astype(float)


def bootstrap_ci(
    stats: MetricStats | list[MetricStats],
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap confidence intervals for every metric in ``stats``.

    Images are resampled with replacement; all metric families share the same resamples, so intervals of
    different metrics are computed on the same pseudo-datasets.  Corpus metrics are re-aggregated from the
    resample's summed statistics (exact for BLEU; see ``docs/metrics.md`` for CIDEr and METEOR).

    Args:
        stats: One or more metric families computed on the same images.
        n_resamples: Number of bootstrap resamples.
        confidence: Two-sided coverage, e.g. 0.95.
        seed: Seed of the NumPy generator; the same seed gives the same intervals.

    Returns:
        ``{metric_name: (low, high)}``; NaN bounds where the metric is undefined on every resample.
    """
    families = [stats] if isinstance(stats, MetricStats) else list(stats)
    if not families:
        return {}
    if not 0 < confidence < 1:
        raise ValueError(f"`confidence` must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"`n_resamples` must be >= 1, got {n_resamples}")
    n = families[0].n_images
    if any(f.n_images != n for f in families):
        raise ValueError("all metric families must be computed on the same images")
    rng = np.random.default_rng(seed)
    draws: list[list[np.ndarray]] = [[] for _ in families]
    for weights in _bootstrap_blocks(n, n_resamples, rng):
        for store, fam in zip(draws, families):
            store.append(fam.resampled(weights))
    alpha = (1 - confidence) / 2
    out: dict[str, tuple[float, float]] = {}
    for store, fam in zip(draws, families):
        values = np.concatenate(store, axis=0)
        # Centre the resamples on the reported point estimate.  The offset is 0 up to rounding for every
        # metric whose point estimate *is* the re-aggregated statistic; for METEOR it moves the spread of the
        # mean per-image score onto the jar's corpus score.
        offset = np.asarray([fam.scores()[name] for name in fam.names]) - fam.aggregate(fam.table.sum(0))
        values = values + np.nan_to_num(offset)
        for j, name in enumerate(fam.names):
            col = values[:, j]
            col = col[~np.isnan(col)]
            if col.size == 0:
                out[name] = (float("nan"), float("nan"))
            else:
                lo, hi = np.quantile(col, [alpha, 1 - alpha])
                out[name] = (float(lo), float(hi))
    return out


@dataclass(frozen=True)
class PairedTest:
    """Result of a paired comparison of systems A and B on one metric.

    The test is two-sided; the sign of ``delta`` says which system is ahead (for a rate where lower is better,
    such as ``clinical_laterality_conflict_rate``, a negative delta favours A).

    Attributes:
        metric: Metric name.
        score_a, score_b: Point estimates on the full sample.
        delta: ``score_a - score_b``.
        p_value: Two-sided p-value for "A and B are equally good" (add-one smoothed, never exactly 0).
        method: ``"permutation"`` (approximate randomisation) or ``"bootstrap"`` (paired bootstrap).
        n_resamples: Number of permutations or resamples drawn.
    """

    metric: str
    score_a: float
    score_b: float
    delta: float
    p_value: float
    method: str
    n_resamples: int


def _swap_blocks(n: int, n_resamples: int, rng: np.random.Generator):
    """Yield ``(block, n)`` 0/1 matrices: 1 where a permutation swaps the two systems' outputs for an image."""
    for b in _block_sizes(n_resamples):
        yield rng.integers(0, 2, size=(b, n)).astype(float)


def _count_extreme(null_delta: np.ndarray, obs: np.ndarray) -> np.ndarray:
    """Count rows at least as extreme as ``obs``; undefined (NaN) rows count as extreme, to stay conservative.

    The 1e-12 slack makes ties (e.g. identical systems, where every delta is 0) count as extreme despite
    floating-point noise in the re-aggregation.
    """
    extreme = (np.abs(null_delta) >= np.abs(obs) - 1e-12) | np.isnan(null_delta)
    return extreme.sum(axis=0)


def paired_test(
    stats_a: MetricStats,
    stats_b: MetricStats,
    *,
    method: str = "permutation",
    n_resamples: int = 10000,
    seed: int = 0,
) -> dict[str, PairedTest]:
    """Paired significance test of system A vs system B on the same images, for every metric of a family.

    ``method="permutation"`` is approximate randomisation (Noreen 1989; Riezler & Maxwell 2005): under the null
    hypothesis the two systems' outputs for an image are exchangeable, so each permutation swaps A's and B's
    per-image statistics with probability 1/2 and recomputes both corpus scores.  The p-value is
    ``(1 + #{|delta_perm| >= |delta_obs|}) / (1 + R)``; identical systems give p = 1.

    ``method="bootstrap"`` is the paired bootstrap (Koehn 2004) with the shift of Berg-Kirkpatrick et al.
    (2012): resample images, and count resamples whose delta exceeds twice the observed delta
    (two-sided: ``|delta_b - delta_obs| >= |delta_obs|``).

    Both systems must be scored against the same references (the per-image statistics of CIDEr depend on the
    references only through document frequencies, which are therefore shared and swaps are exact).
    """
    if stats_a.names != stats_b.names or stats_a.n_images != stats_b.n_images:
        raise ValueError("paired_test needs the same metric family computed on the same images for A and B")
    if method not in ("permutation", "bootstrap"):
        raise ValueError(f"`method` must be 'permutation' or 'bootstrap', got {method!r}")
    rng = np.random.default_rng(seed)
    point_a, point_b = stats_a.scores(), stats_b.scores()
    # Tests run on the re-aggregated statistic so that observed and resampled deltas are comparable.
    obs = stats_a.aggregate(stats_a.table.sum(0)) - stats_b.aggregate(stats_b.table.sum(0))
    hits = np.zeros(len(stats_a.names))
    n = stats_a.n_images
    if method == "permutation":
        for swap in _swap_blocks(n, n_resamples, rng):
            keep = 1.0 - swap
            sum_a = keep @ stats_a.table + swap @ stats_b.table
            sum_b = swap @ stats_a.table + keep @ stats_b.table
            delta = stats_a.aggregate(sum_a) - stats_b.aggregate(sum_b)
            hits += _count_extreme(delta, obs)
    else:
        for weights in _bootstrap_blocks(n, n_resamples, rng):
            delta = stats_a.resampled(weights) - stats_b.resampled(weights)
            hits += _count_extreme(delta - obs, obs)
    p_values = np.where(np.isnan(obs), np.nan, (hits + 1) / (n_resamples + 1))
    return {
        name: PairedTest(
            metric=name,
            score_a=point_a[name],
            score_b=point_b[name],
            delta=point_a[name] - point_b[name],
            p_value=float(p),
            method=method,
            n_resamples=n_resamples,
        )
        for name, p in zip(stats_a.names, p_values)
    }
