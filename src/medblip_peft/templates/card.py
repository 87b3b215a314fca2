"""The model card (README.md) of a published checkpoint, generated from its ``medblip_peft.json``.

The YAML metadata is built with ``huggingface_hub.ModelCardData`` so that it parses back with ``ModelCard``
and passes the Hub's checks; the Markdown body is ``model_card.md`` next to this file, filled in with
``string.Template`` (``$name`` placeholders), which leaves the braces of the code examples alone.
"""

from __future__ import annotations

import json
import os
import re
import textwrap
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

__all__ = ["METADATA_FILE", "is_hub_id", "looks_like_path", "make_model_card", "read_json"]

METADATA_FILE = "medblip_peft.json"
STRATEGIES = {
    "full": "every weight of the vision encoder and the text decoder was trained.",
    "encoder": "only the vision encoder was trained; the text decoder kept the base weights.",
    "decoder": "only the text decoder was trained; the vision encoder kept the base weights.",
    "lora": "the base weights were frozen and low-rank (LoRA) adapters were trained; this repository holds "
    "the adapter only, which is applied on top of the base model.",
}
# Evaluation keys of medblip-peft -> (Hub metric id, display name). Unknown keys (e.g. clinical_*) are shown
# as they are and left out of the card's `metrics` list, which should name known metrics only.
METRICS = {
    **{f"bleu{sep}{n}": ("bleu", f"BLEU-{n}") for n in range(1, 5) for sep in ("", "_")},
    **{key: ("rouge", "ROUGE-L") for key in ("rouge_l", "rougeL")},
    "meteor": ("meteor", "METEOR"),
    "cider": ("cider", "CIDEr"),
    **{f"bertscore_{part}": ("bertscore", f"BERTScore {part}") for part in ("precision", "recall", "f1")},
    "val_loss": ("loss", "validation loss"),
}
# Configuration keys that could hold a credential are never written into a card.
SECRET_KEY = re.compile(r"(hf_|hub_|api_|auth_)?(token|secret|password|key)", re.IGNORECASE)
# Loading snippets of the card; {load} is filled per strategy.
SNIPPET = """```python
{imports}from PIL import Image
from transformers import BlipForConditionalGeneration, BlipProcessor

{load}processor = BlipProcessor.from_pretrained("{repo}")
inputs = processor(images=Image.open("chest_xray.png").convert("RGB"){prompt}, return_tensors="pt")
ids = model.generate(
{generation}
)
print(processor.batch_decode(ids, skip_special_tokens=True)[0])
```"""
LORA_HINT = """Not needed: this repository holds complete weights. To keep fine-tuning it with LoRA, wrap it:

```python
from peft import LoraConfig, get_peft_model

model = get_peft_model(model, LoraConfig(r=16, target_modules=["self_attn.qkv", "query", "value"]))
```"""


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``, or ``{}`` when the file does not exist."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def looks_like_path(name: str) -> bool:
    """Whether ``name`` reads as a filesystem path rather than a Hub repo id."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1


def is_hub_id(value: Any) -> bool:
    """True for a string that is a valid repo id and not a path on this machine (a card may only link those)."""
    if not isinstance(value, str) or looks_like_path(value) or Path(value).expanduser().exists():
        return False
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return value if isinstance(value, str) else json.dumps(value)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _strategy_section(meta: dict[str, Any], strategy: str) -> str:
    text = f"**{strategy}**: {STRATEGIES.get(strategy, 'a custom strategy.')}"
    trainable, total = meta.get("trainable_params"), meta.get("total_params")
    if isinstance(trainable, int) and isinstance(total, int) and total > 0:
        text += f"\n\nTrainable parameters: **{trainable:,}** of {total:,} ({100 * trainable / total:.2f}%)."
    towers = meta.get("trainable_by_tower") or {}
    if towers:
        text += "\n\n" + _table(["tower", "trainable parameters"], [[k, f"{v:,}"] for k, v in towers.items()])
    return text


def _config_section(meta: dict[str, Any]) -> str:
    config = {k: v for k, v in (meta.get("config") or {}).items() if not SECRET_KEY.fullmatch(k)}
    parts = [_table(["setting", "value"], [[k, v] for k, v in config.items()])] if config else []
    if meta.get("prompt"):
        parts.append(f"Text prompt fed to the decoder: `{meta['prompt']}`.")
    if meta.get("train_seconds") is not None:
        parts.append(f"Training time: {float(meta['train_seconds']) / 60:.1f} minutes.")
    if meta.get("versions"):
        parts.append("Libraries: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".")
    return "\n\n".join(parts) or "The training configuration was not recorded."


def _data_section(dataset: Any) -> str:
    if not dataset:
        return "The training data was not recorded with this checkpoint."
    if is_hub_id(dataset):
        return f"Trained on [`{dataset}`](https://huggingface.co/datasets/{dataset})."
    return f"Trained on local data: `{Path(str(dataset)).name}`."


def _scores(meta: dict[str, Any]) -> dict[str, float]:
    metrics = meta.get("metrics") or {}
    return {
        k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def _eval_section(meta: dict[str, Any]) -> str:
    scores = _scores(meta)
    if not scores:
        return "No evaluation results were recorded for this checkpoint."
    ci = (meta.get("metrics") or {}).get("ci") or {}
    header = ["metric", "value"] + (["95% CI"] if ci else [])
    rows = []
    for key, value in scores.items():
        row: list[Any] = [METRICS.get(key, (key, key))[1], value]
        if ci:
            low_high = ci.get(key)
            row.append(f"[{low_high[0]:.4g}, {low_high[1]:.4g}]" if low_high else "")
        rows.append(row)
    return "Scores recorded by the training run on its held-out evaluation data.\n\n" + _table(header, rows)


def _generation() -> str:
    """Captioner's generation settings as keyword arguments, so that the snippets caption as it does."""
    from transformers import GenerationConfig

    from medblip_peft.caption import DEFAULT_GENERATION

    defaults = GenerationConfig()
    kwargs = ["**inputs"] + [
        f"{k}={v!r}" for k, v in DEFAULT_GENERATION.items() if getattr(defaults, k, None) != v
    ]
    return textwrap.fill(", ".join(kwargs) + ",", width=100, initial_indent="    ", subsequent_indent="    ")


