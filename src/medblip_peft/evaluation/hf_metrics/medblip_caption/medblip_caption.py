"""`evaluate` module wrapping :func:`medblip_peft.evaluation.score_captions`.

Load it offline by path (nothing is fetched from the Hub)::

    import evaluate
    from medblip_peft.evaluation import caption_metric_path

    metric = evaluate.load(caption_metric_path())
    metric.compute(predictions=["axial ct of the chest"], references=[["Axial CT of the chest."]])

and combine it with other modules via ``evaluate.combine([metric, ...])``.  Keyword arguments of ``compute``
other than ``predictions`` and ``references`` are passed to ``score_captions`` (``metrics``, ``normalize``,
``tokenizer``, ``bertscore``, ``n_resamples``, ...).
"""

from __future__ import annotations

from typing import Any

import datasets
import evaluate

from medblip_peft.evaluation import DEFAULT_METRICS, score_captions

_CITATION = """\
@inproceedings{pelka2018roco,
  title={Radiology Objects in COntext (ROCO): a multimodal image dataset},
  author={Pelka, Obioma and Koitka, Sven and R{\\"u}ckert, Johannes and Nensa, Felix and Friedrich, Christoph M.},
  booktitle={MICCAI LABELS workshop},
  year={2018}
}
"""

_DESCRIPTION = """\
Radiology caption metrics from medblip-peft: BLEU-1..4, METEOR, ROUGE-L and CIDEr-D computed by pycocoevalcap
(PTB tokenizer when Java is available), optional BERTScore, and a lexicon-based clinical concept metric
(modality, anatomy, laterality, plane, sequence, findings with negation), with optional bootstrap intervals.
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions: list of generated captions, one per image.
    references: list of reference captions, or list of lists of references per image.
    metrics: metric families (default: bleu, meteor, rouge, cider, clinical; add "bertscore" to opt in).
    normalize: "default" or "imageclef".
    bertscore: dict of BERTScore options (model_type, num_layers, idf, rescale_with_baseline, ...).
    n_resamples: bootstrap resamples for confidence intervals (0 = none).
Returns:
    A flat dict of scores (bleu_1 ... bleu_4, meteor, rouge_l, cider, bertscore_*, clinical_*), metadata
    (n_images, tokenizer, normalize, skipped) and, with n_resamples > 0, a "ci" dict.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MedblipCaption(evaluate.Metric):
    """Caption metrics for radiology images (see medblip_peft.evaluation.score_captions)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # Two accepted layouts: several references per image, or exactly one.
            features=[
                datasets.Features(
                    {
                        "predictions": datasets.Value("string"),
                        "references": datasets.Sequence(datasets.Value("string")),
                    }
                ),
                datasets.Features(
                    {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
                ),
            ],
            reference_urls=["https://github.com/tylin/coco-caption", "https://github.com/Tiiiger/bert_score"],
        )

    def _compute(
        self, predictions: list[str], references: list[Any], metrics: Any = DEFAULT_METRICS, **kwargs: Any
    ) -> dict[str, Any]:
        return score_captions(predictions, references, metrics=metrics, **kwargs)
