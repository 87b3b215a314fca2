"""Tiny, randomly initialised BLIP models for tests, the demo and offline development.

Nothing here touches the network: the tokenizer is a small WordPiece vocabulary built in memory with
``tokenizers`` (through transformers' ``BertTokenizer``) and the model comes from a config.
"""

from __future__ import annotations

import re

from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessorPil,
    BlipProcessor,
)

__all__ = ["PHANTOM_WORDS", "blip_base_config", "tiny_blip", "tiny_tokenizer"]

# BERT's special tokens keep BERT's order so that [PAD] is id 0, as BLIP's text config expects.
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
DEC_TOKEN = "[DEC]"  # BLIP's decoder BOS: generate() starts every caption with it.

# Words of the phantom caption grammar plus a little general radiology vocabulary, so that tiny models can
# also tokenise ROCO-like text without collapsing every word to [UNK].
PHANTOM_WORDS = [
    "a",
    "an",
    "the",
    "of",
    "in",
    "on",
    "at",
    "with",
    "without",
    "and",
    "or",
    "no",
    "is",
    "are",
    "there",
    "showing",
    "shows",
    "demonstrating",
    "image",
    "images",
    "scan",
    "axial",
    "coronal",
    "sagittal",
    "ct",
    "computed",
    "tomography",
    "mri",
    "mr",
    "magnetic",
    "resonance",
    "radiograph",
    "radiography",
    "x",
    "ray",
    "plain",
    "chest",
    "abdomen",
    "pelvis",
    "brain",
    "head",
    "neck",
    "ultrasound",
    "sonographic",
    "sonography",
    "doppler",
    "pet",
    "spect",
    "left",
    "right",
    "upper",
    "lower",
    "bilateral",
    "mass",
    "nodule",
    "lesion",
    "focal",
    "zone",
    "region",
    "field",
    "quadrant",
    "abnormality",
    "normal",
    "study",
    "findings",
    "arrow",
    "arrows",
    "contrast",
    "enhanced",
    "enhancement",
    "t1",
    "t2",
    "flair",
    "weighted",
    "fracture",
    "effusion",
    "cyst",
    "tumor",
    "tumour",
    "stenosis",
    "aneurysm",
    "hemorrhage",
    "haemorrhage",
    "metastasis",
    "opacity",
    "consolidation",
    "lung",
    "liver",
    "kidney",
    "heart",
    "spine",
    "bone",
    "artery",
    "vein",
    "view",
    "lateral",
    "ap",
    "pa",
    "patient",
    "year",
    "old",
    "male",
    "female",
]

CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789") + list(".,;:()-/%'\"")


def _vocabulary(extra_words: list[str] | None = None) -> dict[str, int]:
    tokens = list(SPECIAL_TOKENS)
    seen = set(tokens)
    # Single characters and their ## continuations make every word encodable (no [UNK] for lower-case
    # ASCII), while the whole words keep phantom captions short.
    for tok in [*CHARS, *(f"##{c}" for c in CHARS), *PHANTOM_WORDS, *(extra_words or [])]:
        tok = tok.lower()
        if tok not in seen:
            seen.add(tok)
            tokens.append(tok)
    tokens.append(DEC_TOKEN)
    return {tok: i for i, tok in enumerate(tokens)}


def tiny_tokenizer(extra_words: list[str] | None = None) -> BertTokenizer:
    """A BERT-style WordPiece tokenizer with BLIP's extra ``[DEC]`` BOS token, built offline."""
    vocab = _vocabulary([w for w in (extra_words or []) if re.fullmatch(r"[a-z0-9]+", w.lower())])
    tok = BertTokenizer(vocab=vocab, do_lower_case=True)
    tok.add_special_tokens({"bos_token": DEC_TOKEN})
    tok.model_max_length = 128
    return tok


def tiny_blip(
    *,
    image_size: int = 64,
    patch_size: int = 8,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_text_positions: int = 96,
    seed: int = 0,
    position_std: float = 0.3,
) -> tuple[BlipForConditionalGeneration, BlipProcessor]:
    """Return ``(model, processor)``: a tiny random BLIP and a matching PIL-based processor.

    The vision ``initializer_range`` is 0.02: BLIP's default of 1e-10 leaves the patch embedding nearly zero,
    which makes a randomly initialised model blind to the image.
    """
    import torch

    tokenizer = tiny_tokenizer()
    special = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "sep_token_id": tokenizer.sep_token_id,
        "eos_token_id": tokenizer.sep_token_id,
    }
    assert max(special.values()) < len(tokenizer), "special token ids must lie inside the vocabulary"
    inter = intermediate_size or 4 * hidden_size
    config = BlipConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden_size,
            "encoder_hidden_size": hidden_size,
            "intermediate_size": inter,
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "max_position_embeddings": max_text_positions,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            **special,
        },
        vision_config={
            "hidden_size": hidden_size,
            "intermediate_size": inter,
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "image_size": image_size,
            "patch_size": patch_size,
            "initializer_range": 0.02,
        },
        projection_dim=hidden_size,
    )
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config)
    with torch.no_grad():
        # Patch embeddings come out with a std of about 0.4 while position embeddings start at 0.02, so a tiny
        # model trained from scratch takes thousands of steps to learn *where* things are. Starting the
        # position embeddings at a comparable scale makes location learnable in a short demo.
        model.vision_model.embeddings.position_embedding.normal_(0.0, position_std)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.sep_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    image_processor = BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return model.eval(), processor


def blip_base_config() -> BlipConfig:
    """The architecture of ``Salesforce/blip-image-captioning-base`` (ViT-B/16 at 384 px, BERT-base decoder),
    built from a config so that its parameter counts and step costs can be measured without a download."""
    return BlipConfig(
        text_config={"vocab_size": 30524, "bos_token_id": 30522, "sep_token_id": 102, "pad_token_id": 0},
        vision_config={"image_size": 384, "patch_size": 16, "initializer_range": 0.02},
    )
