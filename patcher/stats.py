"""Key statistics C = E[k k^T] per editable layer, streamed in float64, and their inverses.

One forward pass over the calibration inputs feeds every editable layer at once;
each layer's keys [n, P, G, Kd] are folded into a running sum S = sum k k^T and a
count (mergeable partial sums: statistics of several data shards add up).

Precision: the products K^T K are float32 GEMMs over chunks of at most ``CHUNK_ROWS``
keys (relative error about sqrt(CHUNK_ROWS) x 6e-8, below 1e-5), each added to a float64
sum; float32 GEMMs run about twice as fast as float64 on CPUs and GPUs, and the GEMM is
the whole cost of this pass (about 9 C_in / C_out times the conv itself for a 3x3 conv).
Keys already in float64 stay in float64.

``max_rows`` (optional) caps the keys per layer: each batch contributes a seeded,
uniformly drawn share of its keys, so that about ``max_rows`` keys in all are used. The
default uses every key.
Regularisation (ridge): C_reg = C + lambda I with lambda = ridge * mean(diag C),
default ridge = 1e-2.

Kronecker-factored statistics (``kind = "kronecker"``), for convolutions with a spatial
kernel: a conv key k[c, o] holds input channel c at kernel offset o, and the exact C costs
Kd = C_in/g x kh x kw times the keys' count in multiply-adds, about 9 C_in / C_out times
the conv itself for 3x3 kernels (8x a whole ResNet-18 forward). The factored form

    C ~= A (x) B / mean(diag B),
    A[c, c'] = E_pixels[x_c x_c']               (the layer input's channel second moment)
    B[o, o'] = E_keys,channels[k_(c,o) k_(c,o')]  (the kernel offsets' second moment)

costs one C_in/g x C_in/g product per input pixel for A and a Kd x kh*kw product per key
for B, taken on the first ``OFFSET_IMAGES`` inputs of each batch (B is kh*kw x kh*kw).
With A = U_A L_A U_A^T and B' = B / mean(diag B) = U_B L_B U_B^T, C_reg = (U_A (x) U_B)
(L_A (x) L_B + lambda) (U_A (x) U_B)^T, so C_reg^-1 k and the whitened norms cost two small
matrix products per key. The factors are exact when the input's spatial correlation is the
same in every channel (and with no padding); they are an approximation otherwise, used to
rank layers; an edit always uses the exact C of its layer (:func:`statistics_kind`).
"""
from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .keys import LayerTap, layer_keys
from .progress import progress
from .shadow import EditableLayer, ShadowGraph

DEFAULT_RIDGE = 1e-2
CHUNK_ROWS = 8192
#: How C is computed per layer: "exact" everywhere, "kronecker" for every conv with a
#: spatial kernel, or "auto": Kronecker-factored where the exact products would cost more
#: than the conv itself (key dimension Kd above the output channels per group).
STATISTICS_MODES = ("auto", "exact", "kronecker")
#: Kronecker statistics: inputs per batch whose unfolded keys estimate the offsets' B.
OFFSET_IMAGES = 8


def kernel_offsets(layer: EditableLayer) -> int:
    """kh x kw (1 for Gemm, MatMul and 1x1 convolutions)."""
    if layer.orientation != "conv":
        return 1
    return int(np.prod(layer.shape[2:], dtype=np.int64))


def statistics_kind(layer: EditableLayer, mode: str = "auto") -> str:
    """"exact" or "kronecker" for ``layer`` under ``mode`` (:data:`STATISTICS_MODES`).

    Only convolutions with a spatial kernel can be factored (channel x offset); "auto"
    factors those whose K^T K costs more than the conv: Kd > M / g."""
    if mode not in STATISTICS_MODES:
        raise ValueError(f"unknown statistics mode '{mode}' ({', '.join(STATISTICS_MODES)})")
    if mode == "exact" or kernel_offsets(layer) == 1:
        return "exact"
    if mode == "kronecker":
        return "kronecker"
    return "kronecker" if layer.key_dim > layer.value_dim // max(layer.groups, 1) else "exact"


@contextmanager
def _threads_for(dim: int):
    """One thread for small factorisations, all threads for large ones."""
    if dim < SINGLE_THREAD_BELOW:
        with single_thread():
            yield
    else:
        yield


@contextmanager
def single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class KeyMoments:
    """Running sum of k k^T (float64) and the number of keys, for one layer."""

    sum_kk: torch.Tensor
    count: int = 0

    def add(self, keys: torch.Tensor) -> None:
        flat = keys.reshape(-1, keys.shape[-1])
        if flat.dtype != torch.float64:
            flat = flat.to(torch.float32)
        for i in range(0, flat.shape[0], CHUNK_ROWS):
            chunk = flat[i:i + CHUNK_ROWS]
            self.sum_kk += (chunk.T @ chunk).to(torch.float64)
        self.count += flat.shape[0]

    def merge(self, other: "KeyMoments") -> "KeyMoments":
        return KeyMoments(self.sum_kk + other.sum_kk.to(self.sum_kk.device), self.count + other.count)

    def to(self, device) -> "KeyMoments":
        return KeyMoments(self.sum_kk.to(device), self.count)

    @property
    def second_moment(self) -> torch.Tensor:
        return self.sum_kk / max(self.count, 1)


