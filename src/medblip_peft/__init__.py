"""medblip-peft: fine-tune Salesforce BLIP to caption radiology images, correctly.

>>> from medblip_peft import adapt                                      # doctest: +SKIP
>>> result = adapt("Salesforce/blip-image-captioning-base", "path/to/roco", strategy="lora")  # doctest: +SKIP
>>> result.captioner()(["scan.png"])                                    # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0.dev0"

__all__ = [
    "AdaptConfig",
    "AdaptResult",
    "Captioner",
    "__version__",
    "adapt",
    "explain",
    "push_to_hub",
    "score_captions",
]

# Public names resolve lazily so that `import medblip_peft` (and `medblip-peft --help`) stays fast and does not
# import torch, transformers or Java-backed metrics until they are used.
_LAZY = {
    "AdaptConfig": "medblip_peft.config",
    "AdaptResult": "medblip_peft.train",
    "adapt": "medblip_peft.train",
    "Captioner": "medblip_peft.caption",
    "score_captions": "medblip_peft.evaluation",
    "explain": "medblip_peft.explain",
    "push_to_hub": "medblip_peft.hub",
}

if TYPE_CHECKING:  # pragma: no cover
    from medblip_peft.caption import Captioner
    from medblip_peft.config import AdaptConfig
    from medblip_peft.evaluation import score_captions
    from medblip_peft.explain import explain
    from medblip_peft.hub import push_to_hub
    from medblip_peft.train import AdaptResult, adapt


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'medblip_peft' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
