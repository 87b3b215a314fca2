"""`compare` (any captioners on one test split) and `ablate` (the four fine-tuning strategies, same budget).

Both caption the same test images with every system, score them once, and write the files described in
:mod:`.tables`. See ``docs/comparison.md``.
"""

from __future__ import annotations

import copy
import gc
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medblip_peft.data.images import BadImageError, load_image

from .baselines import CaptionerLike, load_baseline
from .scoring import DEFAULT_METRICS, caption_stats
from .tables import TABLE_METRICS, Report, bar_panels, build_report, metric_panels, write_report

__all__ = ["STRATEGIES", "TestSplit", "ablate", "compare", "load_test_split", "phantom_inputs"]

STRATEGIES = ("full", "encoder", "decoder", "lora")


@dataclass
class TestSplit:
    """The images every system captions, with references and ids; ``skipped`` lists undecodable images."""

    __test__ = False  # not a pytest test class, despite the name

    images: list[Any]
    references: list[str]
    image_ids: list[str]
    paths: list[str | None]
    skipped: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.images)


def load_test_split(dataset: Any, *, split: str = "test", limit: int | None = None, **columns: Any) -> TestSplit:
    """Load a test split (anything :func:`~medblip_peft.data.loaders.load_caption_dataset` takes).

    Every image is decoded once first: an image that cannot be decoded is left out for *all* systems and listed
    in ``skipped``, so every system is scored on the same images.
    """
    from medblip_peft.data.loaders import load_caption_dataset

    ds = load_caption_dataset(dataset, split=split, **columns)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    ids = ds["image_id"] if "image_id" in ds.column_names else [str(i) for i in range(len(ds))]
    out = TestSplit([], [], [], [], [])
    for row, image_id in zip(ds, ids):
        source = row["image"]
        # Paths are kept for the predictions file; datasets image dicts may carry one, PIL images do not.
        path = source if isinstance(source, str) else source.get("path") if isinstance(source, dict) else None
        try:
            load_image(source)
        except BadImageError as err:
            out.skipped.append({"image_id": image_id, "image": path, "reason": err.reason, "error": str(err)})
            continue
        out.images.append(source)
        out.references.append(row["caption"].strip())
        out.image_ids.append(str(image_id))
        out.paths.append(path)
    if not out.images:
        raise ValueError("no decodable test images")
    return out


def _free(device_cache: bool = True) -> None:
    # Baselines are loaded one at a time and dropped after captioning, so a 7-B model never shares the GPU.
    gc.collect()
    if device_cache and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _run(captioner: CaptionerLike, test: TestSplit, batch_size: int | None, generation: Mapping[str, Any]):
    kwargs = {**generation, **({"batch_size": batch_size} if batch_size else {})}
    start = time.perf_counter()
    captions = captioner(test.images, **kwargs)
    seconds = time.perf_counter() - start
    if len(captions) != len(test):
        raise RuntimeError(f"{getattr(captioner, 'name', captioner)!r} returned {len(captions)} captions "
                           f"for {len(test)} images")  # fmt: skip
    return list(captions), seconds, list(getattr(captioner, "failures", []) or [])


def _finish(
    predictions: dict[str, list[str]],
    test: TestSplit,
    out_dir: str | Path,
    *,
    title: str,
    metrics: Sequence[str],
    plot: bool,
    extras: dict[str, dict[str, float]],
    failures: dict[str, list[dict[str, Any]]],
    report_kwargs: Mapping[str, Any],
) -> Report:
    stats = {name: caption_stats(preds, test.references, metrics=metrics) for name, preds in predictions.items()}
    report_kwargs = dict(report_kwargs)
    meta = {"n_images": len(test), "skipped_images": test.skipped, "metrics": list(metrics),
            **report_kwargs.pop("meta", {})}  # fmt: skip
    report = build_report(stats, extras=extras, failures=failures, meta=meta, **report_kwargs)
    write_report(report, out_dir, predictions=predictions, references=test.references, image_ids=test.image_ids,
                 images=test.paths, title=title, plot=plot)  # fmt: skip
    return report


