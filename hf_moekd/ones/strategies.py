r"""Knowledge-gathering merge strategies: one layer's experts -> one dense FFN (OneS, arXiv 2201.10890).

Experts are held in a model-independent form, :class:`ExpertWeights`: ``in_proj`` is a list of
``[E, I, H]`` tensors (gated FFNs such as SwiGLU have two, gate then up; plain FFNs one),
``out_proj`` is ``[E, H, I]``, biases are optional. Every strategy returns a :class:`DenseFFN`
with the same layout minus the expert axis. Strategies live in a registry
(:data:`MERGE_STRATEGIES`, :func:`register_strategy`) and are called through :func:`merge_experts`,
which can first align the experts' hidden units (``align=True``).

Strategies (``usage`` = each expert's share of routed tokens, from calibration data):

* ``average``: :math:`W = \frac1E \sum_e W_e` for every tensor.
* ``weighted_average``: :math:`W = \sum_e w_e W_e`, usage weights :math:`w_e` (normalised; uniform without
  usage). What ``svd`` keeping every component gives, bit for bit; the default of ``gather_experts``.
* ``sum``: :math:`W = \sum_e W_e` (the paper's "summation"; not scale-preserving: the output of an
  FFN of E identical experts grows ~E^2 for ReLU/E^3 for SwiGLU, meant to be fixed by distillation).
* ``top_experts``: the ``k`` most used experts, averaged with weights ``usage_e / sum_k usage``; without
  usage every expert counts the same (a warning says so) and the first ``k`` are taken. Called ``topk``
  before (still accepted, with a FutureWarning): it keeps whole experts, which is not the paper's Top-KG.
* ``top_kg`` (Top-KG under **our stated reading**: the paper's section defining Top-KG and SVD-KG, arXiv
  2201.10890, is not readable offline; only its summaries are, "Top-KG and SVD-KG aim to select the most
  crucial knowledge from each expert"). Both readings select per expert, then merge with the usage weights:

  - ``granularity="unit"`` (default): expert ``e`` keeps its ``K_e`` most important hidden units, importance
    :math:`s_{e,j} = w_e \prod_p \lVert [W^{in}_{p,e}[j,:], b^{in}_{p,e}[j]] \rVert \cdot
    \lVert W^{out}_e[:, j] \rVert` (product over the in-projections: gate and up of a gated FFN, the one in
    of a plain FFN; in-biases, if any, count as one more input weight). The kept units are concatenated into
    one dense FFN, each expert's out-columns times :math:`w_e`, so every kept unit computes exactly what it
    computed in its expert: :math:`\mathrm{dense}(x) = \sum_e w_e f_e^{K_e}(x)`, with :math:`f_e^{K_e}` the
    expert restricted to its kept units (out-bias: the usage-weighted sum, once). ``units=None``: the dense
    width ``I`` shared equally, ``K_e = I // E``, the remainder one unit each to the most used experts;
    experts no calibration token was routed to (usage 0) get none. ``units=K``: ``K`` per (used) expert,
    ``K * E <= I``, the rest of the width zero units. Ranking is within an expert, so :math:`w_e` only
    decides the remainder and the out-scale. ``E = 1`` returns the expert unchanged.
  - ``granularity="weight"``: each expert matrix keeps its ``round(keep_fraction * numel)`` (at least 1)
    largest-magnitude entries (the rest zero), then the usage-weighted average; biases are averaged
    unpruned. ``keep_fraction=None``: ``1 / E`` (the experts' kept weights add up to one matrix's).
    ``keep_fraction=1`` is ``weighted_average``.

  ``svd`` below follows the same reading (per expert: its top singular components).
* ``svd`` (SVD-KG as described in the paper's abstract-level summaries: keep each expert's principal
  components and merge them into one matrix; the exact formula and rank are our choice, the paper's text
  not being available). Per projection, with :math:`W_e = U_e S_e V_e^\top`:

  .. math:: W = \sum_e w_e\, U_e[:, :r]\, \mathrm{diag}(S_e[:r])\, V_e[:, :r]^\top

  (``method="expert"``, the default). Biases are merged by the same weighted average. The default rank
  ``r = min(I, H) // E`` (at least 1) shares one dense matrix's rank equally among the experts: the E
  truncated experts fit in one matrix without competing for directions, and each loses only its weakest
  components. ``r = min(I, H)`` keeps every component and is exactly ``weighted_average``; identical
  experts are reproduced exactly only at full rank.
  Alternatives, for comparison: ``method="joint"`` (Sub-MoE-like: a basis ``B`` shared by all
  experts, the top-r singular vectors on the smaller side of the experts stacked along the larger
  side, :math:`W = (\sum_e w_e W_e) B B^\top` or :math:`B B^\top \sum_e w_e W_e`) and
  ``method="merged"`` (:math:`W = [\sum_e w_e W_e]_r`, best rank-r approximation of the average).

  Why ``expert``: on 8 synthetic experts (power-law spectra; shared base + rank-16 expert-specific
  part + noise; H=64, I=128, SwiGLU, Mixtral top-2 routing on 4096 random tokens), the relative
  error of the dense FFN's output against the MoE layer's was, at r = 8 / 16 / 32,
  expert 0.934 / 0.924 / 0.913, merged 0.935 / 0.925 / 0.915, joint 0.937 / 0.928 / 0.919
  (full rank: 0.906); ``expert`` was lowest or tied (within 4e-4) at every rank and noise level
  tried, and it also has the lowest weight-space error to the weighted average. No truncation beat
  full rank before distillation: for the best start before distillation use ``weighted_average``.

  ``torch.svd_lowrank`` replaces the exact SVD when ``r <= min(I, H) / 8`` (``lowrank=None``; set
  ``lowrank`` to force either), with ``q = r + lowrank_oversample`` (16) sampled directions and
  ``lowrank_niter`` (2) power iterations: on 2816x1024 matrices at r = 64 its rank-r reconstruction
  error ||W - U S V^T|| / ||W|| was within 0.3-0.8% of the exact SVD's (Gaussian, s_k ~ k^-0.5 and
  k^-1 spectra; the earlier q = 2r, 4 iterations: within 0.01-0.2%, at ~2x the time: see
  ``benchmarks/gather_memory.py`` for a Mixtral-8x7B layer). Experts are decomposed one at a time,
  so memory stays ~one expert in float32; their factors are multiplied back in one matmul.

``align=True`` (any strategy): each expert's hidden units are permuted to match a reference expert
(the most used one, else expert 0) by Hungarian matching
(:func:`scipy.optimize.linear_sum_assignment`) on the cosine similarity of the per-unit features
``[in rows of every in_proj; in_bias; out_proj column]``; the permutation is applied consistently to
``in_proj`` rows, ``in_bias`` and ``out_proj`` columns, so every expert computes the same function.
"""
from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, replace
from typing import Callable, TypeVar

