"""Training-step cost per strategy, and against the study's ("paper-style") loop, side by side in one run.

Variants, each a full optimizer step (fetch rows, collate, forward, backward, clip, AdamW) on the same rows:

* ``full``, ``encoder``, ``lora`` (both towers), ``decoder`` (no cache): our loop, pixels in;
* ``decoder+cache``, ``lora-text+cache``: our loop with the vision-feature cache already built (warm);
* ``paper full``, ``paper decoder``: the study's loop: one processor call per sample with
  ``padding="max_length", max_length=128``, ``labels=input_ids``, BLIP's own forward, no cache, torch's default
  (unfused) AdamW; ours uses the fused AdamW that `adapt()` uses.

Variants that share a model (ours and the study's loop; cached and uncached decoder) run round-robin, one step
each per round; the first round is a warm-up that also counts FLOPs, and the table shows medians. One model is
alive at a time, so BLIP-base with AdamW fits a small machine. On CPU the measure is the step's CPU time on one
thread (`--threads 1`), which other jobs on a shared machine do not inflate; wall time is reported beside it. Usage::

    python benchmarks/train_step.py                  # BLIP-base, CPU (1 thread), batch 2, 3 timed rounds
    python benchmarks/train_step.py --device cuda    # batch 32, bf16, 10 timed rounds, adds MFU
    python benchmarks/train_step.py --smoke          # tiny model, seconds
"""

from __future__ import annotations

import copy
import gc
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import _common as common
from medblip_peft.cache import training_feed
from medblip_peft.config import AdaptConfig
from medblip_peft.data.collate import CaptionCollator
from medblip_peft.data.images import load_image
from medblip_peft.data.loaders import load_caption_dataset
from medblip_peft.strategies import apply_strategy, parameter_report
from medblip_peft.train import CaptioningLoss, _param_groups

PAPER_MAX_LENGTH = 128  # the study padded every caption to 128 tokens
ORDER = [  # table order
    "full", "encoder", "decoder+cache", "decoder", "lora", "lora-text+cache", "paper full", "paper decoder",
]  # fmt: skip


@dataclass
class Setup:
    """One prepared model with its optimizer; several variants may share it."""

    model: nn.Module
    loss: CaptioningLoss
    optimizer: torch.optim.Optimizer
    config: AdaptConfig
    prepared: Any
    report: dict[str, dict[str, int]]


