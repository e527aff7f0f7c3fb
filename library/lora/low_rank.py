"""Low-rank factors by SVD (specs/lora_format.md sections 8, 8.x, 9 and 10): of a dense weight delta (extracting a
LoRA from two models), and, exactly and cheaply, of a sum of LoRA deltas (svd-merge, resize).

Factors follow sd-scripts' split: for delta = U S Vh, `up = U[:, :r] diag(S[:r])` and `down = Vh[:r]`, shaped like
a LoRA module's tensors: up (out, r) and down (r, in) for a Linear layer, up (out, r, 1, 1) and down (r, in, k, k)
for a conv. By Eckart-Young, `up @ down` is the best rank-r approximation of the delta in the Frobenius norm:
||delta - up @ down||_F^2 = sum of S_i^2 over the singular values left out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from library.errors import UserError


class LowRank(NamedTuple):
    up: torch.Tensor  # (out, r) for Linear, (out, r, 1, 1) for conv
    down: torch.Tensor  # (r, in) for Linear, (r, in, k, k) for conv
    singular_values: torch.Tensor  # all singular values, descending (for reports / rank choice)


class Term(NamedTuple):
    """One LoRA delta in a sum: coefficient * up @ down, with the tensors as a LoRA file stores them."""

    up: torch.Tensor
    down: torch.Tensor
    coefficient: float


class ThinSVD(NamedTuple):
    """delta = left diag(singular_values) right, with orthonormal columns in `left` and rows in `right`."""

    left: torch.Tensor  # (out, k)
    singular_values: torch.Tensor  # (k,), descending
    right: torch.Tensor  # (k, in*k*k)

    def truncated(self, rank: int, weight_shape: torch.Size | tuple[int, ...]) -> LowRank:
        """The best rank-`rank` factors (fewer when the SVD has fewer singular values), shaped for a layer whose
        weight is `weight_shape`: (out, in), (out, in, 1, 1) or (out, in, k, k)."""
        rank = min(rank, self.singular_values.shape[0])
        up = self.left[:, :rank] * self.singular_values[:rank]
        down = self.right[:rank]
        if len(weight_shape) == 4:
            up = up.reshape(*up.shape, 1, 1)
        return LowRank(up.contiguous(), down.reshape(rank, *weight_shape[1:]).contiguous(), self.singular_values)


def factors_from_delta(delta: torch.Tensor, rank: int, clamp_quantile: float | None = None) -> LowRank:
    """Best rank-`rank` factors of a dense weight delta shaped like the layer's weight ((out, in), (out, in, 1, 1) or
    (out, in, k, k)): SVD in float32 on delta's device, up = U[:, :r] diag(S[:r]), down = Vh[:r] (sd-scripts' split),
    r = min(rank, out, in*k*k).

    With `clamp_quantile` q, both factors are clamped to [-t, t], where t is the q-quantile of the *signed* entries
    of up and down taken together. This is what sd-scripts' extract_lora_from_models.py does with --clamp_quantile
    (default 0.99) and svd_merge_lora.py with a fixed 0.99 (spec sections 8 step 5, 9, 13 B13): the quantile of the
    signed values, not of their absolute values, so about 1 - q of the entries lie above t and a similar share below
    -t (for q = 0.99 roughly the 98th percentile of |x|). The clamp trims outliers at the cost of exactness; without
    it the factors are the optimal truncation."""
    factors = svd_of_dense(delta).truncated(rank, delta.shape)
    return factors if clamp_quantile is None else clamp_to_quantile(factors, clamp_quantile)


def norm_of_sum(terms: Sequence[Term]) -> float:
    """|| sum c_k up_k @ down_k ||_F in float64 without the dense matrix: with U = [c_k up_k] and D = [down_k] stacked
    along the rank, ||U D||_F^2 = sum((U^T U) * (D D^T))."""
    device = terms[0].up.device
    ups = torch.cat([t.coefficient * t.up.to(device, torch.float64).reshape(t.up.shape[0], -1) for t in terms], dim=1)
    downs = torch.cat([t.down.to(device, torch.float64).reshape(t.down.shape[0], -1) for t in terms], dim=0)
    return ((ups.T @ ups) * (downs @ downs.T)).sum().clamp_min(0).sqrt().item()


def svd_of_dense(delta: torch.Tensor) -> ThinSVD:
    """The thin SVD of a weight delta of any layer shape, as an (out, in*k*k) matrix, in float32."""
    left, singular_values, right = torch.linalg.svd(delta.reshape(delta.shape[0], -1).float(), full_matrices=False)
    return ThinSVD(left, singular_values, right)


def svd_of_sum(terms: Sequence[Term]) -> ThinSVD:
    """The exact thin SVD of sum_i coefficient_i * up_i @ down_i without forming the dense sum (spec section 8.x).

    Stack the factors, U = [c_i up_i] (out x R) and D = [down_i] (R x n), R = sum of the ranks; thin QR gives
    U = Q_u R_u and D^T = Q_d R_d, so the sum is Q_u (R_u R_d^T) Q_d^T and the SVD of the small core
    R_u R_d^T = A S B^T gives the sum's SVD (Q_u A) S (Q_d B)^T. It costs O((out + n) R^2) instead of the dense
    O(out n min(out, n)), and has at most min(out, n, R) singular values (the others are exactly zero). float32 on
    the factors' device."""
    ups = torch.cat([term.coefficient * term.up.reshape(term.up.shape[0], -1).float() for term in terms], dim=1)
    downs = torch.cat([term.down.reshape(term.down.shape[0], -1).float() for term in terms], dim=0)
    up_basis, up_core = torch.linalg.qr(ups)
    down_basis, down_core = torch.linalg.qr(downs.T)
    core_left, singular_values, core_right = torch.linalg.svd(up_core @ down_core.T, full_matrices=False)
    return ThinSVD(up_basis @ core_left, singular_values, core_right @ down_basis.T)


