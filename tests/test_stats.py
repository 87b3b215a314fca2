"""Bootstrap confidence intervals and paired significance tests."""

from __future__ import annotations

import csv
import math
import random
from pathlib import Path

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu

from medblip_peft.evaluation import (
    MetricStats,
    bootstrap_ci,
    caption_stats,
    compare_systems,
    paired_test,
    score_captions,
    score_systems,
)

FIXTURE = Path(__file__).parent / "fixtures" / "captions" / "roco_validation_sample.tsv"
FAST = ["bleu", "rouge", "cider", "clinical"]  # no METEOR: its JVM start-up would dominate these tests


@pytest.fixture(scope="module")
def captions() -> list[str]:
    with FIXTURE.open(encoding="utf-8") as f:
        return [row["caption"] for row in csv.DictReader(f, delimiter="\t")]


@pytest.fixture(scope="module")
def systems(captions) -> dict[str, list[str]]:
    """A good system (light word drops), a copy of it, and a bad one (captions of other images)."""
    good = [" ".join(w for j, w in enumerate(c.split()) if j % 4 != 3) for c in captions]
    bad = captions[1:] + captions[:1]
    return {"good": good, "good_copy": list(good), "bad": bad}


def test_bootstrap_is_seeded_and_brackets_the_point_estimate(captions, systems):
    a = score_captions(systems["good"], captions, metrics=FAST, tokenizer="regex", n_resamples=300, seed=1)
    b = score_captions(systems["good"], captions, metrics=FAST, tokenizer="regex", n_resamples=300, seed=1)
    c = score_captions(systems["good"], captions, metrics=FAST, tokenizer="regex", n_resamples=300, seed=2)
    assert a["ci"] == b["ci"] and a["ci"] != c["ci"]
    assert a["ci_resamples"] == 300 and a["ci_confidence"] == 0.95
    for name in ("bleu_4", "rouge_l", "cider", "clinical_micro_f1"):
        low, high = a["ci"][name]
        assert low < a[name] < high, name
    # More resamples do not change the interval much; higher confidence widens it.
    wide = score_captions(
        systems["good"],
        captions,
        metrics=["rouge"],
        tokenizer="regex",
        n_resamples=300,
        confidence=0.99,
        seed=1,
    )
    assert wide["ci"]["rouge_l"][1] - wide["ci"]["rouge_l"][0] > a["ci"]["rouge_l"][1] - a["ci"]["rouge_l"][0]


def test_resampled_bleu_is_recomputed_exactly(captions, systems):
    """A resample's BLEU from summed per-image counts equals pycocoevalcap run on the resampled corpus."""
    stats = caption_stats(systems["bad"], captions, metrics=["bleu"], tokenizer="regex")
    bleu = stats.families["bleu"]
    rng = random.Random(0)
    draw = [rng.randrange(len(captions)) for _ in captions]
    weights = np.bincount(draw, minlength=len(captions)).astype(float)[None, :]
    ours = bleu.resampled(weights)[0]
    from medblip_peft.evaluation.text import tokenize_pairs

    gts, res, _ = tokenize_pairs(systems["bad"], [[c] for c in captions], "regex")
    # Duplicated images need distinct keys in pycocoevalcap's dicts.
    expected, _ = Bleu(4).compute_score(
        {k: gts[i] for k, i in enumerate(draw)}, {k: res[i] for k, i in enumerate(draw)}, verbose=0
    )
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-12)


HEADLINE = ("bleu_4", "rouge_l", "cider", "clinical_micro_f1")


@pytest.mark.parametrize("method", ["permutation", "bootstrap"])
def test_identical_systems_give_p_one(captions, systems, method):
    tests = compare_systems(
        systems["good"], systems["good_copy"], captions, metrics=FAST, tokenizer="regex", method=method
    )
    defined = {k: t for k, t in tests.items() if not math.isnan(t.p_value)}
    assert set(HEADLINE) <= set(defined)
    for name, test in defined.items():
        assert test.delta == 0.0, name
        assert test.p_value == pytest.approx(1.0), name


@pytest.mark.parametrize("method", ["permutation", "bootstrap"])
def test_clearly_different_systems_give_small_p(captions, systems, method):
    tests = compare_systems(
        systems["good"], systems["bad"], captions, metrics=FAST, tokenizer="regex", method=method, seed=3
    )
    for name in HEADLINE:
        assert tests[name].delta > 0, name
        assert tests[name].p_value < 0.01, name
        assert tests[name].method == method and tests[name].n_resamples == 10000


def test_close_systems_are_not_declared_different(captions, systems):
    # "good" and "good" with one image swapped for a bad caption: a real but tiny difference.
    nearly = list(systems["good"])
    nearly[0] = systems["bad"][0]
    tests = compare_systems(
        systems["good"], nearly, captions, metrics=["rouge"], tokenizer="regex", n_resamples=2000
    )
    assert tests["rouge_l"].delta > 0 and tests["rouge_l"].p_value > 0.2


def test_score_systems_table(captions, systems):
    table = score_systems(
        {k: systems[k] for k in ("good", "bad")},
        captions,
        metrics=["rouge", "clinical"],
        tokenizer="regex",
        n_resamples=200,
    )
    assert set(table) == {"good", "bad"}
    good_low = table["good"]["ci"]["rouge_l"][0]
    bad_high = table["bad"]["ci"]["rouge_l"][1]
    assert good_low > bad_high  # non-overlapping intervals for clearly different systems
    assert table["good"]["n_images"] == len(captions)


def test_nan_and_validation():
    stats = MetricStats.from_means({"x": np.array([1.0, 0.0, 1.0])})
    assert stats.scores() == {"x": pytest.approx(2 / 3)}
    undefined = MetricStats(names=("r",), table=np.zeros((3, 2)), aggregate=lambda s: s[..., :1] / np.nan)
    assert math.isnan(bootstrap_ci(undefined, n_resamples=10)["r"][0])
    assert math.isnan(paired_test(undefined, undefined, n_resamples=10)["r"].p_value)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci(stats, confidence=95)
    with pytest.raises(ValueError, match="same metric family"):
        paired_test(stats, MetricStats.from_means({"x": np.ones(4)}))
    with pytest.raises(ValueError, match="method"):
        paired_test(stats, stats, method="t-test")


def test_interval_is_centred_on_a_reported_point_estimate():
    # METEOR's point estimate is the jar's corpus score, not the mean of the per-image scores it resamples.
    per_image = np.linspace(0.1, 0.5, 40)
    plain = bootstrap_ci(MetricStats.from_means({"m": per_image}), n_resamples=200)["m"]
    shifted = bootstrap_ci(
        MetricStats.from_means({"m": per_image}, point={"m": per_image.mean() + 0.1}), n_resamples=200
    )["m"]
    np.testing.assert_allclose(np.subtract(shifted, plain), [0.1, 0.1], atol=1e-12)
