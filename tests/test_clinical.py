"""Radiology lexicon (synonyms, multi-word terms, negation) and the clinical concept metric."""

from __future__ import annotations

import json
import math
import re

import pytest

from medblip_peft.evaluation import RadiologyLexicon, default_lexicon, score_captions
from medblip_peft.evaluation.clinical import clinical_stats


@pytest.fixture(scope="module")
def lexicon() -> RadiologyLexicon:
    return default_lexicon()


def affirmed(lexicon: RadiologyLexicon, text: str, group: str) -> set[str]:
    return set(lexicon.concept_sets(text)[group])


def negated(lexicon: RadiologyLexicon, text: str) -> set[str]:
    return {m.concept for m in lexicon.extract(text) if m.negated}


# --- lexicon -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "group", "expected"),
    [
        ("CT of the abdomen", "modality", {"ct"}),
        ("Computed tomography of the abdomen", "modality", {"ct"}),
        ("Computerised tomography (CAT scan) of the abdomen", "modality", {"ct"}),
        ("Magnetic resonance imaging of the knee", "modality", {"mri"}),
        ("Plain X-ray of the hand", "modality", {"radiograph"}),
        ("Chest xray", "modality", {"radiograph"}),
        ("US image of the liver", "modality", {"ultrasound"}),
        ("Sonographic image of the liver", "modality", {"ultrasound"}),
        ("Let us look at the liver", "modality", set()),  # "us" is a pronoun; only upper-case "US" counts
        ("SPECT of the heart", "modality", {"scintigraphy"}),
        ("Bone scan", "modality", {"scintigraphy"}),
        ("Non-contrast CT of the head", "sequence", {"non_contrast"}),  # longest match beats "contrast"
        ("Contrast-enhanced CT", "sequence", {"contrast"}),
        ("T2-weighted fluid attenuated inversion recovery", "sequence", {"t2", "flair"}),
        ("Bilateral pleural effusions", "finding", {"effusion"}),  # multi-word term, plural
        ("Subarachnoid haemorrhage", "finding", {"hemorrhage"}),  # British spelling
        ("Multiple liver metastases", "finding", {"metastasis"}),  # irregular plural
        ("Aneurysms of the aorta", "finding", {"aneurysm"}),
        ("Anteroposterior radiograph", "plane", {"ap_view"}),
        ("Axial and sagittal images", "plane", {"axial", "sagittal"}),
        ("Mass in the left lung", "laterality", {"left"}),
    ],
)
def test_synonyms_and_multiword_terms(lexicon, text, group, expected):
    assert affirmed(lexicon, text, group) == expected


def test_synonyms_map_to_one_concept(lexicon):
    variants = ["CT", "computed tomography", "computerized tomography", "CAT scan", "MDCT"]
    assert all(affirmed(lexicon, v, "modality") == {"ct"} for v in variants)
    assert (
        affirmed(lexicon, "haemorrhage", "finding")
        == affirmed(lexicon, "hemorrhage", "finding")
        == {"hemorrhage"}
    )
    assert affirmed(lexicon, "oedema", "finding") == affirmed(lexicon, "edema", "finding") == {"edema"}


@pytest.mark.parametrize(
    ("text", "negated_concepts", "affirmed_findings"),
    [
        ("No fracture.", {"fracture"}, set()),
        ("There is no evidence of intracranial haemorrhage.", {"hemorrhage"}, set()),
        ("Negative for pneumothorax", {"pneumothorax"}, set()),
        ("Free of metastases", {"metastasis"}, set()),
        ("Fracture was ruled out.", {"fracture"}, set()),  # post-negation trigger
        ("Hydronephrosis is not seen", {"hydronephrosis"}, set()),
        (
            "No fracture, dislocation or effusion",
            {"fracture", "dislocation", "effusion"},
            set(),
        ),  # list in scope
        ("No fracture but a large hematoma", {"fracture"}, {"hematoma"}),  # "but" ends the scope
        ("Without fracture; effusion present", {"fracture"}, {"effusion"}),  # punctuation ends the scope
        ("No change in the size of the mass", set(), {"mass"}),  # pseudo-negation
        (
            "No visible change at all in the appearance of this large mass",
            set(),
            {"mass"},
        ),  # beyond the window
        ("Fracture of the femur", set(), {"fracture"}),
    ],
)
def test_negation(lexicon, text, negated_concepts, affirmed_findings):
    assert negated(lexicon, text) == negated_concepts
    assert affirmed(lexicon, text, "finding") == affirmed_findings


def test_negation_applies_to_findings_only(lexicon):
    text = "No fracture of the left femur on this radiograph."
    assert negated(lexicon, text) == {"fracture"}
    sets = lexicon.concept_sets(text)
    assert (
        sets["laterality"] == {"left"} and sets["anatomy"] == {"femur"} and sets["modality"] == {"radiograph"}
    )


def test_shipped_lexicon_is_well_formed(lexicon):
    assert set(lexicon.groups) == {"modality", "anatomy", "laterality", "plane", "sequence", "finding"}
    cuis = [c.cui for c in lexicon.concepts.values() if c.cui]
    assert all(re.fullmatch(r"C\d{7}", c) for c in cuis)
    assert len(cuis) == len(set(cuis))  # no CUI claimed by two concepts
    expected = {
        "modality": {
            "ct",
            "mri",
            "radiograph",
            "ultrasound",
            "angiography",
            "pet",
            "scintigraphy",
            "mammography",
        },
        "laterality": {"left", "right", "bilateral"},
        "plane": {"axial", "coronal", "sagittal", "ap_view", "pa_view", "lateral_view"},
        "sequence": {"t1", "t2", "flair", "dwi", "contrast"},
        "finding": {"mass", "nodule", "fracture", "effusion", "hemorrhage", "cyst", "stenosis", "aneurysm"},
    }
    for group, ids in expected.items():
        assert ids <= {c.id for c in lexicon.concepts_in(group)}, group
    assert lexicon.concepts["ct"].cui == "C0040405" and lexicon.concepts["fracture"].cui == "C0016658"


