"""Overlays for `Explanation`: one PNG per token, a grid figure and the numbers as JSON (matplotlib, `plots`).

Figures are built with `matplotlib.figure.Figure` directly, not pyplot, so saving works headless and does not
touch a notebook's current figure.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from medblip_peft.explain.core import Explanation

__all__ = ["draw_overlay", "grid_figure", "save_explanation"]

_ALPHA = 0.5  # heat over anatomy: enough to see both


def _figure_class() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "Saving or plotting explanations needs matplotlib: pip install 'medblip-peft[plots]'."
        ) from None
    return Figure


def draw_overlay(ax: Any, explanation: Explanation, i: int, *, title: str | None = None) -> None:
    """Token `i`'s heatmap over the grey image on a matplotlib axis, its peak marked with a white cross."""
    ax.imshow(np.asarray(explanation.image.convert("L")), cmap="gray")
    ax.imshow(explanation.heatmaps[i], cmap="jet", alpha=_ALPHA, vmin=0.0, vmax=1.0)
    peak = explanation.peaks[i]
    if peak is not None:
        ax.plot(*peak, marker="+", color="white", markersize=8, markeredgewidth=1.5)
    ax.set_title(explanation.tokens[i] if title is None else title, fontsize=9)
    ax.set_axis_off()


def grid_figure(explanation: Explanation, *, columns: int = 6) -> Any:
    """All tokens' overlays in one figure, titled with the method and caption."""
    figure_cls = _figure_class()
    n = len(explanation.tokens)
    cols = max(1, min(columns, n))
    rows = -(-n // cols)
    fig = figure_cls(figsize=(1.7 * cols, 1.8 * rows + 0.4), dpi=80)
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i < n:
            draw_overlay(ax, explanation, i)
        else:
            ax.set_axis_off()
    fig.suptitle(f"{explanation.method}: {explanation.caption}", fontsize=8, wrap=True)
    fig.tight_layout()
    return fig


def _slug(token: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", token).strip("_") or "tok"


def save_explanation(explanation: Explanation, directory: str | Path) -> list[Path]:
    """Write ``NN_token.png`` per token, ``grid.png`` and ``explanation.json`` under `directory`; return paths."""
    figure_cls = _figure_class()
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for i, token in enumerate(explanation.tokens):
        fig = figure_cls(figsize=(1.6, 1.7), dpi=80)
        draw_overlay(fig.add_subplot(), explanation, i)
        fig.tight_layout()
        path = out / f"{i:02d}_{_slug(token)}.png"
        fig.savefig(path)
        written.append(path)
    grid = out / "grid.png"
    grid_figure(explanation).savefig(grid)
    meta = out / "explanation.json"
    meta.write_text(json.dumps(explanation.to_dict(), indent=1), encoding="utf-8")
    return [*written, grid, meta]
