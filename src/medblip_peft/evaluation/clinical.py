"""Clinical concept metric: does the caption name the right modality, anatomy, side, plane, sequence and findings?

Lexical overlap rewards "CT of the right kidney" against a reference "CT of the left kidney" almost fully; a
radiologist would call it wrong.  This metric extracts concepts with the shipped :mod:`.lexicon` (negated
findings removed) and compares the sets per image:

* per group ``g``: micro-averaged precision, recall and F1 over images,
  ``P = Σ|pred_g ∩ ref_g| / Σ|pred_g|``, ``R = Σ|pred_g ∩ ref_g| / Σ|ref_g|``, ``F1 = 2·TP / (Σ|pred_g| + Σ|ref_g|)``;
* ``clinical_micro_*``: the same over all groups pooled;
* ``clinical_modality_accuracy``: over images whose reference names a modality, the share whose prediction names
  at least one modality and only modalities the reference names;
* ``clinical_laterality_conflict_rate``: over images whose reference names exactly one side (left xor right), the
  share whose prediction names the opposite side and not the reference's side.

With several references per image, the reference concept set is their union.  Undefined ratios (a zero
denominator) are NaN rather than 0, so "no laterality in any reference" is not reported as "no conflicts".
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .lexicon import RadiologyLexicon, default_lexicon
from .stats import MetricStats, ratio

__all__ = ["CLINICAL_GROUPS", "clinical_stats"]

CLINICAL_GROUPS = ("modality", "anatomy", "laterality", "plane", "sequence", "finding")
_OPPOSITE = {"left": "right", "right": "left"}


def _names(groups: Sequence[str]) -> tuple[str, ...]:
    per_group = [f"clinical_{g}_{m}" for g in (*groups, "micro") for m in ("precision", "recall", "f1")]
    return (*per_group, "clinical_modality_accuracy", "clinical_laterality_conflict_rate")


def _make_aggregate(n_groups: int):
    def aggregate(sums: np.ndarray) -> np.ndarray:
        # Columns: [tp, n_pred, n_ref] per group, then modality [correct, applicable], laterality [conflict, applicable].
        counts = sums[..., : 3 * n_groups].reshape(*sums.shape[:-1], n_groups, 3)
        counts = np.concatenate([counts, counts.sum(axis=-2, keepdims=True)], axis=-2)  # + pooled "micro" row
        tp, n_pred, n_ref = counts[..., 0], counts[..., 1], counts[..., 2]
        prf = np.stack([ratio(tp, n_pred), ratio(tp, n_ref), ratio(2 * tp, n_pred + n_ref)], axis=-1)
        tail = sums[..., 3 * n_groups :]
        extra = np.stack([ratio(tail[..., 0], tail[..., 1]), ratio(tail[..., 2], tail[..., 3])], axis=-1)
        return np.concatenate([prf.reshape(*sums.shape[:-1], -1), extra], axis=-1)

    return aggregate


def _image_row(
    pred: dict[str, frozenset[str]], ref: dict[str, frozenset[str]], groups: Sequence[str]
) -> list[float]:
    row: list[float] = []
    for g in groups:
        row += [len(pred[g] & ref[g]), len(pred[g]), len(ref[g])]
    mod_p, mod_r = pred["modality"], ref["modality"]
    row += [float(bool(mod_r) and bool(mod_p) and mod_p <= mod_r), float(bool(mod_r))]
    sides = ref["laterality"] & {"left", "right"}
    if len(sides) == 1:
        (side,) = sides
        conflict = _OPPOSITE[side] in pred["laterality"] and side not in pred["laterality"]
        row += [float(conflict), 1.0]
    else:
        row += [0.0, 0.0]
    return row


def clinical_stats(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    lexicon: RadiologyLexicon | None = None,
) -> MetricStats:
    """Per-image concept counts for the clinical metric (see the module docstring for the definitions).

    Args:
        predictions: One caption per image (raw text; the lexicon does its own tokenisation).
        references: One or more reference captions per image.
        lexicon: Concept extractor; defaults to the shipped radiology lexicon.
    """
    lexicon = lexicon or default_lexicon()
    missing = {"modality", "laterality"} - set(lexicon.groups)
    if missing:
        raise ValueError(f"the lexicon must define the groups {sorted(missing)} used by the clinical metric")
    groups = [g for g in CLINICAL_GROUPS if g in lexicon.groups] + [
        g for g in lexicon.groups if g not in CLINICAL_GROUPS
    ]
    rows = []
    for pred, refs in zip(predictions, references):
        ref_sets = [lexicon.concept_sets(r) for r in refs]
        union = {g: frozenset().union(*(s[g] for s in ref_sets)) for g in groups}
        rows.append(_image_row(lexicon.concept_sets(pred), union, groups))
    table = np.asarray(rows, dtype=float).reshape(len(rows), 3 * len(groups) + 4)
    return MetricStats(
        names=_names(groups),
        table=table,
        aggregate=_make_aggregate(len(groups)),
        note="exact: ratios of summed counts",
    )
