"""AdaptConfig validates every field up front, naming the field and the fix."""

from __future__ import annotations

import pytest

from medblip_peft import AdaptConfig
from medblip_peft.config import canonical_strategy


@pytest.mark.parametrize(
    ("field", "value"),
    [("learning_rate", -1.0), ("batch_size", 0), ("lr_scheduler", "step"), ("mixed_precision", "fp8"),
     ("label_smoothing", 1.0), ("metric_for_best", "rouge"), ("lora_towers", "all"), ("max_caption_tokens", 2),
     ("warmup_ratio", 1.5), ("eval_num_beams", 0)],
)
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"`{field}="):
        AdaptConfig(**{field: value})


def test_replace_rejects_unknown_fields_and_lists_valid_ones():
    with pytest.raises(TypeError, match="learning_rate"):
        AdaptConfig().replace(learnin_rate=1e-4)


def test_defaults_fit_roco_and_fix_the_study():
    config = AdaptConfig()
    assert config.max_caption_tokens >= 64, "the study's 20-token cap truncated 37% of ROCO captions"
    assert config.label_smoothing == 0.0
    assert config.resolved_learning_rate("lora") > config.resolved_learning_rate("full")


def test_yaml_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("batch_size: 4\nprompt: '  a scan of  '\n")
    config = AdaptConfig.from_file(path, seed=7)
    assert (config.batch_size, config.seed, config.prompt) == (4, 7, "a scan of")
    assert config.to_dict()["batch_size"] == 4


def test_strategy_aliases():
    assert canonical_strategy("Decoder_Only") == "decoder"
    with pytest.raises(ValueError, match="encoder-only"):
        canonical_strategy("vision")
