"""Time the default metric suite (everything but BERTScore) on the 8,180 ROCO validation captions.

Predictions are the reference captions shuffled with a fixed seed (a realistic "wrong caption" baseline of the
same length distribution), so every scorer does its full work.  Usage::

    python benchmarks/metrics_speed.py --roco /work/shared/roco [--resamples 1000]

Prints one JSON line with the wall-clock seconds of each stage and the scores.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from medblip_peft.evaluation import caption_stats


def read_captions(roco_root: Path) -> list[str]:
    """Captions of ``validation/radiology/captions.txt`` (``ID<TAB> caption``; the leading space is dropped)."""
    path = roco_root / "validation" / "radiology" / "captions.txt"
    return [
        line.split("\t", 1)[1].strip()
        for line in path.read_text(encoding="utf-8").splitlines()
        if "\t" in line
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--roco", type=Path, default=Path("/work/shared/roco"), help="ROCO root (original layout)"
    )
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples to time")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    references = read_captions(args.roco)
    predictions = references[:]
    random.Random(args.seed).shuffle(predictions)

    t0 = time.perf_counter()
    stats = caption_stats(predictions, references)  # bleu, meteor, rouge, cider, clinical
    t1 = time.perf_counter()
    result = stats.as_dict(n_resamples=args.resamples, seed=args.seed)
    t2 = time.perf_counter()
    # Per-family timing, each family on its own (tokenisation included for the lexical ones).
    family_seconds = {}
    for family in ("bleu", "meteor", "rouge", "cider", "clinical"):
        start = time.perf_counter()
        caption_stats(predictions, references, metrics=[family])
        family_seconds[family] = round(time.perf_counter() - start, 2)
    report = {
        "n_images": len(references),
        "suite_seconds": round(t1 - t0, 2),
        "bootstrap_seconds": round(t2 - t1, 2),
        "bootstrap_resamples": args.resamples,
        "family_seconds": family_seconds,
        "tokenizer": result["tokenizer"],
        "scores": {k: round(v, 4) for k, v in result.items() if isinstance(v, float)},
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
