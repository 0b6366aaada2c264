"""Matrix product operator (MPO) decomposition of a weight matrix by sequential SVDs, and its contraction.

A matrix ``W`` of shape ``(I, J)`` with ``I = i_1 ... i_n`` and ``J = j_1 ... j_n`` is reshaped to
``(i_1, ..., i_n, j_1, ..., j_n)``, its axes interleaved to ``(i_1, j_1, ..., i_n, j_n)``, and written as a chain
of cores ``T_k[r_{k-1}, i_k, j_k, r_k]`` with ``r_0 = r_n = 1``. Without truncation the decomposition is exact.

An MPO is defined only up to invertible matrices on its bonds (the *gauge*); `mpo_decompose` offers two:

- ``gauge="official"`` (default), the symmetric square-root gauge of the official OPDF code
  (``compress_tools/Matrix2MPO.py``, ``MPO.matrix2mpo``): at every bond ``k`` the cores left of it contract to
  ``U_k sqrt(S_k)`` and the cores right of it to ``sqrt(S_k) V_k^T``, where ``U_k S_k V_k^T`` is the SVD of ``W``
  unfolded at that bond. The outer cores carry the scale; with OPDF's singleton middle factors
  (``[64, 1, 1, 1, 48]``) every bond splits ``W`` the same way and the middle cores are identities (the official
  code gets +-1 on the diagonal from unfixed SVD signs; here signs are fixed, so they are +1).
- ``gauge="center"``: *mixed-canonical* form around the central tensor ``T_c`` (``c = n // 2`` by default): the
  cores left of it are left-isometries, the cores right of it right-isometries, and all singular values end up in
  the central tensor (the MPOP convention "central tensor = information, auxiliary tensors = bases").

Singular vectors are sign-fixed, so equal weights always give equal cores; that is what makes cores of two models
comparable at all (see `hf_moekd.opdf.losses`), provided both use the same gauge.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import torch
from torch import Tensor

GAUGES = ("official", "center")
"""`mpo_decompose` gauges: the official OPDF symmetric square-root gauge, or all scale in the central tensor."""

__all__ = ["GAUGES", "MPODecomposition", "auto_factors", "check_factors", "check_gauge", "mpo_contract", "mpo_decompose"]


@dataclass
class MPODecomposition:
    """The cores of an MPO decomposition (``cores[k]`` has shape ``[r_{k-1}, i_k, j_k, r_k]``)."""

    cores: list[Tensor]
    truncation_error: float = 0.0
    """Relative Frobenius error ``||W - contract(cores)|| / ||W||`` caused by `max_bond` (0.0 without truncation)."""
    center: int = 0
    """Index of the central tensor; the other cores are the auxiliary tensors."""
    gauge: str = "official"
    """How the scale is spread over the cores (one of `GAUGES`, see the module docstring)."""

    @property
    def bond_dims(self) -> list[int]:
        return [self.cores[0].shape[0]] + [core.shape[-1] for core in self.cores]

    @property
    def num_parameters(self) -> int:
        return sum(core.numel() for core in self.cores)


def auto_factors(dim: int, n: int = 5) -> list[int]:
    """OPDF-style factorisation of `dim` into `n` factors: two balanced outer factors, singleton middle factors.

    The larger factor comes first, e.g. ``3072 -> [64, 1, 1, 1, 48]``, ``768 -> [32, 1, 1, 1, 24]``,
    ``384 -> [24, 1, 1, 1, 16]``. The singleton middle factors make the middle cores large ``r x r`` matrices.
    """
    if dim < 1 or n < 2:
        raise ValueError(f"auto_factors needs dim >= 1 and n >= 2, got dim={dim}, n={n}.")
    small = max(d for d in range(1, math.isqrt(dim) + 1) if dim % d == 0)
    return [dim // small] + [1] * (n - 2) + [small]


def check_factors(shape: Sequence[int], row_factors: Sequence[int], col_factors: Sequence[int]) -> tuple[list[int], list[int]]:
    """Validate a factorisation of a ``(rows, cols)`` shape; returns the factors as lists of ints."""
    rows, cols = (list(map(int, f)) for f in (row_factors, col_factors))
    if len(shape) != 2:
        raise ValueError(f"MPO decomposes matrices; got a tensor of shape {tuple(shape)}.")
    if len(rows) != len(cols) or not rows:
        raise ValueError(
            f"row_factors {rows} and col_factors {cols} must be non-empty and of the same length (one pair per core); "
            f"e.g. auto_factors({shape[0]}) = {auto_factors(shape[0])} and auto_factors({shape[1]}) = {auto_factors(shape[1])}."
        )
    for arg, what, dim, factors in (("row_factors", "row", shape[0], rows), ("col_factors", "column", shape[1], cols)):
        if any(f < 1 for f in factors) or math.prod(factors) != dim:
            raise ValueError(
                f"{arg} {factors} (product {math.prod(factors)}) do not factorise the {what} dimension {dim}; "
                f"use positive factors whose product is {dim}, e.g. auto_factors({dim}, n={len(factors)}) = "
                f"{auto_factors(dim, len(factors)) if len(factors) >= 2 else [dim]}."
            )
    return rows, cols


def _svd(mat: Tensor, max_bond: int | None, fix: str) -> tuple[Tensor, Tensor, Tensor, bool]:
    """Thin SVD, truncated to `max_bond`; signs fixed so the largest entry of each `fix` ('u' or 'v') vector is > 0."""
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    ref = u if fix == "u" else vh.mT
    sign = torch.sign(ref.gather(0, ref.abs().argmax(0, keepdim=True))).squeeze(0)
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    u, vh = u * sign, vh * sign[:, None]
    cut = max_bond is not None and s.numel() > max_bond
    if cut:
        u, s, vh = u[:, :max_bond], s[:max_bond], vh[:max_bond]
    return u, s, vh, cut


def check_gauge(gauge: str) -> str:
    """`gauge` if it is one of `GAUGES`, else one clear error."""
    if gauge not in GAUGES:
        raise ValueError(f"gauge must be one of {list(GAUGES)} ('official': OPDF's symmetric square-root gauge, "
                         f"'center': all scale in the central tensor), got {gauge!r}.")
    return gauge


def mpo_decompose(
    weight: Tensor,
    row_factors: Sequence[int],
    col_factors: Sequence[int],
    max_bond: int | None = None,
    center: int | None = None,
    gauge: str = "official",
) -> MPODecomposition:
    """Decompose `weight` (``[prod(row_factors), prod(col_factors)]``) into an MPO by sequential SVDs.

    Args:
        weight: the matrix; for an ``nn.Linear`` pass ``linear.weight`` as stored (``[out_features, in_features]``).
        row_factors: ``i_1..i_n``, whose product is the number of rows.
        col_factors: ``j_1..j_n`` (as many as ``row_factors``), whose product is the number of columns.
        max_bond: keep at most this many singular values at each bond (best truncation at each SVD step).
        center: index of the central tensor (default ``n // 2``).
        gauge: ``"official"`` (OPDF's symmetric square-root gauge: outer cores carry the scale, singleton middle
            cores are identities) or ``"center"`` (all scale in the central tensor, isometric auxiliary tensors).
            With `max_bond`, the ``"official"`` gauge is that of the truncated matrix (the official code instead
            slices its gauged cores; without truncation, OPDF's setting, the two agree).

    SVDs run in float64; the cores are returned in the weight's dtype and on its device.
    """
    rows, cols = check_factors(weight.shape, row_factors, col_factors)
    n = len(rows)
    center = n // 2 if center is None else center
    if not 0 <= center < n:
        raise ValueError(f"center must index one of the {n} cores, got {center}.")
    if max_bond is not None and max_bond < 1:
        raise ValueError(f"max_bond must be >= 1 (or None for an exact decomposition), got {max_bond}.")
    check_gauge(gauge)
    w = weight.detach().to(torch.float64)
    interleave = [a for k in range(n) for a in (k, n + k)]
    mpo_order = w.reshape(*rows, *cols).permute(interleave)  # (i_1, j_1, ..., i_n, j_n)
    dims = [i * j for i, j in zip(rows, cols)]
    truncated = False
    if gauge == "center" or max_bond is not None:
        cores64, truncated = _mixed_canonical(mpo_order, rows, cols, center, max_bond)
        bonds = [core.shape[0] for core in cores64] + [1]
    else:  # the exact bonds: min(left, right) dimension at each cut, as the official compute_rank
        bonds = [min(math.prod(dims[:k]), math.prod(dims[k:])) for k in range(n + 1)]
    error = 0.0
    if truncated:
        error = (torch.linalg.matrix_norm(w - mpo_contract(cores64)) / torch.linalg.matrix_norm(w).clamp_min(1e-300)).item()
    if gauge == "official":
        target = mpo_contract(cores64).reshape(*rows, *cols).permute(interleave) if truncated else mpo_order
        cores64 = _square_root_gauge(target, rows, cols, bonds)
    cores = [core.to(weight.dtype).contiguous() for core in cores64]
    return MPODecomposition(cores=cores, truncation_error=error, center=center, gauge=gauge)


def _mixed_canonical(
    mpo_order: Tensor, rows: list[int], cols: list[int], center: int, max_bond: int | None,
) -> tuple[list[Tensor], bool]:
    """Cores with all scale in core `center` (left-/right-isometries around it); whether a bond was truncated."""
    n = len(rows)
    dims = [i * j for i, j in zip(rows, cols)]
    rest = mpo_order.reshape(1, -1)
    truncated = False

    left, rank = [], 1  # left sweep: left-isometries T_0..T_{c-1}
    for k in range(center):
        mat = rest.reshape(rank * dims[k], -1)
        if dims[k] == 1 and rank <= mat.shape[1] and (max_bond is None or rank <= max_bond):
            # rows of `rest` are already orthogonal (s * vh of the previous SVD): its SVD is the identity
            left.append(torch.eye(rank, dtype=rest.dtype, device=rest.device).reshape(rank, 1, 1, rank))
            continue
        u, s, vh, cut = _svd(mat, max_bond, fix="u")
        truncated |= cut
        left.append(u.reshape(rank, rows[k], cols[k], -1))
        rank, rest = s.numel(), s[:, None] * vh

    right, rank_r = [], 1  # right sweep: right-isometries T_{n-1}..T_{c+1}
    for k in range(n - 1, center, -1):
        mat = rest.reshape(-1, dims[k] * rank_r)
        if dims[k] == 1 and rank_r <= mat.shape[0] and (max_bond is None or rank_r <= max_bond):
            right.append(torch.eye(rank_r, dtype=rest.dtype, device=rest.device).reshape(rank_r, 1, 1, rank_r))
            continue
        u, s, vh, cut = _svd(mat, max_bond, fix="v")
        truncated |= cut
        right.append(vh.reshape(-1, rows[k], cols[k], rank_r))
        rank_r, rest = s.numel(), u * s

    return left + [rest.reshape(rank, rows[center], cols[center], rank_r)] + right[::-1], truncated


def _square_root_gauge(mpo_order: Tensor, rows: list[int], cols: list[int], bonds: list[int]) -> list[Tensor]:
    """Cores in the official OPDF gauge: the cores left of bond k contract to ``U_k sqrt(S_k)`` (SVD of the
    matrix unfolded at bond k, its first ``bonds[k]`` singular values), so core k is
    ``pinv(U_k sqrt(S_k)) [U_{k+1} sqrt(S_{k+1})]``. Exact whenever every unfolding has rank <= its bond.

    Bonds that cut the matrix at the same place (singleton factors between them) share one SVD, so their cores
    are exactly the identity (masked to the non-zero singular values)."""
    n = len(rows)
    dims = [i * j for i, j in zip(rows, cols)]
    flat = mpo_order.reshape(-1)
    svds: dict[int, tuple[Tensor, Tensor]] = {}
    halves: list[tuple[int, Tensor, Tensor]] = [(1, flat.new_ones(1, 1), flat.new_ones(1, 1))]  # (cut, U sqrt(S), U / sqrt(S))
    for k in range(1, n):
        cut = math.prod(dims[:k])
        if cut not in svds:
            u, s, _, _ = _svd(flat.reshape(cut, -1), None, fix="u")
            svds[cut] = (u, s)
        u, s = (t[..., :bonds[k]] for t in svds[cut])
        root = s.sqrt()
        keep = s > s[0] * max(cut, flat.numel() // cut) * torch.finfo(s.dtype).eps  # numerically non-zero
        halves.append((cut, u * root, u * torch.where(keep, 1 / root.clamp_min(1e-300), 0)))
    halves.append((flat.numel(), flat[:, None], flat[:, None]))
    cores = []
    for k in range(n):
        (cut, _, inverse), (next_cut, nxt, _) = halves[k], halves[k + 1]
        if next_cut == cut and 0 < k < n - 1 and bonds[k] == bonds[k + 1]:  # same unfolding: identity on kept directions
            core = torch.diag((inverse.abs().sum(0) > 0).to(flat.dtype))
        else:
            core = inverse.mT @ nxt.reshape(cut, -1)
        cores.append(core.reshape(bonds[k], rows[k], cols[k], bonds[k + 1]))
    return cores


@lru_cache(maxsize=256)
def _contraction_plan(shapes: tuple[tuple[int, int], ...], bonds: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """Matrix-chain order: split[a][b] = where to split the segment of cores a..b (fewest multiply-adds)."""
    n = len(shapes)
    sizes = [i * j for i, j in shapes]
    cost = [[0.0] * n for _ in range(n)]
    split = [[0] * n for _ in range(n)]
    for length in range(2, n + 1):
        for a in range(n - length + 1):
            b = a + length - 1
            best = None
            for m in range(a, b):
                c = cost[a][m] + cost[m + 1][b] + bonds[a] * math.prod(sizes[a:m + 1]) * bonds[m + 1] * math.prod(sizes[m + 1:b + 1]) * bonds[b + 1]
                if best is None or c < best:
                    best, split[a][b] = c, m
            cost[a][b] = best
    return tuple(map(tuple, split))


def _merge(a: Tensor, b: Tensor) -> Tensor:
    """[p, I1, J1, q] x [q, I2, J2, s] -> [p, I1*I2, J1*J2, s]."""
    p, i1, j1, q = a.shape
    _, i2, j2, s = b.shape
    out = (a.reshape(-1, q) @ b.reshape(q, -1)).view(p, i1, j1, i2, j2, s)
    return out.permute(0, 1, 3, 2, 4, 5).reshape(p, i1 * i2, j1 * j2, s)


def mpo_contract(cores: Sequence[Tensor] | MPODecomposition) -> Tensor:
    """Contract MPO cores (or the `MPODecomposition` that `mpo_decompose` returns) back to the
    ``[prod(i_k), prod(j_k)]`` matrix (differentiable).

    Cores are multiplied pairwise in the cheapest matrix-chain order (no single giant einsum), which for
    OPDF factorisations multiplies the small ``r x r`` middle cores before the large outer ones.
    """
    if isinstance(cores, MPODecomposition):
        cores = cores.cores
    if not cores:
        raise ValueError("mpo_contract needs at least one core.")
    for k, core in enumerate(cores):
        if core.dim() != 4:
            raise ValueError(f"core {k} has shape {tuple(core.shape)}; cores are [r_left, i, j, r_right].")
        if k and cores[k - 1].shape[-1] != core.shape[0]:
            raise ValueError(f"bond {k}: core {k - 1} ends with {cores[k - 1].shape[-1]}, core {k} starts with {core.shape[0]}.")
    if cores[0].shape[0] != 1 or cores[-1].shape[-1] != 1:
        raise ValueError("the first core must start and the last core end with a bond of 1.")
    split = _contraction_plan(tuple((c.shape[1], c.shape[2]) for c in cores), tuple([1] + [c.shape[-1] for c in cores]))

    def segment(a: int, b: int) -> Tensor:
        if a == b:
            return cores[a]
        m = split[a][b]
        return _merge(segment(a, m), segment(m + 1, b))

    full = segment(0, len(cores) - 1)
    return full.reshape(full.shape[1], full.shape[2])