def test_custom_lexicon_from_json(tmp_path):
    data = {
        "groups": {"modality": {"negatable": False}, "laterality": {}, "finding": {"negatable": True}},
        "negation": {"window": 3, "pre": ["no"], "post": [], "pseudo": [], "terminators": ["."]},
        "concepts": [
            {"id": "oct", "group": "modality", "label": "OCT", "cui": None, "terms": ["oct"]},
            {"id": "drusen", "group": "finding", "label": "drusen", "cui": None, "terms": ["drusen"]},
        ],
    }
    path = tmp_path / "lex.json"
    path.write_text(json.dumps(data))
    lex = RadiologyLexicon.from_json(path)
    assert lex.concept_sets("OCT, no drusen")["finding"] == frozenset()
    assert lex.concept_sets("OCT with drusen")["finding"] == {"drusen"}
    result = score_captions(["OCT with drusen"], ["OCT, drusen"], metrics=["clinical"], lexicon=lex)
    assert result["clinical_micro_f1"] == 1.0


# --- metric --------------------------------------------------------------------------------------------------


def clinical(predictions: list[str], references: list[str]) -> dict[str, float]:
    return score_captions(predictions, references, metrics=["clinical"])


def test_wrong_side_scores_worse_despite_higher_bleu():
    reference = ["Axial CT image shows a mass in the left kidney."]
    wrong_side = ["Axial CT image shows a mass in the right kidney."]
    right_side = ["Axial CT of left kidney mass."]
    a = score_captions(wrong_side, reference, metrics=["bleu", "clinical"], tokenizer="regex")
    b = score_captions(right_side, reference, metrics=["bleu", "clinical"], tokenizer="regex")
    assert a["bleu_4"] > b["bleu_4"] and a["bleu_1"] > b["bleu_1"]
    assert a["clinical_micro_f1"] < b["clinical_micro_f1"] == 1.0
    assert a["clinical_laterality_f1"] == 0.0 and b["clinical_laterality_f1"] == 1.0
    assert a["clinical_laterality_conflict_rate"] == 1.0 and b["clinical_laterality_conflict_rate"] == 0.0


def test_laterality_conflict_rate_definition():
    references = [
        "Left knee radiograph",
        "Right hip MRI",
        "Right hip MRI",
        "Chest CT",
        "Bilateral hip radiograph",
    ]
    predictions = [
        "Right knee radiograph",
        "Right hip MRI",
        "Left and right hips",
        "Left lung CT",
        "Left hip",
    ]
    # Applicable: images 0-2 (reference names exactly one side).  Conflicts: image 0 only (image 2 names both).
    assert clinical(predictions, references)["clinical_laterality_conflict_rate"] == pytest.approx(1 / 3)
    assert math.isnan(clinical(["Left lung CT"], ["Chest CT"])["clinical_laterality_conflict_rate"])


def test_negated_finding_is_not_credited():
    assert (
        clinical(["Fracture of the radius."], ["No fracture of the radius."])["clinical_finding_precision"]
        == 0.0
    )
    agree = clinical(["No fracture of the radius."], ["No fracture of the radius."])
    assert math.isnan(
        agree["clinical_finding_precision"]
    )  # nothing affirmed on either side: undefined, not 0
    assert math.isnan(agree["clinical_micro_f1"])  # the lexicon has no "radius": no concept anywhere


def test_micro_averaging_and_modality_accuracy_by_hand():
    references = ["CT of the chest with a nodule", "MRI of the brain", "CT and MRI of the liver"]
    predictions = ["CT of the chest", "CT of the brain with a mass", "CT of the liver"]
    r = clinical(predictions, references)
    # modality: pred {ct},{ct},{ct} vs ref {ct},{mri},{ct,mri}: TP 2, |pred| 3, |ref| 4.
    assert r["clinical_modality_precision"] == pytest.approx(2 / 3)
    assert r["clinical_modality_recall"] == pytest.approx(2 / 4)
    assert r["clinical_modality_f1"] == pytest.approx(4 / 7)
    # modality accuracy: image 0 correct, image 1 wrong, image 2 correct (CT is among CT and MRI).
    assert r["clinical_modality_accuracy"] == pytest.approx(2 / 3)
    # findings: pred {}, {mass}, {} vs ref {nodule}, {}, {}: TP 0.
    assert r["clinical_finding_precision"] == 0.0 and r["clinical_finding_recall"] == 0.0
    # pooled over groups: modality 2/3/4 + anatomy (chest, brain, liver all right) 3/3/3 + finding 0/1/1.
    assert r["clinical_micro_precision"] == pytest.approx(5 / 7)
    assert r["clinical_micro_recall"] == pytest.approx(5 / 8)


def test_multiple_references_use_the_union():
    stats = clinical_stats(["Left knee MRI"], [["Knee MRI", "Left knee"]])
    scores = stats.scores()
    assert scores["clinical_micro_precision"] == 1.0 and scores["clinical_micro_recall"] == 1.0
