"""Nothing lost: resumable training states, written atomically, and the guards that stop a run cleanly.

A training state lives in ``<output_dir>/checkpoints/step-NNNNNNNN/`` and holds

* what ``accelerate.Accelerator.save_state`` writes: the trainable module as safetensors, the optimizer, the
  scheduler, the gradient-accumulation step and every process's RNG states (Python, numpy, torch, CUDA);
* ``best.safetensors``: the trainable weights of the best evaluation so far (so that best-checkpoint selection
  survives a resume), when there has been an evaluation;
* ``trainer_state.json``: the step counter, the epoch and the micro-batches of it already consumed (the data
  order of an epoch is a function of ``seed + epoch`` alone, so this *is* the sampler position), the history,
  the best metric, the early-stopping and non-finite counters.

Each state is written into a hidden ``.tmp-step-N`` folder and renamed into place only once complete, so a
process killed mid-save (even by SIGKILL) leaves the previous states intact and loadable; leftovers of a torn
save are ignored and removed by the next save. Only the newest ``save_total_limit`` states are kept.

Loading is safe: accelerate 1.16 reads the model from safetensors and the optimizer, scheduler and RNG pickles
through ``accelerate.utils.load``, which calls ``torch.load(weights_only=True)`` (numpy arrays and dtypes are
the only extra globals it allows). Nothing here registers custom objects with ``register_for_checkpointing``,
whose loader uses ``weights_only=False``; our own state is JSON and safetensors.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CHECKPOINTS_DIR",
    "NonFiniteLossError",
    "TooManyBadSamplesError",
    "TrainerState",
    "check_bad_fraction",
    "check_nonfinite",
    "grad_norm",
    "is_finite",
    "latest_checkpoint",
    "list_checkpoints",
    "load_training_state",
    "resolve_resume",
    "resume",
    "rows_read",
    "save_training_state",
    "sync_manifest",
]

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
BEST_FILE = "best.safetensors"
_PREFIX = "step-"
_TMP_PREFIX = ".tmp-"


class NonFiniteLossError(FloatingPointError, ValueError):
    """The loss or the gradients were NaN/Inf for `max_nonfinite_steps` optimizer steps in a row."""


class TooManyBadSamplesError(ValueError):
    """More than `max_bad_fraction` of the samples read were skipped: the dataset is broken."""


@dataclass
class TrainerState:
    """Everything about the loop's progress that is not a tensor; saved as ``trainer_state.json``.

    ``epoch`` is the 0-based epoch in progress and ``batches_in_epoch`` the micro-batches of it already
    consumed (batches whose rows were all bad included), which together fix the sampler position.
    """

    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # kept across resumes
    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_value: float | None = None
    best_metrics: dict[str, Any] = field(default_factory=dict)
    best_step: int | None = None
    stale: int = 0
    nonfinite_in_row: int = 0
    truncated_captions: int = 0

    def to_json(self) -> str:
        # NaN losses (skipped steps) are written as JSON's non-standard NaN, which json.loads reads back.
        return json.dumps({"format_version": 1, **asdict(self)}, indent=2, default=str)

    @classmethod
    def from_json(cls, text: str) -> TrainerState:
        data = json.loads(text)
        data.pop("format_version", None)
        return cls(**data)


def _step_of(path: Path) -> int:
    return int(path.name[len(_PREFIX) :])


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete training states under ``output_dir/checkpoints``, oldest first (torn ``.tmp-*`` excluded)."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir()
        and p.name.startswith(_PREFIX)
        and p.name[len(_PREFIX) :].isdigit()
        and (p / STATE_FILE).is_file()
    ]
    return sorted(found, key=_step_of)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete training state, or ``None``."""
    states = list_checkpoints(output_dir)
    return states[-1] if states else None


def resolve_resume(resume_from: str | os.PathLike[str] | None, output_dir: Path) -> Path | None:
    """The state to resume from: ``None`` (start fresh), ``"latest"`` (the newest state under `output_dir`, or
    a fresh start when there is none yet, so that one command line serves the first run and every restart), or
    a path to a ``step-N`` folder (or to a run folder, whose newest state is used)."""
    if resume_from is None:
        return None
    if str(resume_from) == "latest":
        return latest_checkpoint(output_dir)
    path = Path(resume_from).expanduser()
    if path.is_dir() and not (path / STATE_FILE).is_file():
        found = latest_checkpoint(path)
        if found is not None:
            return found
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"resume_from={str(resume_from)!r} is not a complete training state (no {STATE_FILE} in it). "
            f"Pass a {CHECKPOINTS_DIR}/{_PREFIX}N folder, a run folder that holds some, or 'latest'."
        )
    return path


