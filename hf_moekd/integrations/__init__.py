"""Integrations with other libraries of the Hugging Face stack (peft)."""