def _load_sections(strategy: str, repo: str, base: str | None, prompt: str | None) -> tuple[str, str]:
    """The "with transformers" and "with peft" parts of the card."""
    fill = {
        "repo": repo,
        "imports": "",
        "prompt": f", text={prompt!r}" if prompt else "",
        "generation": _generation(),
    }
    direct = SNIPPET.format(load=f'model = BlipForConditionalGeneration.from_pretrained("{repo}")\n', **fill)
    if strategy != "lora":
        return direct, LORA_HINT
    base_ref = base or "<base model id or path>"
    via_peft = SNIPPET.format(
        **{**fill, "imports": "from peft import PeftModel\n"},
        load=f'base = BlipForConditionalGeneration.from_pretrained("{base_ref}")\n'
        f'model = PeftModel.from_pretrained(base, "{repo}")  # .merge_and_unload() gives a plain BLIP\n',
    )
    intro = f"With `peft` installed, transformers reads `adapter_config.json`, loads `{base_ref}` and applies the adapter:"
    return f"{intro}\n\n{direct}", via_peft


def _checkpoint_info(
    source: str | os.PathLike[str] | dict[str, Any],
) -> tuple[dict[str, Any], str, list[str]]:
    """``(metadata, name, explanation image paths)`` of a checkpoint folder or of a metadata dict."""
    if isinstance(source, dict):
        return dict(source), "medblip-peft-captioner", []
    folder = Path(source)
    meta = read_json(folder / METADATA_FILE)
    adapter = read_json(folder / "adapter_config.json")
    if adapter:
        meta.setdefault("strategy", "lora")
        if not meta.get("base_model"):
            meta["base_model"] = adapter.get("base_model_name_or_path")
    images = sorted(p.relative_to(folder).as_posix() for p in (folder / "explanations").glob("*.png"))
    return meta, folder.resolve().name, images


def make_model_card(
    folder_or_metadata: str | os.PathLike[str] | dict[str, Any],
    *,
    repo_id: str | None = None,
    license: str | None = None,
) -> ModelCard:
    """Build the model card (``README.md``) of a checkpoint folder, or of its ``medblip_peft.json`` metadata.

    The YAML metadata parses with ``huggingface_hub.ModelCard``; the body documents the strategy, the
    configuration, the data, the evaluation, how to load the model and its limitations. ``license`` defaults
    to the metadata's, else BLIP's ``bsd-3-clause`` for Salesforce BLIP bases, else ``other``.
    """
    meta, name, images = _checkpoint_info(folder_or_metadata)
    strategy = str(meta.get("strategy") or "full")
    base = meta.get("base_model")
    repo = repo_id or name
    if license is None:
        license = meta.get("license") or (
            "bsd-3-clause" if str(base).startswith("Salesforce/blip") else "other"
        )
    scores = _scores(meta)
    dataset = meta.get("dataset")
    dataset_id = dataset if is_hub_id(dataset) else None
    eval_results = [
        EvalResult(
            task_type="image-to-text",
            task_name="Radiology image captioning",
            dataset_type=dataset_id or "custom",
            dataset_name=dataset_id or "held-out evaluation data",
            metric_type=METRICS.get(key, (key, key))[0],
            metric_name=METRICS.get(key, (key, key))[1],
            metric_value=value,
        )
        for key, value in scores.items()
    ]
    data = ModelCardData(
        base_model=base if is_hub_id(base) else None,
        base_model_relation=("adapter" if strategy == "lora" else "finetune") if is_hub_id(base) else None,
        library_name="peft" if strategy == "lora" else "transformers",
        pipeline_tag="image-to-text",
        license=license,
        datasets=[dataset_id] if dataset_id else None,
        metrics=sorted({METRICS[k][0] for k in scores if k in METRICS} - {"loss"}) or None,
        tags=["medical", "radiology", "blip", strategy, "image-captioning", "medblip-peft"],
        model_name=repo if eval_results else None,
        eval_results=eval_results or None,
    )
    relation = "a LoRA adapter on" if strategy == "lora" else "fine-tuned from"
    transformers_section, peft_section = _load_sections(strategy, repo, base, meta.get("prompt"))
    explanations = "".join(f"\n![{Path(p).stem}]({p})\n" for p in images)
    from medblip_peft import __version__

    body = Template(resources.files("medblip_peft.templates").joinpath("model_card.md").read_text("utf-8"))
    text = body.substitute(
        title=repo.split("/")[-1],
        strategy=strategy,
        base_phrase=f", {relation} `{base}`" if base else "",
        base_clause=f" (`{base}`)" if base else "",
        repo_id=repo,
        strategy_section=_strategy_section(meta, strategy),
        config_section=_config_section(meta),
        data_section=_data_section(dataset),
        eval_section=_eval_section(meta),
        transformers_section=transformers_section,
        peft_section=peft_section,
        explanations_section=f"\n## Explanations\n{explanations}" if images else "",
        version=__version__,
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text}")
