"""Key moments per editable layer, streamed in one pass: sum k k^T (exact) or Kronecker factors.

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
from ``OFFSET_KEYS`` keys sampled over the whole pass; s in a second, short
pass over ``CORRECTION_IMAGES`` inputs (at most ``SPECTRUM_ROWS`` keys each batch), since
it needs the basis of the whole first pass. C_reg^-1 k and whitened norms then cost two
small products per key. On the ResNet sample the factored scores rank layers with
Spearman 0.98 against the exact ones (the plain Kronecker form: 0.86). They rank layers;
an edit always uses the exact C of its layer, computed when the layer is chosen
(:func:`statistics_kind` says which layers are factored).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from patcher.graph.keys import (LayerTap, layer_keys, patch_coverage, pointwise_pixels,
                                sampled_conv_keys)
from patcher.graph.shadow import EditableLayer, ShadowGraph
from patcher.progress import progress

DEFAULT_RIDGE = 1e-2
CHUNK_ROWS = 8192
#: Keys narrower than this are summed in float64 in chunks of CHUNK_ELEMENTS / Kd rows.
NARROW_KEY_DIM = 64
CHUNK_ELEMENTS = 1 << 22
#: Unfolded keys of at most this many bytes exist at once: a batch whose keys would be
#: larger is unfolded a few inputs at a time (memory bounded by the chunk, not the batch).
CHUNK_BYTES = 64 << 20
#: Largest key dimension whose exact statistics are computed: a float64 C of 8 GiB, and the
#: same again for its eigen-decomposition (memory and an O(d^3) factorisation).
MAX_KEY_DIM = 1 << 15
#: Gemm and MatMul layers with more inputs than this (a flattened 25,088-wide VGG feature
#: map: 5 GB per float64 d x d copy) keep their keys as float32 rows instead of the d x d
#: sum: C = K^T K / n in that factored form costs n x d (:class:`KeyRows`,
#: :class:`patcher.analysis.stats.LowRankStatistics`), exact while every key is kept.
WIDE_KEY_DIM = 8192
#: ... and keep at most this many keys (a seeded uniform sample beyond: C is then estimated).
MAX_KEY_ROWS = 2048
#: How C is computed per layer: "exact" everywhere, "kronecker" for every conv with a
#: spatial kernel, or "auto": Kronecker-factored where the exact products would cost more
#: than the conv itself (key dimension Kd above the output channels per group).
STATISTICS_MODES = ("auto", "exact", "kronecker")
#: Kronecker statistics: keys per pass (a seeded uniform sample, gathered, each batch its
#: share of them) that estimate the offsets' B (each gives C_in/g rows of kh*kw, so
#: hundreds of thousands of rows for a kh*kw x kh*kw matrix). Unfolding every key of 8
#: inputs per batch took 24 of the 52 CPU s of ResNet-18's statistics pass at 224; 4096
#: keys per batch (unfolding every key of a batch with fewer) still about 19 of 41.
OFFSET_KEYS = 4096
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
    if layer.orientation != "conv" and layer.key_dim > WIDE_KEY_DIM:
        return "low-rank"  # in every mode: the keys themselves, not a d x d matrix
    if mode == "exact" or kernel_offsets(layer) == 1 or layer.key_dim == kernel_offsets(layer):
        return "exact"  # nothing to factor: a 1x1 kernel, or one input channel per group
    if mode == "kronecker":
        return "kronecker"
    return "kronecker" if layer.key_dim > layer.value_dim // max(layer.groups, 1) else "exact"


#: Below this key dimension the factorisation runs on one thread (small LAPACK calls thrash
#: when threads compete for cores); above it, on all of them.
SINGLE_THREAD_BELOW = 512


@contextmanager
def threads_for(dim: int):
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
        """Add k k^T for every row k of ``keys``; ``count`` keys (default: the rows).

        Narrow keys (Kd below :data:`NARROW_KEY_DIM`, e.g. a depthwise conv's 9) are summed
        in float64 in chunks of CHUNK_ELEMENTS / Kd rows (few large products instead of
        many tiny ones); wider keys in float32 chunks of CHUNK_ROWS (module docstring)."""
        flat = keys.reshape(-1, keys.shape[-1])
        dim = flat.shape[-1]
        if dim < NARROW_KEY_DIM:
            rows = max(CHUNK_ROWS, CHUNK_ELEMENTS // max(dim, 1))
            flat = flat.to(torch.float64)
        else:
            rows = CHUNK_ROWS
            if flat.dtype != torch.float64:
                flat = flat.to(torch.float32)
        for i in range(0, flat.shape[0], rows):
            chunk = flat[i:i + rows]
            self.sum_kk += (chunk.T @ chunk).to(torch.float64)
        self.count += flat.shape[0] if count is None else count

    def add_channels(self, data: torch.Tensor) -> None:
        """Add x x^T for every pixel x of ``data`` [n, C, *spatial] (the keys of a pointwise
        convolution, :func:`patcher.graph.keys.pointwise_pixels`) without unfolding them:
        per input [C, HW] x [HW, C] in pixel chunks of CHUNK_ROWS, or, for maps smaller than
        the channels, the pixels of several inputs side by side (at most CHUNK_ROWS)."""
        n, c = data.shape[:2]
        pixels = data.reshape(n, c, -1)
        if pixels.dtype != torch.float64:
            pixels = pixels.to(torch.float32)
        hw = pixels.shape[-1]
        if hw >= c:
            per_chunk = max(1, CHUNK_BYTES // (c * c * 4))  # products alive at once
            for i in range(0, n, per_chunk):
                for j in range(0, hw, CHUNK_ROWS):
                    part = pixels[i:i + per_chunk, :, j:j + CHUNK_ROWS]
                    self.sum_kk += (part @ part.transpose(1, 2)).sum(0, dtype=torch.float64)
        else:
            per_chunk = max(1, CHUNK_ROWS // hw)
            for i in range(0, n, per_chunk):
                flat = pixels[i:i + per_chunk].transpose(0, 1).reshape(c, -1)
                self.sum_kk += (flat @ flat.T).to(torch.float64)
        self.count += n * hw

    def merge(self, other: "KeyMoments") -> "KeyMoments":
        return KeyMoments(self.sum_kk + other.sum_kk.to(self.sum_kk.device), self.count + other.count)

    def to(self, device) -> "KeyMoments":
        return KeyMoments(self.sum_kk.to(device), self.count)

    @property
    def second_moment(self) -> torch.Tensor:
        return self.sum_kk / max(self.count, 1)


@dataclass
class KeyRows:
    """The keys of a wide Gemm/MatMul layer themselves, as float32 rows (C = K^T K / rows,
    kept factored), and the number of keys they stand for."""

    parts: list = field(default_factory=list)
    count: int = 0

    def add(self, keys: torch.Tensor, count: int | None = None) -> None:
        flat = keys.reshape(-1, keys.shape[-1])
        self.parts.append(flat.to(torch.float32 if flat.dtype != torch.float64 else flat.dtype))
        self.count += flat.shape[0] if count is None else count

    @property
    def rows(self) -> torch.Tensor:
        """All kept key rows [rows, d] (one tensor)."""
        if len(self.parts) > 1:
            self.parts = [torch.cat(self.parts)]
        return self.parts[0]

    def merge(self, other: "KeyRows") -> "KeyRows":
        return KeyRows([self.rows, other.rows.to(self.rows.device)], self.count + other.count)

    def to(self, device) -> "KeyRows":
        return KeyRows([p.to(device) for p in self.parts], self.count)


def rotate_keys(mats: torch.Tensor, ua: torch.Tensor, ub: torch.Tensor) -> torch.Tensor:
    """U_A^T K U_B for every key K [rows, C_in/g, kh*kw], as two large products (not one
    small product per key)."""
    rows, ca, kk = mats.shape
    right = (mats.reshape(rows * ca, kk) @ ub).reshape(rows, ca, kk)
    return (right.transpose(1, 2).reshape(rows * kk, ca) @ ua).reshape(rows, kk, ca).transpose(1, 2)


def key_chunks(layer: EditableLayer, data: torch.Tensor, attrs: dict):
    """The layer's keys for ``data`` as rows [keys, Kd], in the order of
    ``layer_keys(layer, data, attrs).reshape(-1, Kd)``. A convolution's keys are unfolded a
    few inputs at a time, so that at most about CHUNK_BYTES of them exist at once; the
    keys of Gemm and MatMul are the data itself (one piece)."""
    if layer.orientation != "conv":
        keys = layer_keys(layer, data, attrs)
        yield keys.reshape(-1, keys.shape[-1])
        return
    per_input = conv_key_count(layer, attrs, tuple(data.shape[2:])) * layer.key_dim * 4
    step = max(1, CHUNK_BYTES // max(per_input, 1))
    for i in range(0, data.shape[0], step):
        keys = layer_keys(layer, data[i:i + step], attrs)
        yield keys.reshape(-1, keys.shape[-1])


def conv_key_count(layer: EditableLayer, attrs: dict, spatial: tuple[int, ...]) -> int:
    """Keys of a convolution per input: output positions x groups."""
    return patch_coverage(layer, attrs, spatial)[1] * max(layer.groups, 1)


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

    def add(self, layer: EditableLayer, data: torch.Tensor, attrs: dict,
            offset_keys: int | None = None) -> None:
        """Fold in one batch of the layer's input ``data`` [n, C, *spatial]; B from at most
        ``offset_keys`` of its keys (default OFFSET_KEYS; a seeded sample, gathered)."""
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
        rows = conv_key_count(layer, attrs, tuple(data.shape[2:])) * n
        wanted = OFFSET_KEYS if offset_keys is None else max(1, offset_keys)
        if rows > wanted:  # a seeded uniform sample of the batch's keys, gathered
            generator = torch.Generator(device="cpu").manual_seed(self.offsets.count)
            pick = torch.randint(rows, (wanted,), generator=generator).sort().values
            keys = sampled_conv_keys(layer, data, attrs, pick)
            self.offsets.add(keys.reshape(-1, kernel_offsets(layer)))
        else:
            for keys in key_chunks(layer, data, attrs):
                self.offsets.add(keys.reshape(-1, kernel_offsets(layer)))
        # new data moves the basis: a spectrum measured along the old one no longer fits
        self._basis, self.spectrum_sum, self.spectrum_count = None, None, 0

    def basis(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(L_A, U_A, L_B, U_B): eigenvalues and eigenvectors of A and B' = B / mean(diag B)."""
        if self._basis is None:
            a, b = self.channels.second_moment, self.offsets.second_moment
            a, b = (a + a.T) * 0.5, (b + b.T) * 0.5
            b = b / torch.diagonal(b).mean().clamp_min(1e-300)
            with threads_for(a.shape[0]):
                la, ua = torch.linalg.eigh(a)
                lb, ub = torch.linalg.eigh(b)
            self._basis = (la.clamp_min(0), ua, lb.clamp_min(0), ub)
        return self._basis

    def add_spectrum(self, layer: EditableLayer, data: torch.Tensor, attrs: dict) -> None:
        """Second moments of one batch's keys along U_A (x) U_B: sum of (U_A^T K U_B)^2."""
        _, ua, _, ub = self.basis()
        rows = conv_key_count(layer, attrs, tuple(data.shape[2:])) * data.shape[0]
        if rows > SPECTRUM_ROWS:  # a seeded uniform sample of the keys, gathered alone
            generator = torch.Generator(device="cpu").manual_seed(self.spectrum_count)
            pick = torch.randperm(rows, generator=generator)[:SPECTRUM_ROWS].sort().values
            mats = sampled_conv_keys(layer, data, attrs, pick)
        else:
            mats = torch.cat(list(key_chunks(layer, data, attrs)))
        mats = mats.reshape(-1, ua.shape[0], ub.shape[0])
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



def check_key_dims(layers: list[EditableLayer], mode: str = "exact") -> None:
    """Refuse, before anything is allocated, layers whose exact key statistics (a float64
    key_dim x key_dim matrix, and its factorisations) would exceed :data:`MAX_KEY_DIM`."""
    from patcher.errors import NumericalError

    big = [l for l in layers if statistics_kind(l, mode) == "exact" and
           l.key_dim > MAX_KEY_DIM]
    if big:
        l = max(big, key=lambda layer: layer.key_dim)
        raise NumericalError(
            f"layer '{l.name}' has {l.key_dim} inputs per output (key dimension): its key "
            f"statistics would take {l.key_dim ** 2 * 8 / 2**30:.0f} GiB and cannot be "
            f"factorised; at most {MAX_KEY_DIM} are supported"
            + (f" ({len(big)} layers exceed it)" if len(big) > 1 else ""))


def collect_moments(graph: ShadowGraph, layers: list[EditableLayer], batches,
                    total: int | None = None, label: str = "key statistics",
                    show_progress: bool | None = None,
                    max_rows: "int | dict[str, int] | None" = None,
                    seed: int = 0, mode: str = "exact", on_output=None
                    ) -> dict[str, "KeyMoments | KroneckerMoments"]:
    """One forward pass per batch (an iterable of input tensors) feeds all layers' sums:
    :class:`KeyMoments`, or :class:`KroneckerMoments` where :func:`statistics_kind` says so
    for ``mode``. ``on_output(batch, outputs)`` sees every batch's graph outputs.

    With ``max_rows`` (one cap for every layer, or a cap per layer name) and ``total``
    (the number of inputs), each layer keeps a seeded random share max_rows / (keys per
    input x total) of every batch's keys (exact statistics only: the factored ones are
    cheap); a conv's sampled keys are gathered from its input
    (:func:`patcher.graph.keys.sampled_conv_keys`), the others are never unfolded."""
    device = next((p.device for p in graph.parameters()), torch.device("cpu"))
    check_key_dims(layers, mode)
    moments: dict = {}
    for l in layers:
        if statistics_kind(l, mode) == "kronecker":
            moments[l.name] = KroneckerMoments.empty(l, device)
        elif statistics_kind(l, mode) == "low-rank":
            moments[l.name] = KeyRows()
        else:
            moments[l.name] = KeyMoments(torch.zeros(l.key_dim, l.key_dim, dtype=torch.float64,
                                                     device=device))
    attrs = {l.name: graph.node_attributes(l.name) for l in layers}

    generator = torch.Generator(device="cpu").manual_seed(seed)
    current = {"batch": 1}

    def accumulate(layer, data, _out):
        target = moments[layer.name]
        if isinstance(target, KroneckerMoments):
            # B's OFFSET_KEYS keys spread over the pass (the batch's share), not per batch
            share = (None if not total else
                     -(-OFFSET_KEYS * len(data) // total))  # ceil
            target.add(layer, data, attrs[layer.name], share)
            return
        cap = max_rows.get(layer.name) if isinstance(max_rows, dict) else max_rows
        if isinstance(target, KeyRows):
            cap = min(cap or MAX_KEY_ROWS, MAX_KEY_ROWS)
        if cap and total and layer.orientation == "conv":
            per_input = conv_key_count(layer, attrs[layer.name], tuple(data.shape[2:]))
            rows = per_input * len(data)
            keep = round(cap / (per_input * total) * rows)
            if keep < rows:  # the sampled keys alone, gathered: nothing else is unfolded
                # drawn with replacement (unbiased for the sums; a permutation of the 24M
                # keys of one MobileNetV2 batch cost more than the sums themselves)
                pick = torch.randint(rows, (max(1, keep),), generator=generator).sort().values
                target.add(sampled_conv_keys(layer, data, attrs[layer.name], pick))
                return
            cap = None  # the cap does not bind: every key
        if not (cap and total):
            pixels = pointwise_pixels(layer, data, attrs[layer.name])
            if pixels is not None:  # a 1x1 conv: the channels' covariance, nothing unfolded
                target.add_channels(pixels)
                return
        for flat in key_chunks(layer, data, attrs[layer.name]):
            if cap and total:
                per_input = (conv_key_count(layer, attrs[layer.name], tuple(data.shape[2:]))
                             if layer.orientation == "conv" else
                             flat.shape[0] / max(current["batch"], 1))
                share = cap / (per_input * total)
                if share < 1:
                    keep = max(1, round(share * flat.shape[0]))
                    pick = torch.randperm(flat.shape[0], generator=generator)[:keep]
                    flat = flat[pick.to(flat.device)]
            target.add(flat)

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


def graph_input(t: torch.Tensor) -> torch.Tensor:
    """``t`` laid out as the shadow graph runs fastest: a 4-D (image batch) tensor in
    channels-last memory order (same shape and values; convolutions keep that order for
    their outputs). torch's CPU convolutions then run about 1.15x faster on ResNet-18 and
    1.25-1.5x on MobileNetV2 at 224 (40 images, 2 cores, CPU seconds; logits equal within
    1e-5); other tensors unchanged."""
    if t.dim() == 4 and t.is_floating_point():
        return t.contiguous(memory_format=torch.channels_last)
    return t


def iterate_batches(x: np.ndarray, batch: int = 128):
    for i in range(0, len(x), batch):
        yield graph_input(torch.from_numpy(np.ascontiguousarray(x[i:i + batch])))
