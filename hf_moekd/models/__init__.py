"""Model architectures shipped with hf_moekd (one folder per model, transformers-style)."""
