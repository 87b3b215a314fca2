"""`AdaptConfig`: every knob of `adapt()`, validated up front with messages that name the field and the fix."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["STRATEGY_ALIASES", "AdaptConfig", "canonical_strategy"]

STRATEGY_ALIASES = {
    "full": "full",
    "encoder": "encoder",
    "encoder-only": "encoder",
    "decoder": "decoder",
    "decoder-only": "decoder",
    "lora": "lora",
}

# Per-strategy learning rates used when `learning_rate` is left unset: adapters tolerate (and need) a larger
# step than full fine-tuning of a pre-trained BLIP.
DEFAULT_LEARNING_RATES = {"full": 2e-5, "encoder": 2e-5, "decoder": 2e-5, "lora": 2e-4}


def canonical_strategy(strategy: str) -> str:
    """Map a strategy name or alias to one of ``full``, ``encoder``, ``decoder`` or ``lora``."""
    key = str(strategy).strip().lower().replace("_", "-")
    if key not in STRATEGY_ALIASES:
        raise ValueError(
            f"Unknown `strategy={strategy!r}`. Choose one of 'full', 'encoder' (alias 'encoder-only'), "
            "'decoder' (alias 'decoder-only') or 'lora'."
        )
    return STRATEGY_ALIASES[key]


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class AdaptConfig:
    """Configuration of one `adapt()` run.

    Parameters are grouped as follows.

    **Optimisation**: `learning_rate`, `weight_decay`, `num_epochs`, `max_steps`, `batch_size`,
    `gradient_accumulation_steps`, `max_grad_norm`, `lr_scheduler`, `warmup_ratio`, `label_smoothing`,
    `mixed_precision`, `gradient_checkpointing`, `seed`.

    **Text**: `max_caption_tokens`, `prompt`.

    **Validation and selection**: `eval_max_samples`, `eval_batch_size`, `eval_num_beams`, `metric_for_best`,
    `early_stopping_patience`.

    **LoRA**: `lora_r`, `lora_alpha`, `lora_dropout`, `lora_towers`, `lora_target_modules`, `peft_config`.

    **Data**: `image_column`, `caption_column`, `num_workers`, `group_by_length`.

    **Speed**: `cache_vision_features`, `vision_cache_dir`, `vision_cache_dtype`.

    **Output**: `save_every_steps`, `save_total_limit`, `report_to`, `progress`, `cpu`.

    **Reliability**: `resume_from`, `max_nonfinite_steps`, `max_bad_fraction` (see ``docs/reliability.md``).
    """

    # --- optimisation -------------------------------------------------------------------------------------
    learning_rate: float | None = field(
        default=None,
        metadata=_help("Peak learning rate; unset picks 2e-5 (full/encoder/decoder) or 2e-4 (lora)."),
    )
    weight_decay: float = field(
        default=0.05, metadata=_help("AdamW weight decay; never applied to norms or biases.")
    )
    num_epochs: int = field(default=3, metadata=_help("Passes over the training data."))
    max_steps: int | None = field(
        default=None,
        metadata=_help("Stop after this many optimizer steps (overrides `num_epochs` when set)."),
    )
    batch_size: int = field(default=8, metadata=_help("Images per device per micro-batch."))
    gradient_accumulation_steps: int = field(default=1, metadata=_help("Micro-batches per optimizer step."))
    max_grad_norm: float | None = field(
        default=1.0, metadata=_help("Gradient clipping norm; None disables it.")
    )
    lr_scheduler: str = field(
        default="cosine", metadata=_help("'cosine', 'linear' or 'constant' after warmup.")
    )
    warmup_ratio: float = field(
        default=0.05, metadata=_help("Fraction of the optimizer steps spent warming up.")
    )
    label_smoothing: float = field(
        default=0.0, metadata=_help("Label smoothing of the caption cross-entropy.")
    )
    mixed_precision: str = field(default="no", metadata=_help("'no', 'fp16' or 'bf16' (through accelerate)."))
    gradient_checkpointing: bool = field(
        default=False, metadata=_help("Trade compute for activation memory.")
    )
    seed: int = field(default=42, metadata=_help("Seed for weights of new modules, data order and dropout."))

    # --- text ---------------------------------------------------------------------------------------------
    max_caption_tokens: int = field(
        default=96,
        metadata=_help(
            "Longest training caption in tokens, [DEC] and [SEP] included. 96 keeps 97.7% of ROCO captions whole "
            "(the study's 20-token cap cut 37% of them); longer ones are truncated and counted."
        ),
    )
    prompt: str | None = field(
        default=None,
        metadata=_help("Optional text prompt before every caption; masked in the loss and stripped."),
    )

    # --- validation and selection -------------------------------------------------------------------------
    eval_max_samples: int = field(default=200, metadata=_help("Validation images captioned per evaluation."))
    eval_batch_size: int | None = field(
        default=None, metadata=_help("Validation batch size (default batch_size).")
    )
    eval_num_beams: int = field(default=3, metadata=_help("Beams when captioning the validation sample."))
    metric_for_best: str = field(
        default="cider", metadata=_help("'cider', 'bleu_4' or 'val_loss': picks the checkpoint that is kept.")
    )
    early_stopping_patience: int | None = field(
        default=None,
        metadata=_help("Stop after this many evaluations without improvement; None never stops."),
    )

    # --- LoRA ---------------------------------------------------------------------------------------------
    lora_r: int = field(default=16, metadata=_help("LoRA rank."))
    lora_alpha: int = field(default=32, metadata=_help("LoRA scaling numerator (scale = alpha / r)."))
    lora_dropout: float = field(default=0.05, metadata=_help("Dropout on the LoRA branch."))
    lora_towers: str = field(default="both", metadata=_help("Where LoRA goes: 'vision', 'text' or 'both'."))
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata=_help("Override the module-name suffixes LoRA targets (BLIP's real names by default)."),
    )
    peft_config: Any = field(
        default=None,
        metadata=_help(
            "Any peft `PeftConfig`; used as given instead of the lora_* fields (Python API only)."
        ),
    )

    # --- data ---------------------------------------------------------------------------------------------
    image_column: str = field(default="image", metadata=_help("Image column of Hub and tabular datasets."))
    caption_column: str = field(
        default="caption", metadata=_help("Caption column of Hub and tabular datasets.")
    )
    num_workers: int = field(default=0, metadata=_help("DataLoader worker processes for image decoding."))
    group_by_length: bool = field(
        default=False,
        metadata=_help("Batch captions of similar token length together (less padding; still shuffled)."),
    )

    # --- speed --------------------------------------------------------------------------------------------
    cache_vision_features: bool | None = field(
        default=None,
        metadata=_help(
            "Compute frozen vision-tower outputs once and reuse them every epoch (decoder, text-only LoRA). "
            "None turns it on whenever valid; never used with a trained vision tower or augmentation."
        ),
    )
    vision_cache_dir: str | None = field(
        default=None,
        metadata=_help(
            "Keep the vision-feature cache as memory-mapped files here (reused by later runs with the same "
            "weights, image settings and data); None keeps it in RAM."
        ),
    )
    vision_cache_dtype: str = field(
        default="float32",
        metadata=_help("'float32', 'float16' or 'bfloat16' storage of cached features (16-bit halves size)."),
    )

    # --- output -------------------------------------------------------------------------------------------
    save_every_steps: int | None = field(
        default=None, metadata=_help("Write a resumable training state every N optimizer steps.")
    )
    save_total_limit: int = field(default=2, metadata=_help("Training states kept on disk (oldest removed)."))
    resume_from: str | None = field(
        default=None,
        metadata=_help(
            "Continue from a training state: 'latest' (the newest under output_dir/checkpoints, or a fresh start "
            "when there is none) or a checkpoints/step-N folder. The result equals an uninterrupted run."
        ),
    )
    max_nonfinite_steps: int = field(
        default=5,
        metadata=_help(
            "Optimizer steps with a NaN/Inf loss or gradient are skipped; this many in a row stop the run "
            "(the last saved training state stays intact)."
        ),
    )
    max_bad_fraction: float | None = field(
        default=0.05,
        metadata=_help(
            "Stop when more than this fraction of the samples read are skipped as bad (see skipped.jsonl); "
            "None never stops."
        ),
    )
    report_to: str = field(
        default="auto",
        metadata=_help(
            "'auto' (TensorBoard when installed), 'tensorboard', 'none' or an accelerate tracker."
        ),
    )
    progress: bool = field(default=True, metadata=_help("Show tqdm progress bars (main process only)."))
    cpu: bool = field(default=False, metadata=_help("Train on the CPU even when an accelerator is present."))

    def __post_init__(self) -> None:
        def need(cond: bool, name: str, fix: str) -> None:
            if not cond:
                raise ValueError(f"Invalid `{name}={getattr(self, name)!r}` in AdaptConfig: {fix}")

        need(
            self.learning_rate is None or self.learning_rate > 0,
            "learning_rate",
            "use a positive float such as 2e-5.",
        )
        need(self.weight_decay >= 0, "weight_decay", "use a value >= 0.")
        need(self.num_epochs >= 1, "num_epochs", "use at least 1 (or set `max_steps`).")
        need(self.max_steps is None or self.max_steps >= 1, "max_steps", "use a positive integer or None.")
        need(self.batch_size >= 1, "batch_size", "use at least 1.")
        need(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "use at least 1.")
        need(
            self.max_grad_norm is None or self.max_grad_norm > 0,
            "max_grad_norm",
            "use a positive float or None.",
        )
        need(
            self.lr_scheduler in ("cosine", "linear", "constant"),
            "lr_scheduler",
            "use 'cosine', 'linear' or 'constant'.",
        )
        need(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", "use a fraction in [0, 1).")
        need(0.0 <= self.label_smoothing < 1.0, "label_smoothing", "use a value in [0, 1); 0.0 disables it.")
        need(self.mixed_precision in ("no", "fp16", "bf16"), "mixed_precision", "use 'no', 'fp16' or 'bf16'.")
        need(
            self.max_caption_tokens >= 4,
            "max_caption_tokens",
            "use at least 4 ([DEC], a word, [SEP]); 96 fits ROCO.",
        )
        need(
            self.eval_max_samples >= 0,
            "eval_max_samples",
            "use 0 (loss only) or a positive number of images.",
        )
        need(
            self.eval_batch_size is None or self.eval_batch_size >= 1,
            "eval_batch_size",
            "use at least 1 or None.",
        )
        need(self.eval_num_beams >= 1, "eval_num_beams", "use at least 1 (1 is greedy).")
        need(
            self.metric_for_best in ("cider", "bleu_4", "val_loss"),
            "metric_for_best",
            "use 'cider', 'bleu_4' or 'val_loss'.",
        )
        need(
            self.early_stopping_patience is None or self.early_stopping_patience >= 1,
            "early_stopping_patience",
            "use a positive number of evaluations or None.",
        )
        need(self.lora_r >= 1, "lora_r", "use a positive rank such as 16.")
        need(self.lora_alpha > 0, "lora_alpha", "use a positive value such as 2 * lora_r.")
        need(0.0 <= self.lora_dropout < 1.0, "lora_dropout", "use a probability in [0, 1).")
        need(self.lora_towers in ("vision", "text", "both"), "lora_towers", "use 'vision', 'text' or 'both'.")
        need(self.num_workers >= 0, "num_workers", "use 0 (decode in the main process) or more workers.")
        need(
            self.cache_vision_features in (None, True, False),
            "cache_vision_features",
            "use None (auto), True or False.",
        )
        need(
            self.vision_cache_dtype in ("float32", "float16", "bfloat16"),
            "vision_cache_dtype",
            "use 'float32', 'float16' or 'bfloat16'.",
        )
        need(
            self.save_every_steps is None or self.save_every_steps >= 1,
            "save_every_steps",
            "use a positive integer or None.",
        )
        need(self.save_total_limit >= 1, "save_total_limit", "keep at least 1 training state.")
        need(
            self.resume_from is None or str(self.resume_from).strip() != "",
            "resume_from",
            "use 'latest', a checkpoints/step-N folder or None.",
        )
        need(self.max_nonfinite_steps >= 1, "max_nonfinite_steps", "use at least 1 (1 stops at the first one).")
        need(
            self.max_bad_fraction is None or 0.0 <= self.max_bad_fraction < 1.0,
            "max_bad_fraction",
            "use a fraction in [0, 1) such as 0.01, or None to never stop.",
        )
        if self.prompt is not None:
            self.prompt = self.prompt.strip() or None

    def resolved_learning_rate(self, strategy: str) -> float:
        return self.learning_rate or DEFAULT_LEARNING_RATES[canonical_strategy(strategy)]

    def replace(self, **overrides: Any) -> AdaptConfig:
        """A copy with some fields replaced; unknown names raise a `TypeError` that lists the valid ones."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"Unknown AdaptConfig field(s) {unknown}. Valid fields: {sorted(names)}.")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict of the fields (a `peft_config` is stored as its own dict)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "peft_config" and value is not None:
                value = value.to_dict() if hasattr(value, "to_dict") else repr(value)
                value = (
                    {k: (sorted(v) if isinstance(v, set) else v) for k, v in value.items()}
                    if isinstance(value, dict)
                    else value
                )
            out[f.name] = value
        return out

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> AdaptConfig:
        """Read a YAML or JSON file of fields; `overrides` win over the file."""
        import yaml

        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise FileNotFoundError(
                f"Config file {path} does not exist; pass an existing YAML or JSON file."
            ) from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a mapping of AdaptConfig fields, not {type(data).__name__}.")
        data.update(overrides)
        return cls().replace(**data)
