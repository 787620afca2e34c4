"""Silencing edits: the rank-one edit for the ``attribution`` objective (feature leakage).

The ``prediction`` objective maps a layer's corrupted keys to its clean values. That
removes what the corruption does to the *output*, but feature leakage is measured on the
*attribution*: the share of input Integrated-Gradients mass on the corrupted region.
On samples/leakage every edit towards clean values left that share at 0.42-0.44 (0.431
trained), and so did projecting the null block's whole key subspace out of the first
dense layer (rank 512): the forward effect vanishes, the per-pixel gradients do not.

What carries attribution through a ReLU network is the gradient, and a unit passes none
where its pre-activation is negative. A silencing edit lowers every unit of a hidden
layer on the corruption's keys, so that the units the corruption drives fall silent:

    k* = sum_q w_q k~_q / sum_q w_q,  w_q = ||k~_q - k_q||  (the corruption's mean key,
                                       weighted towards positions the corruption changes;
                                       two candidates, see below)
    d  = C^-1 k* / (k*^T C^-1 k*)      (the paper's edit direction, scaled to d^T k* = 1)
    dW = -beta sigma s d^T             (s: +1 for every output unit, -1 where a BatchNorm
                                       with a negative scale follows; sigma: the RMS over
                                       units of the standard deviation of the layer's outputs)

so dW k* = -beta sigma: each unit's response to the corruption's mean key drops by beta
standard deviations, while on keys that C^-1 tells apart from k* (d^T k ~ 0) little
changes. k* has two candidates, both tried: over the pairs alone, and over the pairs
with up to SHARE_IMAGES eval images that already show a pair's corruption, possibly
moved (:func:`showing_corruption`), each paired with itself with the corruption taken
out (:func:`without_corruption`), disjoint from the images the share is measured on.
One pair shows the pattern at one place; behind a pooling layer its keys depend on
where it sits relative to the pooling grid, and the eval images show the other places
(a bar that moves within its block kept no edit at n = 1 from the pair alone). The
pair alone did better on a residual network (-27% leakage against -5%): which one
silences better depends on the model (benchmarks/LEAKAGE_GENERALISATION.md). The bias
is untouched. The loop (:func:`patcher.rectify.loop.run`) searches beta over
``SILENCE_SCALES`` per hidden layer and keeps what the attribution share on held-out
images pays for.
"""
from __future__ import annotations

import numpy as np
import torch

from patcher.edits.rankone import RankOneEdit
from patcher.errors import NumericalError

#: beta values tried per layer and round, smallest first (units: the layer's output std).
SILENCE_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)
#: A pixel belongs to a pair's corruption when x~ and x differ by more than this.
CHANGED = 1e-6
#: An image already shows a pair's corruption when it equals x~ on the corrupted region
#: to within this (max absolute difference).
MATCH_TOLERANCE = 0.05


def corruption_key_sums(keys_corrupted: torch.Tensor, keys_clean: torch.Tensor
                        ) -> tuple[torch.Tensor, float]:
    """(sum_q w_q k~_q [Kd], sum_q w_q) over corrupted keys [n, P, G, Kd] and their clean
    counterparts, w_q = ||k~_q - k_q||: the parts of :func:`corruption_key`, which add up
    over chunks of inputs."""
    flat_c = keys_corrupted.reshape(-1, keys_corrupted.shape[-1]).to(torch.float64)
    flat_x = keys_clean.reshape(-1, keys_clean.shape[-1]).to(torch.float64)
    weights = (flat_c - flat_x).norm(dim=1)
    return (weights[:, None] * flat_c).sum(0), float(weights.sum())


def corruption_key(keys_corrupted: torch.Tensor, keys_clean: torch.Tensor) -> torch.Tensor:
    """k* [Kd]: mean of the corrupted keys [n, P, G, Kd], each weighted by how much the
    corruption changed it, ||k~ - k||."""
    total, weight = corruption_key_sums(keys_corrupted, keys_clean)
    if weight == 0:
        raise NumericalError("the corrupted and clean keys are identical at this layer")
    return total / weight


def output_signs(graph, layer) -> torch.Tensor:
    """+1 per output unit of ``layer``; -1 where a BatchNormalization that reads the
    layer's output has a negative scale (lowering the layer's output raises the
    normalised one there, so silencing must raise it instead)."""
    signs = torch.ones(layer.value_dim, dtype=torch.float64)
    output = graph.node_by_name[layer.name].outputs[0]
    for info in graph.nodes:
        if info.op_type == "BatchNormalization" and info.inputs and info.inputs[0] == output:
            gamma = graph.constant(info.inputs[1]).detach().to(torch.float64).cpu().reshape(-1)
            if gamma.numel() == layer.value_dim:
                signs = torch.where(gamma < 0, -1.0, 1.0).to(torch.float64)
    return signs


def silencing_direction(layer: str, k_star: torch.Tensor, c_inv: torch.Tensor) -> torch.Tensor:
    """d = C^-1 k* / (k*^T C^-1 k*), so that d^T k* = 1."""
    k_star = k_star.to(torch.float64)
    direction = c_inv.to(torch.float64) @ k_star
    norm = float(k_star @ direction)
    if not np.isfinite(norm) or norm <= 0:
        raise NumericalError(f"layer '{layer}': k*^T C^-1 k* is {norm}; no silencing direction")
    return direction / norm


