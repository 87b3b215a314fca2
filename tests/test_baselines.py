"""Baselines: each family loads from a folder through the real `from_pretrained` path and captions images.

The models are tiny random configurations of the same architecture classes as the Hub checkpoints (BLIP,
BLIP-2 with OPT, InstructBLIP with OPT, ViT + GPT-2), saved as safetensors to temporary folders; the GPT-2/OPT
tokenizer is a byte-level BPE trained on phantom captions. Gemini runs through the real google-genai client
against a loopback server.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medblip_peft.data import make_phantoms
from medblip_peft.evaluation.baselines import BASELINES, FAMILIES, CaptionerLike, load_baseline

IMAGE = 32
FAST = {"num_beams": 1, "max_new_tokens": 6, "min_new_tokens": 1}


@pytest.fixture(scope="module")
def images():
    return list(make_phantoms(3, seed=7, image_size=IMAGE)["image"])


@pytest.fixture(scope="module")
def bpe_tokenizer(tmp_path_factory):
    """A GPT-2-style byte-level BPE (OPT uses the same tokenizer class), trained offline on phantom captions."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Tokenizer

    folder = tmp_path_factory.mktemp("bpe")
    bpe = ByteLevelBPETokenizer()
    captions = list(make_phantoms(64, seed=1, image_size=IMAGE)["caption"])
    bpe.train_from_iterator(captions, vocab_size=320, min_frequency=1, special_tokens=["<pad>", "</s>", "<unk>"])
    bpe.save_model(str(folder))
    return GPT2Tokenizer(
        vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"),
        bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
    )  # fmt: skip


def _vision(**extra):
    return {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "image_size": IMAGE, "patch_size": 16, **extra}


def _opt(tokenizer):
    return {"model_type": "opt", "vocab_size": len(tokenizer), "hidden_size": 32, "ffn_dim": 64,
            "num_hidden_layers": 1, "num_attention_heads": 2, "word_embed_proj_dim": 32,
            "max_position_embeddings": 64, "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}


def _save(model, processor, folder: Path) -> Path:
    torch.manual_seed(0)
    model.save_pretrained(folder)  # safetensors by default
    processor.save_pretrained(folder)
    return folder


def _qformer_model(tmp_path, tokenizer, kind: str) -> Path:
    """A tiny BLIP-2 or InstructBLIP with an OPT language model; `<image>` is added by the processor."""
    import transformers
    from transformers import BlipImageProcessorPil

    from medblip_peft.testing import tiny_tokenizer

    image_processor = BlipImageProcessorPil(size={"height": IMAGE, "width": IMAGE})
    qformer_tok = tiny_tokenizer()
    processor = (
        transformers.Blip2Processor(image_processor, tokenizer, num_query_tokens=4)
        if kind == "blip2"
        else transformers.InstructBlipProcessor(image_processor, tokenizer, qformer_tok, num_query_tokens=4)
    )
    prefix = "Blip2" if kind == "blip2" else "InstructBlip"
    config = getattr(transformers, f"{prefix}Config")(
        vision_config=_vision(),
        qformer_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                        "num_attention_heads": 2, "encoder_hidden_size": 32, "vocab_size": len(qformer_tok)},
        text_config=_opt(tokenizer),
        num_query_tokens=4,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(0)
    model = getattr(transformers, f"{prefix}ForConditionalGeneration")(config)
    return _save(model, processor, tmp_path / kind)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, bpe_tokenizer):
    """Folders of tiny models, one per family, built once for the module."""
    from transformers import (
        GPT2Config,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTImageProcessorPil,
    )

    from medblip_peft.testing import tiny_blip

    root = tmp_path_factory.mktemp("baselines")
    blip, blip_processor = tiny_blip(image_size=IMAGE, patch_size=16, hidden_size=32, num_layers=1, num_heads=2)
    tok = bpe_tokenizer
    vit_gpt2 = VisionEncoderDecoderModel(
        VisionEncoderDecoderConfig.from_encoder_decoder_configs(
            ViTConfig(**_vision()),
            GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=64,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        )
    )
    vit_gpt2.config.decoder_start_token_id = vit_gpt2.generation_config.decoder_start_token_id = tok.bos_token_id
    vit_gpt2.config.pad_token_id = tok.pad_token_id
    vit_folder = _save(vit_gpt2, ViTImageProcessorPil(size={"height": IMAGE, "width": IMAGE}), root / "vit")
    tok.save_pretrained(vit_folder)
    return {
        "blip": _save(blip, blip_processor, root / "blip"),
        "blip2": _qformer_model(root, _copy(tok), "blip2"),
        "instructblip": _qformer_model(root, _copy(tok), "instructblip"),
        "vision-encoder-decoder": vit_folder,
    }


def _copy(tokenizer):
    import copy

    return copy.deepcopy(tokenizer)  # the Q-Former processors add <image> to the tokenizer they get


