"""MPO over-parameterisation of students (OPDF, arXiv 2411.06448).

Typical use::

    from hf_moekd.opdf import MPOConstraintLoss, contract, overparameterize

    print(overparameterize(student))        # BERT Q/K/V/attention-output/FFN linears -> MPOLinear (~3x params)
    term = MPOConstraintLoss(args, student, teacher)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                  loss_terms={"mpo_constraint": (0.01, term)}, ...)
    trainer.train()
    contract(student).save_pretrained(out)  # stock checkpoint, no inference overhead

The ``mpo_constraint`` loss term (``extra_loss_terms=["mpo_constraint=0.01"]``) is found through the
``hf_moekd.loss_terms`` entry points; importing this package registers it and the method's card section.
"""
from ..cards import CardMethod, register_card_method
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

register_card_method(CardMethod("opdf", "OPDF: MPO over-parameterised distillation", ("knowledge-distillation", "opdf")))

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
