"""OPDF's model-card section."""
from ..cards import CardMethod, register_card_method

register_card_method(CardMethod("opdf", "OPDF: MPO over-parameterised distillation", ("knowledge-distillation", "opdf")))
