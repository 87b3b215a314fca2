"""`medblip-peft demo`: the whole pipeline offline in a few minutes, on synthetic phantoms and a tiny BLIP.

It builds phantom train/validation/test sets and a tiny random BLIP, scores the untrained model, trains it with
one strategy, scores it again (BLEU-4 plus modality, side and level accuracy read from the captions), saves a
checkpoint, reloads it with `Captioner.from_pretrained`, and captions three test phantoms. The learning is
real: side and level can only be read from the pixels.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["DEMO_MODEL", "DEMO_TRAINING", "phantom_accuracy", "run_demo"]

# The tiny architecture the demo and the learning tests use.
DEMO_MODEL: dict[str, Any] = {"image_size": 64, "patch_size": 16, "hidden_size": 64, "num_layers": 2}
# How the demo trains it (on 2,000 phantoms): tests and benchmarks that need "the demo model" reuse these.
DEMO_TRAINING: dict[str, Any] = {
    "num_epochs": 32,
    "learning_rate": 1.5e-3,
    "batch_size": 16,
    "warmup_ratio": 0.1,
}


def phantom_accuracy(predictions: Sequence[str], dataset) -> dict[str, float]:
    """Accuracy of modality, side, level, side-and-level together and (when the dataset has a ``finding``
    column) the finding word, parsed from predicted captions.

    A lesion-free phantom counts as correct for side, level and finding only when the caption names none.
    """
    from medblip_peft.data.phantoms import parse_phantom_caption

    if len(predictions) != len(dataset):
        raise ValueError(f"{len(predictions)} predictions for {len(dataset)} phantoms; they must match.")
    n = max(len(predictions), 1)
    findings = dataset["finding"] if "finding" in dataset.column_names else None
    hits = {"modality": 0, "side": 0, "level": 0, "side_and_level": 0, **({"finding": 0} if findings else {})}
    for i, (pred, modality, side, level) in enumerate(
        zip(predictions, dataset["modality"], dataset["side"], dataset["level"])
    ):
        got = parse_phantom_caption(pred)
        side_ok, level_ok = (got.side or "") == side, (got.level or "") == level
        hits["modality"] += got.modality == modality
        hits["side"] += side_ok
        hits["level"] += level_ok
        hits["side_and_level"] += side_ok and level_ok
        if findings:
            hits["finding"] += (got.finding or "") == findings[i]
    return {k: v / n for k, v in hits.items()}


def _score(captioner, dataset, log) -> dict[str, float]:
    predictions = captioner(list(dataset["image"]), num_beams=1)
    scores = phantom_accuracy(predictions, dataset)
    try:
        from medblip_peft.evaluation import score_captions

        scores["bleu_4"] = float(
            score_captions(predictions, list(dataset["caption"]), metrics=("bleu",))["bleu_4"]
        )
    except ImportError:
        log("(BLEU-4 needs the `eval` extra: pip install 'medblip-peft[eval]')")
    return scores


def _fmt(scores: dict[str, float]) -> str:
    return "  ".join(f"{k}={v:.3f}" for k, v in scores.items())


def run_demo(
    *,
    strategy: str = "full",
    output_dir: str | Path = "medblip_demo",
    train_size: int = 2000,
    eval_size: int = 64,
    test_size: int = 100,
    num_epochs: int = DEMO_TRAINING["num_epochs"],
    learning_rate: float = DEMO_TRAINING["learning_rate"],
    seed: int = 0,
    log=print,
    **overrides: Any,
) -> dict[str, Any]:
    """Run the demo and return its numbers (accuracies before and after, wall time and paths)."""
    import torch

    from medblip_peft.caption import Captioner
    from medblip_peft.data.phantoms import make_phantoms
    from medblip_peft.testing import tiny_blip
    from medblip_peft.train import adapt

    start = time.perf_counter()
    output_dir = Path(output_dir)
    size = DEMO_MODEL["image_size"]
    log(f"Building phantoms: {train_size} train, {eval_size} validation, {test_size} test ({size}x{size} px)")
    train = make_phantoms(train_size, seed=seed, image_size=size)
    val = make_phantoms(eval_size, seed=seed + 1, image_size=size)
    test = make_phantoms(test_size, seed=seed + 2, image_size=size)
    model, processor = tiny_blip(seed=seed, **DEMO_MODEL)
    # The untrained model must be saved as a loadable base for a LoRA adapter to point to.
    base_dir = output_dir / "base_model"
    model.save_pretrained(base_dir)
    processor.save_pretrained(base_dir)
    model.config._name_or_path = str(base_dir.resolve())

    before = _score(Captioner(model, processor, device="cpu"), test, log)
    log(f"Untrained:  {_fmt(before)}")
    torch.manual_seed(seed)
    result = adapt(
        model,
        train,
        strategy=strategy,
        eval_data=val,
        output_dir=output_dir / "model",
        processor=processor,
        **{
            **DEMO_TRAINING,
            "num_epochs": num_epochs,
            "learning_rate": learning_rate,
            "eval_num_beams": 1,
            "eval_max_samples": eval_size,
            "metric_for_best": "val_loss",
            "seed": seed,
            "report_to": "none",
            "cpu": True,
            **overrides,
        },
    )
    after = _score(result.captioner(device="cpu"), test, log)
    log(f"Trained ({strategy}): {_fmt(after)}")

    reloaded = Captioner.from_pretrained(result.output_dir, device="cpu")
    examples = []
    for i in range(min(3, len(test))):
        caption = reloaded([test[i]["image"]], num_beams=1)[0]
        examples.append({"truth": test[i]["caption"], "caption": caption})
        log(f"  test {i}: {caption!r}\n          truth: {test[i]['caption']!r}")
    seconds = time.perf_counter() - start
    log(
        f"Checkpoint: {result.output_dir}  (reload with Captioner.from_pretrained({str(result.output_dir)!r}))"
    )
    log(
        f"Wall time: {seconds:.1f}s; trainable parameters {result.trainable_params:,} of {result.total_params:,}"
    )
    return {
        "before": before,
        "after": after,
        "examples": examples,
        "seconds": seconds,
        "output_dir": str(result.output_dir),
        "strategy": result.strategy,
        "trainable_params": result.trainable_params,
        "total_params": result.total_params,
    }
