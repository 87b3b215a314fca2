"""A transparent radiology lexicon: surface forms → concepts, with NegEx-style negation of findings.

The shipped lexicon (``data/radiology_lexicon.json``) is plain data a reader can audit: each concept has a group
(modality, anatomy, laterality, plane, sequence, finding), a UMLS CUI where known, and its surface forms.
Extraction is deterministic and model-free:

1. Tokenise into lowercase words and the punctuation marks that end a negation scope (hyphens and slashes split
   words, so "X-ray" and "x ray" are the same; "3.5" stays one token).
2. Match terms greedily, longest first, so "computed tomography" is one ``ct`` mention and "non contrast"
   wins over "contrast".  Regular plurals of every term are generated when the lexicon is loaded.
3. Negation (Chapman et al. 2001, NegEx): a pre-negation trigger ("no", "without", "negative for", …) negates
   findings in the next ``window`` words, a post-negation trigger ("… was ruled out") the previous ``window``
   words; a scope stops at a terminator (punctuation, "but", "however", …).  Pseudo-triggers ("no change")
   are consumed first so they negate nothing.  Only groups marked ``negatable`` (findings) are negated: in "no
   fracture of the left femur" the side and the bone are still described.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

__all__ = ["Concept", "Mention", "RadiologyLexicon", "default_lexicon"]

_TOKEN = re.compile(r"\d+(?:\.\d+)+|[^\W_]+|[.;:!?()\[\]]")
_PUNCT = frozenset(".;:!?()[]")


@dataclass(frozen=True)
class Concept:
    """One lexicon entry."""

    id: str
    group: str
    label: str
    cui: str | None
    terms: tuple[str, ...]


@dataclass(frozen=True)
class Mention:
    """A concept found in a text: token span ``[start, end)``, the matched words, and whether it is negated."""

    concept: str
    group: str
    start: int
    end: int
    text: str
    negated: bool


def _plurals(word: str) -> set[str]:
    """Regular English plurals of a (last) word; over-generation is harmless because matching is exact."""
    out = {word + "s", word + "es"}
    for singular, plural in (("y", "ies"), ("is", "es"), ("us", "i"), ("um", "a")):
        if word.endswith(singular) and len(word) > len(singular) + 2:
            out.add(word[: -len(singular)] + plural)
    return out


def _words(text: str) -> tuple[str, ...]:
    return tuple(t.lower() for t in _TOKEN.findall(text))


class _PhraseIndex:
    """Greedy longest-match lookup of token tuples, mapping each phrase to a tuple of labels."""

    def __init__(self, phrases: Mapping[tuple[str, ...], Iterable[str]]) -> None:
        self._table = {k: tuple(sorted(set(v))) for k, v in phrases.items() if k}
        self._max_len = max((len(k) for k in self._table), default=0)

    def matches(self, tokens: Sequence[str]) -> list[tuple[int, int, tuple[str, ...]]]:
        """Non-overlapping ``(start, end, labels)`` spans, scanning left to right, longest phrase first."""
        out = []
        i = 0
        while i < len(tokens):
            for n in range(min(self._max_len, len(tokens) - i), 0, -1):
                labels = self._table.get(tuple(tokens[i : i + n]))
                if labels:
                    out.append((i, i + n, labels))
                    i += n
                    break
            else:
                i += 1
        return out


class RadiologyLexicon:
    """Concept extractor built from a lexicon JSON file (see the module docstring for the algorithm)."""

    def __init__(self, data: Mapping) -> None:
        self.name: str = data.get("name", "lexicon")
        self.version: str = str(data.get("version", ""))
        self.groups: dict[str, dict] = dict(data["groups"])
        self.concepts: dict[str, Concept] = {}
        lower: dict[tuple[str, ...], list[str]] = {}
        cased: dict[tuple[str, ...], list[str]] = {}
        for entry in data["concepts"]:
            if entry["group"] not in self.groups:
                raise ValueError(f"concept {entry['id']!r} has unknown group {entry['group']!r}")
            concept = Concept(
                entry["id"], entry["group"], entry["label"], entry.get("cui"), tuple(entry["terms"])
            )
            self.concepts[concept.id] = concept
            for term in entry["terms"]:
                words = _words(term)
                for variant in {words, *((*words[:-1], p) for p in _plurals(words[-1]))}:
                    lower.setdefault(variant, []).append(concept.id)
            for term in entry.get("cased_terms", ()):
                cased.setdefault(tuple(_TOKEN.findall(term)), []).append(concept.id)
        self._lower = _PhraseIndex(lower)
        self._cased = _PhraseIndex(cased)
        neg = data["negation"]
        self.window: int = int(neg["window"])
        # One index for all cues; a phrase may be both a pre- and a post-trigger ("ruled out").
        cues: dict[tuple[str, ...], list[str]] = {}
        for kind in ("pre", "post", "pseudo", "terminators"):
            for phrase in neg[kind]:
                cues.setdefault(_words(phrase), []).append(kind)
        self._cues = _PhraseIndex(cues)

    @classmethod
    def from_json(cls, path: str | Path) -> RadiologyLexicon:
        """Load a lexicon from a JSON file with the same layout as the shipped one."""
        return cls(json.loads(Path(path).read_text(encoding="utf-8")))

    def concepts_in(self, group: str) -> list[Concept]:
        """Concepts of one group, in lexicon order."""
        return [c for c in self.concepts.values() if c.group == group]

    def _negated_positions(self, tokens: Sequence[str]) -> set[int]:
        """Token positions inside the scope of a negation trigger."""
        cues = self._cues.matches(tokens)
        stops = {i for i, t in enumerate(tokens) if t in _PUNCT}
        for start, end, kinds in cues:
            if "terminators" in kinds:
                stops.update(range(start, end))
        negated: set[int] = set()
        for start, end, kinds in cues:
            if "pseudo" in kinds:
                continue
            if "pre" in kinds:
                negated.update(self._scope(range(end, len(tokens)), stops))
            if "post" in kinds:
                negated.update(self._scope(range(start - 1, -1, -1), stops))
        return negated

    def _scope(self, positions: Iterable[int], stops: set[int]) -> list[int]:
        scope = []
        for pos in positions:
            if pos in stops or len(scope) == self.window:
                break
            scope.append(pos)
        return scope

    def extract(self, text: str) -> list[Mention]:
        """All concept mentions in ``text``, in order, each flagged as negated or affirmed."""
        raw = _TOKEN.findall(text)
        tokens = [t.lower() for t in raw]
        negated = self._negated_positions(tokens)
        spans = self._lower.matches(tokens)
        taken = {i for s, e, _ in spans for i in range(s, e)}
        # Case-sensitive terms only fill gaps the case-insensitive pass left (e.g. "US" but not "us").
        spans += [m for m in self._cased.matches(raw) if not taken.intersection(range(m[0], m[1]))]
        mentions = []
        for start, end, ids in sorted(spans):
            for cid in ids:
                group = self.concepts[cid].group
                is_negated = self.groups[group].get("negatable", False) and start in negated
                mentions.append(Mention(cid, group, start, end, " ".join(raw[start:end]), bool(is_negated)))
        return mentions

    def concept_sets(self, text: str) -> dict[str, frozenset[str]]:
        """Affirmed concept ids per group (every group present, possibly empty)."""
        found: dict[str, set[str]] = {g: set() for g in self.groups}
        for m in self.extract(text):
            if not m.negated:
                found[m.group].add(m.concept)
        return {g: frozenset(s) for g, s in found.items()}


@lru_cache(maxsize=1)
def default_lexicon() -> RadiologyLexicon:
    """The lexicon shipped with the package (``medblip_peft/evaluation/data/radiology_lexicon.json``)."""
    text = resources.files(__package__).joinpath("data/radiology_lexicon.json").read_text(encoding="utf-8")
    return RadiologyLexicon(json.loads(text))
