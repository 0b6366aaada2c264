"""MoDE's model-card section."""
from ..cards import CardMethod, register_card_method

register_card_method(CardMethod("mode", "MoDE: mutual distillation among the experts",
                                ("mode", "mutual-distillation", "mixture-of-experts")))