def state_bytes(setup: Setup) -> int:
    """Bytes of parameters plus AdamW state: what the model holds between steps."""
    params = sum(p.numel() * p.element_size() for p in setup.model.parameters())
    moments = sum(
        t.numel() * t.element_size()
        for state in setup.optimizer.state.values()
        for t in state.values()
        if torch.is_tensor(t)
    )
    return params + moments


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0], "benchmarks/results/train_step.json")
    parser.add_argument("--batch-size", type=int, help="default 2 (CPU), 32 (CUDA), 4 (smoke)")
    parser.add_argument("--steps", type=int, help="timed rounds; default 3 (CPU), 10 (CUDA), 1 (smoke)")
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed rounds first (>= 1; FLOPs are counted)"
    )
    parser.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], help="default bf16 on CUDA")
    args = parser.parse_args()
    common.setup_threads(args)
    from accelerate import Accelerator

    cuda = args.device.startswith("cuda")
    batch = args.batch_size or (4 if args.smoke else 32 if cuda else 2)
    steps = args.steps or (1 if args.smoke else 10 if cuda else 3)
    warmup = max(1, args.warmup)
    precision = args.mixed_precision or ("bf16" if cuda else "no")
    accelerator = Accelerator(cpu=not cuda, mixed_precision=precision)
    device = accelerator.device

    base, processor, size = common.build_model(args.smoke)
    n_rows = batch * (warmup + steps)
    data = load_caption_dataset(
        _dataset(common.phantom_images(n_rows, size, args.seed), common.sample_captions(args, n_rows))
    )
    collator = CaptionCollator(processor, max_length=96)
    # The tiny smoke model has 96 text positions; BLIP-base has 512, so the study's 128 applies unchanged.
    paper_length = min(PAPER_MAX_LENGTH, base.config.text_config.max_position_embeddings)
    tokens = [min(len(ids), 96) for ids in processor.tokenizer(list(data["caption"]))["input_ids"]]

    def setup(strategy: str, **overrides: Any) -> Setup:
        config = AdaptConfig(batch_size=batch, mixed_precision=precision, progress=False, **overrides)
        torch.manual_seed(args.seed)
        prepared = apply_strategy(copy.deepcopy(base), strategy, config)
        model = prepared.model.to(device).train()
        optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=1e-5, fused=True)
        loss = CaptioningLoss(model, vision_frozen=prepared.vision_frozen)
        return Setup(model, loss, optimizer, config, prepared, parameter_report(model))

    def rows_of(feed_rows: Any, r: int) -> list[dict[str, Any]]:
        return [feed_rows[i] for i in range(r * batch, (r + 1) * batch)]

    def optimizer_step(s: Setup, loss: torch.Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
        optimizer = optimizer or s.optimizer
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in s.model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def ours(s: Setup, cached: bool) -> tuple[Any, float]:
        config = s.config.replace(cache_vision_features=cached)
        with common.Clock(device) as clock:
            feed = training_feed(
                data, collator, s.prepared, processor.image_processor, config, accelerator=accelerator
            )
        assert (feed.cache is not None) == cached, feed.reason
        build = clock.wall if cuda else clock.cpu

        def step(r: int) -> None:
            batch_ = feed.collate_fn(rows_of(feed.dataset, r))
            batch_ = {k: v.to(device, non_blocking=True) for k, v in batch_.items()}
            with accelerator.autocast():
                loss = s.loss(**batch_)
            optimizer_step(s, loss)

        return step, build

    def paper(s: Setup) -> Any:
        # The study's optimizer: torch's default AdamW (not fused), with its own state on the shared model.
        optimizer = torch.optim.AdamW(_param_groups(s.model, s.config.weight_decay), lr=1e-5)

        def step(r: int) -> None:
            encoded = [  # the study called the processor once per sample, padding to 128
                processor(
                    images=load_image(row["image"]),
                    text=row["caption"],
                    padding="max_length",
                    max_length=paper_length,
                    truncation=True,
                    return_tensors="pt",
                )
                for row in rows_of(data, r)
            ]
            inputs = {k: torch.cat([e[k] for e in encoded]).to(device) for k in encoded[0]}
            with accelerator.autocast():
                loss = s.model(**inputs, labels=inputs["input_ids"]).loss
            optimizer_step(s, loss, optimizer)

        return step

    flops: dict[str, int] = {}

    def counted(name: str, step: Any) -> Any:
        def run(r: int) -> None:
            if r > 0:
                return step(r)
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as counter:
                step(r)
            flops[name] = counter.get_total_flops()

        return run

    # One model (and optimizer) at a time keeps BLIP-base within a small machine's RAM; the variants that share
    # it (ours vs the study's loop, cached vs not) run interleaved, so their ratios are side by side.
    groups = [
        ("full", {}, [("full", False), ("paper full", None)]),
        ("decoder", {}, [("decoder+cache", True), ("decoder", False), ("paper decoder", None)]),
        ("encoder", {}, [("encoder", False)]),
        ("lora", {"lora_towers": "both"}, [("lora", False)]),
        ("lora", {"lora_towers": "text"}, [("lora-text+cache", True)]),
    ]
    timings: dict[str, dict[str, Any]] = {}
    builds: dict[str, float] = {}
    info: dict[str, dict[str, Any]] = {}
    for strategy, overrides, members in groups:
        s = setup(strategy, **overrides)
        variants = {}
        for name, cached in members:
            if cached is None:
                variants[name] = paper(s)
            else:
                variants[name], builds[name] = ours(s, cached)
        timings.update(
            common.interleaved({n: counted(n, step) for n, step in variants.items()}, steps, warmup, device)
        )
        for name in variants:
            info[name] = {"report": s.report, "state_bytes": state_bytes(s)}
        del s, variants
        gc.collect()
    # On CPU the primary measure is single-thread CPU seconds (immune to other jobs on the cores); on CUDA, wall.
    measure = "median_wall_s" if cuda else "median_cpu_s"
    full_s = timings["full"][measure]
    rows = []
    for name in ORDER:
        t = timings[name]
        trainable, total = info[name]["report"]["all"]["trainable"], info[name]["report"]["all"]["total"]
        seconds = t[measure]
        achieved = flops[name] / seconds
        rows.append(
            {
                "variant": name,
                "step_s": seconds,
                "wall_s": t["median_wall_s"],
                "samples_per_s": batch / seconds,
                "vs_full": seconds / full_s,
                "trainable": trainable,
                "share": trainable / total,
                "state_mib": info[name]["state_bytes"] / 2**20,
                "step_peak_mib": t["step_peak_bytes"] / 2**20,
                "gflop": flops[name] / 1e9,
                "tflops": achieved / 1e12,
                "mfu": achieved / common.H200_BF16_DENSE_FLOPS if cuda else None,
                "wall_times_s": t["wall_s"],
                "cpu_times_s": t["cpu_s"],
                "cache_build_s_per_image": builds.get(name) / n_rows if "cache" in name else None,
            }
        )
    by = {r["variant"]: r for r in rows}
    ratios = {
        "decoder_cache_vs_full": (by["decoder+cache"]["step_s"] / full_s, "<= 0.25"),
        "lora_vs_full": (by["lora"]["step_s"] / full_s, "<= 0.7"),
        "lora_trainable_share": (by["lora"]["share"], "<= 0.01"),
        "full_speedup_vs_paper": (by["paper full"]["step_s"] / full_s, ">= 1.2"),
        "decoder_speedup_vs_paper": (by["paper decoder"]["step_s"] / by["decoder+cache"]["step_s"], ">= 5"),
        "decoder_nocache_speedup_vs_paper": (
            by["paper decoder"]["step_s"] / by["decoder"]["step_s"],
            "(info)",
        ),
    }
    columns = [
        ("variant", "variant", "s"),
        ("step_s", "step s" if cuda else "step CPU s", ".3f"),
        ("wall_s", "wall s", ".3f"),
        ("samples_per_s", "samples/s", ".2f"),
        ("vs_full", "x full", ".2f"),
        ("trainable", "trainable", ",d"),
        ("share", "share", ".2%"),
        ("state_mib", "params+AdamW MiB", ",.0f"),
        ("step_peak_mib", "step peak +MiB", ",.0f"),
        ("gflop", "GFLOP/step", ",.0f"),
        ("tflops", "TFLOP/s", ".3f"),
        *([("mfu", "MFU", ".1%")] if cuda else []),
    ]
    print(common.table(rows, columns))
    print()
    for key, (value, target) in ratios.items():
        print(f"{key:36s} {value:8.3f}   target {target}")
    build = builds["decoder+cache"] / n_rows
    saved = by["decoder"]["step_s"] - by["decoder+cache"]["step_s"]
    print(
        f"cache build {build:.3f} s/image; pays for itself after {build * batch / saved:.2f} epochs"
        if saved > 0
        else f"cache build {build:.3f} s/image"
    )
    common.write_json(
        args.out,
        {
            "benchmark": "train_step",
            "smoke": args.smoke,
            "machine": common.machine_info(device),
            "settings": {
                "device": str(device),
                "measure": measure,
                "threads": torch.get_num_threads(),
                "batch_size": batch,
                "timed_rounds": steps,
                "warmup_rounds": warmup,
                "mixed_precision": precision,
                "image_size": size,
                "mean_caption_tokens": sum(tokens) / len(tokens),
                "paper_caption_tokens": paper_length,
            },
            "rows": rows,
            "ratios": {k: {"value": v, "target": t} for k, (v, t) in ratios.items()},
        },
    )


def _dataset(images: list, captions: list[str]):
    import datasets

    features = datasets.Features(
        {"image_id": datasets.Value("string"), "image": datasets.Image(), "caption": datasets.Value("string")}
    )
    ids = [f"BENCH_{i:05d}" for i in range(len(images))]
    return datasets.Dataset.from_dict(
        {"image_id": ids, "image": images, "caption": captions}, features=features
    )


if __name__ == "__main__":
    main()
