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

from patcher.analysis.moments import key_chunks
from patcher.errors import NumericalError
from patcher.graph.shadow import EditableLayer


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


def principal_direction(c_inv, keys: torch.Tensor, weights: torch.Tensor,
                        iterations: int = 100) -> torch.Tensor:
    """Unit top left-singular vector of A = C^-1 K^T diag(w), A [Kd, Q].

    Power iteration on A A^T, started at A 1. With fewer keys than key dimensions
    (Q < Kd: a wide dense layer's few pairs) it runs in the key space instead: every
    iterate is v = A x, and A A^T (A x) = A (G x) with the Q x Q Gram matrix G = A^T A,
    so x_{t+1} = G x_t / ||A G x_t|| (||A x||^2 = x^T G x) gives the same iterates while
    never forming a Kd x Kd matrix (25,088^2 float64 = 5 GB for a flattened VGG input).
    ``c_inv`` is a dense C_reg^-1 or an operator with ``c_inv @ X`` (the statistics'
    ``solver``)."""
    a = c_inv @ (keys.T * weights)  # [Kd, Q]
    if a.shape[1] == 1:
        v = a[:, 0]
        return v / v.norm().clamp_min(1e-300)
    if a.shape[1] < a.shape[0]:
        return _principal_direction_by_gram(a, iterations)
    gram = a @ a.T
    v = a.sum(1) if a.sum(1).norm() > 0 else torch.ones(a.shape[0], dtype=a.dtype)
    return _power_iteration(gram, v / v.norm().clamp_min(1e-300), iterations)


def _power_iteration(matrix: torch.Tensor, v: torch.Tensor, iterations: int,
                     length=torch.linalg.vector_norm) -> torch.Tensor:
    """v_{t+1} = M v_t / length(M v_t) from a unit ``v``, for at most ``iterations`` steps
    or until two iterates differ by less than 1e-10 in ``length`` (or M v = 0)."""
    for _ in range(iterations):
        nxt = matrix @ v
        norm = length(nxt)
        if norm == 0:
            break
        nxt = nxt / norm
        if length(nxt - v) < 1e-10:
            return nxt
        v = nxt
    return v


def _principal_direction_by_gram(a: torch.Tensor, iterations: int) -> torch.Tensor:
    """:func:`principal_direction`'s iteration in the coordinates x of v = A x (Q < Kd):
    memory Kd x Q + Q x Q. Norms and the stopping test are taken of A x through G:
    ||A x||^2 = x^T G x, ||A x' - A x||^2 = (x' - x)^T G (x' - x)."""
    gram = a.T @ a                                                  # G [Q, Q]

    def length(x: torch.Tensor) -> torch.Tensor:
        return (x @ gram @ x).clamp_min(0).sqrt()

    x = torch.ones(a.shape[1], dtype=a.dtype, device=a.device)
    if float(length(x)) == 0:  # A 1 = 0: start from G's top eigenvector instead
        x = torch.linalg.eigh(gram)[1][:, -1]
    x = _power_iteration(gram, x / length(x).clamp_min(1e-300), iterations, length)
    v = a @ x
    return v / v.norm().clamp_min(1e-300)


#: Key rows converted to float64 at once by :func:`solve_rank_one` (chunks of about 64 MiB):
#: a conv early in a 224-pixel network has 12,544 keys per image, and 40 fit pairs' keys
#: in float64 with their weighted copies took several GB at once.
SOLVE_CHUNK_BYTES = 64 << 20