def compare(
    captioners: Mapping[str, CaptionerLike | str],
    dataset: Any,
    *,
    out_dir: str | Path,
    split: str = "test",
    limit: int | None = None,
    n_resamples: int = 1000,
    metrics: Sequence[str] = DEFAULT_METRICS,
    primary: str | None = None,
    batch_size: int | None = None,
    generation: Mapping[str, Any] | None = None,
    device: str | None = None,
    plot: bool = True,
    title: str = "Caption comparison",
    **report_kwargs: Any,
) -> Report:
    """Caption one test split with every system and write the comparison (see :mod:`.tables` for the files).

    Args:
        captioners: ``{display name: captioner}``; a string is loaded with
            :func:`~.baselines.load_baseline`: a registry name (``"blip-base"``, ``"gemini"``, …), a
            fine-tuned checkpoint folder or a Hub repo id. Strings are loaded one at a time and freed after use.
        dataset: Test data: a ``datasets.Dataset``, ROCO root, imagefolder, CSV/JSONL file or Hub dataset id.
        out_dir: Where the files go.
        split: Split to take from ``dataset`` (ROCO: ``"test"``).
        limit: Caption only the first ``limit`` images (quick looks; the paper's table needs all).
        n_resamples: Bootstrap resamples for the intervals (0: none).
        metrics: Metric families (``"bertscore"`` is opt-in).
        primary: Metric that picks the best system for the paired tests (default: CIDEr when computed).
        batch_size, generation: Passed to every captioner call (Gemini ignores decoding settings).
        device: Device for captioners loaded from strings.
        **report_kwargs: ``confidence``, ``seed``, ``paired_method``, ``paired_resamples`` (see
            :func:`.tables.build_report`).
    """
    test = load_test_split(dataset, split=split, limit=limit)
    predictions: dict[str, list[str]] = {}
    extras: dict[str, dict[str, float]] = {}
    failures: dict[str, list[dict[str, Any]]] = {}
    for name, spec in captioners.items():
        captioner = load_baseline(spec, name=name, device=device) if isinstance(spec, (str, Path)) else spec
        predictions[name], seconds, failures[name] = _run(captioner, test, batch_size, generation or {})
        extras[name] = {"caption_seconds": seconds, "failures": len(failures[name])}
        del captioner
        _free()
    return _finish(predictions, test, out_dir, title=title, metrics=metrics, plot=plot, extras=extras,
                   failures=failures, report_kwargs={"n_resamples": n_resamples, "primary": primary,
                                                     **report_kwargs})  # fmt: skip


def phantom_inputs(
    out_dir: str | Path, *, train_size: int = 2000, test_size: int = 100, seed: int = 0
) -> tuple[str, Any, Any]:
    """Offline ablation inputs: ``(base model folder, train phantoms, test phantoms)``.

    The base is the demo's tiny random BLIP, saved (safetensors) so that LoRA adapters can point to it and every
    strategy starts from the same weights.
    """
    from medblip_peft.data.phantoms import make_phantoms
    from medblip_peft.demo import DEMO_MODEL
    from medblip_peft.testing import tiny_blip

    size = DEMO_MODEL["image_size"]
    model, processor = tiny_blip(seed=seed, **DEMO_MODEL)
    base = Path(out_dir) / "base_model"
    model.save_pretrained(base)
    processor.save_pretrained(base)
    train = make_phantoms(train_size, seed=seed, image_size=size)
    test = make_phantoms(test_size, seed=seed + 2, image_size=size)
    return str(base.resolve()), train, test


def _peak_reset() -> None:
    if torch.cuda.is_available():  # per-strategy peaks on GPU; on CPU the peak RSS is per process
        torch.cuda.reset_peak_memory_stats()