import torch
from torch import Tensor

__all__ = [
    "ExpertWeights", "DenseFFN", "MERGE_STRATEGIES", "register_strategy", "get_strategy",
    "merge_experts", "align_experts", "validate_options", "SVD_METHODS", "DEFAULT_STRATEGY", "expert_spectra",
    "default_svd_rank", "GRANULARITIES", "top_kg_importance", "check_top_kg_options",
]


_FFN = TypeVar("_FFN", bound="FFNTensors")


@dataclass
class FFNTensors:
    """The tensors of an FFN or of a stack of them: ``in_proj`` (one matrix, or gate and up), ``out_proj``, optional
    biases."""

    in_proj: list[Tensor]
    out_proj: Tensor
    in_bias: list[Tensor] | None = None
    out_bias: Tensor | None = None

    def map(self: _FFN, fn: Callable[[Tensor], Tensor]) -> _FFN:
        """Apply ``fn`` to every tensor."""
        return type(self)(
            [fn(w) for w in self.in_proj], fn(self.out_proj),
            None if self.in_bias is None else [fn(b) for b in self.in_bias],
            None if self.out_bias is None else fn(self.out_bias),
        )


@dataclass
class ExpertWeights(FFNTensors):
    """One layer's experts: ``in_proj`` list of ``[E, I, H]``, ``out_proj`` ``[E, H, I]``, optional biases (every tensor
    has the expert axis first)."""

    def __post_init__(self) -> None:
        e, h, i = self.out_proj.shape
        for w in self.in_proj:
            if tuple(w.shape) != (e, i, h):
                raise ValueError(f"in_proj shape {tuple(w.shape)} does not match out_proj {tuple(self.out_proj.shape)}: expected {(e, i, h)}")
        if self.in_bias is not None and (len(self.in_bias) != len(self.in_proj) or any(tuple(b.shape) != (e, i) for b in self.in_bias)):
            raise ValueError(f"in_bias must be {len(self.in_proj)} tensor(s) of shape {(e, i)}")
        if self.out_bias is not None and tuple(self.out_bias.shape) != (e, h):
            raise ValueError(f"out_bias shape {tuple(self.out_bias.shape)} != {(e, h)}")

    @property
    def num_experts(self) -> int:
        return self.out_proj.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.out_proj.shape[1]

    @property
    def intermediate_size(self) -> int:
        return self.out_proj.shape[2]

    def select(self, idx: Tensor) -> "ExpertWeights":
        return self.map(lambda t: t[idx])

    def permute_units(self, perms: Tensor) -> "ExpertWeights":
        """Reorder hidden units: ``perms[e, j]`` is the old unit placed at position ``j`` of expert ``e``."""
        rows = lambda t: torch.take_along_dim(t, perms[..., None] if t.dim() == 3 else perms, dim=1)  # noqa: E731
        return replace(
            self,
            in_proj=[rows(w) for w in self.in_proj],
            in_bias=None if self.in_bias is None else [rows(b) for b in self.in_bias],
            out_proj=torch.take_along_dim(self.out_proj, perms[:, None, :], dim=2),
        )


