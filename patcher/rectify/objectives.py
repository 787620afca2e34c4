"""Objectives: what the loop removes, how it is measured, and when a round removed enough.

An objective owns its held-out set and answers four questions for the keep rule: the
measure now (:meth:`measure`), whether a round shrank it enough (``MIN_GAP_GAIN`` of it),
how much accuracy the removed part pays for (its rate times what was removed), and whether
the run met its target.

- :class:`GapObjective` (``--objective prediction``): the gap delta* on held-out
  (transplanted) pairs, or, when the corruption has a target class and the loop steers
  by it, the target-class gap tau (what a backdoor's edit removes).
- :class:`ShareObjective` (``--objective attribution``): the share of input IG mass on the
  corrupted region, on eval images that already show the corruption (feature leakage).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from patcher.analysis.input_attribution import attribution_share
from patcher.edits.silence import corruption_masks, showing_corruption, without_corruption
from patcher.errors import BadSamplesError
from patcher.rectify.config import (ACCURACY_PER_GAP, ACCURACY_PER_SHARE, DECISION_PAIRS,
                                    DECISIONS_GONE_SHARE, EFFECT_GONE_SHARE,
                                    MIN_GAP_GAIN, SHARE_IMAGES)
from patcher.rectify.workspace import Workspace


@dataclass
class Measure:
    """An objective's value; ``tau`` (the target-class gap) and ``flipped`` when the loop
    steers by a target class."""

    value: float
    tau: float | None = None
    #: gap pairs whose corrupted input is classified as the target class (clean one not)
    flipped: int | None = None
    #: gap pairs measured
    pairs: int = 0


class Objective(Protocol):
    #: what the measure is called in messages ("gap", "attribution share")
    name: str
    #: where it is measured, in words (the result's ``gap_measured_on``)
    source: str

    def measure(self) -> Measure: ...
    def reached(self, m: Measure) -> bool: ...
    def note_reached(self, m: Measure) -> str: ...
    def shrank_enough(self, before: Measure, after: Measure) -> bool: ...
    def affordable(self, before: Measure, after: Measure) -> float: ...
    def gain(self, before: Measure, after: Measure) -> float: ...
    def met(self, final: Measure, edited: bool, within_budget: bool) -> bool: ...
    def note_small(self, before: Measure, after: Measure) -> str: ...
    def note_costly(self, before: Measure, after: Measure, cost: float, drop: float,
                    affordable: float, budget: float, bound: str) -> str: ...
    def note_kept(self, after: Measure) -> str: ...
    def describe_base(self, accuracy: float, base: Measure) -> str: ...


def affordable_cost(gap: float, new_gap: float, tau: float | None,
                    new_tau: float | None) -> float:
    """The accuracy (a fraction of the eval set) a round may cost: ACCURACY_PER_GAP times
    what it removed of the corruption's effect on the held-out pairs, i.e. of the
    target-class gap max(tau, 0) - max(tau', 0) when the corruption has a target class
    (pushing the corrupted inputs away from the target beyond their clean twins is no
    gain), else of the gap delta* - delta*'. Negative when the round made it worse."""
    if tau is not None and new_tau is not None:
        return ACCURACY_PER_GAP * (max(tau, 0.0) - max(new_tau, 0.0))
    return ACCURACY_PER_GAP * (gap - new_gap)


def shrank_enough(gap: float, new_gap: float, tau: float | None,
                  new_tau: float | None) -> bool:
    """Whether a round removed at least MIN_GAP_GAIN of the corruption's effect on the
    held-out pairs: of the target-class gap max(tau, 0) when the corruption has a target
    class (the measure :func:`affordable_cost` pays for), else of the gap delta*."""
    if tau is not None and new_tau is not None:
        return max(new_tau, 0.0) < max(tau, 0.0) * (1 - MIN_GAP_GAIN) - 1e-9
    return new_gap <= gap - MIN_GAP_GAIN * max(gap, 0.0) - 1e-6


class GapObjective:
    """delta* on the workspace's gap pairs; with ``steer_by_target`` (the dynamic loop) and a
    target class, tau is what rounds remove and what the target is judged on."""

    name = "gap"

    def __init__(self, ws: Workspace, target: float, steer_by_target: bool) -> None:
        self.ws, self.target, self.steer_by_target = ws, target, steer_by_target
        self.source = ws.gap_source
        #: tau of the first measure (the model as loaded), when the loop steers by it
        self.base_tau: float | None = None

    def measure(self) -> Measure:
        reading = self.ws.gaps()
        steer = self.steer_by_target
        m = Measure(reading.gap, reading.tau if steer else None,
                    reading.flipped if steer else None, reading.pairs)
        if self.base_tau is None:
            self.base_tau = m.tau
        return m

    def reached(self, m: Measure) -> bool:
        """delta* <= --gap, or with a target class tau <= --gap or the corruption's effect
        gone (:meth:`effect_gone`; tau is what rounds remove)."""
        return m.value <= self.target or (m.tau is not None and (
            m.tau <= self.target or self.effect_gone(m) != ""))

    def effect_gone(self, m: Measure) -> str:
        """Why the corruption's effect left is not worth another round ("" when it is).

        Gone when no held-out gap pair still has its corrupted input classified as the
        target class t (argmax; its clean input not) *and* the target-class gap tau is
        small, one of:

        - tau <= DECISIONS_GONE_SHARE (10%) x base tau, measured on at least
          DECISION_PAIRS (20) pairs: the corruption no longer changes decisions (ResNet-18
          at 224: after the first edit tau is 4% of its base and no pair flips);
        - tau <= EFFECT_GONE_SHARE (1%) x base tau, on fewer pairs;
        - once a round removed some, ACCURACY_PER_GAP x tau < 1 / (eval images): removing
          all of it would pay for less than one eval image.

        A small tau alone does not stop the loop while some pair still flips (gelu case,
        n = 5: tau 0.0021 = 0.2% of base with pairs still flipped; three more rounds took
        test ASR from 2.28% to 1.76%)."""
        if m.tau is None or self.base_tau is None or self.base_tau <= 0 or m.flipped:
            return ""
        share = DECISIONS_GONE_SHARE if m.pairs >= DECISION_PAIRS else EFFECT_GONE_SHARE
        flips = (f"none of the {m.pairs} held-out pairs' corrupted inputs is classified as "
                 f"the target class")
        if m.tau <= share * self.base_tau:
            return (f"target-class gap {m.tau:.4f} is at most {share:.0%} of its base "
                    f"{self.base_tau:.4f} and {flips}: the corruption's effect is gone")
        images = len(self.ws.eval_x)
        removed = m.tau < (1 - MIN_GAP_GAIN) * self.base_tau  # only once a round removed some
        if removed and ACCURACY_PER_GAP * max(m.tau, 0.0) < 1.0 / max(images, 1):
            return (f"target-class gap {m.tau:.4f}: removing all of it would pay for less "
                    f"than one of the {images} eval images, and {flips}")
        return ""

    def note_reached(self, m: Measure) -> str:
        """Why the loop stops before its round limit."""
        gone = self.effect_gone(m)
        if gone and not (m.value <= self.target or m.tau <= self.target):
            return f"stopping: {gone}"
        what, value = ("target-class gap", m.tau) if m.tau is not None and \
            m.tau <= self.target else ("gap", m.value)
        return f"stopping: {what} {value:.4f} is at most --gap {self.target:g}"

    def shrank_enough(self, before: Measure, after: Measure) -> bool:
        return shrank_enough(before.value, after.value, before.tau, after.tau)

    def affordable(self, before: Measure, after: Measure) -> float:
        return affordable_cost(before.value, after.value, before.tau, after.tau)

    def gain(self, before: Measure, after: Measure) -> float:
        return self.affordable(before, after) / ACCURACY_PER_GAP

    def met(self, final: Measure, edited: bool, within_budget: bool) -> bool:
        """With a target class, tau <= --gap or the corruption's effect gone
        (:meth:`effect_gone`, the loop's own stopping rule; the reason is kept in
        :attr:`met_because`); else delta* <= --gap. Never beyond the budget."""
        self.met_because = ""
        if final.tau is not None:
            gone = self.effect_gone(final)
            if final.tau > self.target and not gone:
                return False
            self.met_because = gone if within_budget else ""
            return within_budget
        return final.value <= self.target and within_budget

    def _what(self, before: Measure) -> str:
        return "target-class gap" if before.tau is not None else "gap"

    def note_small(self, before: Measure, after: Measure) -> str:
        return f"{self._what(before)} shrank by less than {MIN_GAP_GAIN:.0%}"

    def note_costly(self, before, after, cost, drop, affordable, budget, bound) -> str:
        if drop > budget:
            return f"accuracy drop {bound}{drop:.2%} over budget {budget:.2%}"
        return (f"cost {bound}{cost:.2%} accuracy for {affordable / ACCURACY_PER_GAP:.4f} of "
                f"{self._what(before)}")

    def note_kept(self, after: Measure) -> str:
        return "kept"

    def describe_base(self, accuracy: float, base: Measure) -> str:
        return f"base: accuracy {accuracy:.2%}, gap {base.value:.4f} (on {self.source})"


class ShareObjective:
    """The attribution share on the share set: up to SHARE_IMAGES eval images that already
    show a pair's corruption, at its place or moved
    (:func:`patcher.edits.silence.showing_corruption`), seeded, plus the pairs' corrupted
    inputs; each with the region where the corruption is. Up to SHARE_IMAGES other such
    images, with their clean counterparts (:func:`patcher.edits.silence.without_corruption`),
    go to :attr:`key_examples`, the silencing edits' second source of k*. The share has no
    absolute target: it must fall, at ACCURACY_PER_SHARE accuracy per unit removed."""

    name = "attribution share"

    def __init__(self, ws: Workspace, pairs) -> None:
        self.ws = ws
        masks = corruption_masks(pairs.corrupted, pairs.clean)
        if not masks.any():
            raise BadSamplesError("--objective attribution: every pair's corrupted and clean "
                                  "inputs are identical, so there is no region to measure "
                                  "attribution on")
        owner, regions, shifts = showing_corruption(pairs.corrupted, masks, ws.eval_x)
        found = np.flatnonzero(owner >= 0)
        rng = np.random.default_rng(ws.config.seed)
        rest = np.zeros(0, dtype=np.int64)
        if len(found) > SHARE_IMAGES:
            chosen = np.sort(rng.choice(found, size=SHARE_IMAGES, replace=False))
            rest = np.setdiff1d(found, chosen)
            if len(rest) > SHARE_IMAGES:
                rest = np.sort(rng.choice(rest, size=SHARE_IMAGES, replace=False))
            found = chosen
        # k* also from eval images the share is not measured on (see patcher.edits.silence)
        rest_clean = without_corruption(ws.eval_x[rest], owner[rest], regions[rest],
                                        shifts[rest], pairs.clean)
        #: (corrupted, clean) inputs for k*: the pairs first, then the set-aside eval images
        self.key_examples = (np.concatenate([pairs.corrupted, ws.eval_x[rest]]),
                             np.concatenate([pairs.clean, rest_clean]))
        x = np.concatenate([pairs.corrupted, ws.eval_x[found]])
        y = np.concatenate([pairs.label, ws.eval_y[found]])
        m = np.concatenate([masks, regions[found]])
        self.share_set = (ws.tensor(x), ws.tensor(y), ws.tensor(m))
        self.source = (f"the {len(pairs)} pairs and {len(found)} eval images that already "
                       f"show their corruption, anywhere")
        self.key_source = (f"the {len(pairs)} pairs and {len(rest)} other eval images that "
                           f"show their corruption")

    def measure(self) -> Measure:
        """Mean share of input IG mass on the corrupted region over the share set."""
        start = time.perf_counter()
        x, y, m = self.share_set
        value = attribution_share(self.ws.graph, x, y, m, steps=self.ws.config.steps)
        self.ws.timings.add("attribution", start)
        return Measure(value)

    def reached(self, m: Measure) -> bool:
        return False

    def note_reached(self, m: Measure) -> str:
        return ""

    def gain(self, before: Measure, after: Measure) -> float:
        return before.value - after.value

    def shrank_enough(self, before: Measure, after: Measure) -> bool:
        gain = self.gain(before, after)
        return not (gain <= 0 or gain < MIN_GAP_GAIN * before.value)

    def affordable(self, before: Measure, after: Measure) -> float:
        return ACCURACY_PER_SHARE * self.gain(before, after)

    def met(self, final: Measure, edited: bool, within_budget: bool) -> bool:
        """An edit was kept within --budget (the loop keeps only edits that lower it)."""
        return edited and within_budget

    def note_small(self, before: Measure, after: Measure) -> str:
        return f"share {after.value:.4f}: shrank by less than {MIN_GAP_GAIN:.0%}"

    def note_costly(self, before, after, cost, drop, affordable, budget, bound) -> str:
        return (f"share {after.value:.4f} cost {bound}{cost:.2%} accuracy (affordable "
                f"{affordable:.2%})")

    def note_kept(self, after: Measure) -> str:
        return f"share {after.value:.4f}"

    def describe_base(self, accuracy: float, base: Measure) -> str:
        return (f"base: accuracy {accuracy:.2%}, attribution share {base.value:.4f} "
                f"(on {self.source}); silencing keys from {self.key_source}")