def ablate(
    model: Any,
    train_data: Any,
    test_data: Any,
    *,
    out_dir: str | Path,
    strategies: Sequence[str] = STRATEGIES,
    seed: int = 0,
    max_steps: int | None = None,
    num_epochs: int | None = None,
    eval_data: Any = None,
    processor: Any = None,
    limit: int | None = None,
    n_resamples: int = 1000,
    metrics: Sequence[str] = DEFAULT_METRICS,
    primary: str | None = None,
    paired_resamples: int = 10000,
    generation: Mapping[str, Any] | None = None,
    plot: bool = True,
    warmup: bool = True,
    log: Callable[[str], None] = print,
    **adapt_overrides: Any,
) -> Report:
    """Fine-tune one base model with each strategy (same data, seed and step budget) and compare the results.

    Args:
        model: The base BLIP: Hub id or folder (loaded fresh per strategy), or a model object (deep-copied per
            strategy; pass ``processor``; LoRA adapters record ``model.config._name_or_path`` as their base).
        train_data, test_data, eval_data: Anything :func:`~medblip_peft.train.adapt` and
            :func:`load_test_split` accept.
        out_dir: Writes ``checkpoints/<strategy>/`` plus the files of :mod:`.tables` and ``ablation.png``.
        strategies: Any of ``"full"``, ``"encoder"``, ``"decoder"``, ``"lora"``.
        seed, max_steps, num_epochs: The shared budget (``max_steps`` wins when both are set).
        limit, n_resamples, metrics, primary, paired_resamples, generation, plot: As in :func:`compare`.
        warmup: Run one untimed training step first, so that the first strategy's train time is not inflated
            by one-off start-up costs.
        **adapt_overrides: Other :class:`~medblip_peft.config.AdaptConfig` fields, the same for every strategy.

    Returns:
        The :class:`~.tables.Report`; its extras hold train time, trainable parameters and peak memory.
    """
    if len(set(strategies)) != len(strategies):
        raise ValueError(f"strategies must be distinct, got {list(strategies)}")
    out = Path(out_dir)
    test = load_test_split(test_data, limit=limit)
    budget = {k: v for k, v in {"max_steps": max_steps, "num_epochs": num_epochs}.items() if v is not None}
    predictions: dict[str, list[str]] = {}
    extras: dict[str, dict[str, float]] = {}
    from medblip_peft.train import adapt

    def train(strategy: str, output_dir: Path, *, evaluate: bool = True, **steps: Any):
        torch.manual_seed(seed)
        source = model if isinstance(model, (str, Path)) else copy.deepcopy(model)
        return adapt(source, train_data, strategy=strategy, eval_data=eval_data if evaluate else None,
                     processor=processor,
                     output_dir=output_dir, seed=seed, **steps, **adapt_overrides)  # fmt: skip

    if warmup:
        # The first training in a process pays one-off costs (allocator, kernels, thread pools) that would
        # otherwise inflate the first strategy's train time; one untimed step absorbs them.
        shutil.rmtree(train(strategies[0], out / "checkpoints" / "_warmup", evaluate=False, max_steps=1).output_dir)
        _free()
    for strategy in strategies:
        log(f"ablate: training {strategy!r}")
        _peak_reset()
        result = train(strategy, out / "checkpoints" / strategy, **budget)
        predictions[strategy], seconds, _ = _run(result.captioner(), test, None, generation or {})
        extras[strategy] = {
            "train_seconds": result.train_seconds,
            "trainable_params": result.trainable_params,
            "trainable_percent": 100.0 * result.trainable_params / max(result.total_params, 1),
            "peak_memory_mib": result.peak_memory_bytes / 2**20,
            "caption_seconds": seconds,
        }
        del result
        _free()
    memory = ("CUDA max allocated, reset per strategy" if torch.cuda.is_available()
              else "process peak RSS (cumulative: a strategy's value includes the earlier strategies' peaks)")
    report = _finish(predictions, test, out, title="Fine-tuning strategy ablation", metrics=metrics, plot=plot,
                     extras=extras, failures={}, report_kwargs={
                         "n_resamples": n_resamples, "primary": primary, "seed": seed,
                         "paired_resamples": paired_resamples,
                         "meta": {"budget": budget, "peak_memory": memory,
                                  "adapt_overrides": {k: str(v) for k, v in adapt_overrides.items()}}})  # fmt: skip
    if plot:  # the cost side of the trade-off next to the primary metric
        quality = [p for p in metric_panels(report) if p[0] == TABLE_METRICS.get(report.primary)]
        cost = [(label, {s: float(extras[s][key]) for s in extras}, None)
                for key, label in (("train_seconds", "Train time (s)"), ("trainable_params", "Trainable params"),
                                   ("peak_memory_mib", "Peak memory (MiB)"))]  # fmt: skip
        report.files["ablation_chart"] = bar_panels([*quality, *cost], out / "ablation.png",
                                                    title="Strategy ablation: quality and cost")
    return report
