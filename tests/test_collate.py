"""The study's training bugs, each pinned by a test that fails on the study's code.

* padding counted in the loss        -> labels are -100 on padding
* [CLS] in training, [DEC] at test   -> the first input token is generate()'s BOS
* prompt scored as caption           -> prompt tokens are -100, and stripped when decoding
* fixed padding to 128               -> padding is dynamic
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from medblip_peft.data import IGNORE_INDEX, CaptionCollator, SkipManifest
from medblip_peft.train import CaptioningLoss


def rows(ds, n):
    return [ds[i] for i in range(n)]


def test_labels_mask_padding_and_first_token_is_dec(tiny, phantoms):
    model, processor = tiny
    collator = CaptionCollator(processor)
    batch = collator([{"image": phantoms[0]["image"], "caption": "ct of the abdomen."},
                      {"image": phantoms[1]["image"], "caption": phantoms[1]["caption"]}])
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert mask[0].sum() < mask[1].sum(), "the first caption is shorter, so it must be padded"
    assert (labels[mask == 0] == IGNORE_INDEX).all(), "padding must never be a target"
    assert (labels[mask == 1][1:] != IGNORE_INDEX).any()
    # generate() feeds bos_token_id ([DEC]) as the first decoder token, never [CLS]
    tokenizer = processor.tokenizer
    assert (ids[:, 0] == model.config.text_config.bos_token_id).all()
    assert tokenizer.convert_ids_to_tokens(int(ids[0, 0])) == "[DEC]"
    assert (ids != tokenizer.cls_token_id).all()
    # [SEP] ends each caption and is a target (the model must learn to stop)
    last = mask.sum(1) - 1
    assert (ids[torch.arange(2), last] == tokenizer.sep_token_id).all()
    assert (labels[torch.arange(2), last] == tokenizer.sep_token_id).all()


def test_first_token_matches_what_generate_feeds(tiny, phantoms):
    model, processor = tiny
    batch = CaptionCollator(processor)(rows(phantoms, 2))
    out = model.generate(pixel_values=batch["pixel_values"], max_new_tokens=2, num_beams=1)
    assert (out[:, 0] == batch["input_ids"][:, 0]).all()


def test_prompt_tokens_are_masked(tiny, phantoms):
    _, processor = tiny
    prompt = "a radiograph of the"
    collator = CaptionCollator(processor, prompt=prompt)
    batch = collator(rows(phantoms, 2))
    n_prompt = len(processor.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert n_prompt == 4
    assert (batch["labels"][:, : 1 + n_prompt] == IGNORE_INDEX).all()
    assert (batch["labels"][:, 1 + n_prompt] != IGNORE_INDEX).all(), "the first caption token is a target"
    decoded = processor.tokenizer.decode(batch["input_ids"][0, 1 : 1 + n_prompt])
    assert decoded == prompt


def test_padding_is_dynamic(tiny, phantoms):
    _, processor = tiny
    batch = CaptionCollator(processor, max_length=96)(rows(phantoms, 4))
    longest = max(len(processor.tokenizer(phantoms[i]["caption"])["input_ids"]) for i in range(4))
    assert batch["input_ids"].shape[1] == longest < 96


def test_long_captions_are_truncated_and_counted(tiny, phantoms):
    _, processor = tiny
    collator = CaptionCollator(processor, max_length=8)
    batch = collator([{"image": phantoms[0]["image"], "caption": "left " * 30}, rows(phantoms, 1)[0]])
    assert batch["input_ids"].shape[1] == 8
    assert collator.truncated == 2
    assert (batch["input_ids"][:, -1] == processor.tokenizer.sep_token_id).all()


def test_bad_rows_are_skipped_and_recorded(tiny, phantoms, tmp_path):
    _, processor = tiny
    manifest = SkipManifest(tmp_path / "skipped.jsonl")
    collator = CaptionCollator(processor, manifest=manifest)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    batch = collator([
        {"image": str(broken), "caption": "ct.", "image_id": "bad1"},
        {"image": phantoms[0]["image"], "caption": "   ", "image_id": "blank"},
        {"image": phantoms[1]["image"], "caption": phantoms[1]["caption"], "image_id": "ok"},
    ])
    assert batch["input_ids"].shape[0] == 1
    assert {r["id"] for r in manifest.records} == {"bad1", "blank"}
    assert (tmp_path / "skipped.jsonl").read_text().count("\n") == 2
    assert collator([{"image": str(broken), "caption": "x", "image_id": "bad2"}]) is None


def test_loss_equals_hand_cross_entropy_over_real_tokens(tiny, phantoms):
    model, processor = tiny
    batch = CaptionCollator(processor)(rows(phantoms, 3))
    loss = CaptioningLoss(model, vision_frozen=False)(**batch)
    with torch.no_grad():
        embeds = model.vision_model(pixel_values=batch["pixel_values"]).last_hidden_state
        logits = model.text_decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    encoder_hidden_states=embeds).logits
    terms = []
    for b in range(3):
        n = int(batch["attention_mask"][b].sum())
        for t in range(n - 1):  # position t predicts real token t+1 ([DEC] itself is never predicted)
            terms.append(-F.log_softmax(logits[b, t], -1)[batch["input_ids"][b, t + 1]])
    by_hand = torch.stack(terms).mean()
    torch.testing.assert_close(loss.detach(), by_hand, rtol=1e-5, atol=1e-6)


def test_extra_padding_changes_nothing(tiny, phantoms):
    """With labels = input_ids (the study), more padding changes the loss; with -100 masking it cannot."""
    model, processor = tiny
    batch = CaptionCollator(processor)(rows(phantoms, 3))
    extra = 12
    padded = dict(batch)
    pad = torch.full((3, extra), processor.tokenizer.pad_token_id)
    padded["input_ids"] = torch.cat([batch["input_ids"], pad], 1)
    padded["attention_mask"] = torch.cat([batch["attention_mask"], torch.zeros_like(pad)], 1)
    padded["labels"] = torch.cat([batch["labels"], torch.full_like(pad, IGNORE_INDEX)], 1)
    loss_fn = CaptioningLoss(model, vision_frozen=False)
    torch.testing.assert_close(loss_fn(**batch), loss_fn(**padded), rtol=1e-5, atol=1e-6)
    study = {**padded, "labels": padded["input_ids"]}
    study_short = {**batch, "labels": batch["input_ids"]}
    assert abs(float(loss_fn(**study)) - float(loss_fn(**study_short))) > 1e-4


def test_label_smoothing_is_applied(tiny, phantoms):
    model, processor = tiny
    batch = CaptionCollator(processor)(rows(phantoms, 2))
    plain = CaptioningLoss(model, vision_frozen=False)(**batch)
    smooth = CaptioningLoss(model, vision_frozen=False, label_smoothing=0.1)(**batch)
    assert not torch.isclose(plain, smooth)


def test_prompt_longer_than_budget_is_rejected(tiny):
    _, processor = tiny
    with pytest.raises(ValueError, match="max_caption_tokens"):
        CaptionCollator(processor, prompt="a b c d e f", max_length=6)


def test_images_of_every_kind_are_accepted(tiny, phantoms, tmp_path):
    import numpy as np
    from PIL import Image

    _, processor = tiny
    png = tmp_path / "x.png"
    phantoms[0]["image"].save(png)
    buf = io.BytesIO()
    Image.new("L", (40, 30), 90).save(buf, format="PNG")
    batch = CaptionCollator(processor)([
        {"image": str(png), "caption": "a"},
        {"image": np.zeros((20, 20), dtype=np.uint16), "caption": "b"},
        {"image": {"bytes": buf.getvalue(), "path": None}, "caption": "c"},
    ])
    assert batch["pixel_values"].shape == (3, 3, 64, 64)
