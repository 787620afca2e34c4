"""A low-rank extension of the rank-one edit, for corruptions that present several keys.

A trigger on a vision transformer covers several tokens (a 40-pixel patch at 16-pixel
tokens: 9 of them), each a different piece of the trigger plus its own position
embedding, so a layer's corrupted keys point in several directions; the same holds for a
strided kernel that sees a pattern at several phases. The rank-one edit maps one direction
(its d, the top left-singular vector of A = C^-1 K*^T diag(w)) and leaves the others:
on a ViT-Ti/16 its first edit at the patch embedding changed nothing (one direction held
29% of A's energy), and ten rounds left 9% of held-out triggered images attacked.

The edit here keeps the next directions as well:

- directions: D = [d_1 .. d_r], the top r eigenvectors of A A^T (d_1 is the rank-one
  edit's d), r the smallest count whose eigenvalues hold ENERGY of trace(A A^T), at most
  MAX_RANK (and at most the number of key rows);
- magnitudes: per group g, with a_q = D^T k_q, Lambda_g = argmin sum_q ||r_q - Lambda_g a_q||^2,
  i.e. Lambda_g^T = (sum_q a_q a_q^T)^-1 sum_q a_q r_q^T;
- dW_c = Lambda D^T = sum_i lambda_i d_i^T: r rank-one edits along orthonormal directions.

When one direction holds ENERGY already, r = 1 and the rank-one edit is the answer; when
MAX_RANK directions do not hold it (diffuse keys), the rank-one edit is too. A
grouped convolution (depthwise) keeps the rank-one edit: its key is a few kernel taps per
group (9 for a 3x3 depthwise conv, so r <= 9 anyway), and its candidates are tried at
many groups x positions (MobileNetV2 at 224: 96 groups at 112 x 112).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from patcher.edits.rankone import (RankOneEdit, direction_from_gram, fit_inputs,
                                   float64_chunks, key_moment_gram, principal_direction,
                                   rank_one_from_direction, solve_rank_one)
from patcher.errors import NumericalError

#: Share of trace(A A^T) the kept directions must hold (ViT-Ti/16 at 224: 8 directions at
#: the patch embedding, 98%; 2 at block 10's attention output, 4 at the head's first layer).
ENERGY = 0.95
#: Most directions one edit keeps.
MAX_RANK = 16
# When MAX_RANK directions do not reach ENERGY the corrupted keys are diffuse rather than
# a few trigger pieces, and no low-rank edit is proposed: on MobileNetV2 at 224 every
# kept edit took 16 directions holding 44-83%, and held-out clean images of other
# classes predicted as the target went from 6.9% to 20.6% (ASR 21% against 12% with
# rank-one edits alone).
#: Subspace-iteration steps for the top eigenvectors (block of MAX_RANK + 4 vectors).
SUBSPACE_STEPS = 60


@dataclass
class LowRankEdit:
    """dW_c = Lambda D^T for one layer, and how well it fits the given pairs."""

    layer: str
    weight: str
    directions: torch.Tensor      # D [Kd, r], orthonormal columns
    magnitudes: torch.Tensor      # Lambda [V, r] (canonical row order)
    fit_residual_before: float
    fit_residual_after: float
    #: share of trace(A A^T) the r directions hold
    energy: float

    @property
    def rank(self) -> int:
        return int(self.directions.shape[1])

    @property
    def delta(self) -> torch.Tensor:
        """dW_c = Lambda D^T, [V, Kd]."""
        return self.magnitudes @ self.directions.T

    @property
    def norm(self) -> float:
        """||dW_c||_F = ||Lambda||_F (D has orthonormal columns)."""
        return float(self.magnitudes.norm())

    def components(self) -> list[torch.Tensor]:
        """The r rank-one terms lambda_i d_i^T, [V, Kd] each (they sum to :attr:`delta`)."""
        return [torch.outer(self.magnitudes[:, i], self.directions[:, i])
                for i in range(self.rank)]


def top_eigenpairs(matrix: torch.Tensor, count: int, start: torch.Tensor,
                   steps: int = SUBSPACE_STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues descending, eigenvectors as columns) of the symmetric PSD ``matrix``'s
    top ``count`` eigenpairs: eigh when it is small, else subspace iteration
    (Q <- qr(M Q), then Rayleigh-Ritz) from ``start`` and seeded random columns."""
    n = matrix.shape[0]
    count = min(count, n)
    if n <= 4 * (count + 4) or n <= 512:
        values, vectors = torch.linalg.eigh(matrix)
        return values.flip(0)[:count].clamp_min(0), vectors.flip(1)[:, :count]
    block = min(n, count + 4)
    gen = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(n, block, generator=gen, dtype=matrix.dtype).to(matrix.device)
    q[:, 0] = start
    q = torch.linalg.qr(q)[0]
    for _ in range(steps):
        q = torch.linalg.qr(matrix @ q)[0]
    values, vectors = torch.linalg.eigh(q.T @ matrix @ q)
    return values.flip(0)[:count].clamp_min(0), (q @ vectors.flip(1))[:, :count]


