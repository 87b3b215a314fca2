"""`adapt()`: fine-tune BLIP with one strategy through accelerate, from one CPU to many GPUs.

The loop reads top to bottom: prepare, then for each batch accumulate, backward, clip, step; evaluate each
epoch; keep the best weights; save. Frozen towers run without autograd.
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medblip_peft import checkpointing as ckpt
from medblip_peft.cache import training_feed
from medblip_peft.caption import METADATA_FILE, Captioner, load_blip
from medblip_peft.config import AdaptConfig, canonical_strategy
from medblip_peft.data.collate import IGNORE_INDEX, CaptionCollator
from medblip_peft.data.manifest import SkipManifest
from medblip_peft.strategies import apply_strategy, blip_core, format_parameter_report, parameter_report
from medblip_peft.validation import validate

__all__ = ["AdaptResult", "CaptioningLoss", "adapt", "library_versions", "save_checkpoint"]


@dataclass
class AdaptResult:
    """What `adapt()` returns: the trained model and processor, where it was saved, and how training went."""

    model: nn.Module
    processor: Any
    output_dir: Path | None
    history: list[dict[str, Any]]
    metrics: dict[str, Any]
    trainable_params: int
    total_params: int
    train_seconds: float
    peak_memory_bytes: int
    strategy: str = "lora"
    parameter_report: dict[str, dict[str, int]] = field(default_factory=dict)
    skipped: int = 0
    truncated_captions: int = 0
    prompt: str | None = None

    def captioner(self, **kwargs: Any) -> Captioner:
        """A `Captioner` around the trained model (same prompt as in training)."""
        return Captioner(self.model, self.processor, **{"prompt": self.prompt, **kwargs})

    def push_to_hub(self, repo_id: str, *, private: bool = True, **kwargs: Any):
        """Push the saved output directory to the Hub (private by default); see `medblip_peft.hub.push_to_hub`."""
        from medblip_peft.hub import push_to_hub

        if self.output_dir is None:
            raise ValueError("This result has no output directory to push; run adapt() with `output_dir=`.")
        return push_to_hub(self.output_dir, repo_id, private=private, **kwargs)


class CaptioningLoss(nn.Module):
    """Caption cross-entropy of a BLIP, as one module so that DDP sees a single forward.

    The vision tower runs without autograd when nothing trainable feeds it. The loss is computed here, not by
    BLIP, so that label smoothing and the -100 mask are explicit: position t predicts token t+1, and only
    positions whose label is not -100 (real caption tokens and [SEP]) count. ``reduction="sum"`` returns the sum
    over those tokens, which the training loop divides by the token count of the global batch (all processes),
    so that N processes compute the same gradient as one process with N times the batch.
    """

    def __init__(self, model: nn.Module, *, vision_frozen: bool, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.vision_frozen = vision_frozen
        self.label_smoothing = label_smoothing

    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vision = blip_core(self.model).vision_model
        if self.vision_frozen:
            with torch.no_grad():
                return vision(pixel_values=pixel_values).last_hidden_state
        return vision(pixel_values=pixel_values).last_hidden_state

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        reduction: str = "mean",
        **_: Any,
    ) -> torch.Tensor:
        if image_embeds is None:
            image_embeds = self.image_embeds(pixel_values)
        logits = (
            blip_core(self.model)
            .text_decoder(
                input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds
            )
            .logits
        )
        return F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
            labels[:, 1:].reshape(-1),
            ignore_index=IGNORE_INDEX,
            label_smoothing=self.label_smoothing,
            reduction=reduction,
        )


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # No decay on biases and norms (1-D tensors: LayerNorm weights, biases, position scalars).
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or name.endswith(".bias") else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries a run depends on, for metadata and benchmark records."""
    import accelerate
    import peft
    import transformers

    from medblip_peft import __version__

    return {
        "medblip_peft": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
    }


