"""Shared fixtures: tiny random BLIPs and phantom datasets, all built offline."""

from __future__ import annotations

import os

import pytest

# Nothing in the test suite may reach the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    # Tiny models gain nothing from intra-op threads, and on a 2-core machine they only fight each other.
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def tiny():
    """A fresh tiny BLIP and its processor (fresh per test: training mutates it)."""
    from medblip_peft.testing import tiny_blip

    return tiny_blip(seed=0)


@pytest.fixture(scope="session")
def phantoms():
    """32 phantoms at the tiny model's 64 px."""
    from medblip_peft.data import make_phantoms

    return make_phantoms(32, seed=123, image_size=64)


@pytest.fixture
def quick():
    """AdaptConfig overrides for a few fast, quiet training steps."""
    return {"batch_size": 8, "max_steps": 3, "learning_rate": 1e-3, "warmup_ratio": 0.0, "report_to": "none",
            "progress": False, "cpu": True, "weight_decay": 0.0}


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """`run_demo` exactly as `medblip-peft demo` runs it, once per session (about 70 s on one thread): the
    demo tests check its numbers and the explanation tests explain its checkpoint."""
    from medblip_peft.demo import run_demo

    lines: list[str] = []
    result = run_demo(output_dir=tmp_path_factory.mktemp("demo") / "demo", log=lines.append)
    return {**result, "log": lines}
