"""Publishing to and loading from the Hub, fully offline.

Pushes go through the real ``huggingface_hub`` client to the loopback fake in ``hub_server.py``; the fake's
URL is passed as ``endpoint=`` because ``huggingface_hub`` reads ``HF_ENDPOINT`` only once, at import.
Loads by repo id read a Hub cache built in ``tmp_path`` in the real ``models--org--name`` layout.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard, constants
from huggingface_hub.utils import filter_repo_objects
from PIL import Image

from hub_server import FakeHub
from medblip_peft import hub
from medblip_peft.caption import Captioner
from medblip_peft.hub import NotCachedError, PushError, UnsafeWeightsError, make_model_card, push_to_hub
from medblip_peft.testing import tiny_blip

TOKEN = "hf_FakeTestToken0123456789abcdefXYZ"
STORED_SECRET = "hf_SomeoneElsesToken9876543210zyx"  # a credential that slipped into the run's config
BASE_ID = "org/tiny-blip-base"
STRATEGIES = ["full", "encoder", "decoder", "lora"]
PROCESSOR_FILES = {"processor_config.json", "tokenizer.json", "tokenizer_config.json"}
# Greedy and short, identical for Captioner and plain transformers/peft.
GENERATION = {"num_beams": 1, "max_new_tokens": 6, "min_new_tokens": 3, "no_repeat_ngram_size": 0}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine they lose a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _metadata(strategy: str) -> dict:
    return {
        "strategy": strategy,
        "base_model": BASE_ID,
        "config": {"learning_rate": 2e-4, "lora_r": 4, "hub_token": STORED_SECRET},
        "metrics": {
            "bleu_4": 0.125,
            "cider": 0.5,
            "clinical_micro_f1": 0.375,
            "val_loss": 2.25,
            "ci": {"bleu_4": [0.1, 0.15]},
        },
        "trainable_params": 1234,
        "total_params": 56789,
        "trainable_by_tower": {"vision": 600, "text": 634},
        "dataset": "eltorio/ROCO-radiology",
        "train_seconds": 90.0,
    }


def _build(folder: Path, strategy: str) -> Path:
    model, processor = tiny_blip(seed=1)
    if strategy == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["self_attn.qkv", "query", "value"]))
        with torch.no_grad():  # a freshly initialised adapter is a no-op; make it change the captions
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.5)
    Captioner(model, processor, device="cpu").save_pretrained(folder, metadata=_metadata(strategy))
    if strategy == "lora":  # as if the base had been loaded from the Hub
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(
            json.dumps({**config, "base_model_name_or_path": BASE_ID})
        )
    for junk in ("checkpoints/step-10/model.safetensors", "logs/events.out", "optimizer.pt"):
        (folder / junk).parent.mkdir(parents=True, exist_ok=True)
        (folder / junk).write_bytes(b"not for upload")
    (folder / "explanations").mkdir()
    (folder / "explanations" / "attention.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    folders = {s: _build(root / s, s) for s in STRATEGIES}
    base, processor = tiny_blip(seed=1)
    base.save_pretrained(root / "base")
    processor.save_pretrained(root / "base")
    return {**folders, "base": root / "base"}


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch):
    """A loopback Hub; the test suite's offline switch is turned off, since nothing leaves 127.0.0.1."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # the usual source; push_to_hub is never given the token
    monkeypatch.setattr(hub, "RETRY_BASE_WAIT_S", 0.0)
    with FakeHub() as server:
        yield server


def _cache_repo(cache: Path, repo_id: str, folder: Path, revision: str = "main") -> str:
    """Lay ``folder`` out as huggingface_hub does: blobs by hash, snapshot symlinks, refs/<revision>."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    sha = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    for src in folder.rglob("*"):
        if src.is_file():
            data = src.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            link = repo / "snapshots" / sha / src.relative_to(folder)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(Path("../" * len(link.relative_to(repo).parts[1:])) / "blobs" / blob.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(sha)
    return sha


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hub cache, with offline mode on for everyone.

    huggingface_hub copies HF_HUB_CACHE and HF_HUB_OFFLINE into ``constants`` at import, and transformers
    reads those constants, while peft also reads the environment: so both are set.
    """
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]


