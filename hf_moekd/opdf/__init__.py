"""MPO over-parameterisation of students (OPDF, arXiv 2411.06448).

Typical use::

    from hf_moekd.opdf import MPOConstraintLoss, contract_overparameterized, overparameterize

    print(overparameterize(student))        # BERT Q/K/V/attention-output/FFN linears -> MPOLinear (~3x params)
    term = MPOConstraintLoss(student, teacher)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                  loss_terms={"mpo_constraint": (0.01, term)}, ...)
    trainer.train()
    contract_overparameterized(student).save_pretrained(out)  # stock checkpoint, no inference overhead

The ``mpo_constraint`` loss term (``extra_loss_terms=["mpo_constraint=0.01"]``) is found through the
``hf_moekd.loss_terms`` entry points; importing this package registers it and the method's card section.
"""
from . import card as _card  # noqa: F401  (registers the card section)
from .losses import MPOConstraintLoss, default_layer_map
from .decomposition import (
    GAUGES,
    MPODecomposition,
    auto_factors,
    check_factors,
    mpo_contract,
    mpo_decompose,
)
from .layers import MPOLinear
from .config import DEFAULT_TARGET_MODULES, MPOConfig
from .model import (
    OverparameterizedReport,
    contract_overparameterized,
    mpo_modules,
    overparameterize,
)


__all__ = [
    "DEFAULT_TARGET_MODULES",
    "GAUGES",
    "MPOConfig",
    "MPOConstraintLoss",
    "MPODecomposition",
    "MPOLinear",
    "OverparameterizedReport",
    "auto_factors",
    "check_factors",
    "contract_overparameterized",
    "default_layer_map",
    "mpo_contract",
    "mpo_decompose",
    "mpo_modules",
    "overparameterize",
]
