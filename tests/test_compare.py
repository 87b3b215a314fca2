"""`ablate` and `compare` end to end on phantoms with the demo's tiny BLIP, through the API and the CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from medblip_peft.evaluation.compare import STRATEGIES, ablate, compare, phantom_inputs

FAST_GENERATION = {"num_beams": 1, "max_new_tokens": 12}
# METEOR is left out: its JVM costs seconds per system, and the table code treats it as any other metric.
METRICS = ("bleu", "rouge", "cider", "clinical")
N_TEST = 12


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablation")
    base, train, test = phantom_inputs(root, train_size=32, test_size=N_TEST, seed=0)
    report = ablate(
        base, train, test, out_dir=root / "out", max_steps=2, batch_size=16, learning_rate=1.5e-3,
        n_resamples=50, metrics=METRICS, generation=FAST_GENERATION, paired_resamples=200,
        cpu=True, report_to="none", progress=False, log=lambda _: None,
    )  # fmt: skip
    return root, base, test, report


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _check_files(out: Path, systems: list[str], n_images: int) -> None:
    rows = _csv(out / "results.csv")
    assert [r["system"] for r in rows] == systems
    for row in rows:  # every metric carries its interval, and the interval holds the point estimate
        for metric in ("bleu_4", "rouge_l", "cider", "clinical_micro_f1"):
            low, value, high = (float(row[k]) for k in (f"{metric}_low", metric, f"{metric}_high"))
            assert low <= value + 1e-9 and value <= high + 1e-9, (row["system"], metric)
    markdown = (out / "results.md").read_text(encoding="utf-8")
    assert all(f"| {s} |" in markdown for s in systems) and "CIDEr" in markdown and "[" in markdown
    assert "Paired tests" in markdown
    data = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert set(data["systems"]) == set(systems) and data["best"] in systems
    assert set(data["paired"]) == set(systems) - {data["best"]}
    assert all("ci" in s and s["n_images"] == n_images for s in data["systems"].values())
    with Image.open(out / "results.png") as png:
        assert png.size[0] > 300 and png.format == "PNG"
    lines = _jsonl(out / "predictions.jsonl")
    assert len(lines) == n_images and all(set(line["captions"]) == set(systems) for line in lines)
    assert all(line["image_id"] and line["reference"] for line in lines)


def test_ablate_writes_table_chart_and_predictions(ablation):
    root, _, test, report = ablation
    out = root / "out"
    _check_files(out, list(STRATEGIES), N_TEST)
    with Image.open(out / "ablation.png") as png:
        assert png.format == "PNG"
    assert [line["reference"] for line in _jsonl(out / "predictions.jsonl")] == list(test["caption"])
    rows = {r["system"]: r for r in _csv(out / "results.csv")}
    params = {s: int(float(rows[s]["trainable_params"])) for s in STRATEGIES}
    # The strategies train different parts: LoRA least, full everything, encoder + decoder cover full's towers.
    assert params["lora"] < min(params["encoder"], params["decoder"]) and params["full"] > params["decoder"]
    assert all(float(rows[s]["train_seconds"]) > 0 and float(rows[s]["peak_memory_mib"]) > 0 for s in STRATEGIES)
    markdown = (out / "results.md").read_text(encoding="utf-8")
    assert "Train time (s)" in markdown and "Peak memory (MiB)" in markdown
    assert report.meta["budget"] == {"max_steps": 2} and (out / "checkpoints" / "lora" / "adapter_config.json").is_file()


class Oracle:
    """Returns the references (best possible system) and fails on image 0, as an API baseline might."""

    name = "oracle"

    def __init__(self, references):
        self.references, self.failures = list(references), []

    def __call__(self, images, **kwargs):
        assert len(images) == len(self.references)
        self.failures = [{"index": 0, "error": "ClientError", "status": 400, "message": "refused"}]
        return ["", *self.references[1:]]


def test_compare_mixes_checkpoints_and_captioner_objects(ablation, tmp_path):
    root, base, test, _ = ablation
    systems = {"untrained": base, "full": str(root / "out" / "checkpoints" / "full"),
               "lora": str(root / "out" / "checkpoints" / "lora"), "oracle": Oracle(test["caption"])}  # fmt: skip
    report = compare(systems, test, out_dir=tmp_path, n_resamples=50, metrics=METRICS, device="cpu",
                     generation=FAST_GENERATION, paired_resamples=200)  # fmt: skip
    _check_files(tmp_path, list(systems), N_TEST)
    assert report.best == "oracle"
    assert all(report.paired[s]["cider"].delta > 0 for s in ("untrained", "full", "lora"))
    failures = _jsonl(tmp_path / "failures.jsonl")
    assert failures == [{"system": "oracle", "image_id": test[0]["image_id"], "index": 0, "error": "ClientError",
                         "status": 400, "message": "refused"}]  # fmt: skip
    assert _jsonl(tmp_path / "predictions.jsonl")[0]["captions"]["oracle"] == ""  # reported, not dropped
    assert "oracle: 1" in (tmp_path / "results.md").read_text(encoding="utf-8")


def test_cli_compare_and_ablate(ablation, tmp_path):
    from medblip_peft.cli import main

    root, base, test, _ = ablation
    folder = tmp_path / "imagefolder"  # the CLI reads data from disk: an imagefolder of the test phantoms
    folder.mkdir()
    rows = []
    for i, row in enumerate(test.select(range(4))):
        row["image"].save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "caption": row["caption"], "image_id": row["image_id"]})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "cmp"
    code = main(["compare", f"base={base}", str(root / "out" / "checkpoints" / "decoder"), "--data", str(folder),
                 "--out", str(out), "--n-resamples", "20", "--num-beams", "1", "--max-new-tokens", "8",
                 "--metrics", "bleu", "cider", "--device", "cpu"])  # fmt: skip
    assert code == 0
    systems = [r["system"] for r in _csv(out / "results.csv")]
    assert systems == ["base", str(root / "out" / "checkpoints" / "decoder")]
    assert len(_jsonl(out / "predictions.jsonl")) == 4

    out = tmp_path / "abl"  # no data arguments: phantoms and the tiny model, offline
    code = main(["ablate", "--out", str(out), "--strategies", "decoder", "lora", "--train-size", "16",
                 "--test-size", "4", "--max-steps", "1", "--n-resamples", "20", "--metrics", "bleu", "cider"])
    assert code == 0
    assert [r["system"] for r in _csv(out / "results.csv")] == ["decoder", "lora"]
    assert (out / "ablation.png").is_file() and len(_jsonl(out / "predictions.jsonl")) == 4
