"""Entity-level seqeval metric for `evaluate.load(<this folder>)`, computed locally (no Hub download)."""

import datasets
import evaluate
from seqeval import scheme as seqeval_scheme
from seqeval.metrics import accuracy_score, classification_report

_DESCRIPTION = "Entity-level precision, recall and F1 (plus token accuracy) of tag sequences, computed with seqeval."
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of predicted tag sequences, e.g. [["B-PER", "I-PER", "O"]].
    references: list of gold tag sequences of the same lengths.
    suffix: tags are written "PER-B" instead of "B-PER".
    scheme: strict-mode scheme name (IOB1, IOB2, IOE1, IOE2, IOBES, BILOU); None keeps seqeval's default chunking.
    mode: "strict" to score only entities that follow `scheme` exactly.
    sample_weight: optional per-sequence weights.
    zero_division: value (or "warn") for undefined precision/recall.
Returns:
    overall_precision, overall_recall, overall_f1, overall_accuracy, and per entity type
    {"precision", "recall", "f1", "number"}.
"""
_CITATION = """@misc{seqeval,
  title={{seqeval}: A Python framework for sequence labeling evaluation},
  url={https://github.com/chakki-works/seqeval},
  author={Hiroki Nakayama},
  year={2018}
}"""
_SCHEMES = ("IOB1", "IOB2", "IOE1", "IOE2", "IOBES", "BILOU")


class SeqevalLocal(evaluate.Metric):
    """seqeval's entity-level scores in the layout of the Hub `seqeval` metric."""

    def _info(self) -> evaluate.MetricInfo:
        tags = datasets.Sequence(datasets.Value("string"))
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": tags, "references": tags}),
        )

    def _compute(
        self, predictions, references, suffix=False, scheme=None, mode=None, sample_weight=None, zero_division="warn"
    ) -> dict:
        if scheme is not None:
            if scheme not in _SCHEMES:
                raise ValueError(f"Unknown seqeval scheme {scheme!r}; pass one of: {', '.join(_SCHEMES)}")
            scheme = getattr(seqeval_scheme, scheme)
        report = classification_report(
            y_true=references,
            y_pred=predictions,
            suffix=suffix,
            output_dict=True,
            scheme=scheme,
            mode=mode,
            sample_weight=sample_weight,
            zero_division=zero_division,
        )
        overall = report.pop("micro avg")
        report.pop("macro avg")
        report.pop("weighted avg")
        scores: dict = {
            entity: {
                "precision": float(s["precision"]),
                "recall": float(s["recall"]),
                "f1": float(s["f1-score"]),
                "number": int(s["support"]),
            }
            for entity, s in report.items()
        }
        scores.update(
            overall_precision=float(overall["precision"]),
            overall_recall=float(overall["recall"]),
            overall_f1=float(overall["f1-score"]),
            overall_accuracy=float(accuracy_score(y_true=references, y_pred=predictions)),
        )
        return scores
