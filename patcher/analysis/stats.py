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
Kd = C_in/g x kh x kw multiply-adds per key, about 9 C_in / C_out times the conv itself
for 3x3 kernels (8x a whole ResNet-18 forward). The factored form takes the eigenbasis of
a Kronecker product and measures C's eigenvalues along it (K-FAC's factors, with the
eigenvalue correction of EKFAC, George et al. 2018):

    A[c, c'] = E_keys,offsets[k_(c,o) k_(c',o)]   (the channels' second moment)
    B[o, o'] = E_keys,channels[k_(c,o) k_(c,o')]  (the kernel offsets' second moment)
    A = U_A L_A U_A^T,  B / mean(diag B) = U_B L_B U_B^T,  U = U_A (x) U_B
    s_(i,j) = E_keys[(u_Ai^T K u_Bj)^2]            (K the key as a C_in/g x kh*kw matrix)
    C ~= U diag(s) U^T,  C_reg = U (diag(s) + lambda) U^T,  lambda = ridge * mean(diag A)

diag(s) is the best diagonal in that basis (it equals diag(U^T C U)); without it the form
is A (x) B / mean(diag B), exact only when every channel has the same spatial correlation.
Cost: A is read off the input pixels, each weighted by how many (position, offset) pairs
read it (:func:`patcher.graph.keys.patch_coverage`), one C_in/g x C_in/g product per pixel; B
from the keys of the first ``OFFSET_IMAGES`` inputs of each batch; s in a second, short
pass over ``CORRECTION_IMAGES`` inputs (at most ``SPECTRUM_ROWS`` keys each batch), since
it needs the basis of the whole first pass. C_reg^-1 k and whitened norms then cost two
small products per key. On the ResNet sample the factored scores rank layers with
Spearman 0.98 against the exact ones (the plain Kronecker form: 0.86). They rank layers;
an edit always uses the exact C of its layer, computed when the layer is chosen
(:func:`statistics_kind` says which layers are factored).
"""
from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from patcher.graph.keys import LayerTap, layer_keys, patch_coverage
from patcher.progress import progress
from patcher.graph.shadow import EditableLayer, ShadowGraph

DEFAULT_RIDGE = 1e-2
CHUNK_ROWS = 8192
#: How C is computed per layer: "exact" everywhere, "kronecker" for every conv with a
#: spatial kernel, or "auto": Kronecker-factored where the exact products would cost more
#: than the conv itself (key dimension Kd above the output channels per group).
STATISTICS_MODES = ("auto", "exact", "kronecker")
#: Kronecker statistics: inputs per batch whose unfolded keys estimate the offsets' B.
OFFSET_IMAGES = 8
#: Kronecker statistics: calibration inputs whose keys measure the eigenvalues (the
#: second pass of :func:`correct_spectra`).
CORRECTION_IMAGES = 32
#: ... and at most this many of their keys per layer and batch (a seeded uniform sample).
SPECTRUM_ROWS = 2048


def kernel_offsets(layer: EditableLayer) -> int:
    """kh x kw (1 for Gemm, MatMul and 1x1 convolutions)."""
    if layer.orientation != "conv":
        return 1
    return int(np.prod(layer.shape[2:], dtype=np.int64))


def statistics_kind(layer: EditableLayer, mode: str = "auto") -> str:
    """"exact" or "kronecker" for ``layer`` under ``mode`` (:data:`STATISTICS_MODES`).

    Only convolutions with a spatial kernel and several input channels per group can be
    factored (channel x offset); "auto" factors those whose K^T K costs more than the
    conv: Kd > M / g."""
    if mode not in STATISTICS_MODES:
        raise ValueError(f"unknown statistics mode '{mode}' ({', '.join(STATISTICS_MODES)})")
    if mode == "exact" or kernel_offsets(layer) == 1 or layer.key_dim == kernel_offsets(layer):
        return "exact"  # nothing to factor: a 1x1 kernel, or one input channel per group
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

    def add(self, keys: torch.Tensor, count: int | None = None) -> None:
        """Add k k^T for every row k of ``keys``; ``count`` keys (default: the rows)."""
        flat = keys.reshape(-1, keys.shape[-1])
        if flat.dtype != torch.float64:
            flat = flat.to(torch.float32)
        for i in range(0, flat.shape[0], CHUNK_ROWS):
            chunk = flat[i:i + CHUNK_ROWS]
            self.sum_kk += (chunk.T @ chunk).to(torch.float64)
        self.count += flat.shape[0] if count is None else count

    def merge(self, other: "KeyMoments") -> "KeyMoments":
        return KeyMoments(self.sum_kk + other.sum_kk.to(self.sum_kk.device), self.count + other.count)

    def to(self, device) -> "KeyMoments":
        return KeyMoments(self.sum_kk.to(device), self.count)

    @property
    def second_moment(self) -> torch.Tensor:
        return self.sum_kk / max(self.count, 1)


def rotate_keys(mats: torch.Tensor, ua: torch.Tensor, ub: torch.Tensor) -> torch.Tensor:
    """U_A^T K U_B for every key K [rows, C_in/g, kh*kw], as two large products (not one
    small product per key)."""
    rows, ca, kk = mats.shape
    right = (mats.reshape(rows * ca, kk) @ ub).reshape(rows, ca, kk)
    return (right.transpose(1, 2).reshape(rows * kk, ca) @ ua).reshape(rows, kk, ca).transpose(1, 2)


@dataclass
class KroneckerMoments:
    """Running sums of the two factors of a conv's C and, once :meth:`add_spectrum` has seen
    keys, of their second moments along the factors' eigenbasis (module docstring)."""

    channels: KeyMoments  # sum over keys and offsets of k_c k_c'^T, [C_in/g, C_in/g]
    offsets: KeyMoments   # sum over keys and channels of k_o k_o'^T, [kh*kw, kh*kw]
    spectrum_sum: torch.Tensor | None = field(default=None, repr=False)  # [C_in/g, kh*kw]
    spectrum_count: int = 0
    _basis: tuple | None = field(default=None, repr=False, compare=False)

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
        # A over keys and offsets, read off the pixels: each pixel weighted by how many
        # (position, offset) pairs read it (padding zeros add nothing)
        coverage, positions = patch_coverage(layer, attrs, tuple(data.shape[2:]))
        weight = coverage.to(device=data.device, dtype=data.dtype).sqrt().reshape(1, 1, -1)
        pixels = data.reshape(n * groups, per_group, -1) * weight
        if pixels.dtype != torch.float64:
            pixels = pixels.to(torch.float32)
        if pixels.shape[-1] >= per_group:  # large maps: one [C, HW] x [HW, C] per input
            self.channels.sum_kk += (pixels @ pixels.transpose(1, 2)).sum(0, dtype=torch.float64)
        else:  # small maps, many channels: all pixels side by side, in chunks
            flat = pixels.transpose(0, 1).reshape(per_group, -1)
            for i in range(0, flat.shape[1], CHUNK_ROWS):
                chunk = flat[:, i:i + CHUNK_ROWS]
                self.channels.sum_kk += (chunk @ chunk.T).to(torch.float64)
        self.channels.count += n * groups * positions * kernel_offsets(layer)
        keys = layer_keys(layer, data[:OFFSET_IMAGES], attrs)
        self.offsets.add(keys.reshape(-1, per_group, kernel_offsets(layer))
                         .reshape(-1, kernel_offsets(layer)))
        # new data moves the basis: a spectrum measured along the old one no longer fits
        self._basis, self.spectrum_sum, self.spectrum_count = None, None, 0

    def basis(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(L_A, U_A, L_B, U_B): eigenvalues and eigenvectors of A and B' = B / mean(diag B)."""
        if self._basis is None:
            a, b = self.channels.second_moment, self.offsets.second_moment
            a, b = (a + a.T) * 0.5, (b + b.T) * 0.5
            b = b / torch.diagonal(b).mean().clamp_min(1e-300)
            with _threads_for(a.shape[0]):
                la, ua = torch.linalg.eigh(a)
                lb, ub = torch.linalg.eigh(b)
            self._basis = (la.clamp_min(0), ua, lb.clamp_min(0), ub)
        return self._basis

    def add_spectrum(self, layer: EditableLayer, data: torch.Tensor, attrs: dict) -> None:
        """Second moments of one batch's keys along U_A (x) U_B: sum of (U_A^T K U_B)^2."""
        _, ua, _, ub = self.basis()
        keys = layer_keys(layer, data, attrs)
        mats = keys.reshape(-1, ua.shape[0], ub.shape[0])
        if mats.shape[0] > SPECTRUM_ROWS:  # a seeded uniform sample of the keys
            generator = torch.Generator(device="cpu").manual_seed(self.spectrum_count)
            pick = torch.randperm(mats.shape[0], generator=generator)[:SPECTRUM_ROWS]
            mats = mats[pick.to(mats.device)]
        dtype = torch.float64 if mats.dtype == torch.float64 else torch.float32
        total = torch.zeros(ua.shape[0], ub.shape[0], dtype=torch.float64, device=ua.device)
        for i in range(0, mats.shape[0], CHUNK_ROWS):
            y = rotate_keys(mats[i:i + CHUNK_ROWS].to(dtype), ua.to(dtype), ub.to(dtype))
            total += (y * y).sum(0).to(torch.float64)
        self.spectrum_sum = total if self.spectrum_sum is None else self.spectrum_sum + total
        self.spectrum_count += mats.shape[0]

    def spectrum(self) -> torch.Tensor:
        """C's eigenvalue estimates along U_A (x) U_B, [C_in/g, kh*kw]: the keys' measured
        second moments there when :meth:`add_spectrum` ran, else L_A (x) L_B."""
        if self.spectrum_sum is not None and self.spectrum_count:
            return (self.spectrum_sum / self.spectrum_count).clamp_min(0)
        la, _, lb, _ = self.basis()
        return la[:, None] * lb[None, :]

    def dense(self) -> torch.Tensor:
        """The factored second moment U diag(spectrum) U^T as a Kd x Kd matrix."""
        _, ua, _, ub = self.basis()
        q = torch.kron(ua, ub)
        return q @ torch.diag(self.spectrum().reshape(-1)) @ q.T

    def merge(self, other: "KroneckerMoments") -> "KroneckerMoments":
        """Sums of two data shards. The spectrum is measured along the merged factors'
        basis, so it is dropped here; :func:`correct_spectra` measures it again."""
        return KroneckerMoments(self.channels.merge(other.channels),
                                self.offsets.merge(other.offsets))

    def to(self, device) -> "KroneckerMoments":
        """On ``device``, with the basis the spectrum was measured along (an eigenbasis
        recomputed elsewhere may differ within repeated eigenvalues)."""
        spectrum = self.spectrum_sum.to(device) if self.spectrum_sum is not None else None
        basis = None if self._basis is None else tuple(t.to(device) for t in self._basis)
        return KroneckerMoments(self.channels.to(device), self.offsets.to(device), spectrum,
                                self.spectrum_count, basis)


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

    def before(batch):
        current["batch"] = len(batch)

    _tapped_passes(graph, layers, batches, accumulate, label, total, show_progress,
                   on_output=on_output, on_batch=before)
    return moments


def _tapped_passes(graph: ShadowGraph, layers: list[EditableLayer], batches, on_capture,
                   label: str, total: int | None, show_progress: bool | None,
                   on_output=None, on_batch=None) -> None:
    """Forward every batch with ``on_capture(layer, data, out)`` tapping ``layers``, under a
    progress bar. Without ``on_output`` each forward stops after the last tapped layer:
    nothing downstream of it feeds the sums (an edit's exact statistics of one layer)."""
    device = next((p.device for p in graph.parameters()), torch.device("cpu"))
    order = {info.name: i for i, info in enumerate(graph.nodes)}
    last = max((l.name for l in layers), key=order.__getitem__) if on_output is None else None

    def tap(layer, data, out):
        on_capture(layer, data, out)
        if layer.name == last:
            raise _LastLayerDone

    with progress(total or 0, label, show_progress) as bar, \
            LayerTap(graph, layers, on_capture=tap), torch.no_grad():
        for batch in batches:
            if on_batch is not None:
                on_batch(batch)
            try:
                outputs = graph(batch.to(device))
            except _LastLayerDone:
                outputs = None
            if on_output is not None:
                on_output(batch, outputs)
            bar.update(len(batch))


class _LastLayerDone(Exception):
    """Raised by a statistics tap to end a forward pass early (caught in this module)."""


def correct_spectra(graph: ShadowGraph, layers: list[EditableLayer], moments: dict, batches,
                    total: int | None = None, show_progress: bool | None = None) -> None:
    """Measure the keys' second moments along each factored layer's eigenbasis (a second,
    shorter pass: the basis needs the whole first pass)."""
    factored = [l for l in layers if isinstance(moments.get(l.name), KroneckerMoments)]
    if not factored:
        return
    attrs = {l.name: graph.node_attributes(l.name) for l in factored}

    def accumulate(layer, data, _out):
        moments[layer.name].add_spectrum(layer, data, attrs[layer.name])

    _tapped_passes(graph, factored, batches, accumulate,
                   "key statistics (eigenvalue correction)", total, show_progress)


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
        else:
            np.savez(buf, sum_kk=m.sum_kk.cpu().numpy(), count=np.int64(m.count))
        write_bytes_atomic(self._path(model_hash, layer, data_key), buf.getvalue())
