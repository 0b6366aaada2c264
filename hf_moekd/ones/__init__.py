"""OneS ("One Student Knows All Experts Know", arXiv 2201.10890): knowledge gathering (`hf_moekd.gathering`), then
distillation with the MoE as teacher. This package holds the study's report and the method's card section; the
image pipeline is `hf_moekd.recipes.ones`."""
from ..cards import CardMethod, register_card_method
from .report import OneSReport, benefit_preserved


def _results_table(results: dict) -> str | None:
    """The pipeline's comparison table (every model it trained, over seeds), rebuilt from all_results.json."""
    summary = results.get("summary") or {}
    if not {"dense", "moe"} <= set(results.get("per_seed") or {}) & set(summary.get("params") or {}):
        return None
    return OneSReport(args={}, accuracy=results["per_seed"], latency_ms=summary.get("latency_ms", {}),
                      params=summary.get("params", {})).table()


def _recognises(config: dict, results: dict) -> bool:
    return config.get("model_type") == "ones" and ("per_seed" in results or "ones_accuracy" in results)


register_card_method(CardMethod(
    "ones", "OneS: knowledge gathering, then distillation",
    ("knowledge-distillation", "ones", "knowledge-gathering", "mixture-of-experts"),
    recognises=_recognises, results_table=_results_table,
))

__all__ = ["OneSReport", "benefit_preserved"]
