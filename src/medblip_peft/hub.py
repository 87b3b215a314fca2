"""Share checkpoints on the Hugging Face Hub and load them back by repo id.

Everything goes through ``huggingface_hub``: its cache layout, its token lookup (``HF_TOKEN`` or ``hf auth
login``) and its offline switch (``HF_HUB_OFFLINE=1``). Weights travel as safetensors only; nothing here
downloads or uploads a pickle, and ``trust_remote_code`` is never involved.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
from huggingface_hub.utils import validate_repo_id

__all__ = [
    "NotCachedError",
    "UnsafeWeightsError",
    "resolve_pretrained",
]

# What a checkpoint needs to load: configs, safetensors weights, tokenizer/processor files and the card.
# Anything else in a repository (pickled *.bin, optimizer states, images) is never fetched.
DOWNLOAD_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.txt",
    "*.md",
    "*.model",  # sentencepiece tokenizers
    "tokenizer*",
]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class NotCachedError(FileNotFoundError):
    """A repository is not in the local Hub cache and the Hub cannot be (or may not be) asked for it."""


class UnsafeWeightsError(ValueError):
    """A checkpoint holds pickled weights only; medblip-peft loads safetensors, which cannot run code."""


def _offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; also honour a variable set later in the process
    # so that "offline" never silently means "try the network".
    env = os.environ.get("HF_HUB_OFFLINE", "").upper()
    return constants.HF_HUB_OFFLINE or env in {"1", "ON", "YES", "TRUE"}


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1


def _check_safetensors(folder: Path, origin: str) -> Path:
    """Return ``folder`` if it holds safetensors weights; refuse pickle-only or weightless folders."""
    if any(folder.rglob("*.safetensors")):
        return folder
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UnsafeWeightsError(
            f"{origin} holds only pickled weights ({', '.join(pickles)}). medblip-peft loads safetensors only, "
            "because unpickling can run arbitrary code. Convert the checkpoint once in a trusted environment "
            "(load it and call save_pretrained(..., safe_serialization=True)) and load that folder instead."
        )
    raise FileNotFoundError(
        f"{origin} holds no weights: expected model.safetensors (full, encoder, decoder) or "
        "adapter_model.safetensors (lora). Pickled *.bin files are never downloaded."
    )


def resolve_pretrained(path_or_repo_id: str | os.PathLike[str], *, revision: str | None = None) -> Path:
    """Turn a local checkpoint folder or a Hub repo id into a local folder that holds safetensors weights.

    - An existing local directory is returned as is (``revision`` must then be ``None``).
    - Otherwise ``path_or_repo_id`` must be a Hub repo id (``"org/name"``); its snapshot at ``revision``
      (branch, tag or commit; default ``main``) is downloaded into, or found in, the Hub cache. Only configs,
      safetensors, tokenizer files and the card are fetched, never pickled ``*.bin`` weights.

    Raises:
        NotCachedError: offline (``HF_HUB_OFFLINE=1``) or the Hub is unreachable, and the snapshot is not in
            the local Hub cache. The message names the repo, the cache directory and the fix.
        UnsafeWeightsError: the folder holds only pickled weights.
        FileNotFoundError: a path that does not exist, or a folder without any weights.
        ValueError: neither an existing directory nor a valid repo id; or a revision given for a local path.
    """
    name = os.fspath(path_or_repo_id)
    local = Path(name).expanduser()
    if local.is_dir():
        if revision is not None:
            raise ValueError(
                f"revision={revision!r} was given, but {name!r} is a local directory, not a repo id"
            )
        return _check_safetensors(local, f"Local checkpoint {str(local)!r}")
    if local.exists():
        raise ValueError(f"{name!r} is a file; pass the checkpoint directory that contains it")
    if isinstance(path_or_repo_id, os.PathLike) or _looks_like_path(name):
        raise FileNotFoundError(f"No such checkpoint directory: {name!r}")
    try:
        validate_repo_id(name)
    except HFValidationError as err:
        raise ValueError(
            f"{name!r} is neither an existing local directory nor a valid Hub repo id ('org/name'): {err}"
        ) from err

    offline = _offline()
    try:
        snapshot = snapshot_download(
            name, revision=revision, allow_patterns=DOWNLOAD_PATTERNS, local_files_only=offline
        )
    except LocalEntryNotFoundError as err:
        cache = constants.HF_HUB_CACHE
        at = f" at revision {revision!r}" if revision else ""
        if offline:
            why = "HF_HUB_OFFLINE is set, so the Hub is not contacted"
            fix = "run once with network access (unset HF_HUB_OFFLINE) to cache it, or pass a local checkpoint path"
        else:
            why = f"the Hub could not be reached ({err.__class__.__name__})"
            fix = "check your network connection (and HF_ENDPOINT), or pass a local checkpoint path"
        raise NotCachedError(
            f"Checkpoint {name!r}{at} is not in the local Hub cache ({cache}) and {why}. To fix: {fix}."
        ) from err
    return _check_safetensors(Path(snapshot), f"Hub checkpoint {name!r}")
