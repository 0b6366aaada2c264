"""OPDF settings: which linears `overparameterize` turns into MPOs and how (`MPOConfig`)."""
from __future__ import annotations

from dataclasses import dataclass, field

from .decomposition import check_gauge

# BERT-family attention (Q/K/V, output) and feed-forward linears; "output.dense" also covers "attention.output.dense".
DEFAULT_TARGET_MODULES = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


@dataclass
class MPOConfig:
    """How `overparameterize` picks and decomposes linears (peft-style target selection)."""

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Module-name suffixes (a module matches if its name equals one or ends with '.' + it), or a "
                  "regex matched against the full name. Default: BERT's query/key/value, attention output and FFN."},
    )
    factors: dict[int, list[int]] | None = field(
        default=None,
        metadata={"help": "Dimension -> factor list (e.g. {3072: [64, 1, 1, 1, 48]}); other dimensions use "
                  "auto_factors(dim, num_cores)."},
    )
    max_bond: int | None = field(
        default=None,
        metadata={"help": "Truncate every bond to this dimension (None: exact decomposition, the OPDF setting)."},
    )
    num_cores: int = field(default=5, metadata={"help": "Number of cores of automatic factorisations."})
    gauge: str = field(
        default="official",
        metadata={"help": "How the weight's scale is spread over the cores: 'official' (the OPDF code's symmetric "
                  "square-root gauge: the outer cores carry the scale, the singleton middle cores are identities) or "
                  "'center' (all scale in the central tensor, orthonormal auxiliary tensors)."},
    )

    def __post_init__(self) -> None:
        check_gauge(self.gauge)