def factors_of_sum(terms: Sequence[Term], rank: int, weight_shape: torch.Size | tuple[int, ...]) -> LowRank:
    """The best rank-`rank` factors of sum_i coefficient_i * up_i @ down_i (see `svd_of_sum`); exact when `rank` is
    at least the sum of the ranks."""
    return svd_of_sum(terms).truncated(rank, weight_shape)


def clamp_to_quantile(factors: LowRank, quantile: float) -> LowRank:
    """sd-scripts' outlier clamp (see `factors_from_delta`): both factors clamped to +-(the `quantile`-quantile of
    their signed entries together). Computed by sorting, so it has no size limit (torch.quantile refuses inputs of
    more than 2^24 elements, spec B13)."""
    if not 0.0 <= quantile <= 1.0:
        raise UserError(
            f"--clamp_quantile {quantile}: a quantile must be between 0 and 1 (sd-scripts' default is 0.99)."
        )
    limit = signed_quantile(torch.cat([factors.up.flatten(), factors.down.flatten()]), quantile)
    return factors._replace(up=factors.up.clamp(-limit, limit), down=factors.down.clamp(-limit, limit))


def signed_quantile(values: torch.Tensor, quantile: float) -> torch.Tensor:
    """torch.quantile(values, quantile) with its default linear interpolation, for inputs of any size."""
    ordered = values.flatten().sort().values
    position = quantile * (ordered.numel() - 1)
    below = math.floor(position)
    above = min(below + 1, ordered.numel() - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (position - below)


# ---------------------------------------------------------------- choosing a rank from the singular values


class NewRanks(NamedTuple):
    """The tools' --new_rank and --new_conv_rank (3x3 convs; None: new_rank)."""

    new_rank: int
    new_conv_rank: int | None = None

    def for_module(self, uses_conv_rank: bool) -> int:
        return self.new_conv_rank if uses_conv_rank and self.new_conv_rank is not None else self.new_rank

    def check(self) -> None:
        for flag, rank in (("--new_rank", self.new_rank), ("--new_conv_rank", self.new_conv_rank)):
            if rank is not None and rank < 1:
                raise UserError(f"{flag} {rank}: a rank must be at least 1.")


DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")
ZERO_DELTA = 1e-6  # sd-scripts' MIN_SV: a module whose largest singular value is this small gets rank 1


def dynamic_rank(singular_values: torch.Tensor, method: str, parameter: float) -> int:
    """The smallest rank r (at least 1) whose truncation meets the criterion of resize_lora.py's --dynamic_method:

    * sv_ratio p: keep every singular value larger than S_0 / p (r = how many there are);
    * sv_cumulative p: sum(S[:r]) >= p * sum(S);
    * sv_fro p: ||S[:r]|| >= p * ||S||, i.e. the kept part has at least the fraction p of the Frobenius norm.

    sd-scripts at the commit the spec studied keeps one singular value more than this (spec B14)."""
    values = singular_values.double()
    if method == "sv_ratio":
        return max(1, int((values > values[0] / parameter).sum()))
    if method == "sv_cumulative":
        shares, target = values, parameter
    elif method == "sv_fro":
        shares, target = values.square(), parameter**2
    else:
        raise ValueError(f"unknown dynamic method {method!r}")
    total = float(shares.sum())
    if total <= 0:
        return 1
    reached = torch.nonzero(shares.cumsum(0) / total >= target)
    return int(reached[0]) + 1 if len(reached) else values.shape[0]


def chosen_rank(
    singular_values: torch.Tensor, cap: int, method: str | None = None, parameter: float | None = None
) -> int:
    """The rank a resized module gets: `cap` (--new_rank or --new_conv_rank), or fewer by the dynamic method; never
    more than the delta's own rank, and 1 for a zero delta (as in sd-scripts)."""
    if float(singular_values[0]) <= ZERO_DELTA:
        return 1
    wanted = cap if method is None else dynamic_rank(singular_values, method, parameter)
    return max(1, min(wanted, cap, singular_values.shape[0]))


class Retained(NamedTuple):
    """How much of a delta a rank-r truncation keeps (resize_lora.py --verbose)."""

    sum_share: float  # sum(S[:r]) / sum(S)
    frobenius_share: float  # ||S[:r]|| / ||S||
    max_ratio: float  # S_0 / S_{r-1}


def retained(singular_values: torch.Tensor, rank: int) -> Retained:
    """The shares of sum(S) and of the Frobenius norm that the first `rank` singular values hold (1 for a zero
    delta, which loses nothing), and S_0 / S_{rank-1}."""
    values = singular_values.double()
    total, squares = float(values.sum()), float(values.square().sum())
    sum_share = float(values[:rank].sum()) / total if total > 0 else 1.0
    frobenius_share = math.sqrt(float(values[:rank].square().sum()) / squares) if squares > 0 else 1.0
    smallest = float(values[rank - 1])
    return Retained(sum_share, frobenius_share, float(values[0]) / smallest if smallest > 0 else math.inf)


def numerical_rank(singular_values: torch.Tensor) -> int:
    """How many singular values are not float32 rounding of zero (relative to the largest)."""
    if singular_values.numel() == 0 or singular_values[0] == 0:
        return 0
    return int((singular_values > singular_values[0] * singular_values.shape[0] * torch.finfo(torch.float32).eps).sum())
