"""The command line is a thin shell over the API: help for every command, YAML + flag overrides, captioning."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from medblip_peft.cli import COMMANDS, build_parser, main


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    assert name in capsys.readouterr().out


def test_console_script_help_runs():
    out = subprocess.run([sys.executable, "-m", "medblip_peft.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for name in ("demo", "train", "caption"):
        assert name in out


def test_train_flags_mirror_adapt_config():
    args = build_parser().parse_args(["train", "--learning-rate", "3e-4", "--no-progress", "--lora-towers", "text"])
    assert args.learning_rate == 3e-4 and args.progress is False and args.lora_towers == "text"
    assert not hasattr(args, "batch_size"), "flags that were not given must not override the config file"


@pytest.fixture
def jsonl_data(phantoms, tmp_path):
    rows = []
    for i in range(8):
        path = tmp_path / f"img{i}.png"
        phantoms[i]["image"].save(path)
        rows.append({"image": path.name, "caption": phantoms[i]["caption"]})
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def test_train_with_yaml_config_and_flag_override_then_caption(tiny, jsonl_data, tmp_path, capsys):
    model, processor = tiny
    base = tmp_path / "base"
    model.save_pretrained(base)
    processor.save_pretrained(base)
    out = tmp_path / "out"
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {base}\ntrain_data: {jsonl_data}\nstrategy: decoder\noutput_dir: {out}\n"
        "max_steps: 5\nbatch_size: 4\nlearning_rate: 0.001\nreport_to: none\nprogress: false\ncpu: true\n"
    )
    assert main(["train", "--config", str(config), "--max-steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "Trainable parameters (decoder)" in printed
    summary = json.loads(printed[printed.index("{"):])
    assert summary["strategy"] == "decoder" and summary["steps"] == 2, "the flag overrides the file"
    meta = json.loads((out / "medblip_peft.json").read_text())
    assert meta["config"]["max_steps"] == 2 and meta["config"]["batch_size"] == 4

    images = [str(jsonl_data.parent / "img0.png"), str(jsonl_data.parent / "img1.png")]
    captions_file = tmp_path / "captions.jsonl"
    assert main(["caption", *images, "--checkpoint", str(out), "--num-beams", "1", "--output",
                 str(captions_file)]) == 0
    rows = [json.loads(line) for line in captions_file.read_text().splitlines()]
    assert [r["image"] for r in rows] == images and all(isinstance(r["caption"], str) for r in rows)


def test_bad_config_key_is_a_clear_error(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("train_data: x.jsonl\nlearning_rat: 0.1\n")
    assert main(["train", "--config", str(config)]) == 2
    assert "learning_rat" in capsys.readouterr().err