def save_checkpoint(model: nn.Module, processor, directory: str | Path, metadata: dict[str, Any]) -> Path:
    """Save weights as safetensors (a peft model writes its adapter only), the processor, the generation config
    and ``medblip_peft.json``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    if hasattr(model, "peft_config"):  # adapters: also keep generation defaults beside them
        blip_core(model).generation_config.save_pretrained(directory)
    processor.save_pretrained(directory)
    meta = {
        "format_version": 1,
        "versions": library_versions(),
        "created": datetime.now(timezone.utc).isoformat(),
        **metadata,
    }
    (directory / METADATA_FILE).write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")
    return directory


def _default_output_dir(strategy: str) -> Path:
    return Path("medblip_runs") / f"{strategy}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _tracker(report_to: str) -> str | None:
    if report_to == "none":
        return None
    if report_to == "auto":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            return None
        return "tensorboard"
    return report_to


def _better(metric: str, new: float, old: float | None) -> bool:
    if old is None or math.isnan(old):
        return not math.isnan(new)
    return new < old if metric == "val_loss" else new > old


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 if platform.system() == "Darwin" else 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)


def adapt(
    model: Any,
    train_data: Any,
    *,
    strategy: str = "lora",
    eval_data: Any = None,
    output_dir: str | Path | None = None,
    config: AdaptConfig | None = None,
    processor: Any = None,
    **overrides: Any,
) -> AdaptResult:
    """Fine-tune BLIP on image-caption data with one strategy and return an `AdaptResult`.

    `model` is a Hub id, a local path or a `BlipForConditionalGeneration` (then pass `processor`). `train_data`
    and `eval_data` are a `datasets.Dataset`, a Hub dataset id, or a path (ROCO root, imagefolder, CSV or JSONL).
    `strategy` is ``"full"``, ``"encoder"``, ``"decoder"`` or ``"lora"``. `overrides` replace `config` fields.

    With ``save_every_steps`` set, resumable states go to ``output_dir/checkpoints``; ``resume_from="latest"``
    continues a killed run to the same result. Bad samples are skipped and listed in ``skipped.jsonl``, and
    NaN/Inf steps skipped; ``max_bad_fraction`` and ``max_nonfinite_steps`` stop the run (docs/reliability.md).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from medblip_peft.data.loaders import load_caption_dataset

    config = (config or AdaptConfig()).replace(**overrides)
    strategy = canonical_strategy(strategy)
    output_dir = Path(output_dir) if output_dir is not None else _default_output_dir(strategy)
    ckpt.resolve_resume(config.resume_from, output_dir)  # a bad resume_from fails before any work is done
    # accelerate keeps its settings (mixed precision, cpu) in a process-wide singleton; each adapt() call is a
    # new run, so drop the previous run's settings (the distributed process group itself is kept).
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=_tracker(config.report_to),
        project_dir=str(output_dir / "logs"),
        cpu=config.cpu,
    )
    main = accelerator.is_main_process
    set_seed(config.seed)
    model, processor, base_model = load_blip(model, processor=processor)
    prepared = apply_strategy(model, strategy, config)
    if config.gradient_checkpointing:
        blip_core(prepared.model).gradient_checkpointing_enable()
    report = parameter_report(prepared.model)
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        print(format_parameter_report(report, strategy))

    # A resumed run continues the manifest (which deduplicates), so each bad sample stays one line per run.
    open_manifest = SkipManifest.load if config.resume_from else SkipManifest
    manifest = open_manifest(output_dir / "skipped.jsonl", write=main)
    columns = {
        "image_column": config.image_column,
        "caption_column": config.caption_column,
        "manifest": manifest,
    }
    train_ds = load_caption_dataset(train_data, split="train", **columns)
    eval_ds = (
        load_caption_dataset(eval_data, split="validation", **columns) if eval_data is not None else None
    )
    if len(train_ds) == 0:
        raise ValueError(f"The training data holds no usable rows; see the manifest at {manifest.path}.")
    collator = CaptionCollator(
        processor, max_length=config.max_caption_tokens, prompt=config.prompt, manifest=manifest
    )
    generator = torch.Generator().manual_seed(config.seed)
    # Cached vision features replace pixels when the vision tower is frozen (see medblip_peft.cache).
    feed = training_feed(
        train_ds, collator, prepared, processor.image_processor, config,
        accelerator=accelerator, manifest=manifest, generator=generator,
    )  # fmt: skip
    ckpt.sync_manifest(accelerator, manifest)
    rows_read = ckpt.rows_read(manifest, train_ds, eval_ds)  # the denominator of `max_bad_fraction`
    synced = manifest.count  # records every process holds; newer ones are summed across processes per batch
    bad_limit = (rows_read, config.max_bad_fraction, manifest.path)
    ckpt.check_bad_fraction(synced, *bad_limit)
    train_loader = torch.utils.data.DataLoader(
        feed.dataset,
        batch_size=config.batch_size,
        shuffle=feed.sampler is None,
        sampler=feed.sampler,
        generator=generator,
        collate_fn=feed.collate_fn,
        num_workers=config.num_workers,
        pin_memory=accelerator.device.type == "cuda",
    )
    # accelerate shards the batches between processes: each sees ceil(len / nproc) of them per epoch.
    batches_per_process = math.ceil(len(train_loader) / accelerator.num_processes)
    updates_per_epoch = max(1, math.ceil(batches_per_process / config.gradient_accumulation_steps))
    total_updates = config.max_steps or updates_per_epoch * config.num_epochs
    num_epochs = math.ceil(total_updates / updates_per_epoch)

    loss_module = CaptioningLoss(
        prepared.model, vision_frozen=prepared.vision_frozen, label_smoothing=config.label_smoothing
    )
    optimizer = torch.optim.AdamW(
        _param_groups(prepared.model, config.weight_decay),
        lr=config.resolved_learning_rate(strategy),
        # One fused kernel for all parameters: 3-6x faster than the default update on CPU too (torch >= 2.4).
        fused=accelerator.device.type in ("cuda", "cpu") or None,
    )
    scheduler = get_scheduler(
        "constant_with_warmup" if config.lr_scheduler == "constant" else config.lr_scheduler,
        optimizer,
        num_warmup_steps=int(config.warmup_ratio * total_updates) * accelerator.num_processes,
        num_training_steps=total_updates * accelerator.num_processes,
    )
    loss_module, optimizer, train_loader, scheduler = accelerator.prepare(
        loss_module, optimizer, train_loader, scheduler
    )
    if accelerator.trackers is not None and _tracker(config.report_to):
        accelerator.init_trackers(
            "medblip-peft",
            config={k: v for k, v in config.to_dict().items() if isinstance(v, (int, float, str, bool))},
        )

    # Resume (see medblip_peft.checkpointing): weights, optimizer, scheduler, RNG and loop state come back.
    state, best_state = ckpt.resume(accelerator, config.resume_from, output_dir)
    collator.truncated = state.truncated_captions
    device, nproc = accelerator.device, accelerator.num_processes
    start = time.perf_counter()
    bar = tqdm(
        total=total_updates, initial=state.step, desc=f"adapt[{strategy}]", unit="step",
        disable=not (main and config.progress),
    )  # fmt: skip
    for epoch in range(state.epoch, num_epochs):
        loss_module.train()
        # Epoch e's order depends on (seed, e) only: a resumed run sees the batches the killed one would have.
        generator.manual_seed(config.seed + epoch)
        skip = state.batches_in_epoch if epoch == state.epoch else 0
        state.epoch, state.batches_in_epoch = epoch, skip
        running, seen, step_ok = 0.0, 0, True
        for batch in accelerator.skip_first_batches(train_loader, skip) if skip else train_loader:
            if state.step >= total_updates:
                break
            state.batches_in_epoch += 1
            # One all-reduce: the global batch's caption tokens, batches with no usable row (the collator
            # recorded their rows), and new skip records, so that every process takes the same decisions.
            tokens = 0 if batch is None else int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            local = [tokens, batch is None, manifest.count - synced]
            counts = accelerator.reduce(torch.tensor(local, dtype=torch.float32, device=device), "sum")
            if counts[1] > 0:  # with several processes, the others' rows of this batch are dropped too (DDP)
                continue
            with accelerator.accumulate(loss_module):
                loss_sum = loss_module(**batch, reduction="sum")
                loss_value = float(accelerator.reduce(loss_sum.detach().float(), reduction="sum") / counts[0])
                if ckpt.is_finite(loss_value):  # a NaN/Inf loss never reaches the gradients
                    # Token-sum over the global token count; times nproc because DDP averages the gradients.
                    accelerator.backward(loss_sum * (nproc / counts[0]))
                else:
                    step_ok = False
                if accelerator.sync_gradients:
                    norm = (
                        accelerator.clip_grad_norm_(loss_module.parameters(), config.max_grad_norm)
                        if config.max_grad_norm else ckpt.grad_norm(loss_module.parameters())
                    )  # fmt: skip
                    # fp16: the GradScaler finds overflows itself, skips the step and lowers its scale.
                    step_ok = step_ok and (accelerator.scaler is not None or ckpt.is_finite(norm))
                if step_ok:
                    optimizer.step()
                    scheduler.step()
                    step_ok = not (accelerator.sync_gradients and optimizer.step_was_skipped)
                optimizer.zero_grad(set_to_none=True)
            running += loss_value
            seen += 1
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            state.nonfinite_in_row = 0 if step_ok else state.nonfinite_in_row + 1
            record = {
                "epoch": epoch + 1,
                "step": state.step,
                "loss": running / seen if step_ok else float("nan"),
                "lr": scheduler.get_last_lr()[0],
                **({} if step_ok else {"skipped": "non-finite loss or gradient"}),
            }
            running, seen = 0.0, 0
            state.history.append(record)
            accelerator.log({"train/loss": record["loss"], "train/lr": record["lr"]}, step=state.step)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            ckpt.check_nonfinite(state, config.max_nonfinite_steps, output_dir)
            ckpt.check_bad_fraction(synced + int(counts[2]), *bad_limit)
            saving = config.save_every_steps and state.step % config.save_every_steps == 0
            if saving and step_ok:  # never right after a skipped (non-finite) step
                state.truncated_captions = collator.truncated
                ckpt.save_training_state(
                    accelerator, output_dir, state, best_state, keep=config.save_total_limit
                )
            step_ok = True
            if state.step >= total_updates:
                break
        if eval_ds is not None:
            metrics = validate(loss_module, processor, eval_ds, collator, accelerator, config)
            metrics.update(epoch=epoch + 1, step=state.step)
            state.history.append(metrics)
            eval_logs = {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, float)}
            accelerator.log(eval_logs, step=state.step)
            if main:
                bar.write(
                    " ".join(
                        f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
                    )
                )
            # Without the `eval` extra there are no caption metrics: selection falls back to the loss.
            key = config.metric_for_best if config.metric_for_best in metrics else "val_loss"
            value = metrics[key]
            if _better(key, value, state.best_value):
                state.best_value, state.best_metrics, state.stale = value, dict(metrics), 0
                state.best_step = state.step
                best_state = {
                    n: p.detach().cpu().clone()
                    for n, p in prepared.model.named_parameters()
                    if p.requires_grad
                }
            else:
                state.stale += 1
                if config.early_stopping_patience and state.stale >= config.early_stopping_patience:
                    if main:
                        bar.write(
                            f"Early stopping: no improvement in {config.metric_for_best} for {state.stale} "
                            "evaluations."
                        )
                    break
        ckpt.sync_manifest(accelerator, manifest)  # other processes' skip records reach skipped.jsonl
        synced = manifest.count
        ckpt.check_bad_fraction(synced, *bad_limit)
        if state.step >= total_updates:
            break
    bar.close()
    train_seconds = time.perf_counter() - start
    accelerator.wait_for_everyone()
    history, best_metrics, step = state.history, state.best_metrics, state.step

    if best_state is not None:  # keep the best evaluated weights, not merely the last ones
        params = dict(prepared.model.named_parameters())
        with torch.no_grad():
            for name, value in best_state.items():
                params[name].copy_(value.to(params[name].device))
    final_model = accelerator.unwrap_model(loss_module).model
    metrics = {
        **best_metrics,
        "best_metric": config.metric_for_best if best_state is not None else None,
        "skipped_samples": manifest.count,
        "truncated_captions": collator.truncated,
    }
    metadata = {
        "strategy": strategy,
        "base_model": base_model,
        "prompt": config.prompt,
        "config": config.to_dict(),
        "metrics": metrics,
        "trainable_params": report["all"]["trainable"],
        "total_params": report["all"]["total"],
        "trainable_by_tower": report,
        "dataset": train_data if isinstance(train_data, str) else None,
        "train_seconds": train_seconds,
        "label_smoothing": config.label_smoothing,
    }
    if main:
        save_checkpoint(final_model, processor, output_dir, metadata)
        summary = f"Saved {strategy} model to {output_dir} after {step} steps in {train_seconds:.1f}s"
        if manifest.count:
            summary += f"; {manifest.count} samples skipped (see {manifest.path})"
        print(summary)
    for tracker in accelerator.trackers:
        tracker.finish()
    # Not `accelerator.end_training()`: that also destroys the process group, which belongs to the process
    # (torchrun, `accelerate launch`), not to this run. A second adapt() in the same process (ablate, a
    # notebook) needs it, and with gloo the destroyed group's last owner, the DDP wrapper, tore it down when
    # freed, joining gloo worker threads that could be waiting for the GIL it held (a deadlock in 3 of 35
    # two-process runs on a loaded 2-core machine). The wrapper and the device cache are released here, so
    # the next run starts with the memory back.
    peak_memory = _peak_memory(accelerator.device)
    del loss_module, optimizer, train_loader, scheduler
    accelerator.free_memory()
    return AdaptResult(
        model=final_model,
        processor=processor,
        output_dir=output_dir,
        history=history,
        metrics=metrics,
        trainable_params=report["all"]["trainable"],
        total_params=report["all"]["total"],
        train_seconds=train_seconds,
        peak_memory_bytes=peak_memory,
        strategy=strategy,
        parameter_report=report,
        skipped=manifest.count,
        truncated_captions=collator.truncated,
        prompt=config.prompt,
    )