@dataclass
class DenseFFN(FFNTensors):
    """A merged FFN: ``in_proj`` list of ``[I, H]``, ``out_proj`` ``[H, I]``, optional biases."""

    def scale_output(self, c: float) -> "DenseFFN":
        """Multiply the FFN's output by ``c`` (scales ``out_proj`` and ``out_bias``)."""
        return replace(self, out_proj=self.out_proj * c, out_bias=None if self.out_bias is None else self.out_bias * c)

    def scale_input(self, c: float) -> "DenseFFN":
        """The FFN of ``c`` times its input (scales ``in_proj``; biases unchanged)."""
        return replace(self, in_proj=[w * c for w in self.in_proj])

    def concat(self, other: "DenseFFN") -> "DenseFFN":
        """Side-by-side FFN computing ``self(x) + other(x)`` (hidden units concatenated)."""
        if len(self.in_proj) != len(other.in_proj):
            raise ValueError("cannot concatenate a gated FFN with a plain one")
        if (self.in_bias is None) != (other.in_bias is None):
            raise ValueError("cannot concatenate FFNs of which only one has input biases")
        out_bias = self.out_bias if other.out_bias is None else (other.out_bias if self.out_bias is None else self.out_bias + other.out_bias)
        return DenseFFN(
            [torch.cat([a, b]) for a, b in zip(self.in_proj, other.in_proj)],
            torch.cat([self.out_proj, other.out_proj], dim=1),
            None if self.in_bias is None else [torch.cat([a, b]) for a, b in zip(self.in_bias, other.in_bias)],
            out_bias,
        )

    def to(self, dtype: torch.dtype) -> "DenseFFN":
        return self.map(lambda t: t.to(dtype))


MergeFn = Callable[..., DenseFFN]
MERGE_STRATEGIES: dict[str, MergeFn] = {}
STREAMING = frozenset({"average", "sum", "weighted_average", "top_experts"})
"""Strategies that read the experts one at a time (a layer of per-expert checkpoint tensors is never held whole)."""
DEFAULT_STRATEGY = "weighted_average"  # of merge_experts, gather_experts (GatheringConfig), hf-moekd gather


def register_strategy(name: str) -> Callable[[MergeFn], MergeFn]:
    """Decorator adding ``fn(experts, *, usage=None, **options) -> DenseFFN`` to the registry."""

    def deco(fn: MergeFn) -> MergeFn:
        MERGE_STRATEGIES[name] = fn
        return fn

    return deco


def get_strategy(name: str) -> MergeFn:
    if name not in MERGE_STRATEGIES:
        raise ValueError(f"unknown gathering strategy {name!r}; choose one of {sorted(MERGE_STRATEGIES)}")
    return MERGE_STRATEGIES[name]


