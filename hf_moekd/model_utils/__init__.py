"""Model plumbing shared by distillation, gathering, analysis and the methods: capturing block internals
(`capture`), per-expert outputs of MoE layers (`experts`), students built from a teacher (`students`), the Auto class
of a head (`auto`) and parameter counts (`parameters`)."""
from .parameters import count_parameters, numel

__all__ = ["count_parameters", "numel"]
