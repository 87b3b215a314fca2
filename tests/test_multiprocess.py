"""Two processes on CPU (torchrun, gloo) train to the same weights as one process with the same global batch.

The loss is normalised by the caption-token count of the *global* batch (all-reduced), so the DDP-averaged
gradient of two half batches equals the one-process gradient of the whole batch; accelerate gives process p
the batches p, p + 2, ... of the same shuffled order, so step k sees the same 8 samples either way. Evaluation
shards 5 validation rows 3 + 2 and gathers each caption exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medblip_peft.checkpointing import list_checkpoints

SCRIPT = Path(__file__).parent / "scripts" / "train_tiny.py"
SETTINGS = {
    "num_epochs": 2,
    "learning_rate": 1e-3,
    "warmup_ratio": 0.25,
    "eval_max_samples": 5,
    "eval_num_beams": 1,
    "metric_for_best": "val_loss",
    "save_every_steps": 2,
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _script_args(out: Path, batch_size: int) -> list[str]:
    config = json.dumps({**SETTINGS, "batch_size": batch_size})
    sizes = ["--train-size", "16", "--eval-size", "5"]
    return [str(SCRIPT), "--strategy", "decoder", *sizes, "--config", config, "--again",
            "--output-dir", str(out / "run"), "--result-dir", str(out / "result")]  # fmt: skip


def _finish(name: str, proc: subprocess.Popen, timeout: float) -> None:
    """Wait for a run; a hung one is killed and fails the test with its output (not a bare timeout)."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{name}: still running after {timeout} s (hung?); its output ends:\n{out[-3000:]}")
    assert proc.returncode == 0, f"{name}: {out[-3000:]}"


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_two_cpu_processes_equal_one(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    launcher += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    # Each run in its own session, so that a hung one can be killed with all of torchrun's workers.
    popen = {"env": env, "stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True,
             "start_new_session": True}  # fmt: skip
    runs = {
        "one": subprocess.Popen([sys.executable, *_script_args(tmp_path / "one", 8)], **popen),
        "two": subprocess.Popen([*launcher, *_script_args(tmp_path / "two", 4)], **popen),
    }
    for name, proc in runs.items():
        _finish(name, proc, timeout=240)

    one, two = (json.loads((tmp_path / n / "result" / "result.json").read_text()) for n in ("one", "two"))
    assert (one["num_processes"], two["num_processes"]) == (1, 2)
    w1, w2 = (load_file(tmp_path / n / "result" / "weights.safetensors") for n in ("one", "two"))
    assert w1.keys() == w2.keys()
    worst = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert worst <= 1e-5, f"weights differ by {worst}"
    from medblip_peft.testing import tiny_blip

    initial = dict(tiny_blip(seed=0)[0].named_parameters())
    moved = [k for k in w1 if not torch.equal(initial[k], w1[k])]
    assert moved and all(k.startswith("text_decoder.") for k in moved)  # the decoder trained, nothing else

    steps1 = [h for h in one["history"] if "loss" in h]
    steps2 = [h for h in two["history"] if "loss" in h]
    assert len(steps1) == len(steps2) == 4  # 16 samples / global batch 8 × 2 epochs
    for a, b in zip(steps1, steps2):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["lr"] == pytest.approx(b["lr"])
    evals1 = [h for h in one["history"] if "val_loss" in h]
    evals2 = [h for h in two["history"] if "val_loss" in h]
    for a, b in zip(evals1, evals2, strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5)
        # Each of the 5 validation rows is captioned once, not padded to 6 or duplicated.
        assert a["eval_captions"] == b["eval_captions"] == b["eval_references"] == 5.0
    # Only the main process writes the run folder (one final model); training states hold every rank's RNG.
    assert (tmp_path / "two" / "run" / "model.safetensors").is_file()
    states = list_checkpoints(tmp_path / "two" / "run")
    assert [p.name for p in states] == ["step-00000002", "step-00000004"]
    assert {p.name for p in states[-1].glob("random_states_*.pkl")} == {
        "random_states_0.pkl",
        "random_states_1.pkl",
    }
    assert not list((tmp_path / "two" / "run" / "checkpoints").glob(".tmp-*"))
    # adapt() leaves the process group to the process: a second run in the same processes trains too.
    assert [h["step"] for h in two["again_history"]] == [1]