def silencing_edit(layer: str, weight: str, direction: torch.Tensor, value_dim: int,
                   scale: float, signs: torch.Tensor | None = None) -> RankOneEdit:
    """dW = -scale s d^T with d from :func:`silencing_direction` and s the ``signs`` (all +1
    by default, :func:`output_signs`): moves every one of the ``value_dim`` outputs by
    ``scale`` on k* (``scale`` = beta sigma) towards silence."""
    magnitude = torch.full((value_dim,), -float(scale), dtype=torch.float64,
                           device=direction.device)
    if signs is not None:
        magnitude = magnitude * signs.to(device=direction.device, dtype=torch.float64)
    return RankOneEdit(layer, weight, direction, magnitude, float("nan"), float("nan"))


def corruption_masks(corrupted: np.ndarray, clean: np.ndarray) -> np.ndarray:
    """Per pair, 1 where x~ differs from x (in any channel, for every channel)."""
    changed = np.abs(corrupted - clean) > CHANGED
    if corrupted.ndim >= 4:
        changed = np.broadcast_to(changed.any(axis=1, keepdims=True), corrupted.shape)
    return changed.astype(np.float32)


#: Translations searched for a pair's corruption in other images, at most (beyond this,
#: only its own position is checked).
MAX_SHIFTS = 4096


def _shifts(top: int, bottom: int, left: int, right: int, height: int, width: int):
    """Every (dy, dx) that keeps the box [top:bottom, left:right] inside the image, nearest
    first (its own position first); only (0, 0) when there are more than MAX_SHIFTS."""
    dys, dxs = range(-top, height - bottom + 1), range(-left, width - right + 1)
    if len(dys) * len(dxs) > MAX_SHIFTS:
        return [(0, 0)]
    return sorted(((dy, dx) for dy in dys for dx in dxs), key=lambda s: (abs(s[0]) + abs(s[1]), s))


def showing_corruption(corrupted: np.ndarray, masks: np.ndarray, images: np.ndarray,
                       tolerance: float = MATCH_TOLERANCE
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images that already show a pair's corruption: equal to x~ on the pair's corrupted
    region, to within ``tolerance``, at the pair's position or (for image inputs, NCHW)
    moved by any whole-pixel translation. Returns, per image, the index of the first pair
    found (-1: none), the region where it was found (zeros for none) and the translation
    (dy, dx) from the pair's position to it ([n, 2], zeros for none).

    Feature leakage is a pattern the data carries (BlockMNIST's null block is in every
    image, above or below the digit): such images measure the attribution share on
    held-out inputs without pasting anything (pasting the block onto images whose digit
    sits there made a share that moved against the true leakage, samples/leakage). The
    translations matter for a model without weight sharing: an MLP silenced where one
    pair shows the pattern moved the attribution to where the pattern also occurs
    (benchmarks/LEAKAGE_GENERALISATION.md, ring-side-mlp)."""
    owner = np.full(len(images), -1, dtype=np.int64)
    found = np.zeros(images.shape, dtype=np.float32)
    shifts = np.zeros((len(images), 2), dtype=np.int64)
    for p in range(len(corrupted)):
        region = masks[p] > 0
        if not region.any():
            continue
        if images.ndim != 4:  # no translations: the pair's own position only
            free = owner < 0
            diff = np.abs(images[:, region] - corrupted[p][region][None]).max(axis=1)
            hit = np.flatnonzero(free & (diff <= tolerance))
            owner[hit], found[hit] = p, region
            continue
        rows = np.flatnonzero(region.any(axis=(0, 2)))
        cols = np.flatnonzero(region.any(axis=(0, 1)))
        top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        box = region[:, top:bottom, left:right]
        template = corrupted[p][:, top:bottom, left:right][box]
        for dy, dx in _shifts(top, bottom, left, right, *images.shape[2:]):
            free = owner < 0
            if not free.any():
                break
            window = images[:, :, top + dy:bottom + dy, left + dx:right + dx][:, box]
            hit = np.flatnonzero(free & (np.abs(window - template[None]).max(axis=1) <= tolerance))
            if len(hit):
                owner[hit], shifts[hit] = p, (dy, dx)
                found[hit, :, top + dy:bottom + dy, left + dx:right + dx] = box
    return owner, found, shifts


def without_corruption(images: np.ndarray, owner: np.ndarray, regions: np.ndarray,
                       shifts: np.ndarray, clean: np.ndarray) -> np.ndarray:
    """The clean counterparts of images that show a pair's corruption
    (:func:`showing_corruption`): each image with its region set to the pixels of its
    pair's clean input x, moved by the same translation. Together with the images they
    are more corrupted/clean pairs, drawn from data rather than pasted."""
    out = np.array(images, dtype=images.dtype, copy=True)
    for i in np.flatnonzero(owner >= 0):
        region = regions[i] > 0
        moved = clean[owner[i]]
        if images.ndim == 4:  # the clean input moved; the region stays inside the image
            moved = np.roll(moved, tuple(int(v) for v in shifts[i]), axis=(1, 2))
        out[i][region] = moved[region]
    return out
