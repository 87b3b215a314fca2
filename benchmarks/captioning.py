"""Captioning throughput: `Captioner` batched vs a per-image `generate` loop, same settings, same captions.

Both modes run the same `Captioner` (same preprocessing, generation settings and decoding); the loop mode
calls it once per image, as the study's evaluation did. Modes alternate (batched, loop, batched, loop, ...) after
one warm-up each, and the captions of every run must be identical, or the script exits with status 1. Usage::

    python benchmarks/captioning.py                   # BLIP-base, CPU, 8 images, 3 beams, 32 new tokens
    python benchmarks/captioning.py --device cuda     # 64 images in one batch
    python benchmarks/captioning.py --smoke
"""

from __future__ import annotations

import statistics
import sys

import torch

import _common as common
from medblip_peft.caption import Captioner


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0], "benchmarks/results/captioning.json")
    parser.add_argument("--images", type=int, help="default 8 (CPU), 64 (CUDA), 4 (smoke)")
    parser.add_argument("--num-beams", type=int, help="default 3 (2 in smoke)")
    parser.add_argument("--max-new-tokens", type=int, help="default 32 (6 in smoke)")
    parser.add_argument("--repeats", type=int, help="timed runs per mode; default 2 (1 in smoke)")
    args = parser.parse_args()
    common.setup_threads(args)
    device = torch.device(args.device)
    n = args.images or (3 if args.smoke else 64 if device.type == "cuda" else 8)
    args.num_beams = args.num_beams or (2 if args.smoke else 3)
    args.max_new_tokens = args.max_new_tokens or (6 if args.smoke else 32)
    args.repeats = args.repeats or (1 if args.smoke else 2)
    model, processor, size = common.build_model(args.smoke)
    images = common.phantom_images(n, size, args.seed)
    # min_new_tokens 0: a random model may stop at any point, which also exercises ragged batch endings.
    settings = {"num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens, "min_new_tokens": 0}
    captioner = Captioner(model, processor, device=device, batch_size=n, generation=settings)

    def batched() -> list[str]:
        return captioner(images, batch_size=n)

    def loop() -> list[str]:
        return [caption for image in images for caption in captioner([image], batch_size=1)]

    modes = {"batched": batched, "per-image loop": loop}
    outputs: dict[str, list[list[str]]] = {name: [] for name in modes}
    times: dict[str, list[float]] = {name: [] for name in modes}
    captioner(images[:1])  # warm-up (both modes use the same model and code path)
    walls: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(args.repeats):
        for name, run in modes.items():
            with common.Clock(device) as clock:
                outputs[name].append(run())
            # CPU: single-thread CPU seconds, which other jobs on the cores do not inflate; CUDA: wall seconds.
            times[name].append(clock.wall if device.type == "cuda" else clock.cpu)
            walls[name].append(clock.wall)
    reference = outputs["batched"][0]
    identical = all(out == reference for runs in outputs.values() for out in runs)
    rows = [
        {
            "mode": name,
            "seconds": statistics.median(ts),
            "captions_per_s": n / statistics.median(ts),
            "times_s": ts,
            "wall_s": statistics.median(walls[name]),
        }
        for name, ts in times.items()
    ]
    speedup = rows[1]["seconds"] / rows[0]["seconds"]
    print(
        common.table(
            rows,
            [
                ("mode", "mode", "s"),
                ("seconds", "seconds", ".2f"),
                ("wall_s", "wall s", ".2f"),
                ("captions_per_s", "captions/s", ".2f"),
            ],
        )
    )
    print(f"batched speedup {speedup:.2f}x (target >= 4); identical captions: {identical}")
    mean_words = sum(len(c.split()) for c in reference) / len(reference)
    common.write_json(
        args.out,
        {
            "benchmark": "captioning",
            "smoke": args.smoke,
            "machine": common.machine_info(device),
            "settings": {
                "device": str(device),
                "measure": "wall" if device.type == "cuda" else "thread CPU",
                "threads": torch.get_num_threads(),
                "images": n,
                "image_size": size,
                **settings,
            },
            "rows": rows,
            "speedup": speedup,
            "identical_captions": identical,
            "mean_caption_words": mean_words,
            "captions": reference,
        },
    )
    if not identical:
        print("captions differ between batched and per-image runs", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
