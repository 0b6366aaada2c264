"""OneS's model-card sections: gathering alone, and gathering then distillation (with the study's table)."""
from ..cards import CardMethod, register_card_method
from .report import OneSReport

# model_types of the dense image model V-MoE teachers are gathered into (DenseViT; "ones" before its rename)
DENSE_MODEL_TYPES = ("dense_vit", "ones")


def _results_table(results: dict) -> str | None:
    """The pipeline's comparison table (every model it trained, over seeds), rebuilt from all_results.json."""
    summary = results.get("summary") or {}
    if not {"dense", "moe"} <= set(results.get("per_seed") or {}) & set(summary.get("params") or {}):
        return None
    return OneSReport(args={}, accuracy=results["per_seed"], latency_ms=summary.get("latency_ms", {}),
                      params=summary.get("params", {})).table()


def _recognises(config: dict, results: dict) -> bool:
    return config.get("model_type") in DENSE_MODEL_TYPES and ("per_seed" in results or "ones_accuracy" in results)


register_card_method(CardMethod("gathering", "OneS knowledge gathering (no training)",
                                ("knowledge-gathering", "mixture-of-experts")))
register_card_method(CardMethod(
    "ones", "OneS: knowledge gathering, then distillation",
    ("knowledge-distillation", "ones", "knowledge-gathering", "mixture-of-experts"),
    recognises=_recognises, results_table=_results_table,
))
