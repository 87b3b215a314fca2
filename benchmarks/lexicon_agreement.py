"""Agreement of the shipped radiology lexicon with ROCO's own concept annotations (validation split).

ROCO ships, per image, UMLS CUIs extracted automatically from the caption (``cuis.txt``, noisy) and stemmed
caption keywords (``keywords.txt``).  For every lexicon concept this script compares "the lexicon finds the
concept in the caption" (any mention, negated or not, because ROCO's extraction ignores negation) with:

* **CUI agreement**: "ROCO's ``cuis.txt`` lists the concept's CUI" -> precision, recall, F1 over images;
* **best ROCO CUI**: the CUI in ``cuis.txt`` whose image set best matches the lexicon's (F1), which shows what
  ROCO's extractor emits for the same surface forms when it does not use the canonical UMLS id;
* **keyword agreement**: "ROCO's keywords contain one of the concept's single-word terms", as written or with one
  trailing "s" dropped (ROCO's keywords are stemmed that way: "pelvis" -> "pelvi").

Usage::

    python benchmarks/lexicon_agreement.py --roco /work/shared/roco [--json out.json] [--markdown]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from medblip_peft.evaluation import RadiologyLexicon, default_lexicon


def _read_tsv(path: Path) -> dict[str, list[str]]:
    """``ID<TAB>...`` rows -> ``{ID: [non-empty fields]}``."""
    rows = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        key, _, rest = line.partition("\t")
        rows[key] = [f.strip() for f in rest.split("\t") if f.strip()]
    return rows


def _prf(found: set[str], gold: set[str]) -> dict[str, float | int]:
    tp = len(found & gold)
    p = tp / len(found) if found else float("nan")
    r = tp / len(gold) if gold else float("nan")
    f = 2 * tp / (len(found) + len(gold)) if found or gold else float("nan")
    return {"tp": tp, "found": len(found), "gold": len(gold), "precision": p, "recall": r, "f1": f}


def _stem(word: str) -> str:
    return word[:-1] if word.endswith("s") and len(word) > 3 else word


def agreement(roco_root: Path, lexicon: RadiologyLexicon) -> dict:
    """Per-concept and pooled agreement figures (see the module docstring)."""
    folder = roco_root / "validation" / "radiology"
    captions = {k: " ".join(v) for k, v in _read_tsv(folder / "captions.txt").items()}
    cuis = {k: set(v) for k, v in _read_tsv(folder / "cuis.txt").items()}
    keywords = {k: {w.lower() for w in v} for k, v in _read_tsv(folder / "keywords.txt").items()}
    ids = sorted(captions)

    found: dict[str, set[str]] = {c: set() for c in lexicon.concepts}
    negated = Counter()
    for image in ids:
        for m in lexicon.extract(captions[image]):
            found[m.concept].add(image)
            negated[m.concept] += m.negated
    by_cui: dict[str, set[str]] = {}
    for image in ids:
        for cui in cuis.get(image, ()):
            by_cui.setdefault(cui, set()).add(image)

    rows = []
    # (concept, image) pairs per group and kind, pooled into micro-averaged agreement figures.
    pairs: dict[tuple[str, str], tuple[set, set]] = {}

    def pool(group: str, kind: str, concept_id: str, hits: set[str], gold: set[str]) -> None:
        for key in ((group, kind), ("all", kind)):
            found_pairs, gold_pairs = pairs.setdefault(key, (set(), set()))
            found_pairs |= {(concept_id, i) for i in hits}
            gold_pairs |= {(concept_id, i) for i in gold}

    for concept in lexicon.concepts.values():
        hits = found[concept.id]
        row: dict = {"concept": concept.id, "group": concept.group, "cui": concept.cui, "images": len(hits)}
        row["negated_mentions"] = negated[concept.id]
        if concept.cui and concept.cui in by_cui:
            row["cui_agreement"] = _prf(hits, by_cui[concept.cui])
            pool(concept.group, "cui", concept.id, hits, by_cui[concept.cui])
        # The ROCO CUI that best matches this concept's image set (only CUIs co-occurring with it are candidates).
        candidates = Counter(c for i in hits for c in cuis.get(i, ()))
        # Ties are common (ROCO often lists several CUIs for one word): prefer the concept's own CUI, then the
        # lowest id, so that the report is deterministic.
        best = max(
            sorted(candidates), key=lambda c: (_prf(hits, by_cui[c])["f1"], c == concept.cui), default=None
        )
        row["best_roco_cui"] = None if best is None else {"cui": best, **_prf(hits, by_cui[best])}
        words = {w for t in concept.terms if " " not in t for w in (t, _stem(t))}
        if words:
            gold = {i for i in ids if keywords.get(i, set()) & words}
            row["keyword_agreement"] = _prf(hits, gold)
            pool(concept.group, "keyword", concept.id, hits, gold)
        rows.append(row)
    with_cui = [r for r in rows if r["cui"]]
    return {
        "n_images": len(ids),
        "n_concepts": len(rows),
        "n_concepts_with_cui": len(with_cui),
        "n_cuis_listed_by_roco": sum("cui_agreement" in r for r in with_cui),
        "pooled": {f"{group}/{kind}": _prf(*sets) for (group, kind), sets in sorted(pairs.items())},
        "concepts": rows,
    }


def _fmt(x: float) -> str:
    return "–" if x != x else f"{x:.2f}"  # NaN -> dash


def to_markdown(report: dict) -> str:
    """A table per concept plus the pooled figures, as pasted into ``docs/metrics.md``."""
    lines = [
        f"Images: {report['n_images']}; concepts: {report['n_concepts']} "
        f"({report['n_concepts_with_cui']} with a CUI, {report['n_cuis_listed_by_roco']} of those CUIs used by ROCO).",
        "",
        "| group / compared with | (concept, image) pairs found | ROCO pairs | P | R | F1 |",
        "|---|---|---|---|---|---|",
    ]
    for key, a in report["pooled"].items():
        lines.append(
            f"| {key} | {a['found']} | {a['gold']} | {_fmt(a['precision'])} | {_fmt(a['recall'])} | {_fmt(a['f1'])} |"
        )
    lines += [
        "",
        "| concept | group | CUI | images | negated | CUI P | CUI R | CUI F1 | best ROCO CUI (F1) | kw F1 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["concepts"]:
        cui = r.get("cui_agreement")
        best = r["best_roco_cui"]
        kw = r.get("keyword_agreement")
        cells = [
            r["concept"],
            r["group"],
            r["cui"] or "–",
            str(r["images"]),
            str(r["negated_mentions"]),
            *((_fmt(cui["precision"]), _fmt(cui["recall"]), _fmt(cui["f1"])) if cui else ("n/a",) * 3),
            f"{best['cui']} ({best['f1']:.2f})" if best else "–",
            _fmt(kw["f1"]) if kw else "–",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--roco", type=Path, default=Path("/work/shared/roco"), help="ROCO root (original layout)"
    )
    parser.add_argument("--lexicon", type=Path, default=None, help="lexicon JSON (default: the shipped one)")
    parser.add_argument("--json", type=Path, default=None, help="also write the full report as JSON here")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table instead of JSON")
    args = parser.parse_args()
    lexicon = RadiologyLexicon.from_json(args.lexicon) if args.lexicon else default_lexicon()
    report = agreement(args.roco, lexicon)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1), encoding="utf-8")
    print(
        to_markdown(report)
        if args.markdown
        else json.dumps({k: v for k, v in report.items() if k != "concepts"})
    )


if __name__ == "__main__":
    main()
