"""A small particle swarm optimiser (minimisation in a box), deterministic for a seed.

Standard global-best PSO with Clerc's constriction coefficients: for particle i,

    v_i <- w v_i + c1 r1 (p_i - x_i) + c2 r2 (g - x_i)
    x_i <- clip(x_i + v_i, low, high)

with w = 0.7298, c1 = c2 = 1.49618, r1, r2 ~ U(0, 1) per coordinate, p_i the particle's
best position, g the swarm's best. Velocities are clamped to half the box width. The
initial particles are uniform in the box (``start``, when given, replaces the first: the
result is then never worse than it; CARE's original starts every particle at the identity,
where a rate objective is flat and the swarm cannot move; with ``spread`` the others start
around ``start`` instead, to refine a known good point). With ``patience``, the search
stops after that many iterations without a gain in the best value (pyswarms' ftol_iter
with ftol 0). Every
random draw comes from one ``numpy.random.Generator`` seeded by ``seed``, and the
objective is evaluated for the whole swarm at once (``objective(positions[P, D]) ->
values[P]``), so a run is reproducible bit for bit on the same machine.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from patcher.errors import RectifyError

INERTIA = 0.7298
ACCELERATION = 1.49618


@dataclass
class SwarmResult:
    best: np.ndarray
    best_value: float
    history: list[float] = field(default_factory=list)   # best value after each iteration
    evaluations: int = 0


def particle_swarm(objective: Callable[[np.ndarray], np.ndarray], low: np.ndarray,
                   high: np.ndarray, particles: int = 20, iterations: int = 30, seed: int = 0,
                   start: np.ndarray | None = None, patience: int | None = None,
                   spread: float | None = None) -> SwarmResult:
    """Minimise ``objective`` over the box [low, high]. ``start``, when given, is one of the
    initial particles (so the result is never worse than it); ``patience``: early stop
    (module docstring). ``spread`` (with ``start``): the other particles start at
    ``start`` + N(0, (spread x width)^2) per coordinate, clipped to the box, instead of
    uniform in it (a search that refines a known good point)."""
    low, high = np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)
    if low.shape != high.shape or low.ndim != 1 or not (low <= high).all():
        raise RectifyError("particle swarm: low and high must be 1-D bounds with low <= high")
    if particles < 1 or iterations < 0:
        raise RectifyError("particle swarm: need at least 1 particle and 0 or more iterations")
    rng = np.random.default_rng(seed)
    width = high - low
    x = low + rng.random((particles, len(low))) * width
    if start is not None:
        begin = np.clip(np.asarray(start, dtype=np.float64), low, high)
        if spread is not None:
            x = np.clip(begin + rng.standard_normal(x.shape) * spread * width, low, high)
        x[0] = begin
    v = (rng.random(x.shape) - 0.5) * width * 0.1
    values = np.asarray(objective(x), dtype=np.float64)
    evaluations = particles
    if values.shape != (particles,):
        raise RectifyError(f"particle swarm: objective returned shape {values.shape}, "
                           f"expected ({particles},)")
    values = np.where(np.isfinite(values), values, np.inf)
    personal, personal_value = x.copy(), values.copy()
    g = int(np.argmin(values))
    best, best_value = x[g].copy(), float(values[g])
    history = []
    vmax = 0.5 * width
    stale = 0
    for _ in range(iterations):
        r1, r2 = rng.random(x.shape), rng.random(x.shape)
        v = INERTIA * v + ACCELERATION * r1 * (personal - x) + ACCELERATION * r2 * (best - x)
        v = np.clip(v, -vmax, vmax)
        x = np.clip(x + v, low, high)
        values = np.asarray(objective(x), dtype=np.float64)
        values = np.where(np.isfinite(values), values, np.inf)
        evaluations += particles
        better = values < personal_value
        personal[better], personal_value[better] = x[better], values[better]
        g = int(np.argmin(personal_value))
        if personal_value[g] < best_value:
            best, best_value = personal[g].copy(), float(personal_value[g])
            stale = 0
        else:
            stale += 1
        history.append(best_value)
        if patience is not None and stale >= patience:
            break
    return SwarmResult(best, best_value, history, evaluations)
