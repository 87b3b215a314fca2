"""Per-epoch validation during `adapt()`: loss and caption metrics on a bounded sample, across processes."""

from __future__ import annotations

from typing import Any

import torch

from medblip_peft.caption import Captioner
from medblip_peft.config import AdaptConfig
from medblip_peft.data.collate import IGNORE_INDEX

__all__ = ["bleu4_cider", "validate"]


def validate(loss_module, processor, eval_ds, collator, accelerator, config: AdaptConfig) -> dict[str, Any]:
    """Validation loss and caption metrics on the first `eval_max_samples` rows, sharded across processes.

    The loss is a token-weighted mean over all processes. Captions are gathered to every process (so that
    every process takes the same best-checkpoint and early-stopping decisions) and scored with BLEU-4 and CIDEr.
    """
    from accelerate.utils import gather_object

    from medblip_peft.data.images import BadImageError, load_image

    n = min(len(eval_ds), config.eval_max_samples)
    sample = eval_ds.select(range(n))
    size = config.eval_batch_size or config.batch_size
    loss_module.eval()
    loss_sum, tokens = 0.0, 0
    images, references = [], []
    with accelerator.split_between_processes(list(range(n))) as shard:
        for start in range(0, len(shard), size):
            rows = [sample[i] for i in shard[start : start + size]]
            batch = collator(rows)
            if batch is None:
                continue
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with torch.no_grad(), accelerator.autocast():
                loss = loss_module(**batch)
            count = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            loss_sum, tokens = loss_sum + float(loss) * count, tokens + count
            for row in rows:
                try:
                    images.append(load_image(row["image"]))
                    references.append(row["caption"].strip())
                except BadImageError:
                    continue  # already recorded by the collator
    totals = accelerator.reduce(torch.tensor([loss_sum, tokens], device=accelerator.device), reduction="sum")
    metrics: dict[str, Any] = {"val_loss": float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")}
    if images:
        captioner = Captioner(
            accelerator.unwrap_model(loss_module).model,
            processor,
            prompt=config.prompt,
            device=accelerator.device,
            batch_size=size,
        )
        predictions = captioner(images, num_beams=config.eval_num_beams)
    else:
        predictions = []
    predictions, references = gather_object(predictions), gather_object(references)
    loss_module.train()
    if predictions:
        metrics.update(bleu4_cider(predictions, references))
    return metrics


def bleu4_cider(predictions: list[str], references: list[str]) -> dict[str, float]:
    try:
        from medblip_peft.evaluation import score_captions

        scores = score_captions(predictions, references, metrics=("bleu", "cider"))
    except ImportError as err:  # the `eval` extra (pycocoevalcap) is optional for training
        import warnings

        warnings.warn(
            f"Validation reports loss only: caption metrics need `pip install medblip-peft[eval]` ({err}).",
            stacklevel=2,
        )
        return {}
    return {"bleu_4": float(scores["bleu_4"]), "cider": float(scores["cider"])}