def _row_chunks(rows: int, width: int):
    step = max(1, SOLVE_CHUNK_BYTES // max(8 * width, 1))
    for i in range(0, rows, step):
        yield slice(i, min(rows, i + step))


class UnfoldedKeys:
    """A layer's keys for stored layer inputs, unfolded a few inputs at a time each time
    they are read (:func:`patcher.analysis.moments.key_chunks`: at most its CHUNK_BYTES
    at once), in the order of ``layer_keys(...).reshape(-1, Kd)``. :func:`solve_rank_one`
    reads them twice instead of holding every key: a conv early in a 224-pixel network
    keeps 3 MB of input per image instead of 29 MB of keys."""

    def __init__(self, layer: EditableLayer, inputs: list[torch.Tensor], attrs: dict) -> None:
        self.layer, self.inputs, self.attrs = layer, inputs, attrs
        self.key_dim = layer.key_dim

    def __iter__(self):
        for data in self.inputs:
            yield from key_chunks(self.layer, data, self.attrs)


def float64_chunks(pieces):
    """(first row, float64 rows) of the key pieces [..., Kd] in order, by chunks of about
    SOLVE_CHUNK_BYTES (row numbers count across the pieces)."""
    first = 0
    for piece in pieces:
        flat = piece.reshape(-1, piece.shape[-1])
        for part in _row_chunks(flat.shape[0], flat.shape[1]):
            yield first + part.start, flat[part].to(torch.float64)
        first += flat.shape[0]


def key_moment_gram(c_inv, pieces, weights: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A A^T, A 1) for A = C^-1 K^T diag(w) without A [Kd, Q]: A A^T = C^-1 M C^-1 with
    M = K^T diag(w^2) K summed over chunks of keys, and A 1 = C^-1 K^T w (Kd x Kd memory)."""
    moment = start = None
    for first, rows in float64_chunks(pieces):
        if moment is None:
            kd, device = rows.shape[1], rows.device
            moment = torch.zeros(kd, kd, dtype=torch.float64, device=device)
            start = torch.zeros(kd, dtype=torch.float64, device=device)
        weighted = rows * weights[first:first + rows.shape[0], None]
        moment += weighted.T @ weighted
        start += weighted.sum(0)
    left = c_inv @ moment                    # C^-1 M
    gram = c_inv @ left.T                    # C^-1 M C^-1 (M symmetric)
    return (gram + gram.T) * 0.5, c_inv @ start


def direction_from_gram(gram: torch.Tensor, start: torch.Tensor,
                        iterations: int = 100) -> torch.Tensor:
    """The unit top eigenvector of ``gram`` = A A^T by power iteration from A 1."""
    v = start
    if v.norm() == 0:
        v = torch.ones(gram.shape[0], dtype=torch.float64, device=gram.device)
    return _power_iteration(gram, v / v.norm().clamp_min(1e-300), iterations)


def _direction_by_key_moments(c_inv, pieces, weights: torch.Tensor,
                              iterations: int = 100) -> torch.Tensor:
    """:func:`principal_direction` for many keys (Q >= Kd) without A [Kd, Q]
    (:func:`key_moment_gram`); the same iterates as the dense form, in Kd x Kd memory."""
    gram, start = key_moment_gram(c_inv, pieces, weights)
    return direction_from_gram(gram, start, iterations)


def rank_one_from_direction(layer: str, weight: str, pieces, d: torch.Tensor,
                            residual: torch.Tensor) -> RankOneEdit:
    """The rank-one edit along ``d``: per group, Lambda = sum_q a_q r_q / sum_q a_q^2 with
    a_q = d . k_q (``residual`` [n, P, G, Vg] in float64)."""
    a = torch.cat([chunk @ d for _, chunk in float64_chunks(pieces)])
    a = a.reshape(residual.shape[:3])                               # [n, P, G]
    denom = (a * a).sum(dim=(0, 1))                                 # [G]
    lam = torch.einsum("npg,npgv->gv", a, residual) / denom.clamp_min(1e-300)[:, None]
    if not torch.isfinite(lam).all() or not torch.isfinite(d).all():
        raise NumericalError(f"layer '{layer}': the rank-one solve gave non-finite values")
    before = float((residual ** 2).sum())
    after = float(((residual - a[..., None] * lam[None, None]) ** 2).sum())
    return RankOneEdit(layer, weight, d, lam.reshape(-1), before, after)


def edit_weights(layer: str, residual: torch.Tensor) -> torch.Tensor:
    """w_q = ||r_q|| per key row; raises NumericalError when every residual is zero."""
    weights = residual.reshape(-1, residual.shape[-1]).norm(dim=1)
    if float(weights.sum()) == 0:
        raise NumericalError(f"layer '{layer}': the corrupted and clean values are identical "
                             "here; nothing to edit")
    return weights


def fit_inputs(layer: str, keys, residual: torch.Tensor, c_inv):
    """A fit's inputs in the form the solvers read: (key pieces, residual in float64, c_inv
    in float64 when dense, key width Kd, key rows Q = n P G, per-row weights w)."""
    pieces = [keys] if torch.is_tensor(keys) else keys
    residual = residual.to(torch.float64)
    if torch.is_tensor(c_inv):
        c_inv = c_inv.to(torch.float64)
    kd = getattr(pieces, "key_dim", None) or pieces[0].shape[-1]
    rows = residual.shape[0] * residual.shape[1] * residual.shape[2]
    return pieces, residual, c_inv, kd, rows, edit_weights(layer, residual)


def solve_rank_one(layer: str, weight: str, keys, residual: torch.Tensor, c_inv
                   ) -> RankOneEdit:
    """Closed-form rank-one edit from corrupted keys [n, P, G, Kd] and residuals
    [n, P, G, Vg]. ``keys`` may also be pieces in row order (a list of tensors, or
    :class:`UnfoldedKeys`, read twice), so that the caller need not hold them joined.

    ``c_inv``: C_reg^-1, dense or an operator (``c_inv @ X``: the statistics' ``solver``,
    a Cholesky solve or, for a wide dense layer, the low-rank Woodbury form). Memory is
    bounded by the keys themselves (kept in their dtype; converted to float64 by chunks)
    plus a Kd x min(Kd, Q) matrix (Q = n P G key rows)."""
    pieces, residual, c_inv, kd, rows, weights = fit_inputs(layer, keys, residual, c_inv)
    if rows < kd:  # few keys (a wide dense layer): A [Kd, Q] is small
        flat = torch.cat([p.reshape(-1, kd) for p in pieces]).to(torch.float64)
        d = principal_direction(c_inv, flat, weights)
    else:
        d = _direction_by_key_moments(c_inv, pieces, weights)
    return rank_one_from_direction(layer, weight, pieces, d, residual)


def solve_rank_one_iterative(layer: str, weight: str, keys: torch.Tensor, residual: torch.Tensor,
                             lr: float = 1e-2, epochs: int = 200, project_every: int = 10,
                             seed: int = 0) -> RankOneEdit:
    """The paper's iterative optimiser, as an alternative to the closed form: Adam on
    sum_q ||r_q - dW k_q||^2 / Q over a full dW (per group for grouped convolutions), with
    dW replaced by its best rank-one approximation (truncated SVD) every ``project_every``
    steps and at the end. Slower than :func:`solve_rank_one`; kept for comparison."""
    keys = keys.to(torch.float64)
    residual = residual.to(torch.float64)
    n, p, g, kd = keys.shape
    vg = residual.shape[-1]
    flat_k = keys.permute(2, 0, 1, 3).reshape(g, n * p, kd)       # [G, Q, Kd]
    flat_r = residual.permute(2, 0, 1, 3).reshape(g, n * p, vg)   # [G, Q, Vg]
    scale = float(flat_k.pow(2).sum(-1).mean().clamp_min(1e-12))
    gen = torch.Generator().manual_seed(seed)
    delta = (torch.randn(g * vg, kd, generator=gen, dtype=torch.float64) * 1e-6).requires_grad_(True)
    opt = torch.optim.Adam([delta], lr=lr / scale ** 0.5)

    def project(d: torch.Tensor) -> torch.Tensor:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        return s[0] * torch.outer(u[:, 0], vh[0])

    for step in range(1, epochs + 1):
        with torch.enable_grad():  # callers may run under no_grad
            pred = torch.einsum("gvk,gqk->gqv", delta.reshape(g, vg, kd), flat_k)
            loss = ((flat_r - pred) ** 2).sum() / flat_r.shape[1]
            opt.zero_grad()
            loss.backward()
        opt.step()
        if step % project_every == 0:
            with torch.no_grad():
                delta.copy_(project(delta))
    with torch.no_grad():
        final = project(delta.detach())
        u, s, vh = torch.linalg.svd(final, full_matrices=False)
        direction, magnitude = vh[0], s[0] * u[:, 0]
        pred = torch.einsum("gvk,gqk->gqv", final.reshape(g, vg, kd), flat_k)
        before, after = float((flat_r ** 2).sum()), float(((flat_r - pred) ** 2).sum())
    if not torch.isfinite(final).all():
        raise NumericalError(f"layer '{layer}': the iterative solve diverged; lower its learning rate")
    return RankOneEdit(layer, weight, direction, magnitude, before, after)