def _tree(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


def _plain_captions(model, processor, images: list[Image.Image]) -> list[str]:
    ids = model.generate(**processor(images=images, return_tensors="pt"), **GENERATION)
    return [" ".join(text.split()) for text in processor.batch_decode(ids, skip_special_tokens=True)]


# --- push ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_push_uploads_the_checkpoint_privately_in_one_commit(strategy, checkpoints, fake_hub):
    folder = checkpoints[strategy]
    before = _tree(folder)
    info = push_to_hub(folder, f"org/{strategy}", endpoint=fake_hub.url)

    assert fake_hub.created == [{"name": strategy, "organization": "org", "visibility": "private"}]
    [commit] = fake_hub.commits
    assert info.oid and info.commit_url.startswith(fake_hub.url)
    weights = (
        {"adapter_config.json", "adapter_model.safetensors"}
        if strategy == "lora"
        else {"model.safetensors", "config.json"}
    )
    common = {"README.md", "generation_config.json", "medblip_peft.json", "explanations/attention.png"}
    assert set(commit.files) == weights | common | PROCESSOR_FILES
    assert commit.files["medblip_peft.json"] == (folder / "medblip_peft.json").read_bytes()
    assert all(TOKEN.encode() not in data for data in commit.files.values())
    # The token reached the Hub only as the Authorization header, from HF_TOKEN.
    assert {r.authorization for r in fake_hub.requests} == {f"Bearer {TOKEN}"}
    assert _tree(folder) == before


def test_push_options_public_branch_pr_and_message(checkpoints, fake_hub):
    info = push_to_hub(
        checkpoints["lora"],
        "org/shared",
        private=False,
        revision="v2",
        create_pr=True,
        commit_message="Add radiology adapter",
        endpoint=fake_hub.url,
    )
    assert fake_hub.created[0]["visibility"] == "public"
    assert fake_hub.branches == [("org/shared", "v2")]
    [commit] = fake_hub.commits
    assert (commit.revision, commit.summary, commit.create_pr) == ("v2", "Add radiology adapter", True)
    assert info.pr_url and info.pr_url.startswith(fake_hub.url)


def test_push_retries_a_transient_error(checkpoints, fake_hub):
    fake_hub.fail(503, route="commit", times=1)
    push_to_hub(checkpoints["full"], "org/retried", endpoint=fake_hub.url)
    assert [r.route for r in fake_hub.requests].count("commit") == 2
    assert len(fake_hub.commits) == 1


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (401, "HF_TOKEN"),
        (403, "write access to that namespace"),
        (500, "after 2 attempt(s)"),
        (None, "Could not reach"),
    ],
)
def test_failed_push_keeps_the_folder_and_explains(status, expected, checkpoints, fake_hub, caplog):
    folder = checkpoints["full"]
    before = _tree(folder)
    if status is None:  # nothing listening: a port that was free a moment ago
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
    else:
        fake_hub.fail(status)
        endpoint = fake_hub.url
    with pytest.raises(PushError) as caught:
        push_to_hub(folder, "org/refused", endpoint=endpoint, max_retries=1)
    message = str(caught.value)
    assert expected in message and "was not modified" in message and TOKEN not in message
    assert TOKEN not in caplog.text
    assert fake_hub.commits == []
    assert _tree(folder) == before


def test_push_refuses_a_token_written_into_a_file(tmp_path, checkpoints, fake_hub):
    folder = shutil.copytree(checkpoints["full"], tmp_path / "leaky")
    meta = json.loads((folder / "medblip_peft.json").read_text())
    (folder / "medblip_peft.json").write_text(json.dumps({**meta, "note": TOKEN}))
    with pytest.raises(PushError, match=r"medblip_peft\.json contains your Hugging Face token"):
        push_to_hub(folder, "org/leaky", endpoint=fake_hub.url)
    assert fake_hub.requests == []


