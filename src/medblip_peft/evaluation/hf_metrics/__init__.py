"""`evaluate` metric modules shipped with the package, loadable offline by path."""

from __future__ import annotations

from pathlib import Path

__all__ = ["caption_metric_path"]


def caption_metric_path() -> str:
    """Path of the ``medblip_caption`` metric script, for ``evaluate.load(caption_metric_path())``.

    Loading by local path never contacts the Hub, so it works with ``HF_HUB_OFFLINE=1``; the module can also be
    combined with others through ``evaluate.combine``.
    """
    return str(Path(__file__).parent / "medblip_caption" / "medblip_caption.py")
