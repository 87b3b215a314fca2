"""Caption normalisation presets and the COCO-caption tokenizer (PTB via Java, or a documented fallback)."""

from __future__ import annotations

import re
import shutil
import warnings
from collections.abc import Callable, Sequence
from functools import lru_cache

__all__ = ["NORMALIZERS", "java_available", "normalize_captions", "tokenize_pairs"]

_DIGITS = re.compile(r"\d+(?:[.,]\d+)*")
_PUNCT = re.compile(r"[^\w\s]|_")
_SPACES = re.compile(r"\s+")


def _identity(text: str) -> str:
    return text


def _imageclef(text: str) -> str:
    # ImageCLEFmedical caption convention: case, numbers and punctuation carry no credit.
    text = _DIGITS.sub(" number ", text.lower())
    text = _PUNCT.sub(" ", text)
    return _SPACES.sub(" ", text).strip()


#: Registry of normalisation presets, applied to predictions and references before tokenisation.
#: ``"default"`` changes nothing (the PTB tokenizer still lowercases and drops punctuation tokens);
#: ``"imageclef"`` lowercases, replaces every number by the word ``number`` and removes punctuation.
NORMALIZERS: dict[str, Callable[[str], str]] = {"default": _identity, "imageclef": _imageclef}


def normalize_captions(texts: Sequence[str], preset: str = "default") -> list[str]:
    """Apply a normalisation preset from :data:`NORMALIZERS` to each text."""
    try:
        fn = NORMALIZERS[preset]
    except KeyError:
        raise ValueError(
            f"unknown `normalize` preset {preset!r}; choose one of {sorted(NORMALIZERS)}"
        ) from None
    return [fn(t) for t in texts]


# Unicode quotes and dashes that PTB first normalises to `` '' -- and then drops with its punctuation list.
_UNICODE_PUNCT = frozenset('"\u2010\u2018\u2019\u201c\u201d\u2013\u2014')


@lru_cache(maxsize=1)
def _ptb_punctuation() -> frozenset[str]:
    # Imported lazily: the clinical metric alone must not require pycocoevalcap.
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

    return frozenset(PUNCTUATIONS) | _UNICODE_PUNCT


# Fallback: words (keeping internal hyphens, slashes and decimal points as PTB does), clitics ("'s"), symbols.
_FALLBACK_TOKEN = re.compile(r"\w+(?:[-./]\w+)*|'\w+|\.\.\.|--|[^\w\s]")


# PTB escapes brackets; pycocoevalcap lowercases *after* that, so "-lrb-" no longer matches its punctuation list
# ("-LRB-") and brackets survive as tokens.  The fallback reproduces that quirk.
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}


def _fallback_tokenize(text: str) -> str:
    """Approximate PTB tokenisation without Java: lowercase, split off punctuation, drop PTB's punctuation set.

    It differs from Stanford's tokenizer on clitics ("don't" stays one token), quotes, and abbreviations that
    PTB keeps with their period ("CT." at the end of a caption stays ``ct.`` under PTB); scores are close to,
    but not equal to, the COCO convention, which is why the result records ``tokenizer="regex"``.
    """
    tokens = _FALLBACK_TOKEN.findall(text.replace("\n", " ").lower())
    drop = _ptb_punctuation()
    return " ".join(_BRACKETS.get(t, t) for t in tokens if t not in drop)


def _ptb_tokenize(texts: list[str]) -> list[str]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # PTBTokenizer writes one caption per line and pairs output lines with captions by zip(), replacing only
    # "\n": a caption containing "\r" (or another line boundary) silently shifts every later caption onto the
    # wrong image.  Line boundaries become spaces here, and a sentinel last line proves the alignment held.
    payload = {i: [{"caption": " ".join(t.splitlines())}] for i, t in enumerate(texts)}
    payload[len(texts)] = [{"caption": "sentinel"}]
    out = PTBTokenizer().tokenize(payload)
    if len(out) != len(payload) or out[len(texts)] != ["sentinel"]:
        raise RuntimeError("PTBTokenizer output is misaligned with its input captions")
    return [out[i][0] for i in range(len(texts))]


def java_available() -> bool:
    """Whether a ``java`` executable is on PATH (needed by the PTB tokenizer and METEOR)."""
    # Looked up at call time through the module so tests can monkeypatch ``shutil.which``.
    return shutil.which("java") is not None


def tokenize_pairs(
    predictions: Sequence[str], references: Sequence[Sequence[str]], tokenizer: str = "auto"
) -> tuple[dict[int, list[str]], dict[int, list[str]], str]:
    """Tokenise predictions and references in one pass, in pycocoevalcap's ``{image: [captions]}`` layout.

    Args:
        predictions: One caption per image.
        references: One or more reference captions per image.
        tokenizer: ``"ptb"`` (Stanford PTB tokenizer; needs Java), ``"regex"`` (pure-Python fallback) or
            ``"auto"`` (PTB when Java is on PATH, otherwise the fallback with a warning).

    Returns:
        ``(gts, res, tokenizer_used)`` where ``gts[i]`` lists image ``i``'s tokenised references and
        ``res[i]`` holds its single tokenised prediction.
    """
    if tokenizer not in ("auto", "ptb", "regex"):
        raise ValueError(f"`tokenizer` must be 'auto', 'ptb' or 'regex', got {tokenizer!r}")
    if tokenizer == "auto":
        tokenizer = "ptb" if java_available() else "regex"
        if tokenizer == "regex":
            warnings.warn(
                "Java was not found on PATH: captions are tokenised with the pure-Python regex fallback instead "
                "of the PTB tokenizer, so lexical scores only approximate the COCO convention. Install Java "
                "(e.g. `apt-get install default-jre-headless`) for exact pycocoevalcap parity.",
                UserWarning,
                stacklevel=3,
            )
    elif tokenizer == "ptb" and not java_available():
        raise RuntimeError("tokenizer='ptb' needs Java on PATH; install a JRE or pass tokenizer='regex'")
    # Flatten so that a single tokenizer call (one JVM start) covers every caption.
    flat = [*predictions, *(r for refs in references for r in refs)]
    tokens = _ptb_tokenize(flat) if tokenizer == "ptb" else [_fallback_tokenize(t) for t in flat]
    res = {i: [tokens[i]] for i in range(len(predictions))}
    gts: dict[int, list[str]] = {}
    pos = len(predictions)
    for i, refs in enumerate(references):
        gts[i] = tokens[pos : pos + len(refs)]
        pos += len(refs)
    return gts, res, tokenizer
