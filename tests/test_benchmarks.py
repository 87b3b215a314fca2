"""The benchmark scripts' ``--smoke`` modes run here, so that the scripts cannot rot unnoticed."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_smoke(monkeypatch, tmp_path: Path, script: str) -> dict:
    """Run ``benchmarks/<script> --smoke`` in this process (no second interpreter start-up) and read its JSON."""
    out = tmp_path / f"{script}.json"
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setattr(sys, "argv", [script, "--smoke", "--out", str(out)])
    runpy.run_path(str(BENCHMARKS / script), run_name="__main__")
    return json.loads(out.read_text())


def test_train_step_smoke(monkeypatch, tmp_path):
    result = run_smoke(monkeypatch, tmp_path, "train_step.py")
    rows = {row["variant"]: row for row in result["rows"]}
    assert set(rows) == {
        "full", "encoder", "decoder+cache", "decoder", "lora", "lora-text+cache", "paper full", "paper decoder",
    }  # fmt: skip
    assert all(row["step_s"] > 0 and row["gflop"] > 0 for row in rows.values())
    # The cached variant does no ViT work, so it counts fewer FLOPs than the same model fed pixels.
    assert rows["decoder+cache"]["gflop"] < rows["decoder"]["gflop"]
    assert rows["full"]["share"] == 1.0 and rows["lora"]["trainable"] < rows["decoder"]["trainable"]
    assert rows["decoder+cache"]["cache_build_s_per_image"] > 0
    assert set(result["ratios"]) >= {
        "decoder_cache_vs_full",
        "full_speedup_vs_paper",
        "decoder_speedup_vs_paper",
    }
    assert result["machine"]["torch"] and result["settings"]["paper_caption_tokens"] == 96


def test_captioning_smoke(monkeypatch, tmp_path):
    result = run_smoke(monkeypatch, tmp_path, "captioning.py")
    assert result["identical_captions"] is True
    assert len(result["captions"]) == result["settings"]["images"] == 3
    assert {row["mode"] for row in result["rows"]} == {"batched", "per-image loop"}


def test_metrics_suite_smoke(monkeypatch, tmp_path):
    result = run_smoke(monkeypatch, tmp_path, "metrics_suite.py")
    assert result["n_captions"] == 40
    if "skipped" in result:
        pytest.skip(f"evaluation package not importable: {result['skipped']}")
    assert result["seconds"] > 0 and 0.0 <= result["scores"]["cider"] <= 10.0
