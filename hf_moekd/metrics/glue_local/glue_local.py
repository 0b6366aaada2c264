"""GLUE metrics for `evaluate.load(<this folder>, <task>)`, computed locally (no Hub download)."""

import datasets
import evaluate
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

_DESCRIPTION = (
    "GLUE metrics: accuracy (sst2, rte), accuracy and F1 (mrpc), Matthews correlation (cola), "
    "Pearson and Spearman correlation (stsb)."
)
_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted class ids, or float scores for stsb.
    references: gold class ids, or float scores for stsb.
Returns:
    sst2, rte: {"accuracy"}; mrpc: {"accuracy", "f1"}; cola: {"matthews_correlation"}; stsb: {"pearson", "spearmanr"}.
"""
_CITATION = """@inproceedings{wang2019glue,
  title={{GLUE}: A Multi-Task Benchmark and Analysis Platform for Natural Language Understanding},
  author={Wang, Alex and Singh, Amanpreet and Michael, Julian and Hill, Felix and Levy, Omer and Bowman, Samuel R.},
  booktitle={International Conference on Learning Representations},
  year={2019}
}"""
_CONFIGS = ("sst2", "cola", "mrpc", "rte", "stsb")


class GlueLocal(evaluate.Metric):
    """The GLUE metric of one task, selected by the config name."""

    def _info(self) -> evaluate.MetricInfo:
        if self.config_name not in _CONFIGS:
            raise ValueError(
                f"GLUE metric config {self.config_name!r} is not a task; "
                f"pass config_name as one of: {', '.join(_CONFIGS)}"
            )
        value_type = "float32" if self.config_name == "stsb" else "int64"
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value(value_type), "references": datasets.Value(value_type)}
            ),
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        if self.config_name == "stsb":
            return {
                "pearson": float(pearsonr(references, predictions)[0]),
                "spearmanr": float(spearmanr(references, predictions)[0]),
            }
        if self.config_name == "cola":
            return {"matthews_correlation": float(matthews_corrcoef(references, predictions))}
        scores = {"accuracy": float(accuracy_score(references, predictions))}
        if self.config_name == "mrpc":
            scores["f1"] = float(f1_score(references, predictions))
        return scores
