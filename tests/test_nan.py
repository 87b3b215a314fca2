"""Numerical safety: a NaN/Inf loss or gradient skips its optimizer step; `max_nonfinite_steps` in a row stop
the run with a clear message and the last good training state intact."""

from __future__ import annotations

import math

import pytest
import torch

from medblip_peft import adapt
from medblip_peft.checkpointing import STATE_FILE, NonFiniteLossError, TrainerState, list_checkpoints
from medblip_peft.testing import tiny_blip
from medblip_peft.train import CaptioningLoss


def inject(monkeypatch, bad_calls: set[int] | None, kind: str = "loss") -> None:
    """Make training forward number n (1-based; validation is not counted) produce a NaN loss
    (``kind="loss"``) or a finite loss whose gradient is Inf (``kind="grad"``), for every n in `bad_calls`
    (None: all of them)."""
    real = CaptioningLoss.forward
    calls = [0]

    def forward(self, *args, reduction="mean", **kwargs):
        loss = real(self, *args, reduction=reduction, **kwargs)
        if reduction != "sum":  # validation
            return loss
        calls[0] += 1
        if bad_calls is None or calls[0] in bad_calls:
            if kind == "loss":
                return loss * float("nan")
            loss.register_hook(lambda grad: grad * float("inf"))
        return loss

    monkeypatch.setattr(CaptioningLoss, "forward", forward)


def trainable(result) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in result.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_a_nonfinite_step_is_skipped(kind, phantoms, tmp_path, quick, monkeypatch):
    # Reference: one clean step. With warmup 0 the first step's learning rate does not depend on max_steps.
    model, processor = tiny_blip(seed=0)
    one_step = adapt(model, phantoms, strategy="decoder", processor=processor, output_dir=tmp_path / "a",
                     **{**quick, "max_steps": 1})  # fmt: skip

    inject(monkeypatch, {2}, kind)
    model, processor = tiny_blip(seed=0)
    result = adapt(model, phantoms, strategy="decoder", processor=processor, output_dir=tmp_path / "b",
                   **{**quick, "max_steps": 2})  # fmt: skip
    steps = [h for h in result.history if "loss" in h]
    assert [h["step"] for h in steps] == [1, 2]
    assert math.isfinite(steps[0]["loss"]) and "skipped" not in steps[0]
    assert math.isnan(steps[1]["loss"]) and "non-finite" in steps[1]["skipped"]
    # Step 2 changed nothing (no update, no optimizer moment, no scheduler step): weights equal 1 clean step.
    expected, got = trainable(one_step), trainable(result)
    assert all(torch.equal(expected[n], got[n]) for n in expected)
    assert all(torch.isfinite(t).all() for t in got.values())


def test_nonfinite_steps_in_a_row_stop_with_last_good_state_intact(phantoms, tmp_path, quick, monkeypatch):
    inject(monkeypatch, set(range(3, 100)))  # steps 1 and 2 are good, then every loss is NaN
    model, processor = tiny_blip(seed=0)
    settings = {**quick, "max_steps": 8, "save_every_steps": 2, "max_nonfinite_steps": 3}
    with pytest.raises(NonFiniteLossError, match=r"3 optimizer steps in a row \(up to step 5\)") as info:
        adapt(model, phantoms, strategy="decoder", processor=processor, output_dir=tmp_path, **settings)
    good = tmp_path / "checkpoints" / "step-00000002"
    assert str(good) in str(info.value) and "resume_from='latest'" in str(info.value)
    assert list_checkpoints(tmp_path) == [good]  # no state was written after a skipped step
    assert TrainerState.from_json((good / STATE_FILE).read_text()).step == 2
    from safetensors.torch import load_file

    weights = load_file(good / "model.safetensors")
    assert weights and all(torch.isfinite(t).all() for t in weights.values())
    assert not (tmp_path / "model.safetensors").exists()  # no final model from a diverged run
