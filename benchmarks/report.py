"""Print the Markdown tables of `docs/benchmarks.md` from the JSON files the benchmark scripts wrote.

Usage::

    python benchmarks/report.py [--results benchmarks/results] [--suffix _cpu]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import _common as common

TRAIN_COLUMNS = [
    ("variant", "variant", "s"),
    ("step_s", "step s (median)", ".2f"),
    ("samples_per_s", "samples/s", ".3f"),
    ("vs_full", "× full", ".2f"),
    ("trainable", "trainable params", ",d"),
    ("share", "share", ".2%"),
    ("state_mib", "params+AdamW MiB", ",.0f"),
    ("step_peak_mib", "step peak +MiB", ",.0f"),
    ("gflop", "GFLOP/step", ",.0f"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--suffix", default="_cpu", help="file name suffix, e.g. _cpu or _cuda")
    args = parser.parse_args()
    train = args.results / f"train_step{args.suffix}.json"
    if train.is_file():
        data = json.loads(train.read_text())
        print("Machine:", json.dumps(data["machine"]))
        print("Settings:", json.dumps(data["settings"]))
        columns = TRAIN_COLUMNS + (
            [("mfu", "MFU", ".1%")] if data["settings"]["device"].startswith("cuda") else []
        )
        print(common.table(data["rows"], columns))
        print()
        print(
            common.table(
                [{"ratio": k, **v} for k, v in data["ratios"].items()],
                [("ratio", "ratio", "s"), ("value", "measured", ".3f"), ("target", "target", "s")],
            )
        )
    captioning = args.results / f"captioning{args.suffix}.json"
    if captioning.is_file():
        data = json.loads(captioning.read_text())
        print()
        print("Captioning settings:", json.dumps(data["settings"]))
        columns = [
            ("mode", "mode", "s"),
            ("seconds", "seconds (median)", ".1f"),
            ("captions_per_s", "captions/s", ".3f"),
        ]
        print(common.table(data["rows"], columns))
        print(f"speedup {data['speedup']:.2f}x, identical captions: {data['identical_captions']}")
    metrics = args.results / f"metrics_suite{args.suffix}.json"
    if metrics.is_file():
        data = json.loads(metrics.read_text())
        print()
        print(f"Metric suite on {data['n_captions']} captions: {data.get('seconds', float('nan')):.1f} s")


if __name__ == "__main__":
    main()
