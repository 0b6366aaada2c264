"""Model cards: every saved model folder gets a README.md (Hub metadata; what the model is, how it was made, how well
it does, how to load it) from the templates in `model_cards/`; `hf-moekd card DIR` writes it again from the folder's
config.json and all_results.json."""
from .facts import METHODS, RunFacts, run_facts, training_facts
from .render import CARD_KEY, templates_dir, write_model_card

__all__ = ["CARD_KEY", "METHODS", "RunFacts", "run_facts", "templates_dir", "training_facts", "write_model_card"]
