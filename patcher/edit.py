"""The rank-one edit (paper Eq. 1): W_c' = W_c + Lambda d^T, in closed form.

Given the corrupted keys K* (rows k_q, q over samples x positions x groups), the
residuals r_q = v_q(clean) - v_q(corrupted) in the layer's value space and the
inverse key statistics C^-1:

- direction: d is the principal direction of C^-1 K*^T diag(w), with weights
  w_q = ||r_q|| (positions where the corrupted and clean values differ count most);
  for a single key, d = C^-1 k* / ||C^-1 k*||;
- magnitude: with a_q = d . k_q, Lambda minimises sum_q ||r_q - a_q Lambda||^2, i.e.
  Lambda = sum_q a_q r_q / sum_q a_q^2 (per group for grouped convolutions).

Writing K*' = K* + ... is not needed: keys of other inputs change the output only
through d . k, which C^-1 keeps small for keys in the calibration span.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import NumericalError


@dataclass
class RankOneEdit:
    """A canonical rank-one delta for one layer, and how well it fits the given pairs."""

    layer: str
    weight: str
    direction: torch.Tensor       # d [Kd]
    magnitude: torch.Tensor       # Lambda [V] (canonical row order)
    fit_residual_before: float    # sum ||r_q||^2
    fit_residual_after: float     # sum ||r_q - a_q Lambda||^2

    @property
    def delta(self) -> torch.Tensor:
        """dW_c = Lambda d^T, [V, Kd]."""
        return torch.outer(self.magnitude, self.direction)

    @property
    def norm(self) -> float:
        return float(self.magnitude.norm() * self.direction.norm())


def principal_direction(c_inv: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor,
                        iterations: int = 100) -> torch.Tensor:
    """Unit top left-singular vector of A = C^-1 K^T diag(w) (power iteration on A A^T)."""
    a = c_inv @ (keys.T * weights)  # [Kd, Q]
    if a.shape[1] == 1:
        v = a[:, 0]
        return v / v.norm().clamp_min(1e-300)
    gram = a @ a.T
    v = a.sum(1) if a.sum(1).norm() > 0 else torch.ones(a.shape[0], dtype=a.dtype)
    v = v / v.norm().clamp_min(1e-300)
    for _ in range(iterations):
        nxt = gram @ v
        norm = nxt.norm()
        if norm == 0:
            break
        nxt = nxt / norm
        if (nxt - v).norm() < 1e-10:
            v = nxt
            break
        v = nxt
    return v


def solve_rank_one(layer: str, weight: str, keys: torch.Tensor, residual: torch.Tensor,
                   c_inv: torch.Tensor) -> RankOneEdit:
    """Closed-form rank-one edit from corrupted keys [n, P, G, Kd] and residuals [n, P, G, Vg]."""
    keys = keys.to(torch.float64)
    residual = residual.to(torch.float64)
    c_inv = c_inv.to(torch.float64)
    groups = keys.shape[2]
    flat_k = keys.reshape(-1, keys.shape[-1])
    weights = residual.reshape(-1, residual.shape[-1]).norm(dim=1)
    if float(weights.sum()) == 0:
        raise NumericalError(f"layer '{layer}': the corrupted and clean values are identical "
                             "here; nothing to edit")
    d = principal_direction(c_inv, flat_k, weights)
    a = torch.einsum("npgk,k->npg", keys, d)                       # [n, P, G]
    denom = (a * a).sum(dim=(0, 1))                                 # [G]
    lam = torch.einsum("npg,npgv->gv", a, residual) / denom.clamp_min(1e-300)[:, None]
    if not torch.isfinite(lam).all() or not torch.isfinite(d).all():
        raise NumericalError(f"layer '{layer}': the rank-one solve gave non-finite values")
    before = float((residual ** 2).sum())
    after = float(((residual - a[..., None] * lam[None, None]) ** 2).sum())
    return RankOneEdit(layer, weight, d, lam.reshape(-1), before, after)
