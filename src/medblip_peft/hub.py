"""Share checkpoints on the Hugging Face Hub and load them back by repo id.

Everything goes through ``huggingface_hub``: its cache layout, its token lookup (``HF_TOKEN`` or ``hf auth
login``) and its offline switch (``HF_HUB_OFFLINE=1``). Weights travel as safetensors only; nothing here
downloads or uploads a pickle, and ``trust_remote_code`` is never involved.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from huggingface_hub import (
    CommitInfo,
    CommitOperationAdd,
    HfApi,
    ModelCard,
    constants,
    get_token,
    snapshot_download,
)
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError
from huggingface_hub.utils import validate_repo_id

from medblip_peft.templates.card import METADATA_FILE, looks_like_path, make_model_card, read_json

try:  # the HTTP client of huggingface_hub >= 2 (httpx2), of 1.x (httpx)
    from httpx2 import TransportError
except ImportError:  # pragma: no cover - depends on the installed huggingface_hub
    from httpx import TransportError

__all__ = [
    "NotCachedError",
    "PushError",
    "UnsafeWeightsError",
    "files_to_push",
    "make_model_card",
    "push_to_hub",
    "resolve_pretrained",
]

logger = logging.getLogger(__name__)

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
    # huggingface_hub reads HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) once, at import; also honour a variable
    # set later in the process, so that "offline" never silently means "try the network".
    env = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").upper()
    return constants.HF_HUB_OFFLINE or env in {"1", "ON", "YES", "TRUE"}


def _check_safetensors(folder: Path, origin: str) -> Path:
    """Return ``folder`` if it holds safetensors weights; refuse pickle-only or weightless folders."""
    if any(folder.glob("*.safetensors")):
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
    if isinstance(path_or_repo_id, os.PathLike) or looks_like_path(name):
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


# ---------------------------------------------------------------------------------------------------------
# Push
# ---------------------------------------------------------------------------------------------------------

# What a published checkpoint holds: top-level weights, configs and tokenizer files, plus explanation
# images. checkpoints/, logs/, pickles and anything else in the output folder stay local.
PUSH_PATTERNS = ("*.safetensors", "*.json", "*.txt", "*.model", "tokenizer*")
TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
RETRY_BASE_WAIT_S = 2.0  # doubled after every failed attempt


class PushError(OSError):
    """A push was refused or failed. The local folder is never modified by a push.

    An ``OSError``, like the connection and HTTP errors it stands for, so that callers (and the CLI) that
    handle I/O failures handle it too.
    """


def files_to_push(folder: str | os.PathLike[str]) -> list[str]:
    """The paths, relative to ``folder``, that :func:`push_to_hub` uploads (besides the generated README.md)."""
    root = Path(folder)
    top = [p for p in root.iterdir() if p.is_file() and any(p.match(pattern) for pattern in PUSH_PATTERNS)]
    images = list((root / "explanations").glob("*.png"))
    return sorted(p.relative_to(root).as_posix() for p in top + images)


def _is_transient(err: Exception) -> bool:
    if isinstance(err, TransportError):
        return True
    response = getattr(err, "response", None)
    return (
        isinstance(err, HfHubHTTPError) and response is not None and response.status_code in TRANSIENT_STATUS
    )


def _explain(err: Exception, repo_id: str, endpoint: str, attempts: int) -> str:
    """A one-paragraph reason for a failed push; never includes request headers (and so never the token)."""
    if isinstance(err, TransportError):
        return (
            f"Could not reach the Hub at {endpoint} ({type(err).__name__}) after {attempts} attempt(s). "
            "Check the network connection, proxies and HF_ENDPOINT."
        )
    status = (
        err.response.status_code if isinstance(err, HfHubHTTPError) and err.response is not None else None
    )
    reasons = {
        401: "The Hub rejected the credentials (401 Unauthorized). Set a valid token in HF_TOKEN or run "
        "`hf auth login`; pushing needs a token with write access.",
        403: f"This token may not write to {repo_id!r} (403 Forbidden). Use a token with write access to that "
        "namespace, or push to your own namespace.",
        404: f"Repository {repo_id!r} was not found, or is not visible with this token (404).",
    }
    if status in reasons:
        return reasons[status]
    if status in TRANSIENT_STATUS:
        return f"The Hub at {endpoint} kept failing (HTTP {status}) after {attempts} attempt(s); try again later."
    return f"The Hub refused the push (HTTP {status}): {str(err).splitlines()[0]}"


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def push_to_hub(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool = True,
    revision: str | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    create_pr: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    card: ModelCard | str | None = None,
    max_retries: int = 3,
) -> CommitInfo:
    """Publish a checkpoint folder to the Hub as one commit, with a generated model card.

    Creates the repository if needed (**private** unless ``private=False``; an existing repository keeps its
    visibility), creates the branch ``revision`` if it does not exist, and commits :func:`files_to_push` plus
    ``README.md`` (``card``, default :func:`make_model_card`; a README.md already in the folder, such as
    peft's placeholder, is not used). ``create_pr=True`` opens a pull request instead of committing to the
    branch. The token comes from ``token``, else ``HF_TOKEN``, else ``hf auth login``; it is never printed,
    logged or written. Transient failures (connection errors, HTTP 408/429/5xx) are retried ``max_retries``
    times with exponential backoff. ``endpoint`` overrides ``HF_ENDPOINT`` (e.g. a private Hub).

    Returns ``huggingface_hub.CommitInfo`` (``.commit_url``, ``.oid``, ``.pr_url``).

    Raises:
        PushError: offline mode, no token, a token leaked into a file, or the Hub refused or failed the push.
            The local folder is left untouched in every case.
        UnsafeWeightsError: the folder holds pickled weights only.
        ValueError: an invalid repo id.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"No such checkpoint directory: {str(root)!r}")
    _check_safetensors(root, f"Checkpoint {str(root)!r}")
    validate_repo_id(repo_id)
    if _offline():
        raise PushError("HF_HUB_OFFLINE is set, so nothing can be pushed. Unset it and run the push again.")
    api = HfApi(endpoint=endpoint, token=token)
    secret = token or get_token()
    if not secret:
        raise PushError("No Hugging Face token found: set HF_TOKEN or run `hf auth login` (a write token).")

    readme = str(card if card is not None else make_model_card(root, repo_id=repo_id)).encode("utf-8")
    paths = files_to_push(root)
    # Refuse before anything leaves the machine if the token made its way into a text file.
    for name, data in [
        ("README.md", readme),
        *((p, (root / p).read_bytes()) for p in paths if p.endswith((".json", ".txt"))),
    ]:
        if secret.encode() in data:
            raise PushError(
                f"{name} contains your Hugging Face token; refusing to upload it. Remove it first."
            )
    meta = read_json(root / METADATA_FILE)
    strategy = meta.get("strategy") or ("lora" if (root / "adapter_config.json").is_file() else "full")

    def operations() -> list[CommitOperationAdd]:  # fresh objects per attempt: huggingface_hub mutates them
        ops = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(root / p)) for p in paths]
        return [*ops, CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=readme)]

    def attempt() -> CommitInfo:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != "main" and not revision.startswith("refs/"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        return api.create_commit(
            repo_id,
            operations=operations(),
            commit_message=commit_message or f"Upload {strategy} radiology captioner (medblip-peft)",
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
        )

    logger.info("Pushing %d files to %s (%s)", len(paths) + 1, repo_id, "private" if private else "public")
    return _with_retries(attempt, repo_id, api.endpoint, root, secret, max_retries)


def _with_retries(
    call: Callable[[], CommitInfo], repo_id: str, endpoint: str, root: Path, secret: str, max_retries: int
) -> CommitInfo:
    for attempt in range(max_retries + 1):
        try:
            return call()
        except (HfHubHTTPError, TransportError) as err:
            if not _is_transient(err) or attempt == max_retries:
                message = _explain(err, repo_id, endpoint, attempt + 1)
                raise PushError(
                    _scrub(f"{message} The local folder {root} was not modified.", secret)
                ) from err
            wait = RETRY_BASE_WAIT_S * 2**attempt
            logger.warning("Push to %s failed (%s); retrying in %.0f s", repo_id, type(err).__name__, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")  # the loop either returns or raises
