"""MiniMoE's model-card section (recognised from a saved MiniMoE config)."""
from ..cards import CardMethod, register_card_method
from ..models.minimoe import MiniMoEConfig


def _recognises(config: dict, results: dict) -> bool:
    return config.get("model_type") == MiniMoEConfig.model_type


register_card_method(CardMethod("minimoe", "MiniMoE student", ("knowledge-distillation", "minimoe", "mixture-of-experts"),
                                recognises=_recognises))
