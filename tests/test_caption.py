"""Captioner: loading full checkpoints and LoRA adapters (by path and by Hub repo id), batching, prompts."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from medblip_peft import Captioner, adapt
from medblip_peft.caption import DEFAULT_GENERATION


@pytest.fixture
def base_dir(tiny, tmp_path):
    """The tiny base model saved as a loadable directory (LoRA adapters point at it)."""
    model, processor = tiny
    path = tmp_path / "base"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.mark.parametrize("strategy", ["full", "lora"])
def test_round_trip_gives_identical_captions(strategy, base_dir, phantoms, tmp_path, quick):
    out = tmp_path / strategy
    result = adapt(str(base_dir), phantoms, strategy=strategy, output_dir=out, **quick)
    images = list(phantoms["image"][:6])
    before = result.captioner(device="cpu")(images, num_beams=1)
    loaded = Captioner.from_pretrained(out, device="cpu")
    assert loaded(images, num_beams=1) == before
    files = {p.name for p in out.iterdir() if p.is_file()}
    meta = json.loads((out / "medblip_peft.json").read_text())
    assert meta["strategy"] == strategy and meta["base_model"] == str(base_dir)
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    if strategy == "lora":
        assert {"adapter_config.json", "adapter_model.safetensors"} <= files
        assert "model.safetensors" not in files
        from safetensors import safe_open

        with safe_open(out / "adapter_model.safetensors", "pt") as f:
            names = list(f.keys())
        assert names and all("lora_" in k for k in names), "an adapter directory holds adapter weights only"
        assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    else:
        assert {"model.safetensors", "config.json", "generation_config.json", "processor_config.json"} <= files


def test_loading_by_repo_id_from_offline_hub_cache(base_dir, phantoms, tmp_path, quick, monkeypatch):
    """A full checkpoint in the real models--org--name/snapshots/<sha>/ layout loads by repo id, offline."""
    out = tmp_path / "run"
    result = adapt(str(base_dir), phantoms, strategy="full", output_dir=out, **quick)
    cache = tmp_path / "hub"
    sha = "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "models--radiology--tiny-medblip" / "snapshots" / sha
    shutil.copytree(out, snapshot, ignore=shutil.ignore_patterns("checkpoints", "logs", "skipped.jsonl"))
    (cache / "models--radiology--tiny-medblip" / "refs").mkdir()
    (cache / "models--radiology--tiny-medblip" / "refs" / "main").write_text(sha)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    images = list(phantoms["image"][:4])
    loaded = Captioner.from_pretrained("radiology/tiny-medblip", device="cpu")
    assert loaded(images, num_beams=1) == result.captioner(device="cpu")(images, num_beams=1)


def test_prompt_is_fed_and_stripped(tiny, phantoms):
    model, processor = tiny
    prompt = "a radiograph of the"
    captioner = Captioner(model, processor, prompt=prompt, device="cpu")
    pixel_values = captioner.preprocess(list(phantoms["image"][:2]))
    raw = captioner.generate_ids(pixel_values, num_beams=1, max_new_tokens=5, min_new_tokens=5)
    prompt_ids = processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert raw[:, 1 : 1 + len(prompt_ids)].tolist() == [prompt_ids] * 2, "the prompt is fed to the decoder"
    captions = captioner.decode(raw)
    full = processor.tokenizer.batch_decode(raw, skip_special_tokens=True)
    for caption, text in zip(captions, full):
        assert text.startswith(prompt) and not caption.startswith(prompt)
        assert " ".join(text.split()) == f"{prompt} {caption}".strip()


def test_accepts_pil_paths_arrays_and_batches(tiny, phantoms, tmp_path):
    model, processor = tiny
    captioner = Captioner(model, processor, device="cpu", batch_size=2)
    path = tmp_path / "scan.png"
    phantoms[0]["image"].save(path)
    array = np.asarray(phantoms[1]["image"])
    captions = captioner([phantoms[0]["image"], str(path), array], num_beams=1, max_new_tokens=6)
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)
    assert captions[0] == captions[1], "a PIL image and its PNG file give the same caption"
    assert captioner(phantoms[0]["image"], num_beams=1, max_new_tokens=6) == captions[:1]


def test_batched_captions_equal_one_by_one(tiny, phantoms):
    model, processor = tiny
    captioner = Captioner(model, processor, device="cpu")
    images = list(phantoms["image"][:5])
    for beams in (1, 3):
        alone = [captioner([im], num_beams=beams, max_new_tokens=8)[0] for im in images]
        assert captioner(images, batch_size=5, num_beams=beams, max_new_tokens=8) == alone


def test_generation_defaults_fit_roco():
    # 90th-percentile ROCO caption: 37 words, 64 BERT WordPiece tokens; the study capped captions at 20 tokens.
    assert DEFAULT_GENERATION["max_new_tokens"] >= 60
    assert DEFAULT_GENERATION["num_beams"] == 3
    assert DEFAULT_GENERATION["min_new_tokens"] >= 1
    assert DEFAULT_GENERATION["no_repeat_ngram_size"] >= 2


def test_model_object_needs_processor(tiny, phantoms):
    model, _ = tiny
    with pytest.raises(ValueError, match="processor"):
        adapt(model, phantoms, strategy="full")


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(OSError, match="does-not-exist"):
        Captioner.from_pretrained(tmp_path / "does-not-exist")
