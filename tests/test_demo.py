"""The learning is real: a tiny BLIP trained on phantoms reads modality, side and level from the pixels."""

from __future__ import annotations

from pathlib import Path

from medblip_peft.demo import phantom_accuracy


def test_demo_learns_phantoms_and_round_trips(demo_run):
    result = demo_run
    before, after = result["before"], result["after"]
    assert after["side_and_level"] >= 0.9, result
    assert after["modality"] >= 0.9, result
    assert before["side_and_level"] < 0.5, "an untrained model cannot already know where lesions are"
    assert after["bleu_4"] > before["bleu_4"] + 0.2
    # the reloaded checkpoint captions the test phantoms the same way the in-memory model does
    assert len(result["examples"]) == 3
    assert all(ex["caption"] for ex in result["examples"])
    assert (Path(result["output_dir"]) / "model.safetensors").is_file()
    assert any("Checkpoint:" in line for line in result["log"])


def test_phantom_accuracy_counts_normals_and_sides():
    import datasets

    ds = datasets.Dataset.from_dict({
        "modality": ["CT", "MRI", "ultrasound"], "side": ["left", "", "right"], "level": ["upper", "", "lower"],
    })
    preds = ["axial ct showing a mass in the upper left zone.", "mri of the brain with no focal lesion.",
             "ultrasound image with a nodule in the upper right zone."]
    acc = phantom_accuracy(preds, ds)
    assert acc["modality"] == 1.0
    assert acc["side"] == 1.0
    assert abs(acc["level"] - 2 / 3) < 1e-9
    assert abs(acc["side_and_level"] - 2 / 3) < 1e-9
