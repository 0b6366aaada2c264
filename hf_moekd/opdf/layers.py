"""`MPOLinear`: an `nn.Linear` whose weight is stored (and trained) as MPO cores."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .decomposition import auto_factors, check_gauge, mpo_contract, mpo_decompose

__all__ = ["MPOLinear"]


class MPOLinear(nn.Module):
    """Linear layer over-parameterised as a matrix product operator.

    The weight ``W`` (``[out_features, in_features]``, the layout of ``nn.Linear.weight``; rows factorised by
    `row_factors`, columns by `col_factors`) is rebuilt from the trainable cores at every forward pass, so the
    layer trains more parameters than the plain linear it replaces but contracts back to one (`to_linear`) with
    no inference cost. Build it with `MPOLinear.from_linear`.
    """

    def __init__(
        self,
        cores: Sequence[Tensor],
        bias: Tensor | None,
        row_factors: Sequence[int],
        col_factors: Sequence[int],
        central_index: int,
        max_bond: int | None = None,
        truncation_error: float = 0.0,
        requires_grad: bool = True,
        gauge: str = "official",
    ) -> None:
        super().__init__()
        self.cores = nn.ParameterList([nn.Parameter(c.detach().clone(), requires_grad=requires_grad) for c in cores])
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        self.row_factors, self.col_factors = list(row_factors), list(col_factors)
        self.out_features, self.in_features = math.prod(self.row_factors), math.prod(self.col_factors)
        self.central_index = central_index
        self.max_bond = max_bond
        self.truncation_error = truncation_error
        self.gauge = check_gauge(gauge)
        """The gauge the cores were decomposed in (see `mpo_decompose`); the tensor constraint decomposes the
        teacher in the same one."""

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        row_factors: Sequence[int] | None = None,
        col_factors: Sequence[int] | None = None,
        max_bond: int | None = None,
        num_cores: int = 5,
        center: int | None = None,
        gauge: str = "official",
    ) -> "MPOLinear":
        """Decompose `linear.weight` (``[out, in]``); missing factors come from `auto_factors` (``num_cores`` cores,
        or as many as the given factor list). `center` picks the central tensor (default: the middle core), `gauge`
        how the scale is spread over the cores (``"official"`` or ``"center"``, see `mpo_decompose`)."""
        n = len(row_factors or col_factors or [None] * num_cores)
        row_factors = list(row_factors) if row_factors is not None else auto_factors(linear.out_features, n)
        col_factors = list(col_factors) if col_factors is not None else auto_factors(linear.in_features, n)
        dec = mpo_decompose(linear.weight, row_factors, col_factors, max_bond=max_bond, center=center, gauge=gauge)
        return cls(dec.cores, linear.bias, row_factors, col_factors, dec.center, max_bond, dec.truncation_error,
                   requires_grad=linear.weight.requires_grad, gauge=dec.gauge)

    @property
    def auxiliary_indices(self) -> list[int]:
        return [k for k in range(len(self.cores)) if k != self.central_index]

    @property
    def bond_dims(self) -> list[int]:
        return [1] + [core.shape[-1] for core in self.cores]

    def weight(self) -> Tensor:
        """The ``[out_features, in_features]`` weight contracted from the cores (differentiable).

        The contraction runs in the cores' dtype even under autocast (a chain of half-precision products of
        large bonds would lose the weight's precision); `forward`'s `F.linear` is autocast as usual.
        """
        with torch.autocast(self.cores[0].device.type, enabled=False):
            return mpo_contract(list(self.cores))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight(), self.bias)

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain `nn.Linear` with the contracted weight (same device, dtype and trainability)."""
        core = self.cores[0]
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=core.device, dtype=core.dtype)
        linear.weight.copy_(self.weight())
        linear.weight.requires_grad_(core.requires_grad)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
            linear.bias.requires_grad_(self.bias.requires_grad)
        return linear

    @property
    def num_parameters_linear(self) -> int:
        """Parameters of the equivalent plain linear (weight + bias)."""
        return self.out_features * self.in_features + (self.out_features if self.bias is not None else 0)

    @property
    def num_parameters_overparameterized(self) -> int:
        """Parameters of this layer (cores + bias)."""
        return sum(p.numel() for p in self.parameters())

    @property
    def overparameterization_ratio(self) -> float:
        return self.num_parameters_overparameterized / self.num_parameters_linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"row_factors={self.row_factors}, col_factors={self.col_factors}, bonds={self.bond_dims}, "
                f"central_index={self.central_index}, gauge={self.gauge!r}")
