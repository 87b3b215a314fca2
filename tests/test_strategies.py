"""Each strategy trains exactly what it says: frozen weights stay bitwise equal, trainable ones change."""

from __future__ import annotations

import pytest
import torch

from medblip_peft import AdaptConfig, adapt
from medblip_peft.strategies import apply_strategy, default_lora_config, parameter_report

EXPECTED_PREFIX = {"full": ("",), "encoder": ("vision_model.",), "decoder": ("text_decoder.",)}


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("strategy", ["full", "encoder", "decoder"])
def test_frozen_unchanged_and_trainable_changed(strategy, tiny, phantoms, tmp_path, quick):
    model, processor = tiny
    before = snapshot(model)
    result = adapt(model, phantoms, strategy=strategy, processor=processor, output_dir=tmp_path, **quick)
    after = dict(result.model.named_parameters())
    trainable = {n for n, p in after.items() if p.requires_grad}
    assert trainable == {n for n in before if n.startswith(EXPECTED_PREFIX[strategy])}
    for name, old in before.items():
        if name in trainable:
            assert not torch.equal(old, after[name]), f"{name} should have trained"
        else:
            assert torch.equal(old, after[name]), f"{name} should be frozen"
    assert result.trainable_params == sum(before[n].numel() for n in trainable)
    assert result.total_params == sum(p.numel() for p in before.values())


def test_lora_trains_only_adapters_on_real_blip_modules(tiny, phantoms, tmp_path, quick):
    model, processor = tiny
    before = snapshot(model)
    result = adapt(model, phantoms, strategy="lora", processor=processor, output_dir=tmp_path, **quick)
    params = dict(result.model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    targeted = {n.split(".lora_")[0].removeprefix("base_model.model.") for n in trainable}
    assert any(t.endswith("self_attn.qkv") and t.startswith("vision_model") for t in targeted)
    assert any(t.endswith("self_attn.projection") for t in targeted)
    assert any(t.endswith("crossattention.self.query") for t in targeted)
    assert any(t.endswith("crossattention.self.value") for t in targeted)
    assert any(t.endswith(".attention.self.query") for t in targeted)
    assert not any(t.endswith(("self.key", "output.dense", "mlp.fc1")) for t in targeted)
    for name, old in before.items():  # base weights are bitwise untouched
        wrapped = "base_model.model." + name
        candidates = [wrapped, wrapped.replace(".weight", ".base_layer.weight"),
                      wrapped.replace(".bias", ".base_layer.bias")]
        current = next((params[c] for c in candidates if c in params), None)
        assert current is not None, name
        assert torch.equal(old, current), f"{name} changed under LoRA"
    # Rebuild the adapters exactly as adapt() initialised them (same seed), then check that every one moved.
    from accelerate.utils import set_seed

    from medblip_peft.testing import tiny_blip

    fresh, _ = tiny_blip(seed=0)
    set_seed(AdaptConfig().seed)
    initial = dict(apply_strategy(fresh, "lora").model.named_parameters())
    for name in trainable:
        assert not torch.equal(initial[name], params[name]), f"{name} never trained"


@pytest.mark.parametrize(("towers", "vision", "text"), [("vision", True, False), ("text", False, True)])
def test_lora_towers(tiny, towers, vision, text):
    model, _ = tiny
    prepared = apply_strategy(model, "lora", AdaptConfig(lora_towers=towers))
    names = [n for n, p in prepared.model.named_parameters() if p.requires_grad]
    assert any(".vision_model." in n for n in names) is vision
    assert any(".text_decoder." in n for n in names) is text
    assert prepared.vision_frozen is (not vision)


def test_lora_config_has_no_task_type():
    config = default_lora_config(AdaptConfig())
    assert config.task_type is None


def test_study_lora_targets_are_rejected(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="BLIP's attention modules"):
        apply_strategy(model, "lora", AdaptConfig(lora_target_modules=["q_proj", "v_proj"]))


def test_user_peft_config_passes_through(tiny):
    from peft import IA3Config

    model, _ = tiny
    user = IA3Config(target_modules=["fc2", "output.dense"], feedforward_modules=["fc2", "output.dense"])
    prepared = apply_strategy(model, "lora", AdaptConfig(peft_config=user))
    names = [n for n, p in prepared.model.named_parameters() if p.requires_grad]
    assert names and all("ia3_l" in n for n in names)


@pytest.mark.parametrize(("alias", "name"), [("encoder-only", "encoder"), ("decoder-only", "decoder"), ("FULL", "full")])
def test_aliases(tiny, alias, name):
    model, _ = tiny
    assert apply_strategy(model, alias).strategy == name


def test_unknown_strategy_names_the_choices(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="'full', 'encoder'"):
        apply_strategy(model, "prefix-tuning")


def test_parameter_report_per_tower(tiny):
    model, _ = tiny
    prepared = apply_strategy(model, "decoder")
    report = parameter_report(prepared.model)
    assert report["vision_model"]["trainable"] == 0
    assert report["text_decoder"]["trainable"] == report["text_decoder"]["total"] > 0
    assert report["all"]["total"] == sum(p.numel() for p in model.parameters())
