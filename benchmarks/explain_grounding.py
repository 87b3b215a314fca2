"""Grounding benchmark for `medblip_peft.explain`: the numbers and overlays in docs/explain.md.

1. Train the demo model with `run_demo` (exactly what `medblip-peft demo` trains: 2000 phantoms, 32 epochs), or reuse
   the checkpoint in ``--workdir``.
2. Pointing game and energy-in-mask of every method on held-out lesion-bearing phantoms (seed 2).
3. Randomisation check (decoder cross-attention, then the whole model) on a few held-out phantoms.
4. Seconds per explained caption for every method, on the tiny model and on the real BLIP-base architecture
   (`blip_base_config()`, random weights, CPU, one caption).
5. Overlays of a few phantoms into ``docs/images/explain/`` and all numbers into ``results.json``.

    python benchmarks/explain_grounding.py --workdir /tmp/explain-bench [--skip-base] [--images-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from medblip_peft.caption import Captioner
from medblip_peft.data.phantoms import make_phantoms
from medblip_peft.demo import DEMO_MODEL, phantom_accuracy
from medblip_peft.explain import METHODS, explain, grounding_score, randomization_check
from medblip_peft.testing import blip_base_config, tiny_tokenizer

METHOD_NAMES = [m for m in METHODS if not m.startswith("_")]
CAPTION = "Chest radiograph showing a mass in the upper left zone."


def train_or_load(workdir: Path) -> Captioner:
    """The demo model: `run_demo` exactly as `medblip-peft demo` runs it (the tests explain the same model)."""
    from medblip_peft.demo import run_demo

    checkpoint = workdir / "demo" / "model"
    if not (checkpoint / "medblip_peft.json").is_file():
        result = run_demo(output_dir=workdir / "demo", log=print)
        print(f"trained the demo model in {result['seconds']:.0f}s")
    return Captioner.from_pretrained(checkpoint, device="cpu")


def time_methods(captioner: Captioner, images: list[Any]) -> dict:
    """Mean seconds per explained caption (every token of the model's own greedy caption) per method."""
    explain(captioner, images[0], method="cross_attention", generation={"num_beams": 1})  # warm-up
    out = {}
    for name in METHOD_NAMES:
        runs = [explain(captioner, img, method=name, generation={"num_beams": 1}) for img in images]
        seconds = sum(r.seconds for r in runs) / len(runs)
        tokens = sum(len(r.tokens) for r in runs) / len(runs)
        out[name] = {"seconds": round(seconds, 4), "tokens": tokens}
        print(f"  {name:<22} {seconds:8.3f}s  ({tokens:.1f} tokens)")
    return out


def _seconds(fn, repeat: int = 2) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def base_timing(ig_steps: int, ig_batch: int, occlusion_batch: int) -> dict:
    """The real BLIP-base architecture with random weights, one teacher-forced caption, CPU.

    The attention methods (attention_ig with its defaults: 16 steps, 16 decoder copies per pass) are timed end
    to end. Integrated gradients (tokens x n_steps vision forward and backward passes) and occlusion (577
    vision forward passes) would take tens of minutes on a small CPU, so their cost is measured per batch of
    passes and multiplied out; the JSON says which numbers are which.
    """
    from transformers import BlipForConditionalGeneration, BlipImageProcessorPil, BlipProcessor

    from medblip_peft.explain.core import prepare

    torch.manual_seed(0)
    model = BlipForConditionalGeneration(blip_base_config()).eval()
    processor = BlipProcessor(
        image_processor=BlipImageProcessorPil(size={"height": 384, "width": 384}), tokenizer=tiny_tokenizer()
    )
    captioner = Captioner(model, processor, device="cpu")
    image = make_phantoms(1, seed=11, image_size=384)[0]["image"]
    out: dict[str, Any] = {}
    for name in ("cross_attention", "attention_rollout", "grad_x_attention", "attention_ig"):
        exp = explain(captioner, image, method=name, caption=CAPTION)
        out[name] = {"seconds": round(exp.seconds, 2), "tokens": len(exp.tokens), "measured": True}
    target = prepare(captioner, image, caption=CAPTION)[0]
    n_tokens, n_patches = target.num_tokens, target.grid[0] * target.grid[1]

    def forward_backward() -> None:
        pixels = target.pixel_values.expand(ig_batch, -1, -1, -1).clone().requires_grad_(True)
        target.token_logprobs(pixels)[:, 0].sum().backward()

    def forward() -> None:
        with torch.no_grad():
            target.token_logprobs(target.pixel_values.expand(occlusion_batch, -1, -1, -1))

    per_fb = _seconds(forward_backward, repeat=1)
    per_f = _seconds(forward, repeat=1)
    ig_batches = -(-n_tokens * ig_steps // ig_batch)
    occ_batches = -(-n_patches // occlusion_batch) + 1  # + the unperturbed pass
    out["integrated_gradients"] = {
        "seconds": round(ig_batches * per_fb, 1), "tokens": n_tokens, "n_steps": ig_steps, "measured": False,
        "seconds_per_batch": round(per_fb, 2), "batches": ig_batches, "internal_batch_size": ig_batch,
    }
    out["occlusion"] = {
        "seconds": round(occ_batches * per_f, 1), "tokens": n_tokens, "measured": False,
        "seconds_per_batch": round(per_f, 2), "batches": occ_batches, "perturbations_per_eval": occlusion_batch,
    }
    for name, row in out.items():
        print(f"  {name:<22} {row['seconds']:8.2f}s  ({row['tokens']} tokens, measured={row['measured']})")
    return out


def _shrink(path: Path) -> None:
    """Re-save a figure as a 96-colour palette PNG: a quarter of the size, no visible change."""
    from PIL import Image

    with Image.open(path) as img:
        small = img.convert("RGB").quantize(colors=96)
    small.save(path, optimize=True)


def save_overlays(captioner: Captioner, test, images_dir: Path, picks: list[int]) -> list[str]:
    """Small PNGs for the docs: per phantom, every method (rows) on its location tokens (columns); and the
    full-caption grid that `Explanation.save` writes, for three methods on the first phantom."""
    from matplotlib.figure import Figure

    from medblip_peft.explain import location_token_indices
    from medblip_peft.explain.render import draw_overlay

    images_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i in picks:
        row = test[i]
        caption = captioner([row["image"]], num_beams=1)[0]
        tokens = location_token_indices(captioner.processor.tokenizer.tokenize(caption))
        fig = Figure(figsize=(1.5 * (len(tokens) + 1), 1.45 * len(METHOD_NAMES) + 0.3), dpi=72)
        axes = fig.subplots(len(METHOD_NAMES), len(tokens) + 1, squeeze=False)
        for r, name in enumerate(METHOD_NAMES):
            exp = explain(captioner, row["image"], method=name, caption=caption, tokens=tokens)
            axes[r, 0].imshow(row["mask"], cmap="gray")
            axes[r, 0].set_title("lesion mask" if r == 0 else "", fontsize=8)
            axes[r, 0].set_ylabel(name.replace("_", " "), fontsize=8)
            axes[r, 0].set_xticks([])
            axes[r, 0].set_yticks([])
            for c in range(len(tokens)):
                draw_overlay(axes[r, c + 1], exp, c, title=exp.tokens[c] if r == 0 else "")
        fig.suptitle(caption, fontsize=8)
        fig.tight_layout()
        path = images_dir / f"phantom{i}_methods.png"
        fig.savefig(path)
        _shrink(path)
        written.append(str(path))
    for name in ("attention_ig", "grad_x_attention", "occlusion"):
        exp = explain(captioner, test[picks[0]]["image"], method=name, generation={"num_beams": 1})
        path = images_dir / f"phantom{picks[0]}_{name}_grid.png"
        exp.plot(columns=8).savefig(path)
        _shrink(path)
        written.append(str(path))
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("explain_bench"))
    parser.add_argument("--images-dir", type=Path, default=Path("docs/images/explain"))
    parser.add_argument("--n-test", type=int, default=100, help="held-out phantoms (about 80% carry a lesion)")
    parser.add_argument("--n-random", type=int, default=8, help="phantoms for the randomisation check")
    parser.add_argument("--ig-steps-base", type=int, default=32, help="IG steps for the BLIP-base timing")
    parser.add_argument(
        "--batch-base", type=int, default=2,
        help="images per timed pass on BLIP-base (memory: about 0.6 GB per image with gradients)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 on a shared CPU)")
    parser.add_argument(
        "--only", choices=("all", "tiny", "base", "overlays"), default="all",
        help="run one part; results.json is updated, not replaced",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    path = args.workdir / "results.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    results["torch_threads"] = torch.get_num_threads()
    if args.only in ("all", "tiny", "overlays"):
        captioner = train_or_load(args.workdir)
        test = make_phantoms(args.n_test, seed=2, image_size=DEMO_MODEL["image_size"])
    if args.only in ("all", "tiny"):
        results["accuracy"] = phantom_accuracy(captioner(list(test["image"]), num_beams=1), test)
        print("accuracy", results["accuracy"])
        start = time.perf_counter()
        results["grounding"] = grounding_score(captioner, test, methods=METHOD_NAMES)
        results["grounding_seconds"] = time.perf_counter() - start
        print(json.dumps({k: v for k, v in results["grounding"].items() if k != "per_word"}, indent=1))
        images = list(test.select(range(args.n_random))["image"])
        results["randomization"] = {
            target: {
                name: {k: v for k, v in r.items() if k != "per_image"}
                for name, r in randomization_check(captioner, images, methods=METHOD_NAMES, target=target).items()
            }
            for target in ("cross_attention", "model")
        }
        print(json.dumps(results["randomization"], indent=1))
        print("seconds per explained caption, tiny model:")
        results["timing_tiny"] = time_methods(captioner, list(test.select(range(10))["image"]))
    if args.only in ("all", "base"):
        print("seconds per explained caption, BLIP-base architecture (random weights, CPU):")
        results["timing_base"] = base_timing(args.ig_steps_base, args.batch_base, args.batch_base)
    if args.only in ("all", "overlays"):
        results["overlays"] = save_overlays(captioner, test, args.images_dir, picks=[0, 1])
    path.write_text(json.dumps(results, indent=1, default=float), encoding="utf-8")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
