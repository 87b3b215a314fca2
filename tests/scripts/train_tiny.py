"""Train the tiny BLIP on phantoms with `adapt()`, optionally killing itself with SIGKILL at a chosen point.

Used by tests/test_resume.py (kill and resume) and tests/test_multiprocess.py (run under torchrun). The kill
points are deterministic: ``--kill-after-step N`` dies right after the optimizer update of global step N
(before the scheduler step and any checkpoint), ``--kill-during-save N`` dies while the training state of step
N is half written. On success the main process writes ``result.json`` (history, metrics) and
``weights.safetensors`` (every parameter of the final model) into ``--result-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _install_kill_hooks(args: argparse.Namespace) -> None:
    from medblip_peft import checkpointing

    if args.kill_after_step is not None:
        from accelerate.optimizer import AcceleratedOptimizer

        latest = checkpointing.latest_checkpoint(args.output_dir)
        step = [0 if latest is None else int(latest.name.split("-")[1])]  # the run resumes from here
        original = AcceleratedOptimizer.step

        def step_then_die(self, closure=None):
            original(self, closure)
            if self.gradient_state.sync_gradients:
                step[0] += 1
                if step[0] == args.kill_after_step:
                    _die()

        AcceleratedOptimizer.step = step_then_die
    if args.kill_during_save is not None:
        original_write_best = checkpointing._write_best

        def die_mid_save(target: Path, *rest) -> None:
            # accelerate has written the model, optimizer and RNG files; the best weights, the state file and
            # the rename into place are still to come.
            if target.name.endswith(f"-{args.kill_during_save:08d}"):
                _die()
            original_write_best(target, *rest)

        checkpointing._write_best = die_mid_save


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--result-dir")
    parser.add_argument("--strategy", default="lora")
    parser.add_argument("--train-size", type=int, default=12)
    parser.add_argument("--eval-size", type=int, default=0)
    parser.add_argument("--config", default="{}", help="AdaptConfig fields as JSON")
    parser.add_argument("--kill-after-step", type=int)
    parser.add_argument("--kill-during-save", type=int)
    parser.add_argument(
        "--again", action="store_true", help="then train once more in the same process (one step, no eval)"
    )
    args = parser.parse_args()

    import torch
    from accelerate import PartialState
    from safetensors.torch import save_file

    from medblip_peft import train, validation
    from medblip_peft.data import make_phantoms
    from medblip_peft.testing import tiny_blip

    torch.set_num_threads(1)  # the same kernels in every run, and no oversubscription on small CI machines

    # Caption metrics (BLEU/CIDEr via Java) are not under test; count the gathered captions instead, which
    # shows that evaluation sees each validation row exactly once however many processes there are.
    validation.bleu4_cider = lambda predictions, references: {
        "eval_captions": float(len(predictions)),
        "eval_references": float(len(references)),
    }
    _install_kill_hooks(args)
    model, processor = tiny_blip(seed=0)
    eval_data = make_phantoms(args.eval_size, seed=7, image_size=64) if args.eval_size else None
    quiet = {"report_to": "none", "progress": False, "cpu": True}
    result = train.adapt(
        model,
        make_phantoms(args.train_size, seed=3, image_size=64),
        strategy=args.strategy,
        processor=processor,
        eval_data=eval_data,
        output_dir=args.output_dir,
        **{**quiet, **json.loads(args.config)},
    )
    again = None
    if args.again:  # the process group must outlive one adapt() call (ablate, notebooks under torchrun)
        model, processor = tiny_blip(seed=0)
        again = train.adapt(
            model, make_phantoms(8, seed=5, image_size=64), strategy=args.strategy, processor=processor,
            output_dir=f"{args.output_dir}-again", max_steps=1, batch_size=4, **quiet,
        ).history  # fmt: skip
    state = PartialState()
    if args.result_dir and state.is_main_process:
        out = Path(args.result_dir)
        out.mkdir(parents=True, exist_ok=True)
        summary = {"history": result.history, "metrics": result.metrics, "num_processes": state.num_processes,
                   "again_history": again}  # fmt: skip
        (out / "result.json").write_text(json.dumps(summary))
        weights = {n: p.detach().clone().contiguous() for n, p in result.model.named_parameters()}
        save_file(weights, str(out / "weights.safetensors"))


if __name__ == "__main__":
    main()
