"""Wall-clock time of the full default metric suite (`medblip_peft.evaluation.score_captions`) on ROCO.

Predictions are the 8,180 ROCO validation captions shuffled with a fixed seed, references the captions in
order: every scorer does its full work on realistic lengths. The suite is everything but BERTScore (which needs
a model download). When the evaluation package is not importable the script reports a skip and exits 0.
For a per-family breakdown and the bootstrap see ``benchmarks/metrics_speed.py``. Usage::

    python benchmarks/metrics_suite.py [--smoke]
"""

from __future__ import annotations

import random
import time

import torch

import _common as common


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0], "benchmarks/results/metrics_suite.json")
    args = parser.parse_args()
    references = (
        common.smoke_captions(40, args.seed) if args.smoke else common.read_roco_captions(args.roco_captions)
    )
    predictions = references[:]
    random.Random(args.seed).shuffle(predictions)
    payload = {
        "benchmark": "metrics_suite",
        "smoke": args.smoke,
        "n_captions": len(references),
        "measure": "wall",
    }
    payload["machine"] = common.machine_info(torch.device("cpu"))
    try:
        from medblip_peft.evaluation import score_captions
    except ImportError as err:
        print(f"skipped: medblip_peft.evaluation.score_captions is not importable ({err})")
        common.write_json(args.out, {**payload, "skipped": str(err)})
        return
    # The smoke run checks the script, not the scorers: it skips the Java scorers (METEOR, PTB tokenisation),
    # whose JVM start-up alone takes tens of seconds on a loaded 2-core machine.
    options = {"tokenizer": "regex", "metrics": ("bleu", "rouge", "cider", "clinical")} if args.smoke else {}
    start = time.perf_counter()
    scores = score_captions(predictions, references, **options)
    seconds = time.perf_counter() - start
    print(f"metric suite on {len(references)} captions: {seconds:.1f} s (target <= 60 s)")
    summary = {k: v for k, v in scores.items() if isinstance(v, (int, float, str))}
    common.write_json(args.out, {**payload, "seconds": seconds, "scores": summary})


if __name__ == "__main__":
    main()