@pytest.mark.parametrize("family", ["blip", "blip2", "instructblip", "vision-encoder-decoder"])
def test_each_family_captions_every_image(tiny_dirs, images, family):
    captioner = load_baseline(tiny_dirs[family], device="cpu", batch_size=2)  # family read from config.json
    assert isinstance(captioner, CaptionerLike)
    assert captioner.name == str(tiny_dirs[family])
    captions = captioner(images, **FAST)
    assert len(captions) == len(images) and all(isinstance(c, str) for c in captions)
    assert all(len(c.split()) <= FAST["max_new_tokens"] for c in captions)  # no prompt or image tokens leaked
    if family != "blip":  # PIL image processors only: torchvision is never needed
        processor = captioner.processor[0] if family == "vision-encoder-decoder" else captioner.processor
        image_processor = getattr(processor, "image_processor", processor)
        assert type(image_processor).__name__.endswith("Pil")


def test_registry_names_take_another_checkpoint(tiny_dirs, images):
    captioner = load_baseline("instructblip", model_id=str(tiny_dirs["instructblip"]), device="cpu",
                              prompt="Describe the findings.")
    assert captioner.name == "instructblip" and captioner.prompt == "Describe the findings."
    assert len(captioner(images[:1], **FAST)) == 1
    assert set(BASELINES) == {"blip-base", "blip-large", "blip2", "instructblip", "vit-gpt2", "gemini"}
    assert {spec.family for spec in BASELINES.values()} <= set(FAMILIES)
    assert BASELINES["instructblip"].family == "instructblip"


def test_prompt_tokens_are_cut_from_decoder_only_outputs(tiny_dirs):
    captioner = load_baseline(tiny_dirs["instructblip"], device="cpu")
    tok = captioner.processor.tokenizer
    prompt_ids = torch.tensor([tok("Describe the findings")["input_ids"]])
    new_ids = torch.tensor([tok(" mass in the left zone")["input_ids"]])
    decoded = captioner.decode(torch.cat([prompt_ids, new_ids], dim=1), {"input_ids": prompt_ids})
    assert decoded == ["mass in the left zone"]


def test_unknown_model_type_and_pickled_weights_are_refused(tmp_path):
    from medblip_peft.hub import UnsafeWeightsError

    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "bert" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="model_type='bert'"):
        load_baseline(tmp_path / "bert")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text(json.dumps({"model_type": "blip-2"}))
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(UnsafeWeightsError):
        load_baseline(tmp_path / "pickled")


# ------------------------------------------------------------------------------------------------- Gemini
KEY = "AIza-test-key-never-shown-0123456789"


@pytest.fixture
def gemini(monkeypatch):
    pytest.importorskip("google.genai")
    from gemini_server import GeminiServer

    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    sleeps: list[float] = []

    def make(replies, **kw):
        server = GeminiServer(replies)
        captioner = load_baseline("gemini", base_url=server.url, sleep=sleeps.append, initial_delay=0.5, **kw)
        return server, captioner

    make.sleeps = sleeps
    return make


def test_gemini_retries_a_rate_limit_then_succeeds(gemini, images, capsys):
    from gemini_server import error_reply, text_reply

    server, captioner = gemini([error_reply(429, "Resource exhausted"), text_reply(" Axial CT of the abdomen. "),
                                text_reply("MRI of the brain"), text_reply("Chest radiograph")])
    with server:
        captions = captioner(images)
    assert captions == ["Axial CT of the abdomen.", "MRI of the brain", "Chest radiograph"]
    assert captioner.failures == []
    assert len(server.requests) == 4 and len(gemini.sleeps) == 1 and 0.5 <= gemini.sleeps[0] <= 0.55
    first = server.requests[0]
    assert first["path"].endswith("/models/gemini-1.5-flash:generateContent")
    assert first["json"]["generationConfig"] == {"temperature": 0.4, "topP": 0.9, "maxOutputTokens": 128}
    parts = first["json"]["contents"][0]["parts"]  # the image as base64 PNG ("iVBOR" = \x89PNG), then the prompt
    assert parts[0]["inlineData"]["data"].startswith("iVBOR") and "Reply with the caption only" in parts[1]["text"]
    # The key travels in a header only, and appears nowhere in what the captioner shows.
    assert first["headers"]["x-goog-api-key"] == KEY and KEY not in first["path"]
    assert KEY not in repr(captioner) and KEY not in capsys.readouterr().out


def test_gemini_reports_failed_images_and_never_shows_the_key(gemini, images, capsys):
    from gemini_server import error_reply, text_reply

    # Image 0: a permanent error whose message echoes the key; image 1: 503 until attempts run out; image 2: ok.
    server, captioner = gemini(
        [error_reply(400, f"API key {KEY} not valid"), *[error_reply(503, "overloaded")] * 3, text_reply("US")],
        max_attempts=3,
    )
    with server:
        captions = captioner(images)
    assert captions == ["", "", "US"]  # failed images keep their place: nothing is dropped
    assert [(f["index"], f["status"], f["attempts"]) for f in captioner.failures] == [(0, 400, 1), (1, 503, 3)]
    assert len(server.requests) == 5 and len(gemini.sleeps) == 2  # backoff between the 503s only
    shown = json.dumps(captioner.failures) + capsys.readouterr().out
    assert KEY not in shown and "not valid" in shown


def test_gemini_needs_a_key(monkeypatch):
    pytest.importorskip("google.genai")
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    with pytest.raises(OSError, match="GEMINI_API_KEY or GOOGLE_API_KEY"):
        load_baseline("gemini")
