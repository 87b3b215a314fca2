"""The training loop: validation and best-checkpoint selection, early stopping, mixed precision, logging."""

from __future__ import annotations

import json

import pytest
import torch

from medblip_peft import adapt


def test_validation_history_best_metric_and_metadata(tiny, phantoms, tmp_path, quick):
    model, processor = tiny
    overrides = {**quick, "max_steps": None, "num_epochs": 2, "eval_max_samples": 6, "eval_num_beams": 1,
                 "metric_for_best": "val_loss"}
    result = adapt(model, phantoms.select(range(16)), eval_data=phantoms.select(range(16, 24)), strategy="decoder",
                   processor=processor, output_dir=tmp_path, **overrides)
    evals = [h for h in result.history if "val_loss" in h]
    steps = [h for h in result.history if "loss" in h]
    assert [e["epoch"] for e in evals] == [1, 2]
    assert len(steps) == 4 and all(h["lr"] >= 0 for h in steps)
    assert {"bleu_4", "cider"} <= set(evals[0]), "validation scores captions, not only the loss"
    best = min(evals, key=lambda e: e["val_loss"])
    assert result.metrics["val_loss"] == best["val_loss"]
    meta = json.loads((tmp_path / "medblip_peft.json").read_text())
    assert meta["metrics"]["val_loss"] == best["val_loss"]
    assert meta["config"]["label_smoothing"] == 0.0 and meta["label_smoothing"] == 0.0
    assert set(meta["versions"]) >= {"torch", "transformers", "peft", "accelerate", "medblip_peft"}
    assert meta["trainable_by_tower"]["vision_model"]["trainable"] == 0


def test_best_weights_are_restored_not_the_last(tiny, phantoms, tmp_path, quick):
    """With a learning rate that makes training diverge, the kept weights are the best evaluated ones."""
    model, processor = tiny
    overrides = {**quick, "max_steps": None, "num_epochs": 3, "eval_max_samples": 8, "eval_num_beams": 1,
                 "metric_for_best": "val_loss", "learning_rate": 0.5, "lr_scheduler": "constant",
                 "max_grad_norm": None}
    result = adapt(model, phantoms.select(range(16)), eval_data=phantoms.select(range(16, 24)), strategy="full",
                   processor=processor, output_dir=tmp_path, **overrides)
    evals = [h["val_loss"] for h in result.history if "val_loss" in h]
    assert result.metrics["val_loss"] == min(evals)
    from medblip_peft.data import CaptionCollator
    from medblip_peft.train import CaptioningLoss

    batch = CaptionCollator(processor)([phantoms[i] for i in range(16, 24)])
    with torch.no_grad():
        loss = CaptioningLoss(result.model, vision_frozen=False)(**batch)
    assert abs(float(loss) - min(evals)) < 1e-4, "the returned model is the best evaluated one"


def test_early_stopping(tiny, phantoms, tmp_path, quick):
    model, processor = tiny
    overrides = {**quick, "max_steps": None, "num_epochs": 6, "eval_max_samples": 4, "eval_num_beams": 1,
                 "metric_for_best": "val_loss", "learning_rate": 0.5, "lr_scheduler": "constant",
                 "max_grad_norm": None, "early_stopping_patience": 1}
    result = adapt(model, phantoms.select(range(8)), eval_data=phantoms.select(range(8, 12)), strategy="full",
                   processor=processor, output_dir=tmp_path, **overrides)
    evals = [h for h in result.history if "val_loss" in h]
    assert len(evals) < 6, "training must stop once validation stops improving"


@pytest.mark.parametrize("precision", ["bf16"])
def test_mixed_precision_on_cpu(precision, tiny, phantoms, tmp_path, quick):
    model, processor = tiny
    result = adapt(model, phantoms, strategy="lora", processor=processor, output_dir=tmp_path,
                   **{**quick, "mixed_precision": precision})
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    assert (tmp_path / "adapter_model.safetensors").is_file()


def test_periodic_state_tensorboard_and_gradient_accumulation(tiny, phantoms, tmp_path, quick):
    pytest.importorskip("tensorboard")
    model, processor = tiny
    result = adapt(model, phantoms, strategy="decoder", processor=processor, output_dir=tmp_path,
                   **{**quick, "max_steps": 4, "batch_size": 4, "gradient_accumulation_steps": 2,
                      "save_every_steps": 1, "save_total_limit": 2, "report_to": "tensorboard"})
    assert len([h for h in result.history if "loss" in h]) == 4
    states = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert len(states) == 2 and states[-1].endswith("4"), states
    assert list((tmp_path / "logs").rglob("events.out.tfevents*")), "TensorBoard events were written"
    assert result.peak_memory_bytes > 0 and result.train_seconds > 0