def test_push_needs_a_token_and_the_network(checkpoints, fake_hub, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(PushError, match="No Hugging Face token"):
        push_to_hub(checkpoints["full"], "org/x", endpoint=fake_hub.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PushError, match="HF_HUB_OFFLINE"):
        push_to_hub(checkpoints["full"], "org/x", endpoint=fake_hub.url, token=TOKEN)
    assert fake_hub.requests == []


# --- model card ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["full", "lora"])
def test_card_metadata_parses_with_huggingface_hub(strategy, checkpoints, fake_hub):
    push_to_hub(checkpoints[strategy], "org/card", endpoint=fake_hub.url)
    card = ModelCard(fake_hub.commits[0].files["README.md"].decode())
    data = card.data.to_dict()
    lora = strategy == "lora"
    assert data["base_model"] == BASE_ID
    assert data["base_model_relation"] == ("adapter" if lora else "finetune")
    assert data["library_name"] == ("peft" if lora else "transformers")
    assert data["pipeline_tag"] == "image-to-text"
    assert data["datasets"] == ["eltorio/ROCO-radiology"]
    assert data["metrics"] == ["bleu", "cider"]
    assert data["license"] == "other"
    assert {"medical", "radiology", "blip", strategy} <= set(data["tags"])
    results = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert results == {"BLEU-4": 0.125, "CIDEr": 0.5, "clinical_micro_f1": 0.375, "validation loss": 2.25}
    assert card.data.eval_results[0].task_type == "image-to-text"


def test_card_body_covers_use_limits_and_evaluation(checkpoints):
    text = make_model_card(checkpoints["lora"], repo_id="org/adapter").text
    assert "**Not for clinical use.**" in text
    for heading in (
        "Strategy and trainable parameters",
        "Training configuration",
        "Data",
        "Evaluation",
        "With medblip-peft",
        "With transformers",
        "With peft",
        "Intended use",
        "Limitations",
    ):
        assert f"## {heading}" in text or f"### {heading}" in text, heading
    assert "1,234** of 56,789" in text
    assert "| BLEU-4 | 0.125 | [0.1, 0.15] |" in text
    assert 'Captioner.from_pretrained("org/adapter")' in text
    assert 'PeftModel.from_pretrained(base, "org/adapter")' in text and BASE_ID in text
    assert "![attention](explanations/attention.png)" in text
    assert "| learning_rate | 0.0002 |" in text and "hub_token" not in text and STORED_SECRET not in text


def test_card_without_results_or_hub_ids(tmp_path):
    meta = {
        "strategy": "decoder",
        "base_model": str(tmp_path),
        "dataset": str(tmp_path / "roco"),
        "metrics": {},
    }
    card = make_model_card(meta, repo_id="me/decoder")
    data = card.data.to_dict()
    assert "model-index" not in data and not card.data.eval_results
    assert "base_model" not in data and "datasets" not in data  # local paths are not Hub ids
    assert "No evaluation results were recorded" in card.text
    assert ModelCard(str(card)).data.to_dict() == data


# --- load by repo id -------------------------------------------------------------------------------------


def _cache_all(cache: Path, checkpoints: dict[str, Path]) -> None:
    _cache_repo(cache, BASE_ID, checkpoints["base"])
    for strategy in STRATEGIES:
        _cache_repo(cache, f"org/{strategy}", checkpoints[strategy])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_captioner_loads_a_repo_id_offline_from_the_cache(strategy, checkpoints, offline_cache, images):
    _cache_all(offline_cache, checkpoints)
    from_hub = Captioner.from_pretrained(f"org/{strategy}", device="cpu")
    local = Captioner.from_pretrained(checkpoints[strategy], device="cpu")
    assert from_hub.metadata["strategy"] == strategy
    assert from_hub(images, **GENERATION) == local(images, **GENERATION)


def test_revision_selects_the_cached_ref(checkpoints, offline_cache):
    sha = _cache_repo(offline_cache, "org/versioned", checkpoints["full"], revision="v1")
    assert hub.resolve_pretrained("org/versioned", revision="v1").name == sha
    with pytest.raises(NotCachedError, match="at revision 'main'"):
        hub.resolve_pretrained("org/versioned", revision="main")


@pytest.mark.parametrize("strategy", ["full", "encoder", "decoder"])
def test_plain_transformers_loads_a_full_checkpoint(
    strategy, checkpoints, offline_cache, images, monkeypatch
):
    from transformers import BlipForConditionalGeneration, BlipProcessor

    _cache_all(offline_cache, checkpoints)
    expected = Captioner.from_pretrained(f"org/{strategy}", device="cpu")(images, **GENERATION)
    monkeypatch.setitem(sys.modules, "medblip_peft", None)  # any import of medblip-peft now fails
    model = BlipForConditionalGeneration.from_pretrained(f"org/{strategy}")
    processor = BlipProcessor.from_pretrained(f"org/{strategy}")
    assert _plain_captions(model, processor, images) == expected


def test_plain_peft_loads_the_adapter_on_its_hub_base(checkpoints, offline_cache, images, monkeypatch):
    from peft import PeftModel
    from transformers import BlipForConditionalGeneration, BlipProcessor

    _cache_all(offline_cache, checkpoints)
    expected = Captioner.from_pretrained("org/lora", device="cpu")(images, **GENERATION)
    monkeypatch.setitem(sys.modules, "medblip_peft", None)
    # The base's processor: offline, transformers cannot tell whether the adapter repo lacks a config.json
    # or it was never downloaded (see the next test), while the base repo has one.
    processor = BlipProcessor.from_pretrained(BASE_ID)
    base_captions = _plain_captions(BlipForConditionalGeneration.from_pretrained(BASE_ID), processor, images)
    model = PeftModel.from_pretrained(BlipForConditionalGeneration.from_pretrained(BASE_ID), "org/lora")
    assert _plain_captions(model, processor, images) == expected
    assert expected != base_captions  # the adapter was applied


def test_plain_transformers_loads_the_adapter_once_seen_online(
    checkpoints, offline_cache, images, monkeypatch
):
    """The card's one-line transformers load of an adapter (transformers' peft integration).

    Online, the Hub answers 404 for the adapter repo's config.json and huggingface_hub records that in
    ``.no_exist/<sha>/config.json``; offline, transformers needs that record to know the file is absent.
    """
    from transformers import BlipForConditionalGeneration, BlipProcessor

    _cache_all(offline_cache, checkpoints)
    repo = offline_cache / "models--org--lora"
    marker = repo / ".no_exist" / (repo / "refs" / "main").read_text() / "config.json"
    marker.parent.mkdir(parents=True)
    marker.touch()
    expected = Captioner.from_pretrained("org/lora", device="cpu")(images, **GENERATION)
    monkeypatch.setitem(sys.modules, "medblip_peft", None)
    model = BlipForConditionalGeneration.from_pretrained("org/lora")
    assert _plain_captions(model, BlipProcessor.from_pretrained("org/lora"), images) == expected


def test_offline_and_not_cached_says_what_is_missing(offline_cache):
    with pytest.raises(NotCachedError) as caught:
        Captioner.from_pretrained("org/never-downloaded")
    message = str(caught.value)
    for part in ("'org/never-downloaded'", str(offline_cache), "HF_HUB_OFFLINE", "local checkpoint path"):
        assert part in message


def test_pickle_only_checkpoints_are_refused(tmp_path, offline_cache):
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(UnsafeWeightsError, match=r"pytorch_model\.bin"):
        hub.resolve_pretrained(folder)
    _cache_repo(offline_cache, "org/pickled", folder)  # e.g. downloaded by another tool
    with pytest.raises(UnsafeWeightsError, match="Hub checkpoint 'org/pickled' holds only pickled weights"):
        hub.resolve_pretrained("org/pickled")


def test_downloads_never_include_pickles():
    files = [
        "model.safetensors",
        "config.json",
        "vocab.txt",
        "tokenizer.json",
        "README.md",
        "spm.model",
        "pytorch_model.bin",
        "optimizer.pt",
        "training_args.bin",
        "explanations/a.png",
    ]
    allowed = set(filter_repo_objects(files, allow_patterns=hub.DOWNLOAD_PATTERNS))
    assert allowed == {
        "model.safetensors",
        "config.json",
        "vocab.txt",
        "tokenizer.json",
        "README.md",
        "spm.model",
    }


def test_names_that_are_neither_folders_nor_repo_ids(tmp_path):
    with pytest.raises(FileNotFoundError, match="No such checkpoint directory"):
        hub.resolve_pretrained("./runs/missing")
    with pytest.raises(ValueError, match="neither an existing local directory nor a valid Hub repo id"):
        hub.resolve_pretrained("org--x/name")
    with pytest.raises(ValueError, match="local directory"):
        hub.resolve_pretrained(tmp_path, revision="v1")


def test_captioner_push_to_hub_is_a_thin_wrapper(checkpoints, fake_hub):
    captioner = Captioner.from_pretrained(checkpoints["full"], device="cpu")
    captioner.push_to_hub("org/wrapped", endpoint=fake_hub.url, commit_message="from a Captioner")
    [commit] = fake_hub.commits
    assert fake_hub.created[0]["visibility"] == "private" and commit.summary == "from a Captioner"
    assert {"model.safetensors", "config.json", "README.md"} <= set(commit.files)
    assert ModelCard(commit.files["README.md"].decode()).data.base_model == BASE_ID


def test_push_then_load_by_repo_id_online_then_offline(checkpoints, fake_hub, tmp_path, monkeypatch, images):
    """The round trip through the fake Hub: publish a base and an adapter, load the adapter by repo id."""
    push_to_hub(checkpoints["base"], BASE_ID, endpoint=fake_hub.url)
    push_to_hub(checkpoints["lora"], "org/lora", endpoint=fake_hub.url)
    fake_hub.add_file("org/lora", "pytorch_model.bin", b"a pickle uploaded by some other tool")
    fake_hub.patch_endpoint(monkeypatch)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    expected = Captioner.from_pretrained(checkpoints["lora"], device="cpu")(images, **GENERATION)

    assert Captioner.from_pretrained("org/lora", device="cpu")(images, **GENERATION) == expected
    fetched = {r.path.split("/", 5)[-1] for r in fake_hub.requests if r.route == "resolve"}
    assert {"adapter_model.safetensors", "model.safetensors", "README.md"} <= fetched
    assert "pytorch_model.bin" not in fetched

    fake_hub.fail(500)  # any request now fails: the second load must come from the cache alone
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert Captioner.from_pretrained("org/lora", device="cpu")(images, **GENERATION) == expected


def test_cli_push(checkpoints, fake_hub, monkeypatch, capsys):
    from medblip_peft.cli import main

    # The CLI takes the endpoint from huggingface_hub's constants (HF_ENDPOINT, read at import): patch them.
    fake_hub.patch_endpoint(monkeypatch)
    folder = str(checkpoints["decoder"])
    assert main(["push", folder, "org/cli-public", "--public", "-m", "From the CLI"]) == 0
    assert capsys.readouterr().out.startswith(f"{fake_hub.url}/org/cli-public/commit/")
    assert main(["push", folder, "org/cli-private", "--revision", "v1", "--create-pr"]) == 0
    assert "/discussions/" in capsys.readouterr().out
    assert [c["visibility"] for c in fake_hub.created] == ["public", "private"]
    assert [(c.summary, c.revision, c.create_pr) for c in fake_hub.commits] == [
        ("From the CLI", "main", False),
        ("Upload decoder radiology captioner (medblip-peft)", "v1", True),
    ]

    fake_hub.fail(403)
    assert main(["push", folder, "someone-else/model"]) == 2
    printed = capsys.readouterr()
    assert "403 Forbidden" in printed.err and TOKEN not in printed.out + printed.err
