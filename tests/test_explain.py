"""Explanations: shapes and normalisation of every method, grounding on a trained tiny model, the
randomisation check, LoRA checkpoints and the CLI.

The demo model is trained once per session (conftest's `demo_run`, shared with the demo test); everything else
uses untrained models.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medblip_peft.caption import Captioner
from medblip_peft.data.phantoms import make_phantoms
from medblip_peft.demo import DEMO_MODEL
from medblip_peft.explain import (
    METHODS,
    explain,
    grounding_score,
    location_token_indices,
    randomization_check,
    register_method,
    spearman,
)
from medblip_peft.testing import tiny_blip

# Fast settings for the Captum methods; the defaults are for real use.
FAST = {
    "integrated_gradients": {"n_steps": 4, "internal_batch_size": 32},
    "attention_ig": {"n_steps": 4},
    "occlusion": {"perturbations_per_eval": 64},
}
CAPTION = "Axial CT of the abdomen showing a mass in the upper left zone."



@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a small shared CPU, torch's default of one thread per core makes these tiny
    models 30-100x slower (threads wait on each other); nothing here is big enough to gain from two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def untrained() -> Captioner:
    model, processor = tiny_blip(seed=0, **DEMO_MODEL)
    return Captioner(model, processor, device="cpu", generation={"num_beams": 1, "max_new_tokens": 12})


@pytest.fixture(scope="module")
def held_out():
    return make_phantoms(24, seed=7, image_size=DEMO_MODEL["image_size"])


@pytest.fixture(scope="module")
def trained(demo_run) -> Captioner:
    """The demo model (`run_demo`: 2000 phantoms, 32 epochs), reloaded from its checkpoint."""
    return Captioner.from_pretrained(demo_run["output_dir"], device="cpu")


# --- shapes and normalisation -------------------------------------------------------------------------------
def _check_maps(exp, grid: int, image_size: int, n_tokens: int) -> None:
    assert exp.raw_patch_heatmaps.shape == (n_tokens, grid, grid)
    assert exp.patch_heatmaps.shape == (n_tokens, grid, grid)
    assert exp.heatmaps.shape == (n_tokens, image_size, image_size)
    assert np.isfinite(exp.raw_patch_heatmaps).all()
    assert exp.heatmaps.min() >= 0.0 and exp.heatmaps.max() <= 1.0 + 1e-6
    peaks = exp.patch_heatmaps.reshape(n_tokens, -1).max(1)
    # Every map is either empty (no positive evidence) or peaks at exactly 1.
    assert np.all(np.isclose(peaks, 1.0) | (peaks == 0.0))
    assert peaks.max() == pytest.approx(1.0)
    # The normalised map is the raw map's positive part, rescaled: same ordering where positive.
    raw = np.clip(exp.raw_patch_heatmaps, 0, None).reshape(n_tokens, -1)
    norm = exp.patch_heatmaps.reshape(n_tokens, -1)
    assert np.allclose(norm * raw.max(1, keepdims=True), raw, atol=1e-5 * max(raw.max(), 1e-12))
    for peak in exp.peaks:
        assert peak is None or (0 <= peak[0] < image_size and 0 <= peak[1] < image_size)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_tiny_model_shapes_and_normalisation(untrained, method):
    exp = explain(untrained, make_phantoms(1, seed=3)[0]["image"], method=method, caption=CAPTION,
                  **FAST.get(method, {}))
    tokens = untrained.processor.tokenizer.tokenize(CAPTION)
    assert exp.tokens == tokens and exp.method == method
    _check_maps(exp, grid=4, image_size=64, n_tokens=len(tokens))


@pytest.fixture(scope="module")
def base_shaped() -> Captioner:
    # BLIP-base geometry (384 px, 16 px patches: a 24 x 24 grid) with a tiny, one-layer body.
    model, processor = tiny_blip(seed=1, image_size=384, patch_size=16, hidden_size=32, num_layers=1, num_heads=2)
    return Captioner(model, processor, device="cpu")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_blip_base_geometry_shapes(base_shaped, method):
    image = make_phantoms(1, seed=4, image_size=96)[0]["image"]  # upsampled to the image's own 96 px
    exp = explain(base_shaped, image, method=method, caption=CAPTION, tokens=["upper", "left"],
                  **FAST.get(method, {}))
    assert exp.tokens == ["upper", "left"]
    _check_maps(exp, grid=24, image_size=96, n_tokens=2)


def test_one_layer_rollout_is_cross_attention(base_shaped):
    # Documented: with a single decoder layer, rollout reduces to the (head-mean) cross-attention.
    image = make_phantoms(1, seed=4)[0]["image"]
    rollout = explain(base_shaped, image, method="attention_rollout", caption=CAPTION)
    attention = explain(base_shaped, image, method="cross_attention", caption=CAPTION)
    np.testing.assert_allclose(rollout.patch_heatmaps, attention.patch_heatmaps, atol=1e-5)


def test_head_and_layer_choices_change_the_maps(untrained):
    image = make_phantoms(1, seed=3)[0]["image"]
    maps = {
        key: explain(untrained, image, method="cross_attention", caption=CAPTION, **opts).raw_patch_heatmaps
        for key, opts in {
            "mean": {}, "max": {"heads": "max"}, "h0": {"heads": 0}, "last": {"layers": "last"}
        }.items()
    }
    assert np.all(maps["max"] >= maps["mean"] - 1e-7)
    assert not np.allclose(maps["h0"], maps["mean"]) and not np.allclose(maps["last"], maps["mean"])


def test_bad_options_are_errors(untrained):
    image = make_phantoms(1, seed=3)[0]["image"]
    with pytest.raises(ValueError, match="unknown explanation method"):
        explain(untrained, image, method="saliency", caption=CAPTION)
    with pytest.raises(TypeError, match="n_steps"):
        explain(untrained, image, method="occlusion", caption=CAPTION, n_steps=3)
    with pytest.raises(ValueError, match="heads"):
        explain(untrained, image, method="cross_attention", caption=CAPTION, heads=99)
    with pytest.raises(ValueError, match="Nothing to explain"):
        explain(untrained, image, method="cross_attention", caption=CAPTION, tokens=["kidney"])


def test_generated_caption_is_explained(untrained):
    image = make_phantoms(1, seed=3)[0]["image"]
    exp = explain(untrained, image, method="cross_attention")
    assert exp.caption == untrained([image])[0]
    tokenizer = untrained.processor.tokenizer
    ids = untrained.generate_ids(untrained.preprocess([image]))[0, 1:].tolist()  # without [DEC]
    assert exp.tokens == [t for t in tokenizer.convert_ids_to_tokens(ids) if t not in tokenizer.all_special_tokens]


def test_prompt_tokens_are_never_explained(untrained):
    prompted = Captioner(untrained.model, untrained.processor, prompt="a radiology image of", device="cpu",
                         generation={"num_beams": 1, "max_new_tokens": 8})
    image = make_phantoms(1, seed=3)[0]["image"]
    given = explain(prompted, image, method="grad_x_attention", caption=CAPTION)
    assert given.tokens == prompted.processor.tokenizer.tokenize(CAPTION)
    generated = explain(prompted, image, method="cross_attention")
    assert generated.caption == prompted([image])[0] and len(generated.tokens) <= 8


def test_top_level_export_works_after_the_package_is_imported(untrained):
    import medblip_peft

    # This module imported medblip_peft.explain first, which binds the package to that name.
    exp = medblip_peft.explain(untrained, make_phantoms(1, seed=3)[0]["image"], method="cross_attention",
                               caption=CAPTION)
    assert exp.patch_heatmaps.shape[1:] == (4, 4)


def test_location_tokens_and_spearman():
    tokens = ["ct", "showing", "no", "focal", "lesion", "in", "the", "left", "upper", "zone", "a", "mass"]
    assert location_token_indices(tokens) == [7, 8, 11]  # "lesion" is negated
    assert spearman(np.array([1, 2, 3, 4]), np.array([10, 20, 30, 40])) == pytest.approx(1.0)
    assert spearman(np.array([1, 2, 3, 4]), np.array([4, 3, 2, 1])) == pytest.approx(-1.0)
    assert spearman(np.array([1, 1, 2, 3]), np.array([5, 5, 6, 7])) == pytest.approx(1.0)  # ties share ranks
    assert spearman(np.ones(4), np.arange(4)) == 0.0


def test_save_needs_matplotlib_and_says_so(untrained, monkeypatch, tmp_path):
    import sys

    exp = explain(untrained, make_phantoms(1, seed=3)[0]["image"], method="cross_attention", caption=CAPTION)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"medblip-peft\[plots\]"):
        exp.save(tmp_path)


# --- grounding and randomisation on a trained model ---------------------------------------------------------
@pytest.fixture(scope="module")
def grounding(trained):
    held_out = make_phantoms(40, seed=2, image_size=DEMO_MODEL["image_size"])
    return grounding_score(trained, held_out)


def test_grounding_report_and_the_methods_that_localise(grounding):
    assert grounding["images"] >= 25 and grounding["tokens"] >= 3 * grounding["images"]
    baseline = grounding["baseline"]["pointing_game"]
    assert 0.02 < baseline < 0.06  # lesion area fraction of the phantoms
    for method, scores in grounding["methods"].items():
        assert 0.0 <= scores["pointing_game"] <= 1.0 and 0.0 <= scores["energy"] <= 1.0, method
    # On these 28 phantoms (84 location tokens) the demo model gives attention_ig 0.83, occlusion 0.80,
    # cross-attention 0.66, grad x attention 0.43 and integrated gradients 0.31 (docs/explain.md has 100).
    methods = grounding["methods"]
    assert methods["attention_ig"]["pointing_game"] >= 0.7, grounding
    assert methods["occlusion"]["pointing_game"] >= 0.65, grounding
    for method, scores in methods.items():  # every method points at the lesion far more often than chance
        assert scores["pointing_game"] > 5 * baseline, (method, grounding)
        assert scores["energy"] > 1.5 * grounding["baseline"]["energy"], (method, grounding)


@pytest.mark.xfail(
    strict=True,
    reason="Issue #4 asks for >= 0.8. Grad x attention reads the gradient at the model's own, saturated "
    "attention: 0.41 on the demo model (100 phantoms), 0.26-0.38 on the finding words whose lesion occlusion "
    "shows to be causal (0.98-1.00); attention_ig integrates the same gradient from uniform attention and "
    "reaches 0.80 (docs/explain.md).",
)
def test_grad_x_attention_pointing_game_reaches_0_8(grounding):
    assert grounding["methods"]["grad_x_attention"]["pointing_game"] >= 0.8


def test_attention_ig_is_complete_and_starts_from_uniform_attention(trained):
    from medblip_peft.explain.core import prepare
    from medblip_peft.explain.methods import attention_path_attributions

    image = make_phantoms(1, seed=2, image_size=DEMO_MODEL["image_size"])[0]["image"]
    target, *_ = prepare(trained, image, caption=CAPTION)
    modules = target.attention_probability_modules()

    def uniform(module, inputs, output):
        return torch.full_like(output, 1.0 / output.shape[-1])

    with torch.no_grad():
        embeds = target.image_embeds()
        actual = target.logprobs_from_embeds(embeds)[0]
        # The path's start: on zero image embeddings every query weights all 1 + P positions alike.
        seen: list[torch.Tensor] = []
        hook = modules[-1].register_forward_hook(lambda m, i, o: seen.append(o))
        target.decode(torch.zeros_like(embeds))
        hook.remove()
        torch.testing.assert_close(seen[0], torch.full_like(seen[0], 1.0 / seen[0].shape[-1]))
        hooks = [m.register_forward_hook(uniform) for m in modules]
        flat = target.logprobs_from_embeds(embeds)[0]
        for hook in hooks:
            hook.remove()
    per_layer = attention_path_attributions(target, list(range(len(modules))), n_steps=32, internal_batch_size=64)
    total = sum(m.sum((1, 2, 3)) for m in per_layer).detach()
    change = actual - flat
    assert change.abs().max() > 1.0  # the trained model's attention matters, so there is something to check
    torch.testing.assert_close(total, change, atol=0.02, rtol=0.02)


@register_method("_image_brightness", summary="test-only: ignores the model entirely")
def _image_brightness(target):
    # A "method" that looks only at the pixels: the randomisation check must fail it.
    patches = torch.nn.functional.avg_pool2d(target.pixel_values.mean(1, keepdim=True), 16)[0, 0]
    return patches.expand(target.num_tokens, -1, -1).clone()


def test_randomization_check_separates_trained_from_randomised(trained, held_out):
    captioner = trained
    images = [row["image"] for row in held_out.select(range(4))]
    report = randomization_check(
        captioner, images, methods=["grad_x_attention", "attention_ig", "_image_brightness"],
        method_options={"attention_ig": FAST["attention_ig"]},
    )
    for method in ("grad_x_attention", "attention_ig"):
        assert report[method]["passed"], report
        assert report[method]["spearman"] < 0.5
    assert not report["_image_brightness"]["passed"]
    assert report["_image_brightness"]["spearman"] == pytest.approx(1.0)
    # The original captioner is untouched: the check works on a deep copy.
    before = explain(captioner, images[0], method="grad_x_attention").raw_patch_heatmaps
    again = explain(captioner, images[0], method="grad_x_attention").raw_patch_heatmaps
    np.testing.assert_allclose(before, again)


def test_cli_writes_overlays(demo_run, held_out, tmp_path, capsys):
    from PIL import Image

    from medblip_peft.cli import main

    image_path = tmp_path / "phantom.png"
    held_out[0]["image"].save(image_path)
    out = tmp_path / "out"
    code = main(["explain", str(image_path), "--checkpoint", demo_run["output_dir"], "--method",
                 "grad_x_attention", "occlusion", "--out", str(out), "--num-beams", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    for method in ("grad_x_attention", "occlusion"):
        folder = out / "phantom" / method
        pngs = sorted(folder.glob("*.png"))
        data = json.loads((folder / "explanation.json").read_text())
        assert len(pngs) == len(data["tokens"]) + 1  # one per token plus grid.png
        for png in pngs:
            with Image.open(png) as img:
                img.verify()
                assert img.format == "PNG"
        assert data["caption"] in printed
    assert "peak (x, y)" in printed


# --- LoRA ---------------------------------------------------------------------------------------------------
def test_explain_lora_checkpoint(tmp_path, quick):
    from peft import PeftModel

    from medblip_peft.train import adapt

    model, processor = tiny_blip(seed=0, **DEMO_MODEL)
    base = tmp_path / "base"
    model.save_pretrained(base)
    processor.save_pretrained(base)
    # Trained from the saved base by path, so the adapter records where its base lives.
    result = adapt(str(base), make_phantoms(16, seed=0), strategy="lora", output_dir=tmp_path / "lora", **quick)
    captioner = Captioner.from_pretrained(result.output_dir, device="cpu")
    assert isinstance(captioner.model, PeftModel)
    image = make_phantoms(1, seed=9)[0]["image"]
    for method in ("grad_x_attention", "attention_ig", "integrated_gradients"):
        exp = explain(captioner, image, method=method, caption=CAPTION, **FAST.get(method, {}))
        _check_maps(exp, grid=4, image_size=64, n_tokens=len(exp.tokens))
