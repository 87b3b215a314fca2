"""What each fine-tuning strategy trains.

A strategy takes a `BlipForConditionalGeneration`, freezes or wraps it, and says whether its vision tower still
needs gradients. The registry maps names to small functions instead of an if/elif chain.

* ``full``: every parameter trains.
* ``encoder``: only ``vision_model.*`` trains; the text decoder is frozen.
* ``decoder``: only ``text_decoder.*`` trains; the vision tower is frozen and run without autograd.
* ``lora``: peft LoRA adapters on BLIP's real attention modules; only ``lora_*`` parameters train.

The study aimed LoRA at module names that do not exist in BLIP (such as ``q_proj``/``v_proj``), which trains
nothing. The defaults here are BLIP's own names, and a target list that matches nothing is an error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from medblip_peft.config import AdaptConfig, canonical_strategy

__all__ = [
    "LORA_TEXT_TARGETS",
    "LORA_VISION_TARGETS",
    "STRATEGIES",
    "PreparedModel",
    "apply_strategy",
    "blip_core",
    "default_lora_config",
    "parameter_report",
]

# BLIP's vision attention is a fused `qkv` Linear plus an output `projection` (BlipAttention).
LORA_VISION_TARGETS = ("self_attn.qkv", "self_attn.projection")
# BLIP's text decoder is BERT-style: self-attention and cross-attention each have query/key/value Linears.
LORA_TEXT_TARGETS = (
    "attention.self.query",
    "attention.self.value",
    "crossattention.self.query",
    "crossattention.self.value",
)
TOWERS = ("vision_model", "text_decoder")


@dataclass
class PreparedModel:
    """The model a strategy returns.

    `vision_frozen` is True when nothing trainable feeds the vision tower's output (decoder, or LoRA on the text
    tower only): the tower then runs without autograd, and its outputs may be cached across epochs. LoRA on the
    vision tower leaves the base weights frozen but changes the outputs, so it counts as not frozen.
    """

    model: nn.Module
    strategy: str
    vision_frozen: bool


def blip_core(model: nn.Module) -> nn.Module:
    """The `BlipForConditionalGeneration` inside a model, looking through peft and DDP wrappers."""
    seen = model
    for _ in range(4):
        if hasattr(seen, "vision_model") and hasattr(seen, "text_decoder"):
            return seen
        if hasattr(seen, "get_base_model"):
            seen = seen.get_base_model()
        elif hasattr(seen, "module"):
            seen = seen.module
        else:
            break
    raise TypeError(
        f"Expected a BlipForConditionalGeneration (optionally wrapped by peft), got {type(model).__name__}."
    )


def _freeze_all_but(model: nn.Module, prefixes: tuple[str, ...]) -> None:
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(prefixes))


def _full(model: nn.Module, config: AdaptConfig) -> PreparedModel:
    _freeze_all_but(model, ("",))
    return PreparedModel(model, "full", vision_frozen=False)


def _encoder(model: nn.Module, config: AdaptConfig) -> PreparedModel:
    _freeze_all_but(model, ("vision_model.",))
    return PreparedModel(model, "encoder", vision_frozen=False)


def _decoder(model: nn.Module, config: AdaptConfig) -> PreparedModel:
    _freeze_all_but(model, ("text_decoder.",))
    return PreparedModel(model, "decoder", vision_frozen=True)


def _target_regex(suffixes: tuple[str, ...] | list[str], tower: str) -> str:
    escaped = "|".join(s.replace(".", r"\.") for s in suffixes)
    return rf"{tower}\..*\.({escaped})"


def default_lora_config(config: AdaptConfig):
    """A `peft.LoraConfig` on BLIP's real attention modules of the towers in `config.lora_towers`.

    `task_type` stays unset: BLIP is neither a causal LM nor a seq2seq model in peft's sense, and a task type
    would wrap it in a class whose forward signature does not fit.
    """
    from peft import LoraConfig

    towers = {"vision": ["vision_model"], "text": ["text_decoder"], "both": ["vision_model", "text_decoder"]}
    patterns = []
    for tower in towers[config.lora_towers]:
        if config.lora_target_modules:
            suffixes = config.lora_target_modules
        else:
            suffixes = LORA_VISION_TARGETS if tower == "vision_model" else LORA_TEXT_TARGETS
        patterns.append(_target_regex(suffixes, tower))
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules="|".join(f"(?:{p})" for p in patterns),
        bias="none",
    )


def _lora(model: nn.Module, config: AdaptConfig) -> PreparedModel:
    from peft import get_peft_model

    peft_config = config.peft_config or default_lora_config(config)
    try:
        wrapped = get_peft_model(model, peft_config)
    except ValueError as err:
        if "not found in the base model" in str(err) or "Target modules" in str(err):
            raise ValueError(
                f"LoRA `target_modules` match no module of this BLIP ({err}). BLIP's attention modules are "
                f"vision {list(LORA_VISION_TARGETS)} and text {list(LORA_TEXT_TARGETS)}; names such as "
                "'q_proj'/'v_proj' belong to other architectures. Fix `lora_target_modules` or the peft config."
            ) from err
        raise
    names = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    if not names:
        raise ValueError("The peft config leaves no trainable parameter; check its `target_modules`.")
    vision_adapted = any(".vision_model." in n for n in names)
    return PreparedModel(wrapped, "lora", vision_frozen=not vision_adapted)


STRATEGIES: dict[str, Callable[[nn.Module, AdaptConfig], PreparedModel]] = {
    "full": _full,
    "encoder": _encoder,
    "decoder": _decoder,
    "lora": _lora,
}


def apply_strategy(model: nn.Module, strategy: str, config: AdaptConfig | None = None) -> PreparedModel:
    """Freeze or wrap `model` for `strategy` (an alias such as ``"decoder-only"`` is accepted)."""
    config = config or AdaptConfig()
    name = canonical_strategy(strategy)
    blip_core(model)  # fail early, with a clear message, on a model that is not BLIP
    return STRATEGIES[name](model, config)


def _tower_of(name: str) -> str:
    for tower in TOWERS:
        if f"{tower}." in name:
            return tower
    return "other"


def parameter_report(model: nn.Module) -> dict[str, dict[str, int]]:
    """Trainable and total parameters per tower (``vision_model``, ``text_decoder``, ``other``) and in all.

    Tied weights are counted once, as `named_parameters()` yields them once.
    """
    report = {t: {"trainable": 0, "total": 0} for t in (*TOWERS, "other", "all")}
    for name, param in model.named_parameters():
        n = param.numel()
        for key in (_tower_of(name), "all"):
            report[key]["total"] += n
            report[key]["trainable"] += n if param.requires_grad else 0
    if report["other"]["total"] == 0:
        del report["other"]
    return report


def format_parameter_report(report: dict[str, dict[str, int]], strategy: str) -> str:
    """A small fixed-width table of `parameter_report` output."""
    lines = [f"Trainable parameters ({strategy})", f"{'tower':<14}{'trainable':>14}{'total':>14}{'share':>9}"]
    for tower, row in report.items():
        share = row["trainable"] / row["total"] if row["total"] else 0.0
        lines.append(f"{tower:<14}{row['trainable']:>14,}{row['total']:>14,}{share:>9.2%}")
    return "\n".join(lines)
