"""MPO over-parameterisation of students (OPDF, arXiv 2411.06448).

Typical use::

    from hf_moekd.mpo import MPOConstraintLoss, contract, overparameterize

    print(overparameterize(student))        # BERT Q/K/V/attention-output/FFN linears -> MPOLinear (~3x params)
    term = MPOConstraintLoss(args, student, teacher)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                  loss_terms={"mpo_constraint": (0.01, term)}, ...)
    trainer.train()
    contract(student).save_pretrained(out)  # stock checkpoint, no inference overhead

Importing this package registers the ``mpo_constraint`` loss term (``extra_loss_terms=["mpo_constraint=0.01"]``).
"""
from .constraint import MPOConstraintLoss, default_layer_map
from .decomposition import (
    MPODecomposition,
    auto_factors,
    check_factors,
    mpo_contract,
    mpo_decompose,
)
from .layers import MPOLinear
from .model import (
    DEFAULT_TARGET_MODULES,
    MPOConfig,
    OverparameterizedReport,
    contract,
    mpo_modules,
    overparameterize,
)

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "MPOConfig",
    "MPOConstraintLoss",
    "MPODecomposition",
    "MPOLinear",
    "OverparameterizedReport",
    "auto_factors",
    "check_factors",
    "contract",
    "default_layer_map",
    "mpo_contract",
    "mpo_decompose",
    "mpo_modules",
    "overparameterize",
]
