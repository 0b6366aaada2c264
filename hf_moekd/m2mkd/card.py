"""m2mKD's model-card section."""
from ..cards import CardMethod, register_card_method

register_card_method(CardMethod("m2mkd", "m2mKD: module-to-module distillation",
                                ("knowledge-distillation", "m2mkd", "mixture-of-experts")))