def chosen_rank(values: torch.Tensor, trace: float, energy: float = ENERGY,
                max_rank: int = MAX_RANK) -> tuple[int, float]:
    """(r, share held): the fewest leading eigenvalues holding ``energy`` of ``trace``, at
    most ``max_rank`` and at most the eigenvalues given."""
    if trace <= 0:
        return 1, 1.0
    shares = torch.cumsum(values, 0) / trace
    reached = torch.nonzero(shares >= energy - 1e-12)
    r = int(reached[0]) + 1 if len(reached) else len(values)
    r = max(1, min(r, max_rank, len(values)))
    return r, float(shares[r - 1])


def magnitudes_for(layer: str, pieces, directions: torch.Tensor, residual: torch.Tensor
                   ) -> tuple[torch.Tensor, float, float]:
    """(Lambda [V, r], sum ||r_q||^2, sum ||r_q - Lambda_g a_q||^2): per group, the least
    squares Lambda_g^T = N_g^-1 B_g with N_g = sum_q a_q a_q^T, B_g = sum_q a_q r_q^T and
    a_q = D^T k_q (``residual`` [n, P, G, Vg] in float64). N and B are summed over chunks of
    keys; the residual left is ||R||^2 - 2 <Lambda, B> + <Lambda, N Lambda> (no fitted copy
    of the residual)."""
    r, groups, vg = directions.shape[1], residual.shape[2], residual.shape[3]
    flat_r = residual.reshape(-1, vg)
    normal = torch.zeros(groups, r, r, dtype=torch.float64, device=residual.device)
    right = torch.zeros(groups, r, vg, dtype=torch.float64, device=residual.device)
    for first, chunk in float64_chunks(pieces):
        a = chunk @ directions                                         # [rows, r]
        part = flat_r[first:first + len(a)]
        if groups == 1:
            normal[0] += a.T @ a
            right[0] += a.T @ part
        else:  # row i belongs to group i % G (rows run over n, P, then G)
            group = (torch.arange(first, first + len(a), device=a.device) % groups)
            normal.index_add_(0, group, a[:, :, None] * a[:, None, :])
            right.index_add_(0, group, a[:, :, None] * part[:, None, :])
    ridge = 1e-12 * normal.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(1e-300)
    eye = torch.eye(r, dtype=normal.dtype, device=normal.device)
    lam = torch.linalg.solve(normal + ridge[:, None, None] * eye, right)  # [G, r, Vg]
    if not torch.isfinite(lam).all():
        raise NumericalError(f"layer '{layer}': the low-rank solve gave non-finite values")
    before = float((residual ** 2).sum())
    after = before - 2 * float((lam * right).sum()) + float((lam * (normal @ lam)).sum())
    return lam.permute(0, 2, 1).reshape(-1, r), before, max(after, 0.0)


def solve_edits(layer: str, weight: str, keys, residual: torch.Tensor, c_inv,
                energy: float = ENERGY, max_rank: int = MAX_RANK
                ) -> tuple[RankOneEdit, LowRankEdit | None]:
    """The rank-one edit of :func:`patcher.edits.rankone.solve_rank_one` (the same d and
    Lambda) and, when its direction holds less than ``energy`` of trace(A A^T) and at most
    ``max_rank`` directions hold that much, the low-rank edit along them (else None). ``keys``, ``residual`` and
    ``c_inv`` as there; ``keys`` is read two or three times."""
    pieces, residual, c_inv, kd, rows, weights = fit_inputs(layer, keys, residual, c_inv)
    if residual.shape[2] > 1 or max_rank < 2:  # a grouped (depthwise) conv, or rank one asked
        return solve_rank_one(layer, weight, pieces, residual, c_inv), None
    if rows < kd:  # few keys (a wide dense layer): eigenpairs of G = A^T A [Q, Q]
        flat = torch.cat([p.reshape(-1, kd) for p in pieces]).to(torch.float64)
        d = principal_direction(c_inv, flat, weights)
        a = c_inv @ (flat.T * weights)                                 # [Kd, Q]
        small = a.T @ a
        trace = float(small.diagonal().sum())
        top = float(d @ (a @ (a.T @ d)))
        single = rank_one_from_direction(layer, weight, pieces, d, residual)
        if trace <= 0 or top >= energy * trace or rows < 2:
            return single, None
        values, vectors = top_eigenpairs(small, max_rank + 1,
                                         torch.ones(rows, dtype=torch.float64,
                                                    device=small.device))
        directions = a @ vectors                                       # A u_i, norms sqrt(l_i)
        directions = directions / directions.norm(dim=0).clamp_min(1e-300)
    else:
        gram, start = key_moment_gram(c_inv, pieces, weights)
        d = direction_from_gram(gram, start)
        trace = float(gram.diagonal().sum())
        top = float(d @ gram @ d)
        single = rank_one_from_direction(layer, weight, pieces, d, residual)
        if trace <= 0 or top >= energy * trace:
            return single, None
        values, directions = top_eigenpairs(gram, max_rank + 1, start)
    r, held = chosen_rank(values, trace, energy, max_rank)
    if r < 2 or held < energy:  # diffuse keys: no few directions hold them (module notes)
        return single, None
    directions = torch.linalg.qr(directions[:, :r])[0]
    lam, before, after = magnitudes_for(layer, pieces, directions, residual)
    return single, LowRankEdit(layer, weight, directions, lam, before, after, held)