def _weights(experts: ExpertWeights, usage: Tensor | None) -> Tensor:
    if usage is None:
        return torch.full((experts.num_experts,), 1.0 / experts.num_experts)
    usage = torch.as_tensor(usage, dtype=torch.float32).flatten()
    if usage.numel() != experts.num_experts or (usage < 0).any() or usage.sum() <= 0:
        raise ValueError(f"usage must be {experts.num_experts} non-negative numbers with a positive sum, got {usage.tolist()}")
    return usage / usage.sum()


def _mix(t: Tensor, w: Tensor, each: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """``sum_e w_e each(t[e])`` in float32, one expert at a time (no float32 copy of the whole stack)."""
    out = torch.zeros(t.shape[1:], dtype=torch.float32, device=t.device)
    for e in range(t.shape[0]):
        if w[e] != 0:
            m = t[e].to(torch.float32)
            out.add_(m if each is None else each(m), alpha=float(w[e]))
    return out


def _combine(experts: ExpertWeights, w: Tensor, each: Callable[[Tensor], Tensor] | None = None) -> DenseFFN:
    """``sum_e w_e * tensor_e`` for every tensor; ``each`` transforms every expert's matrices (not biases) first."""
    return DenseFFN(
        [_mix(x, w, each) for x in experts.in_proj], _mix(experts.out_proj, w, each),
        None if experts.in_bias is None else [_mix(b, w) for b in experts.in_bias],
        None if experts.out_bias is None else _mix(experts.out_bias, w),
    )


@register_strategy("average")
def average(experts: ExpertWeights, *, usage: Tensor | None = None) -> DenseFFN:
    """Uniform mean of every expert tensor (``usage`` is ignored)."""
    return _combine(experts, torch.full((experts.num_experts,), 1.0 / experts.num_experts))


@register_strategy("sum")
def summation(experts: ExpertWeights, *, usage: Tensor | None = None) -> DenseFFN:
    """Sum of every expert tensor (``usage`` is ignored)."""
    return _combine(experts, torch.ones(experts.num_experts))


@register_strategy("weighted_average")
def weighted_average(experts: ExpertWeights, *, usage: Tensor | None = None) -> DenseFFN:
    """Usage-weighted mean of every expert tensor (uniform without ``usage``): ``svd`` at full rank."""
    return _combine(experts, _weights(experts, usage))


@register_strategy("top_experts")
def top_experts(experts: ExpertWeights, *, usage: Tensor | None = None, k: int = 2) -> DenseFFN:
    """Usage-weighted average of the ``k`` most used experts."""
    if not 1 <= k <= experts.num_experts:
        raise ValueError(f"top_experts needs 1 <= k <= {experts.num_experts} (number of experts), got k={k}")
    if usage is None:
        warnings.warn("top_experts gathering without calibration data: every expert counts as equally used, "
                      "the first k are merged uniformly; pass calibration_dataset for router frequencies", stacklevel=2)
    w = _weights(experts, usage)
    idx = torch.sort(w, descending=True, stable=True).indices[:k]
    sel = w[idx]
    if sel.sum() <= 0:
        sel = torch.ones_like(sel)
    return _combine(experts.select(idx), sel / sel.sum())


@register_strategy("topk")
def topk(experts: ExpertWeights, *, usage: Tensor | None = None, k: int = 2) -> DenseFFN:
    """Former name of :func:`top_experts` (deprecated)."""
    warnings.warn("gathering strategy `topk` is renamed `top_experts` (it keeps the k most used whole experts; the "
                  "paper's Top-KG, as we read it, is `top_kg`)", FutureWarning, stacklevel=2)
    return top_experts(experts, usage=usage, k=k)


# --------------------------------------------------------------------------- Top-KG
GRANULARITIES = ("unit", "weight")  # what top_kg keeps from each expert (module docstring)


def check_top_kg_options(granularity: str, units: int | None, keep_fraction: float | None) -> None:
    """One error line for a bad ``top_kg`` setting (the checks that need no expert shapes)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown top_kg granularity {granularity!r}; choose one of {list(GRANULARITIES)}")
    if units is not None and (isinstance(units, bool) or not isinstance(units, int) or units < 1):
        raise ValueError(f"top_kg units must be an integer >= 1, got {units!r}")
    if keep_fraction is not None and (isinstance(keep_fraction, bool) or not isinstance(keep_fraction, (int, float))
                                      or not 0 < keep_fraction <= 1):
        raise ValueError(f"top_kg keep_fraction must be a number in (0, 1], got {keep_fraction!r}")
    if granularity == "unit" and keep_fraction is not None:
        raise ValueError("top_kg keep_fraction is for granularity 'weight'; granularity 'unit' keeps `units` per expert")
    if granularity == "weight" and units is not None:
        raise ValueError("top_kg units is for granularity 'unit'; granularity 'weight' keeps `keep_fraction` of each matrix")


def top_kg_importance(experts: ExpertWeights, usage: Tensor | None = None) -> Tensor:
    """``[E, I]``: each hidden unit's importance, ``usage_e * prod_p ||in row (+ in bias)|| * ||out column||``
    (one expert at a time in float32, as :func:`_mix`)."""
    w = _weights(experts, usage)
    scores = []
    for e in range(experts.num_experts):
        score = experts.out_proj[e].to(torch.float32).norm(dim=0)
        for p, stack in enumerate(experts.in_proj):
            rows = stack[e].to(torch.float32)
            if experts.in_bias is not None:
                rows = torch.cat([rows, experts.in_bias[p][e].to(torch.float32)[:, None]], dim=1)
            score = score * rows.norm(dim=1)
        scores.append(score * w[e])
    return torch.stack(scores)


def _units_per_expert(w: Tensor, width: int, units: int | None) -> list[int]:
    """Hidden units each expert keeps: ``units`` per used expert, or ``width`` shared equally by the used experts
    (usage > 0) with the remainder one each to the most used."""
    used = torch.sort(w, descending=True, stable=True).indices[: int((w > 0).sum())].tolist()
    if units is not None and units * len(used) > width:
        fit = f"use units <= {width // len(used)}" if width >= len(used) else "leave units unset"
        raise ValueError(f"top_kg units={units} x {len(used)} used experts = {units * len(used)} hidden units exceed "
                         f"the dense width {width}: {fit} (None: {width} // {len(used)} each, the remainder to the "
                         "most used experts)")
    counts = [0] * len(w)
    for rank, e in enumerate(used):
        counts[e] = units if units is not None else width // len(used) + (rank < width % len(used))
    return counts


def _keep_largest(fraction: float) -> Callable[[Tensor], Tensor]:
    """A matrix -> the matrix with only its ``round(fraction * numel)`` (>= 1) largest-magnitude entries."""

    def keep(m: Tensor) -> Tensor:
        flat = m.flatten()
        idx = torch.topk(flat.abs(), max(1, round(fraction * flat.numel())), sorted=False).indices
        return torch.zeros_like(flat).index_copy_(0, idx, flat[idx]).view_as(m)

    return keep


@register_strategy("top_kg")
def top_kg(experts: ExpertWeights, *, usage: Tensor | None = None, granularity: str = "unit",
           units: int | None = None, keep_fraction: float | None = None) -> DenseFFN:
    """Top-KG, our stated reading (the paper's definition is not readable offline; module docstring):
    ``granularity="unit"`` concatenates each expert's ``units`` most important hidden units, out-columns scaled by
    usage (exact for the kept units); ``"weight"`` averages, usage-weighted, each expert's matrices with only their
    largest ``keep_fraction`` of entries kept."""
    check_top_kg_options(granularity, units, keep_fraction)
    w = _weights(experts, usage)
    if granularity == "weight":
        return _combine(experts, w, _keep_largest(1 / experts.num_experts if keep_fraction is None else keep_fraction))
    width = experts.intermediate_size
    score = top_kg_importance(experts, usage)
    kept = [(e, torch.sort(torch.sort(score[e], descending=True, stable=True).indices[:n]).values)
            for e, n in enumerate(_units_per_expert(w, width, units)) if n]
    rows = lambda t: torch.cat([t[e, idx].to(torch.float32) for e, idx in kept])  # noqa: E731
    out = torch.cat([experts.out_proj[e][:, idx].to(torch.float32) * w[e] for e, idx in kept], dim=1)
    ffn = DenseFFN([rows(t) for t in experts.in_proj], out,
                   None if experts.in_bias is None else [rows(b) for b in experts.in_bias],
                   None if experts.out_bias is None else _mix(experts.out_bias, w))
    if (pad := width - out.shape[1]) > 0:  # zero units (units * E < I): they add nothing to the output
        zeros = DenseFFN([t.new_zeros(pad, t.shape[1]) for t in ffn.in_proj], out.new_zeros(out.shape[0], pad),
                         None if ffn.in_bias is None else [b.new_zeros(pad) for b in ffn.in_bias])
        ffn = ffn.concat(zeros)
    return ffn


# --------------------------------------------------------------------------- SVD-KG
@dataclass(frozen=True)
class LowRank:
    """Settings of ``torch.svd_lowrank``: ``q = rank + oversample`` sampled directions, ``niter`` power iterations."""

    oversample: int = 16
    niter: int = 2


def _svd_topr(m: Tensor, r: int, lowrank: LowRank | None) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``r`` singular triplets ``U [m, r], S [r], V [n, r]`` of a matrix (randomized with ``lowrank``)."""
    if lowrank is not None:
        u, s, v = torch.svd_lowrank(m, q=min(r + lowrank.oversample, *m.shape), niter=lowrank.niter)
        return u[:, :r], s[:r], v[:, :r]
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return u[:, :r], s[:r], vh[:r].T


def _svd_expert(stack: Tensor, w: Tensor, r: int, lowrank: LowRank | None) -> Tensor:
    """``sum_e w_e [W_e]_r`` (each expert truncated to its top-r components), one decomposition at a time; the
    factors are joined into one ``[m, E r] @ [E r, n]`` product (one large matmul instead of E)."""
    left, right = [], []
    for e in range(stack.shape[0]):
        if w[e] != 0:
            u, s, v = _svd_topr(stack[e].to(torch.float32), r, lowrank)
            left.append(u * (s * w[e]))
            right.append(v)
    return torch.cat(left, 1) @ torch.cat(right, 1).T


def _svd_joint(stack: Tensor, w: Tensor, r: int, lowrank: LowRank | None) -> Tensor:
    """Average projected on the top-r basis shared by all experts (Sub-MoE-like joint SVD).

    The basis is the top-r singular vectors, on the smaller side, of the experts stacked along the
    larger side (each scaled by sqrt(w_e)); computed as eigenvectors of the Gram matrix.
    """
    right = stack.shape[-1] <= stack.shape[-2]
    side = stack.shape[-1] if right else stack.shape[-2]
    gram = torch.zeros(side, side, dtype=torch.float64, device=stack.device)
    for e in range(stack.shape[0]):
        x = stack[e].to(torch.float64)
        gram.add_(x.T @ x if right else x @ x.T, alpha=float(w[e]))
    basis = torch.linalg.eigh(gram).eigenvectors[:, -r:].to(torch.float32)
    mean = _mix(stack, w)
    return (mean @ basis) @ basis.T if right else basis @ (basis.T @ mean)


def _svd_merged(stack: Tensor, w: Tensor, r: int, lowrank: LowRank | None) -> Tensor:
    """Best rank-r approximation of the weighted average."""
    u, s, v = _svd_topr(_mix(stack, w), r, lowrank)
    return (u * s) @ v.T


SVD_METHODS: dict[str, Callable[[Tensor, Tensor, int, LowRank | None], Tensor]] = {
    "expert": _svd_expert, "joint": _svd_joint, "merged": _svd_merged,
}


def default_svd_rank(experts: ExpertWeights) -> int:
    """``svd``'s rank when none is given: ``min(I, H) // E`` (at least 1), one dense matrix's rank shared by the experts."""
    return max(1, min(experts.hidden_size, experts.intermediate_size) // experts.num_experts)


@register_strategy("svd")
def svd(experts: ExpertWeights, *, usage: Tensor | None = None, rank: int | None = None,
        method: str = "expert", lowrank: bool | None = None, lowrank_oversample: int = 16,
        lowrank_niter: int = 2) -> DenseFFN:
    """SVD-KG: merge each expert's top-``rank`` singular components, usage-weighted (see module docstring);
    ``rank=None``: :func:`default_svd_rank`. ``lowrank``: randomized SVD (None: when ``rank <= min(I, H) / 8``)
    with ``q = rank + lowrank_oversample`` and ``lowrank_niter`` power iterations."""
    if method not in SVD_METHODS:
        raise ValueError(f"unknown svd method {method!r}; choose one of {sorted(SVD_METHODS)}")
    w = _weights(experts, usage)
    merged = weighted_average(experts, usage=usage)  # full rank; biases always merged this way
    max_rank = min(experts.hidden_size, experts.intermediate_size)
    rank = default_svd_rank(experts) if rank is None else rank
    if rank == max_rank:
        return merged
    shape = (experts.intermediate_size, experts.hidden_size)
    if not isinstance(rank, int) or rank < 1 or rank > max_rank:
        raise ValueError(f"svd rank {rank} is invalid for expert matrices of shape {shape[0]}x{shape[1]}: "
                         f"use 1 <= rank <= {max_rank} (max rank = weighted_average), or rank=None for "
                         f"{default_svd_rank(experts)} (max rank / experts)")
    use_low = rank * 8 <= max_rank if lowrank is None else lowrank
    low = LowRank(lowrank_oversample, lowrank_niter) if use_low else None
    fn = SVD_METHODS[method]
    return replace(merged, in_proj=[fn(t, w, rank, low) for t in experts.in_proj],
                   out_proj=fn(experts.out_proj, w, rank, low))


def expert_spectra(experts: ExpertWeights) -> dict[str, Tensor]:
    """Singular values (descending, float32, no singular vectors) of every expert matrix, ``[E, min(I, H)]`` per
    projection: ``gate``/``up`` (gated FFNs) or ``in``, and ``out``. One expert at a time, as the merges run."""
    names = ["gate", "up"] if len(experts.in_proj) == 2 else [f"in{i or ''}" for i in range(len(experts.in_proj))]
    stacks = dict(zip(names, experts.in_proj)) | {"out": experts.out_proj}
    return {name: torch.stack([torch.linalg.svdvals(m.to(torch.float32)) for m in stack])
            for name, stack in stacks.items()}


# --------------------------------------------------------------------------- alignment
def _unit_features(experts: ExpertWeights) -> Tensor:
    """Per-hidden-unit features ``[E, I, F]``: in rows, in biases, out columns, unit-normalised."""
    parts = [w.to(torch.float32) for w in experts.in_proj] + [experts.out_proj.to(torch.float32).mT]
    parts += [b.to(torch.float32)[..., None] for b in experts.in_bias or []]
    return torch.nn.functional.normalize(torch.cat(parts, dim=-1), dim=-1)


def align_experts(experts: ExpertWeights, reference: int = 0) -> ExpertWeights:
    """Permute every expert's hidden units to best match expert ``reference`` (Hungarian matching on cosine)."""
    from scipy.optimize import linear_sum_assignment

    feats = _unit_features(experts)
    perms = torch.arange(experts.intermediate_size).repeat(experts.num_experts, 1)
    for e in range(experts.num_experts):
        if e != reference:
            sim = (feats[reference] @ feats[e].T).double().numpy()
            _, cols = linear_sum_assignment(sim, maximize=True)
            perms[e] = torch.as_tensor(cols)
    return experts.permute_units(perms)


def validate_options(strategy: str, options: dict) -> None:
    """Raise a clear ValueError if ``strategy`` is unknown or does not take one of ``options``."""
    accepted = set(inspect.signature(get_strategy(strategy)).parameters) - {"experts", "usage"}
    if bad := sorted(set(options) - accepted):
        raise ValueError(f"strategy {strategy!r} does not take option(s) {bad}; it takes {sorted(accepted) or 'none'}")


def merge_experts(experts: ExpertWeights, strategy: str = DEFAULT_STRATEGY, *, usage: Tensor | None = None,
                  align: bool = False, **options) -> DenseFFN:
    """Merge one layer's experts with a registered strategy; ``align`` first matches hidden units across experts."""
    validate_options(strategy, options)
    fn = get_strategy(strategy)
    if align:
        ref = 0 if usage is None else int(torch.as_tensor(usage).argmax())
        experts = align_experts(experts, reference=ref)
    return fn(experts, usage=usage, **options)
