"""Key statistics C per editable layer from their moments: the regularised inverse, whitening,
and a cache of the moments on disk.

Regularisation (ridge): C_reg = C + lambda I with lambda = ridge * mean(diag C), default
ridge = 1e-2 (exact); C_reg = U (diag(s) + lambda) U^T with lambda = ridge * mean(diag A)
(Kronecker-factored, :mod:`patcher.analysis.moments`). C_reg^-1 comes from the Cholesky
factor (exact) or from the eigenbasis (factored); ``whiten_rows`` and ``solve_rows`` apply
C_reg^-1/2 and C_reg^-1 to rows of a matrix.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from patcher.analysis.moments import (DEFAULT_RIDGE, KeyMoments, KeyRows, KroneckerMoments,
                                      rotate_keys, single_thread, threads_for)
from patcher.graph.shadow import EditableLayer

#: Up to this key dimension the condition number is exact (eigenvalues); above it, the
#: ratio of the Cholesky factor's squared diagonal, a cheap lower bound.
EXACT_CONDITION_UP_TO = 1024


@dataclass
class LayerStatistics:
    """The Cholesky factor L of C_reg = C + lambda I, C_reg^-1 (on first use), and
    diagnostics. C itself and the running sums are not kept: two fewer d x d float64
    copies per layer (1.5 GB on ResNet-18); the factor is all scoring and editing need.

    L gives the whitening Z = L^-1 (Z^T Z = C_reg^-1) without an eigendecomposition; the
    inverse is only formed for layers that are edited (or scored with ``inverse``)."""

    layer: str
    ridge: float
    cholesky: torch.Tensor = field(repr=False, default=None)
    condition_number: float = float("nan")
    condition_estimated: bool = False
    ridge_value: float = 0.0
    _inverse: torch.Tensor | None = field(repr=False, default=None)
    kind: str = "exact"

    @classmethod
    def from_moments(cls, layer: str, moments: KeyMoments, ridge: float = DEFAULT_RIDGE
                     ) -> "LayerStatistics":
        cov = moments.second_moment
        cov = (cov + cov.T).mul_(0.5)
        lam = ridge * float(torch.diagonal(cov).mean().clamp_min(1e-12))
        regularised = cov.clone()
        regularised.diagonal().add_(lam)
        with threads_for(cov.shape[0]):
            chol = torch.linalg.cholesky(regularised)
            del regularised
            if cov.shape[0] <= EXACT_CONDITION_UP_TO:
                with single_thread():  # 2 threads cost 3x the CPU on a loaded machine
                    evals = torch.linalg.eigvalsh(cov)
                cond, estimated = float(evals.max() / evals.min().abs().clamp_min(1e-300)), False
            else:  # a lower bound from the factor's diagonal, for large key dimensions
                diag = torch.diagonal(chol) ** 2
                cond, estimated = float(diag.max() / diag.min()), True
        return cls(layer, ridge, chol, cond, estimated, lam)

    @property
    def solver(self) -> "CholeskyInverse":
        """C_reg^-1 as an operator (``solver @ X`` by two triangular solves, O(d^2 q)),
        which is all an edit needs: forming the inverse costs O(d^3) (ResNet-18 at 224,
        d = 4608: about 100 s of a 2-core patch per edited layer)."""
        return CholeskyInverse(self.cholesky)

    @property
    def inverse(self) -> torch.Tensor:
        """C_reg^-1 from the Cholesky factor, formed on first use."""
        if self._inverse is None:
            with threads_for(self.cholesky.shape[0]):
                self._inverse = torch.cholesky_inverse(self.cholesky)
        return self._inverse

    def whiten_rows(self, b: torch.Tensor) -> torch.Tensor:
        """B Z^T with Z = L^-1, for B [..., Kd]: ||B Z^T||_F^2 = tr(B C_reg^-1 B^T)."""
        flat = b.reshape(-1, b.shape[-1]).to(self.cholesky.dtype)
        solved = torch.linalg.solve_triangular(self.cholesky, flat.T, upper=False)
        return solved.T.reshape(b.shape)

    def solve_rows(self, b: torch.Tensor) -> torch.Tensor:
        """B C_reg^-1 for B [..., Kd]."""
        flat = b.reshape(-1, b.shape[-1]).to(self.cholesky.dtype)
        return torch.cholesky_solve(flat.T, self.cholesky).T.reshape(b.shape)


class CholeskyInverse:
    """C_reg^-1 X from the Cholesky factor L of C_reg, for ``operator @ X`` (X [d] or
    [d, q]) and ``.to(device or dtype)``, as edits use a dense inverse."""

    def __init__(self, cholesky: torch.Tensor) -> None:
        self.cholesky = cholesky
        self.shape, self.dtype = tuple(cholesky.shape), cholesky.dtype

    def to(self, *args, **kwargs) -> "CholeskyInverse":
        device = next((a for a in args if isinstance(a, (str, torch.device))),
                      kwargs.get("device"))
        return self if device is None else CholeskyInverse(self.cholesky.to(device))

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        rhs = x.to(self.cholesky.dtype)
        with threads_for(self.cholesky.shape[0]):
            out = torch.cholesky_solve(rhs if rhs.dim() == 2 else rhs[:, None], self.cholesky)
        return out if x.dim() == 2 else out[:, 0]


@dataclass
class KroneckerStatistics:
    """C_reg = (U_A (x) U_B)(S + lambda)(U_A (x) U_B)^T, S the eigenvalue estimates of
    :meth:`KroneckerMoments.spectrum` (module docstring); the same queries as
    :class:`LayerStatistics` except the dense inverse, which edits take from the exact
    statistics."""

    layer: str
    ridge: float
    channel_vectors: torch.Tensor = field(repr=False, default=None)
    offset_vectors: torch.Tensor = field(repr=False, default=None)
    spectrum: torch.Tensor = field(repr=False, default=None)  # eigenvalues + lambda, [Ca, kk]
    condition_number: float = float("nan")
    condition_estimated: bool = False
    ridge_value: float = 0.0
    kind: str = "kronecker"

    @classmethod
    def from_moments(cls, layer: str, moments: KroneckerMoments, ridge: float = DEFAULT_RIDGE
                     ) -> "KroneckerStatistics":
        _, ua, _, ub = moments.basis()
        spectrum = moments.spectrum()
        lam = ridge * float(torch.diagonal(moments.channels.second_moment).mean().clamp_min(1e-12))
        cond = float(spectrum.max() / spectrum.min().clamp_min(1e-300))
        return cls(layer, ridge, ua, ub, spectrum + lam, cond, False, lam)

    def _rotate(self, b: torch.Tensor) -> torch.Tensor:
        """U^T k for every row k of B, as [rows, C_in/g, kh*kw] matrices U_A^T K U_B."""
        ua, ub = self.channel_vectors, self.offset_vectors
        return rotate_keys(b.reshape(-1, ua.shape[0], ub.shape[0]).to(ua.dtype), ua, ub)

    def whiten_rows(self, b: torch.Tensor) -> torch.Tensor:
        """B Z^T with Z^T Z = C_reg^-1 (Z = (L + lambda)^-1/2 U^T): norms as in
        :meth:`LayerStatistics.whiten_rows`, coordinates rotated."""
        return (self._rotate(b) / self.spectrum.sqrt()).reshape(b.shape)

    def solve_rows(self, b: torch.Tensor) -> torch.Tensor:
        """B C_reg^-1 for B [..., Kd]."""
        y = self._rotate(b) / self.spectrum
        return rotate_keys(y, self.channel_vectors.T, self.offset_vectors.T).reshape(b.shape)


@dataclass
class LowRankStatistics:
    """C = K^T K / n from the kept key rows K [n, d] of a wide layer, as V diag(e) V^T
    (V [d, r] orthonormal, r <= n, from the eigen-decomposition of the n x n Gram matrix
    K K^T / n), never as a d x d matrix. With lambda = ridge * mean(diag C) = ridge * sum(e)/d:

        C_reg^-1 x   = V diag(1 / (e + lambda)) V^T x + (x - V V^T x) / lambda
        C_reg^-1/2 x = V diag((e + lambda)^-1/2) V^T x + (x - V V^T x) / sqrt(lambda)

    Exact (C itself, factored) when every key was kept; memory d x r instead of d^2."""

    layer: str
    ridge: float
    basis: torch.Tensor = field(repr=False, default=None)        # V [d, r], float64
    eigenvalues: torch.Tensor = field(repr=False, default=None)  # e [r]
    condition_number: float = float("nan")
    condition_estimated: bool = True
    ridge_value: float = 0.0
    kind: str = "low-rank"

    @classmethod
    def from_moments(cls, layer: str, moments: KeyRows, ridge: float = DEFAULT_RIDGE
                     ) -> "LowRankStatistics":
        k = moments.rows.to(torch.float64)
        n, d = k.shape
        gram = (k @ k.T) / max(n, 1)
        evals, vecs = torch.linalg.eigh((gram + gram.T) * 0.5)
        keep = evals > evals.max().clamp_min(1e-300) * 1e-12
        evals, vecs = evals[keep], vecs[:, keep]
        basis = (k.T @ vecs) / torch.sqrt(evals * max(n, 1))[None, :]
        lam = ridge * max(float(evals.sum()) / d, 1e-12)
        # the regularised C's condition number (C itself is singular when n < d)
        cond = float((evals.max() + lam) / lam) if evals.numel() else 1.0
        return cls(layer, ridge, basis, evals, cond, True, lam)

    def _apply(self, b: torch.Tensor, power: float) -> torch.Tensor:
        """Rows of B times C_reg^power (power -1 or -1/2), B [..., d]."""
        flat = b.reshape(-1, b.shape[-1]).to(self.basis.dtype)
        proj = flat @ self.basis
        inside = (proj * (self.eigenvalues + self.ridge_value) ** power) @ self.basis.T
        return (inside + (flat - proj @ self.basis.T) * self.ridge_value ** power
                ).reshape(b.shape)

    def whiten_rows(self, b: torch.Tensor) -> torch.Tensor:
        """B Z^T with Z = C_reg^-1/2 (symmetric): ||B Z^T||_F^2 = tr(B C_reg^-1 B^T)."""
        return self._apply(b, -0.5)

    def solve_rows(self, b: torch.Tensor) -> torch.Tensor:
        """B C_reg^-1 for B [..., d]."""
        return self._apply(b, -1.0)

    @property
    def inverse(self) -> "LowRankInverse":
        """C_reg^-1 as an operator (``inverse @ X``), never a d x d matrix."""
        return LowRankInverse(self)

    @property
    def solver(self) -> "LowRankInverse":
        """The same operator (:attr:`LayerStatistics.solver`'s interface)."""
        return LowRankInverse(self)


class LowRankInverse:
    """C_reg^-1 of :class:`LowRankStatistics` for ``inverse @ X`` (X [d] or [d, q]) and
    ``.to(device or dtype)``, as edits use a dense inverse."""

    def __init__(self, stats: LowRankStatistics) -> None:
        self.stats = stats
        self.shape = (stats.basis.shape[0], stats.basis.shape[0])
        self.dtype = stats.basis.dtype

    def to(self, *args, **kwargs) -> "LowRankInverse":
        device = next((a for a in args if isinstance(a, (str, torch.device))),
                      kwargs.get("device"))
        if device is None:
            return self
        s = self.stats
        return LowRankInverse(LowRankStatistics(s.layer, s.ridge, s.basis.to(device),
                                                s.eigenvalues.to(device), s.condition_number,
                                                s.condition_estimated, s.ridge_value))

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        return self.stats.solve_rows(x.T).T if x.dim() == 2 else self.stats.solve_rows(x)


def statistics_from_moments(name: str, moments: "KeyMoments | KroneckerMoments | KeyRows",
                            ridge: float = DEFAULT_RIDGE
                            ) -> "LayerStatistics | KroneckerStatistics | LowRankStatistics":
    if isinstance(moments, KeyRows):
        return LowRankStatistics.from_moments(name, moments, ridge)
    if isinstance(moments, KroneckerMoments):
        return KroneckerStatistics.from_moments(name, moments, ridge)
    return LayerStatistics.from_moments(name, moments, ridge)


def data_hash(*arrays: np.ndarray) -> str:
    digest = hashlib.sha256()
    for a in arrays:
        digest.update(str((a.shape, a.dtype.str)).encode())
        digest.update(np.ascontiguousarray(a).tobytes())
    return digest.hexdigest()[:16]


class MomentCache:
    """Partial sums on disk, keyed by model hash, layer weight and data hash."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def _path(self, model_hash: str, layer: EditableLayer, data_key: str) -> Path:
        name = hashlib.sha256(f"{model_hash}|{layer.name}|{layer.weight}|{data_key}".encode())
        return self.folder / f"{name.hexdigest()[:24]}.npz"

    def get(self, model_hash: str, layer: EditableLayer, data_key: str
            ) -> "KeyMoments | KroneckerMoments | None":
        path = self._path(model_hash, layer, data_key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                if "channels_sum" in data:
                    spectrum, count, basis = None, 0, None
                    if "spectrum_sum" in data:
                        spectrum, count = torch.from_numpy(data["spectrum_sum"]), \
                            int(data["spectrum_count"])
                        basis = tuple(torch.from_numpy(data[k]) for k in
                                      ("basis_la", "basis_ua", "basis_lb", "basis_ub"))
                    return KroneckerMoments(
                        KeyMoments(torch.from_numpy(data["channels_sum"]), int(data["channels_count"])),
                        KeyMoments(torch.from_numpy(data["offsets_sum"]), int(data["offsets_count"])),
                        spectrum, count, basis)
                if "key_rows" in data:
                    return KeyRows([torch.from_numpy(data["key_rows"])], int(data["count"]))
                return KeyMoments(torch.from_numpy(data["sum_kk"]), int(data["count"]))
        except (OSError, ValueError, KeyError):
            return None

    def put(self, model_hash: str, layer: EditableLayer, data_key: str,
            m: "KeyMoments | KroneckerMoments") -> None:
        from patcher.model.modelio import write_bytes_atomic
        import io

        self.folder.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        if isinstance(m, KroneckerMoments):
            extra = {}
            if m.spectrum_sum is not None:  # with the basis it was measured along
                la, ua, lb, ub = m.basis()
                extra = {"spectrum_sum": m.spectrum_sum.cpu().numpy(),
                         "spectrum_count": np.int64(m.spectrum_count),
                         "basis_la": la.cpu().numpy(), "basis_ua": ua.cpu().numpy(),
                         "basis_lb": lb.cpu().numpy(), "basis_ub": ub.cpu().numpy()}
            np.savez(buf, channels_sum=m.channels.sum_kk.cpu().numpy(),
                     channels_count=np.int64(m.channels.count),
                     offsets_sum=m.offsets.sum_kk.cpu().numpy(),
                     offsets_count=np.int64(m.offsets.count), **extra)
        elif isinstance(m, KeyRows):
            np.savez(buf, key_rows=m.rows.cpu().numpy(), count=np.int64(m.count))
        else:
            np.savez(buf, sum_kk=m.sum_kk.cpu().numpy(), count=np.int64(m.count))
        write_bytes_atomic(self._path(model_hash, layer, data_key), buf.getvalue())