@dataclass
class KroneckerMoments:
    """Running sums of the two factors of a conv's C (see the module docstring)."""

    channels: KeyMoments  # sum over input pixels of x x^T, [C_in/g, C_in/g]
    offsets: KeyMoments   # sum over keys and channels of k_o k_o'^T, [kh*kw, kh*kw]

    @classmethod
    def empty(cls, layer: EditableLayer, device) -> "KroneckerMoments":
        kk = kernel_offsets(layer)
        zeros = lambda d: torch.zeros(d, d, dtype=torch.float64, device=device)  # noqa: E731
        return cls(KeyMoments(zeros(layer.key_dim // kk)), KeyMoments(zeros(kk)))

    def add(self, layer: EditableLayer, data: torch.Tensor, attrs: dict) -> None:
        """Fold in one batch of the layer's input ``data`` [n, C, *spatial]."""
        n, c = data.shape[:2]
        groups = max(layer.groups, 1)
        per_group = c // groups
        pixels = data.reshape(n, groups, per_group, -1).permute(0, 1, 3, 2)
        self.channels.add(pixels.reshape(-1, per_group))
        keys = layer_keys(layer, data[:OFFSET_IMAGES], attrs)
        self.offsets.add(keys.reshape(-1, per_group, kernel_offsets(layer))
                         .reshape(-1, kernel_offsets(layer)))

    def merge(self, other: "KroneckerMoments") -> "KroneckerMoments":
        return KroneckerMoments(self.channels.merge(other.channels),
                                self.offsets.merge(other.offsets))

    def to(self, device) -> "KroneckerMoments":
        return KroneckerMoments(self.channels.to(device), self.offsets.to(device))


#: Below this key dimension the factorisation runs on one thread (small LAPACK calls thrash
#: when threads compete for cores); above it, on all of them.
SINGLE_THREAD_BELOW = 512
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
        with _threads_for(cov.shape[0]):
            chol = torch.linalg.cholesky(regularised)
            del regularised
            if cov.shape[0] <= EXACT_CONDITION_UP_TO:
                evals = torch.linalg.eigvalsh(cov)
                cond, estimated = float(evals.max() / evals.min().abs().clamp_min(1e-300)), False
            else:  # a lower bound from the factor's diagonal, for large key dimensions
                diag = torch.diagonal(chol) ** 2
                cond, estimated = float(diag.max() / diag.min()), True
        return cls(layer, ridge, chol, cond, estimated, lam)

    @property
    def inverse(self) -> torch.Tensor:
        """C_reg^-1 from the Cholesky factor, formed on first use."""
        if self._inverse is None:
            with _threads_for(self.cholesky.shape[0]):
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


@dataclass
class KroneckerStatistics:
    """C_reg = (U_A (x) U_B)(L_A (x) L_B + lambda)(U_A (x) U_B)^T from the factors'
    eigendecompositions (module docstring); the same queries as :class:`LayerStatistics`
    except the dense inverse, which edits take from the exact statistics."""

    layer: str
    ridge: float
    channel_vectors: torch.Tensor = field(repr=False, default=None)
    offset_vectors: torch.Tensor = field(repr=False, default=None)
    spectrum: torch.Tensor = field(repr=False, default=None)  # L_A (x) L_B + lambda, [Ca, kk]
    condition_number: float = float("nan")
    condition_estimated: bool = False
    ridge_value: float = 0.0
    kind: str = "kronecker"

    @classmethod
    def from_moments(cls, layer: str, moments: KroneckerMoments, ridge: float = DEFAULT_RIDGE
                     ) -> "KroneckerStatistics":
        a, b = moments.channels.second_moment, moments.offsets.second_moment
        a, b = (a + a.T) * 0.5, (b + b.T) * 0.5
        b = b / torch.diagonal(b).mean().clamp_min(1e-300)
        with _threads_for(a.shape[0]):
            la, ua = torch.linalg.eigh(a)
            lb, ub = torch.linalg.eigh(b)
        la, lb = la.clamp_min(0), lb.clamp_min(0)
        lam = ridge * float(torch.diagonal(a).mean().clamp_min(1e-12))
        product = la[:, None] * lb[None, :]
        cond = float(product.max() / product.min().clamp_min(1e-300))
        return cls(layer, ridge, ua, ub, product + lam, cond, False, lam)

    def _rotate(self, b: torch.Tensor) -> torch.Tensor:
        """U^T k for every row k of B, as [rows, C_in/g, kh*kw] matrices U_A^T K U_B."""
        ua, ub = self.channel_vectors, self.offset_vectors
        mats = b.reshape(-1, ua.shape[0], ub.shape[0]).to(ua.dtype)
        return ua.T @ mats @ ub

    def whiten_rows(self, b: torch.Tensor) -> torch.Tensor:
        """B Z^T with Z^T Z = C_reg^-1 (Z = (L + lambda)^-1/2 U^T): norms as in
        :meth:`LayerStatistics.whiten_rows`, coordinates rotated."""
        return (self._rotate(b) / self.spectrum.sqrt()).reshape(b.shape)

    def solve_rows(self, b: torch.Tensor) -> torch.Tensor:
        """B C_reg^-1 for B [..., Kd]."""
        y = self._rotate(b) / self.spectrum
        return (self.channel_vectors @ y @ self.offset_vectors.T).reshape(b.shape)


def collect_moments(graph: ShadowGraph, layers: list[EditableLayer], batches,
                    total: int | None = None, label: str = "key statistics",
                    show_progress: bool | None = None, max_rows: int | None = None,
                    seed: int = 0, mode: str = "exact", on_output=None
                    ) -> dict[str, "KeyMoments | KroneckerMoments"]:
    """One forward pass per batch (an iterable of input tensors) feeds all layers' sums:
    :class:`KeyMoments`, or :class:`KroneckerMoments` where :func:`statistics_kind` says so
    for ``mode``. ``on_output(batch, outputs)`` sees every batch's graph outputs.

    With ``max_rows`` and ``total`` (the number of inputs), each layer keeps a seeded
    random share max_rows / (keys per input x total) of every batch's keys (exact
    statistics only: the factored ones are cheap)."""
    device = next((p.device for p in graph.parameters()), torch.device("cpu"))
    moments: dict = {}
    for l in layers:
        if statistics_kind(l, mode) == "kronecker":
            moments[l.name] = KroneckerMoments.empty(l, device)
        else:
            moments[l.name] = KeyMoments(torch.zeros(l.key_dim, l.key_dim, dtype=torch.float64,
                                                     device=device))
    attrs = {l.name: graph.node_attributes(l.name) for l in layers}

    generator = torch.Generator(device="cpu").manual_seed(seed)
    current = {"batch": 1}

    def accumulate(layer, data, _out):
        target = moments[layer.name]
        if isinstance(target, KroneckerMoments):
            target.add(layer, data, attrs[layer.name])
            return
        keys = layer_keys(layer, data, attrs[layer.name])
        if max_rows and total:
            flat = keys.reshape(-1, keys.shape[-1])
            share = max_rows / (flat.shape[0] / max(current["batch"], 1) * total)
            if share < 1:
                keep = max(1, round(share * flat.shape[0]))
                pick = torch.randperm(flat.shape[0], generator=generator)[:keep]
                keys = flat[pick.to(flat.device)]
        moments[layer.name].add(keys)

    with progress(total or 0, label, show_progress) as bar, \
            LayerTap(graph, layers, on_capture=accumulate), torch.no_grad():
        for batch in batches:
            current["batch"] = len(batch)
            outputs = graph(batch.to(device))
            if on_output is not None:
                on_output(batch, outputs)
            bar.update(len(batch))
    return moments


def statistics_from_moments(name: str, moments: "KeyMoments | KroneckerMoments",
                            ridge: float = DEFAULT_RIDGE
                            ) -> "LayerStatistics | KroneckerStatistics":
    if isinstance(moments, KroneckerMoments):
        return KroneckerStatistics.from_moments(name, moments, ridge)
    return LayerStatistics.from_moments(name, moments, ridge)


def iterate_batches(x: np.ndarray, batch: int = 128):
    for i in range(0, len(x), batch):
        yield torch.from_numpy(np.ascontiguousarray(x[i:i + batch]))


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
                    return KroneckerMoments(
                        KeyMoments(torch.from_numpy(data["channels_sum"]), int(data["channels_count"])),
                        KeyMoments(torch.from_numpy(data["offsets_sum"]), int(data["offsets_count"])))
                return KeyMoments(torch.from_numpy(data["sum_kk"]), int(data["count"]))
        except (OSError, ValueError, KeyError):
            return None

    def put(self, model_hash: str, layer: EditableLayer, data_key: str,
            m: "KeyMoments | KroneckerMoments") -> None:
        from .modelio import write_bytes_atomic
        import io

        self.folder.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        if isinstance(m, KroneckerMoments):
            np.savez(buf, channels_sum=m.channels.sum_kk.cpu().numpy(),
                     channels_count=np.int64(m.channels.count),
                     offsets_sum=m.offsets.sum_kk.cpu().numpy(),
                     offsets_count=np.int64(m.offsets.count))
        else:
            np.savez(buf, sum_kk=m.sum_kk.cpu().numpy(), count=np.int64(m.count))
        write_bytes_atomic(self._path(model_hash, layer, data_key), buf.getvalue())
