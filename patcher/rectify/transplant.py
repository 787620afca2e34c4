"""Transplant: one pair's corruption carried onto other images, and the sets built from it.

Beyond the paper, *transplant* turns one pair into many: the corruption of a pair
(the pixels where x~ differs from x) is pasted onto calibration images ("paste"),
or its difference x~ - x is added to them ("add"). Some transplanted pairs join the
fit; more, never fitted, measure the gap the loop steers by, so that the loop sees
whether an edit generalises rather than whether it fits its own pairs (the fitted
pairs' gap is ~0 after any edit).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from patcher.edits.silence import CHANGED, corruption_masks
from patcher.rectify.config import RectifyConfig

#: "paste" treats a pair's corruption as a blend when it covers more than this share of the
#: input: a corruption spread over the whole image cannot be pasted, since pasting it would
#: paste the pair's own image (generalisation benchmark, stripes case: ASR 96% pasted, 22.8%
#: added, 2.2% as a blend, n = 1).
PASTE_MAX_SHARE = 0.5


def changed_share(pair_corrupted: np.ndarray, pair_clean: np.ndarray) -> float:
    return float(np.mean(np.abs(pair_corrupted - pair_clean) > CHANGED))


def blend_weight(pair_corrupted: np.ndarray, pair_clean: np.ndarray) -> float:
    """phi of a blend x~ = (1 - phi) x + phi t fitted from one pair: d = x~ - x = phi (t - x),
    so with t unrelated to x the slope of d on x over the pixels is -phi. Clipped to
    [0, 1); about 0 for an additive corruption (x~ = x + n)."""
    x = pair_clean.astype(np.float64).ravel()
    d = pair_corrupted.astype(np.float64).ravel() - x
    var = float(np.var(x))
    if var <= 1e-12:
        return 0.0
    slope = float(np.mean((x - x.mean()) * (d - d.mean()))) / var
    return float(np.clip(-slope, 0.0, 0.99))


def transplant(pair_corrupted: np.ndarray, pair_clean: np.ndarray, images: np.ndarray,
               mode: str) -> np.ndarray:
    """Carry one pair's corruption onto other images.

    ``paste``: the changed pixels of x~ replace the image's. ``add``: z~ = z + (x~ - x).
    A corruption over more than half the input cannot be pasted (it would paste the
    pair's own image): it is modelled as a blend, z~ = z + (x~ - x) + phi (x - z) with phi
    from :func:`blend_weight`, which removes the pair image's ghost that plain adding
    leaves (and equals ``add`` for an additive corruption)."""
    if mode == "paste" and changed_share(pair_corrupted, pair_clean) > PASTE_MAX_SHARE:
        phi = blend_weight(pair_corrupted, pair_clean)
        moved = images + (pair_corrupted - pair_clean)[None] + phi * (pair_clean[None] - images)
        return np.clip(moved, 0.0, 1.0).astype(images.dtype)
    if mode == "add":
        return np.clip(images + (pair_corrupted - pair_clean)[None], 0.0, 1.0).astype(images.dtype)
    # a pixel counts as changed in every channel
    changed = corruption_masks(pair_corrupted[None], pair_clean[None])[0] > 0
    return np.where(changed[None], pair_corrupted[None], images).astype(images.dtype)


@dataclass
class PairSets:
    """Arrays (corrupted, clean, labels) the edit is fitted on and the gaps are measured on."""

    fit: tuple[np.ndarray, np.ndarray, np.ndarray]
    gap: tuple[np.ndarray, np.ndarray, np.ndarray]
    #: where the gap is measured, in words
    gap_source: str


def build_pair_sets(pairs, images: np.ndarray, labels: np.ndarray, calib_count: int,
                    target_class: set[int], config: RectifyConfig) -> PairSets:
    """The fit set (the pairs plus ``transplant_count`` transplanted ones) and the gap set
    (``heldout_count`` further transplanted pairs, never fitted), from seeded images of
    ``images`` (the eval set) outside the corruption's target class. Without transplant
    both are the pairs themselves."""
    fit_c, fit_x, fit_y = [pairs.corrupted], [pairs.clean], [pairs.label]
    own = (pairs.corrupted, pairs.clean, pairs.label)
    if config.transplant == "none" or config.transplant_count < 1 or config.heldout_count < 1:
        return PairSets(tuple(np.concatenate(a) for a in (fit_c, fit_x, fit_y)), own, "pairs")
    rng = np.random.default_rng(config.seed)
    count = min(config.transplant_count + config.heldout_count, calib_count)
    # Not onto images of the corruption's target class (a backdoor's): there it
    # changes nothing (zero residuals in the fit, zero gap in the held-out set).
    # Measured in benchmarks/GENERALISATION.md (three seeds) and RECTIFY_RESULTS.md.
    pool = np.flatnonzero(~np.isin(labels, list(target_class)))
    if len(pool) < 2:
        pool = np.arange(len(images))
    idx = pool[rng.choice(len(pool), size=min(count, len(pool)), replace=False)]
    chosen, chosen_labels = images[idx], labels[idx]
    owners = np.arange(len(idx)) % len(pairs)
    moved = np.stack([transplant(pairs.corrupted[o], pairs.clean[o], chosen[i:i + 1],
                                 config.transplant)[0] for i, o in enumerate(owners)])
    # the fit's share, unless too few images are left for both (then half each)
    half = min(config.transplant_count, len(idx) // 2)
    fit_c.append(moved[:half]), fit_x.append(chosen[:half]), fit_y.append(chosen_labels[:half])
    return PairSets(tuple(np.concatenate(a) for a in (fit_c, fit_x, fit_y)),
                    (moved[half:], chosen[half:], chosen_labels[half:]),
                    f"{len(idx) - half} transplanted pairs not used for fitting")
