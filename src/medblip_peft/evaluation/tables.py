"""Results tables for `compare` and `ablate`: scores with confidence intervals, paired tests, charts, predictions.

One :class:`Report` holds everything a comparison produced; :func:`write_report` writes it as

* ``results.md`` — the table (``value [low, high]`` per metric, best value in bold) and the paired tests;
* ``results.csv`` — one row per system, ``<metric>``, ``<metric>_low``, ``<metric>_high`` columns;
* ``results.json`` — every score and interval, the paired tests, metadata and failures;
* ``results.png`` — one bar panel per metric with interval whiskers (``plots`` extra: matplotlib);
* ``predictions.jsonl`` — per image: ``image_id``, ``image``, ``reference`` and every system's ``captions``;
* ``failures.jsonl`` — images a system could not caption (e.g. Gemini errors), when there are any.

Scores come from :func:`.scoring.caption_stats` (computed once per system) and intervals from its ``as_dict``
with one seed for every system, exactly what :func:`.scoring.score_systems` does; paired tests come from
:func:`.stats.paired_test` on the same statistics, which is :func:`.scoring.compare_systems` without scoring the
best system again for every pair (METEOR alone costs seconds per scoring).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .scoring import CaptionStats
from .stats import PairedTest, paired_test

__all__ = ["EXTRA_COLUMNS", "TABLE_METRICS", "Report", "build_report", "write_report"]

#: Metrics shown in tables and charts, with their display names (all of them: higher is better).
TABLE_METRICS: dict[str, str] = {
    "bleu_1": "BLEU-1",
    "bleu_2": "BLEU-2",
    "bleu_3": "BLEU-3",
    "bleu_4": "BLEU-4",
    "meteor": "METEOR",
    "rouge_l": "ROUGE-L",
    "cider": "CIDEr",
    "clinical_micro_f1": "Clinical F1",
}
#: Per-system extras (training cost in `ablate`, captioning time everywhere), with display names.
EXTRA_COLUMNS: dict[str, str] = {
    "train_seconds": "Train time (s)",
    "trainable_params": "Trainable params",
    "trainable_percent": "Trainable %",
    "peak_memory_mib": "Peak memory (MiB)",
    "caption_seconds": "Caption time (s)",
    "failures": "Failed images",
}


@dataclass
class Report:
    """Scores, intervals and paired tests of several systems on the same images.

    Attributes:
        systems: ``{system: score dict}`` as :func:`.scoring.score_captions` returns it, with ``"ci"``.
        paired: ``{other system: {metric: PairedTest}}`` for the best system (A) against each other one (B).
        best: The system with the highest ``primary`` score.
        primary: The metric that picks ``best``.
        extras: ``{system: {column: value}}`` for :data:`EXTRA_COLUMNS`.
        failures: ``{system: [failure dicts]}`` for systems that report failed images.
        meta: How the numbers were computed (resamples, confidence, seed, test method, data).
        files: What :func:`write_report` wrote, by kind.
    """

    systems: dict[str, dict[str, Any]]
    paired: dict[str, dict[str, PairedTest]]
    best: str
    primary: str
    extras: dict[str, dict[str, float]] = field(default_factory=dict)
    failures: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)

    def metrics(self) -> list[str]:
        """Table metrics present in the scores (METEOR is absent without Java)."""
        present = set().union(*(s.keys() for s in self.systems.values()))
        return [m for m in TABLE_METRICS if m in present]

    def extra_columns(self) -> list[str]:
        present = set().union(*(e.keys() for e in self.extras.values())) if self.extras else set()
        return [c for c in EXTRA_COLUMNS if c in present]

    def rows(self) -> list[dict[str, Any]]:
        """One flat row per system: ``system``, ``n_images``, each metric with ``_low``/``_high``, extras."""
        rows = []
        for name, scores in self.systems.items():
            row: dict[str, Any] = {"system": name, "n_images": scores["n_images"]}
            for metric in self.metrics():
                low, high = scores.get("ci", {}).get(metric, (math.nan, math.nan))
                row.update({metric: scores[metric], f"{metric}_low": low, f"{metric}_high": high})
            row.update({c: self.extras.get(name, {}).get(c) for c in self.extra_columns()})
            rows.append(row)
        return rows


def build_report(
    stats: Mapping[str, CaptionStats],
    *,
    primary: str | None = None,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    paired_method: str = "permutation",
    paired_resamples: int = 10000,
    extras: Mapping[str, Mapping[str, float]] | None = None,
    failures: Mapping[str, list[dict[str, Any]]] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Report:
    """Intervals for every system (same seed, hence the same image resamples) and paired tests best-vs-rest.

    ``primary`` (default: CIDEr when computed) picks the best system; every table metric is higher-is-better.
    """
    if not stats:
        raise ValueError("nothing to compare: no systems")
    systems = {
        name: s.as_dict(n_resamples=n_resamples, confidence=confidence, seed=seed) for name, s in stats.items()
    }
    computed = set.intersection(*(set(s) for s in systems.values()))
    if primary is None:  # CIDEr, the captioning convention, else the first table metric that was computed
        primary = next((m for m in ("cider", *TABLE_METRICS) if m in computed), None)
    if primary not in computed:
        raise ValueError(f"primary metric {primary!r} was not computed; it must be one of the requested metrics")
    best = max(systems, key=lambda name: _sortable(systems[name][primary]))
    paired = {}
    for other in (name for name in stats if name != best):
        tests: dict[str, PairedTest] = {}
        for family, fam in stats[best].families.items():
            tests.update(
                paired_test(fam, stats[other].families[family], method=paired_method,
                            n_resamples=paired_resamples, seed=seed)
            )  # fmt: skip
        paired[other] = tests
    info = {"n_resamples": n_resamples, "confidence": confidence, "seed": seed, "paired_method": paired_method,
            "paired_resamples": paired_resamples, **(meta or {})}  # fmt: skip
    return Report(systems, paired, best, primary, {k: dict(v) for k, v in (extras or {}).items()},
                  {k: list(v) for k, v in (failures or {}).items() if v}, info)  # fmt: skip


def _sortable(value: float) -> float:
    return -math.inf if value is None or math.isnan(value) else value


# ------------------------------------------------------------------------------------------------ writers
def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) >= 1000):
        return f"{int(value):,}"
    return f"{value:.{digits}f}"


def _markdown(report: Report, title: str) -> str:
    metrics, extras = report.metrics(), report.extra_columns()
    best_value = {m: max(_sortable(s[m]) for s in report.systems.values()) for m in metrics}
    level = round(100 * report.meta["confidence"])
    header = ["System", "n", *(TABLE_METRICS[m] for m in metrics), *(EXTRA_COLUMNS[c] for c in extras)]
    lines = [f"# {title}", "", f"Point estimate [{level}% bootstrap interval, {report.meta['n_resamples']} "
             f"resamples, seed {report.meta['seed']}]; best value per metric in bold.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]  # fmt: skip
    for row in report.rows():
        cells = [row["system"], str(row["n_images"])]
        for m in metrics:
            value = _fmt(row[m])
            value = f"**{value}**" if _sortable(row[m]) == best_value[m] else value
            cells.append(f"{value} [{_fmt(row[f'{m}_low'])}, {_fmt(row[f'{m}_high'])}]")
        cells += [_fmt(row[c], 1) for c in extras]
        lines.append("| " + " | ".join(cells) + " |")
    if report.paired:
        lines += ["", f"## Paired tests: {report.best} (best {TABLE_METRICS.get(report.primary, report.primary)}) "
                  "against each system", "", f"Δ = {report.best} − other; two-sided p-value, "
                  f"{report.meta['paired_method']} test with {report.meta['paired_resamples']} resamples.", "",
                  "| Other | " + " | ".join(f"Δ {TABLE_METRICS[m]} (p)" for m in metrics) + " |",
                  "|" + "---|" * (len(metrics) + 1)]  # fmt: skip
        for other, tests in report.paired.items():
            cells = [f"{_fmt(tests[m].delta)} ({tests[m].p_value:.3g})" if m in tests else "—" for m in metrics]
            lines.append(f"| {other} | " + " | ".join(cells) + " |")
    if report.failures:
        lines += ["", "Failed images (empty captions, scored as such): "
                  + ", ".join(f"{k}: {len(v)}" for k, v in report.failures.items()) + " (see failures.jsonl)."]
    return "\n".join(lines) + "\n"


def _jsonable(value: Any) -> Any:
    """NaN becomes null (strict JSON), tuples lists, PairedTests dicts."""
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, PairedTest):
        return _jsonable(asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _write_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    path.write_text("".join(json.dumps(_jsonable(r), ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def bar_panels(panels: Sequence[tuple[str, dict[str, float], dict[str, tuple[float, float]] | None]],
               path: Path, *, title: str) -> Path:
    """One bar panel per ``(title, {system: value}, {system: (low, high)} or None)``, whiskers for intervals."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (name, values, cis) in zip(axes.flat, panels):
        systems = list(values)
        heights = [0.0 if math.isnan(v) else v for v in (float(values[s]) for s in systems)]
        errors = None
        if cis:  # whiskers from the interval, clipped at zero length where an interval is undefined
            low = [max(0.0, h - cis[s][0]) if not math.isnan(cis[s][0]) else 0.0 for h, s in zip(heights, systems)]
            high = [max(0.0, cis[s][1] - h) if not math.isnan(cis[s][1]) else 0.0 for h, s in zip(heights, systems)]
            errors = [low, high]
        ax.bar(range(len(systems)), heights, yerr=errors, capsize=3,
               color=[colours[i % len(colours)] for i in range(len(systems))])  # fmt: skip
        ax.set_title(name, fontsize=10)
        # Long names (checkpoint paths) keep their informative end; the full names are in the tables.
        labels = [s if len(s) <= 22 else "…" + s[-21:] for s in systems]
        ax.set_xticks(range(len(systems)), labels, rotation=35, ha="right", fontsize=8)
        ax.tick_params(axis="y", labelsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def metric_panels(report: Report) -> list[tuple[str, dict[str, float], dict[str, tuple[float, float]]]]:
    """Chart panels of :func:`bar_panels` for every table metric, with the bootstrap intervals."""
    return [
        (TABLE_METRICS[m], {n: s[m] for n, s in report.systems.items()},
         {n: tuple(s.get("ci", {}).get(m, (math.nan, math.nan))) for n, s in report.systems.items()})
        for m in report.metrics()
    ]  # fmt: skip


def write_report(
    report: Report,
    out_dir: str | Path,
    *,
    predictions: Mapping[str, Sequence[str]],
    references: Sequence[str],
    image_ids: Sequence[str],
    images: Sequence[str | None] | None = None,
    title: str = "Caption comparison",
    plot: bool = True,
) -> dict[str, Path]:
    """Write the Markdown/CSV/JSON tables, the chart and the per-image predictions; return the paths by kind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"markdown": out / "results.md", "csv": out / "results.csv", "json": out / "results.json",
             "predictions": out / "predictions.jsonl"}  # fmt: skip
    files["markdown"].write_text(_markdown(report, title), encoding="utf-8")
    rows = report.rows()
    with files["csv"].open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
    payload = {"title": title, "best": report.best, "primary": report.primary, "meta": report.meta,
               "systems": report.systems, "extras": report.extras, "paired": report.paired,
               "failures": report.failures}  # fmt: skip
    files["json"].write_text(json.dumps(_jsonable(payload), indent=2, ensure_ascii=False), encoding="utf-8")
    paths = images or [None] * len(image_ids)
    _write_jsonl(files["predictions"], [
        {"image_id": i, "image": p, "reference": ref, "captions": {name: preds[k] for name, preds in predictions.items()}}
        for k, (i, p, ref) in enumerate(zip(image_ids, paths, references))
    ])  # fmt: skip
    if report.failures:
        files["failures"] = out / "failures.jsonl"
        _write_jsonl(files["failures"], [{"system": name, "image_id": image_ids[f["index"]], **f}
                                         for name, items in report.failures.items() for f in items])  # fmt: skip
    if plot:
        files["chart"] = bar_panels(metric_panels(report), out / "results.png", title=title)
    report.files.update(files)
    return files
