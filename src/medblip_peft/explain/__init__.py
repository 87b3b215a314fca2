"""Explain captions: which image patches each generated token rests on, and whether that can be trusted.

>>> from medblip_peft.explain import explain                                   # doctest: +SKIP
>>> exp = explain(captioner, "scan.png")  # method="attention_ig"           # doctest: +SKIP
>>> exp.tokens, exp.heatmaps.shape, exp.peaks                                   # doctest: +SKIP
>>> exp.save("overlays/")                                                       # doctest: +SKIP

Methods (registry `METHODS`): ``attention_ig`` (the default), ``cross_attention``, ``attention_rollout``,
``grad_x_attention``, ``integrated_gradients`` and ``occlusion``; see `medblip_peft.explain.methods` for what
each costs, and docs/explain.md for when to use which. `grounding_score` and `randomization_check` test them.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from medblip_peft.explain import methods as _methods  # noqa: F401  (fills the registry)
from medblip_peft.explain.core import CaptionTarget, Explanation, explain
from medblip_peft.explain.grounding import (
    FINDING_WORDS,
    LOCATION_WORDS,
    RANDOMIZATION_THRESHOLD,
    grounding_score,
    location_token_indices,
    randomization_check,
    spearman,
)
from medblip_peft.explain.methods import METHODS, Method, register_method

__all__ = [
    "FINDING_WORDS",
    "LOCATION_WORDS",
    "METHODS",
    "RANDOMIZATION_THRESHOLD",
    "CaptionTarget",
    "Explanation",
    "Method",
    "explain",
    "grounding_score",
    "location_token_indices",
    "randomization_check",
    "register_method",
    "spearman",
]


class _CallableModule(types.ModuleType):
    """This package shares its name with the function `medblip_peft.explain` exports lazily. Once the package
    is imported, Python binds ``medblip_peft.explain`` to it, so ``from medblip_peft import explain`` returns
    the package; making it callable keeps ``explain(captioner, image, ...)`` working either way."""

    def __call__(self, *args: Any, **kwargs: Any) -> Explanation:
        return explain(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