def _fsync_tree(folder: Path) -> None:
    """Flush the files of `folder` to disk, so the rename publishes whole files even after a power cut."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _write_best(
    target: Path, best: dict[str, torch.Tensor] | None, state: TrainerState, previous: Path | None
) -> None:
    """Write the best trainable weights into a new state, hard-linking the previous state's copy when it holds
    the same best (same run, same step), so that a full fine-tune does not rewrite them at every save."""
    if best is None:
        return
    from safetensors.torch import save_file

    destination = target / BEST_FILE
    if previous is not None and (previous / BEST_FILE).is_file():
        old = TrainerState.from_json((previous / STATE_FILE).read_text(encoding="utf-8"))
        if (old.run_id, old.best_step) == (state.run_id, state.best_step):
            try:
                os.link(previous / BEST_FILE, destination)
                return
            except OSError:  # no hard links on this file system: write a copy
                pass
    save_file({name: t.contiguous() for name, t in best.items()}, str(destination))


def save_training_state(
    accelerator: Any,
    output_dir: Path,
    state: TrainerState,
    best: dict[str, torch.Tensor] | None,
    *,
    keep: int,
) -> Path:
    """Write a resumable state for ``state.step`` atomically and keep only the newest `keep` states.

    Every process takes part (accelerate writes one RNG file per process into the shared folder); only the
    main process creates, renames and deletes folders. States newer than ``state.step`` (left by a run that
    was resumed from an older state) belong to an abandoned future and are removed.
    """
    root = output_dir / CHECKPOINTS_DIR
    final = root / f"{_PREFIX}{state.step:08d}"
    tmp = root / f"{_TMP_PREFIX}{final.name}"
    main = accelerator.is_main_process
    if main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"{_TMP_PREFIX}*"):  # torn saves of killed runs
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if main:
        previous = latest_checkpoint(output_dir)
        _write_best(tmp, best, state, previous)
        # The state file goes last: a folder without it is never taken for a complete state.
        (tmp / STATE_FILE).write_text(state.to_json(), encoding="utf-8")
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for path in list_checkpoints(output_dir):
            if _step_of(path) > state.step:
                shutil.rmtree(path, ignore_errors=True)
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_training_state(
    accelerator: Any, directory: Path
) -> tuple[TrainerState, dict[str, torch.Tensor] | None]:
    """Restore model, optimizer, scheduler and RNG states from `directory` through accelerate (safetensors and
    ``weights_only=True`` pickles only), and return the loop state and the best trainable weights, if any."""
    from safetensors.torch import load_file

    from medblip_peft.hub import UnsafeWeightsError

    if not (directory / "model.safetensors").is_file():  # accelerate's name for the first prepared model
        # accelerate would fall back to unpickling pytorch_model.bin; a state we wrote always has safetensors.
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
        raise UnsafeWeightsError(
            f"Training state {str(directory)!r} holds no safetensors weights "
            f"(only {', '.join(pickles) or 'nothing'}). medblip-peft resumes only from states it wrote "
            "itself (model.safetensors); unpickling model weights can run arbitrary code. Resume from "
            "another state, or start afresh."
        )
    accelerator.load_state(str(directory))
    state = TrainerState.from_json((directory / STATE_FILE).read_text(encoding="utf-8"))
    best = load_file(str(directory / BEST_FILE)) if (directory / BEST_FILE).is_file() else None
    return state, best


def resume(
    accelerator: Any, resume_from: str | os.PathLike[str] | None, output_dir: Path
) -> tuple[TrainerState, dict[str, torch.Tensor] | None]:
    """The loop state to start from: a fresh one, or the one `resume_from` names, loaded with every tensor."""
    directory = resolve_resume(resume_from, output_dir)
    if directory is None and resume_from is not None:
        logger.warning("resume_from='latest': no training state under %s yet; starting at step 0", output_dir)
    if directory is None:
        if resume_from is None and latest_checkpoint(output_dir) is not None:
            logger.warning(
                "%s already holds training states of another run; this fresh run replaces them as it saves "
                "its own. Pass resume_from='latest' (--resume) to continue that run instead.",
                output_dir,
            )
        return TrainerState(), None
    state, best = load_training_state(accelerator, directory)
    if accelerator.is_main_process:
        print(f"Resuming from {directory} at step {state.step}")
    return state, best


def check_nonfinite(state: TrainerState, limit: int, output_dir: Path) -> None:
    """Stop with `NonFiniteLossError` after `limit` skipped (NaN/Inf) optimizer steps in a row."""
    if state.nonfinite_in_row < limit:
        return
    last_good = latest_checkpoint(output_dir) or "none (set save_every_steps to keep some)"
    raise NonFiniteLossError(
        f"{state.nonfinite_in_row} optimizer steps in a row (up to step {state.step}) had a NaN or Inf loss "
        f"or gradient; stopping. Last good training state: {last_good}. Lower learning_rate, set "
        "max_grad_norm, or use bf16 instead of fp16, then resume with resume_from='latest'."
    )


def rows_read(manifest: Any, *datasets: Any) -> int:
    """Every sample read: kept (the rows of `datasets`) or dropped while loading (parse/load records)."""
    kept = sum(len(ds) for ds in datasets if ds is not None)
    return kept + sum(r["stage"] in ("parse", "load") for r in manifest.records)


def grad_norm(parameters: Any) -> torch.Tensor:
    """The global L2 norm of the gradients (what ``clip_grad_norm_`` returns), without clipping."""
    norms = [p.grad.detach().float().norm() for p in parameters if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


def is_finite(value: float | torch.Tensor | None) -> bool:
    """Whether a loss or a gradient norm is a usable number. ``None`` (DeepSpeed's ``clip_grad_norm_`` before
    its first step) counts as finite: DeepSpeed's own loss scaler skips overflowing steps."""
    return value is None or math.isfinite(float(value))


def sync_manifest(accelerator: Any, manifest: Any) -> None:
    """Give every process every skip record (non-main processes do not write ``skipped.jsonl``, so the main
    process writes theirs here). The manifest deduplicates, so records already present are not repeated."""
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import gather_object

    for record in gather_object(manifest.records):
        manifest.add(**record)


def check_bad_fraction(bad: int, total: int, limit: float | None, manifest_path: Any) -> None:
    """Stop with `TooManyBadSamplesError` when more than `limit` of the `total` samples read were skipped."""
    if limit is None or total <= 0 or bad / total <= limit:
        return
    raise TooManyBadSamplesError(
        f"{bad} of {total} samples ({bad / total:.1%}) were skipped as bad, more than "
        f"max_bad_fraction={limit:g}. Each one is listed, with its file and reason, in {manifest_path}: fix "
        "or drop those rows, or raise `max_bad_fraction` (None disables the check) if the loss is expected."
    )
