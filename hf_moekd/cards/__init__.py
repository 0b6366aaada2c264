"""Model cards: every saved model folder gets a README.md (Hub metadata; what the model is, how it was made, how well
it does, how to load it) from the templates in `model_cards/`; `hf-moekd card DIR` writes it again from the folder's
config.json and all_results.json. The card renders what it is given: methods register their own section
(`register_card_method`)."""
from .facts import RunFacts, is_moe, run_facts
from .registry import CardMethod, card_method, card_methods, check_methods, register_card_method
from .render import CARD_KEY, templates_dir, write_model_card

__all__ = ["CARD_KEY", "CardMethod", "RunFacts", "card_method", "card_methods", "check_methods", "is_moe",
           "register_card_method", "run_facts", "templates_dir", "write_model_card"]
