"""Kill and resume: a run SIGKILLed at any point and resumed ends bitwise equal to an uninterrupted run.

The subprocess script ``tests/scripts/train_tiny.py`` kills itself deterministically: right after an optimizer
update (mid-step: before the scheduler step and the checkpoint), or in the middle of writing a training state.
LoRA (whose dropout draws from the torch RNG), a cosine schedule with warmup and per-epoch evaluation with
best-state selection all have to come back exactly for the weights to match.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medblip_peft import checkpointing
from medblip_peft.checkpointing import STATE_FILE, TrainerState, latest_checkpoint, list_checkpoints

SCRIPT = Path(__file__).parent / "scripts" / "train_tiny.py"
# 12 phantoms in batches of 4 for 3 epochs: 9 optimizer steps, a training state every 2, 2 states kept.
CONFIG = {
    "batch_size": 4,
    "num_epochs": 3,
    "learning_rate": 1e-3,
    "save_every_steps": 2,
    "save_total_limit": 2,
    "eval_max_samples": 4,
    "eval_num_beams": 1,
    "metric_for_best": "val_loss",
    "resume_from": "latest",
}


def _command(output_dir: Path, *extra: str, result_dir: Path | None = None) -> list[str]:
    cmd = [sys.executable, str(SCRIPT), "--output-dir", str(output_dir), "--eval-size", "4"]
    cmd += ["--config", json.dumps(CONFIG), *extra]
    return cmd + (["--result-dir", str(result_dir)] if result_dir else [])


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)


def _train_losses(result_dir: Path) -> list[tuple[int, float]]:
    history = json.loads((result_dir / "result.json").read_text())["history"]
    return [(h["step"], h["loss"]) for h in history if "loss" in h]


def test_killed_three_times_then_resumed_equals_uninterrupted(tmp_path):
    # The reference runs beside the kill chain (two cores): same script, never killed.
    reference = subprocess.Popen(
        _command(tmp_path / "ref", result_dir=tmp_path / "ref_result"),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    run = tmp_path / "run"
    states = run / "checkpoints"

    # 1. Killed after the update of step 3 (its scheduler step and any save never happen): step-2 survives.
    killed = _run(_command(run, "--kill-after-step", "3"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert [p.name for p in list_checkpoints(run)] == ["step-00000002"]

    # 2. Resumed from step 2, killed while writing the state of step 6: the torn folder is never taken for a
    #    state, and step 4 (the previous state) stays complete and loadable.
    killed = _run(_command(run, "--kill-during-save", "6"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert "Resuming from" in killed.stdout and "step-00000002" in killed.stdout
    assert (states / ".tmp-step-00000006").is_dir()
    assert not (states / ".tmp-step-00000006" / STATE_FILE).exists()
    assert [p.name for p in list_checkpoints(run)] == ["step-00000002", "step-00000004"]
    assert latest_checkpoint(run) == states / "step-00000004"

    # 3. Resumed from the state before the torn one, killed after step 7 (mid-epoch 3).
    killed = _run(_command(run, "--kill-after-step", "7"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert "step-00000004" in killed.stdout
    assert not (states / ".tmp-step-00000006").exists()  # the next save cleared the torn leftover
    assert [p.name for p in list_checkpoints(run)] == ["step-00000004", "step-00000006"]  # the last K = 2
    state = TrainerState.from_json((states / "step-00000006" / STATE_FILE).read_text())
    assert (state.step, state.epoch, state.batches_in_epoch) == (6, 1, 3)
    assert state.best_step == 3  # the epoch-1 evaluation; epoch 2's comes after this save
    assert (states / "step-00000006" / checkpointing.BEST_FILE).is_file()  # best weights persisted

    # 4. Resumed from step 6 and left to finish.
    final = _run(_command(run, result_dir=tmp_path / "run_result"))
    assert final.returncode == 0, final.stderr[-3000:]
    out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, out[-3000:]

    expected = load_file(tmp_path / "ref_result" / "weights.safetensors")
    got = load_file(tmp_path / "run_result" / "weights.safetensors")
    assert expected.keys() == got.keys()
    different = [name for name in expected if not torch.equal(expected[name], got[name])]
    assert not different, f"not bitwise equal after kill/resume: {different[:5]}"
    # Every step's loss, including those recomputed after each resume point, is identical.
    assert _train_losses(tmp_path / "run_result") == _train_losses(tmp_path / "ref_result")
    assert len(_train_losses(tmp_path / "ref_result")) == 9


def test_resume_with_accumulation_is_exact_and_reads_pickles_with_weights_only(
    tiny, phantoms, tmp_path, quick, monkeypatch
):
    """In-process: resume mid-epoch with gradient accumulation; accelerate 1.16 reads the optimizer, scheduler
    and RNG states through torch.load(weights_only=True)."""
    from medblip_peft import adapt
    from medblip_peft.testing import tiny_blip

    model, processor = tiny
    # 32 phantoms, 4 micro-batches of 8 per epoch, 2 per update: 3 updates span two epochs.
    settings = {**quick, "max_steps": 3, "save_every_steps": 1, "save_total_limit": 3}
    settings["gradient_accumulation_steps"] = 2
    first = adapt(model, phantoms, strategy="decoder", processor=processor, output_dir=tmp_path, **settings)
    expected = {n: p.detach().clone() for n, p in first.model.named_parameters()}
    assert [p.name for p in list_checkpoints(tmp_path)] == [f"step-0000000{i}" for i in (1, 2, 3)]
    assert any(latest_checkpoint(tmp_path).glob("*.safetensors"))

    calls: list[dict] = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    model, processor = tiny_blip(seed=0)
    state = tmp_path / "checkpoints" / "step-00000001"  # mid-epoch: 2 of 4 micro-batches consumed
    assert TrainerState.from_json((state / STATE_FILE).read_text()).batches_in_epoch == 2
    result = adapt(model, phantoms, strategy="decoder", processor=processor, output_dir=tmp_path,
                   resume_from=str(state), **settings)  # fmt: skip
    assert calls, "the optimizer/scheduler/RNG states were not read"
    assert all(kwargs.get("weights_only") is True for kwargs in calls), calls
    assert [h["loss"] for h in result.history] == [h["loss"] for h in first.history]
    got = dict(result.model.named_parameters())
    assert all(torch.equal(expected[n], got[n]) for n in expected)


def test_pickle_only_states_and_checkpoints_are_refused(tmp_path):
    from medblip_peft.hub import UnsafeWeightsError, resolve_pretrained

    state = tmp_path / "run" / "checkpoints" / "step-00000004"
    state.mkdir(parents=True)
    (state / "pytorch_model.bin").write_bytes(b"a pickle")
    (state / STATE_FILE).write_text(TrainerState(step=4).to_json())
    with pytest.raises(UnsafeWeightsError, match=r"step-00000004.*no safetensors.*pytorch_model\.bin"):
        checkpointing.load_training_state(object(), state)

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"a pickle")
    with pytest.raises(UnsafeWeightsError, match="holds only pickled weights"):
        resolve_pretrained(folder)


def test_resume_from_validation(tmp_path):
    assert checkpointing.resolve_resume(None, tmp_path) is None
    assert checkpointing.resolve_resume("latest", tmp_path) is None  # nothing yet: a fresh start
    torn = tmp_path / "checkpoints" / ".tmp-step-00000002"
    torn.mkdir(parents=True)
    assert checkpointing.resolve_resume("latest", tmp_path) is None  # a torn save is not a state
    with pytest.raises(FileNotFoundError, match="not a complete training state"):
        checkpointing.resolve_resume(str(torn), tmp_path)
    done = tmp_path / "checkpoints" / "step-00000003"
    done.mkdir()
    (done / STATE_FILE).write_text(TrainerState(step=3).to_json())
    assert checkpointing.resolve_resume("latest", tmp_path) == done
    assert checkpointing.resolve_resume(str(tmp_path), tmp_path / "elsewhere") == done  # a run folder


def test_cli_resume_flag():
    from medblip_peft.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["train", "--train-data", "d", "--resume"]).resume_from == "latest"
    assert parse(
        ["train", "--train-data", "d", "--resume-from", "runs/a/checkpoints/step-00000010"]
    ).resume_from
    assert not hasattr(parse(["train", "--train-data", "d"]), "resume_from")


def test_source_never_unpickles_or_trusts_remote_code():
    """A guard for review: no `torch.load` without weights_only=True and no trust_remote_code=True in the package
    (resume goes through accelerate's loader, checked above)."""
    import re

    import medblip_peft

    package = Path(medblip_peft.__file__).parent
    for path in package.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"trust_remote_code\s*=\s*True", text), path
        for call in re.findall(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in call, f"{path}: torch.load({call})"
