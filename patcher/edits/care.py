"""CARE's repair (Sun, Sun, Pham, Shi, ICSE 2022) as a weight edit: signed multipliers on a
few units of the activation an editable layer reads, searched by a particle swarm.

Units (:class:`patcher.analysis.causal.UnitSite`): the indices of the key axis of the
consumer layer's data input; by default the flattened feature map that feeds the first
dense layer, one unit per channel x position, as CARE cuts the network. A multiplier m_u on
unit u scales what the consumer reads there, which for a linear consumer is exactly a
scale of the weight slice that reads it:

    Gemm / MatMul  y = x W (+ b):  x_u -> m_u x_u   ==  W[u, :] -> m_u W[u, :]
    Conv           y = W * x:      x_c -> m_c x_c   ==  W[:, c, ...] -> m_c W[:, c, ...]
                   (c the channel within its group: only the group's output channels)

so the repair is written back as dW = (m_u - 1) W[slice u] on those slices (padding zeros
stay zeros under a scale). At a Gemm with a float bias (CENTRED), a second search scales
each unit about its clean median c_u instead of 0 (ours; CARE scales about 0), and the
search with the lower objective is kept:

    x_u -> c_u + m_u (x_u - c_u)  ==  W[u, :] -> m_u W[u, :],  beta dC = alpha (1 - m_u) c_u W[u, :]

(:func:`centre_bias_delta`). For a sparse ReLU unit c_u = 0, CARE's multiplier; a unit with
a clean baseline (tanh, GELU) can be held at it (m = 0) without moving clean inputs.

Search (:func:`patcher.edits.swarm.particle_swarm`): m in [low, high]^k (default
[-10, 10], signs may flip, as the original), particles uniform in the box plus one at the
identity (the original starts all at the identity, which stalls where the rate is flat
around it), early stop after ``patience`` iterations without gain. Objective, minimised,
over a triggered set T (transplanted triggers) and clean eval images E:

    ``rate`` (CARE): (1 - alpha) r(T) + alpha (1 - acc(E)) + fidelity KL(E) + guard
    ``ce`` (ours):   mean_T -log p_y(x~) + mean_E -log p_y(x) + fidelity KL(E) + guard
    guard ``accuracy``:  PENALTY x max(0, err(E) - err_before(E) - max_drop)
    guard ``agreement``: PENALTY x max(0, changed(E) - max_drop)
    KL(E) = mean_E sum_c p_c(x) (log p_c(x) - log p'_c(x))   (p: the model, p': repaired)

with r the misbehaviour rate (argmax = the attack's target, or != the label without one)
and changed(E) the share of clean predictions that differ from the model's. The guard and
the KL term are ours: at alpha 0.1-0.2 the original objective accepts repairs that
suppress the target class for several points of accuracy, and an accuracy bound on the
images searched on lets broken predictions be paid for by fixed ones, which do not carry
over to other images (the agreement guard counts both).

Growth (:func:`grown_repair`): without a given k, k runs along GROWTH, each search
starting around the last best (GROWTH_SPREAD), until the triggered rate is at most
RATE_DONE. Keep rule (:func:`removes_enough`): a repair is kept only when it removes at
least MIN_RATE_REMOVED of the triggered set's rate.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from patcher.analysis.causal import SiteRunner, UnitSite
from patcher.edits.swarm import SwarmResult, particle_swarm
from patcher.errors import RectifyError
from patcher.graph.shadow import EditableLayer, ShadowGraph
from patcher.progress import progress

OBJECTIVES = ("rate", "ce")
#: what the guard bounds: the clean accuracy lost, or the share of clean predictions changed
GUARDS = ("accuracy", "agreement")
#: per unit of error over max_drop: a wall next to objective values of order 1
PENALTY = 100.0


@dataclass
class CareRepair:
    layer: str
    units: list[int]
    multipliers: np.ndarray
    objective_before: float
    objective_after: float
    #: misbehaviour rate on the triggered set and accuracy on the clean set, before/after
    rate_before: float
    rate_after: float
    accuracy_before: float
    accuracy_after: float
    swarm: SwarmResult


def _group_slices(layer: EditableLayer, unit: int) -> tuple:
    """The index of the stored weight that reads input unit ``unit`` (module docstring)."""
    o = layer.orientation
    if o in ("gemm", "matmul_right"):         # W [K, N]
        return (unit, slice(None))
    if o in ("gemm_transposed", "matmul_left"):  # W [N, K] / [M, K]
        return (slice(None), unit)
    if o == "conv":                            # W [M, C/g, k...]
        per_group = layer.shape[1]
        outs = layer.shape[0] // layer.groups
        g, local = divmod(unit, per_group)
        return (slice(g * outs, (g + 1) * outs), local)
    raise RectifyError(f"layer '{layer.name}': unknown orientation {o}")


def unit_scale_delta(layer: EditableLayer, weight: torch.Tensor, units: list[int],
                     multipliers) -> torch.Tensor:
    """dW (stored layout, float64) with W + dW = W scaled by m_u on the slice reading unit u."""
    w = weight.detach().to(torch.float64)
    delta = torch.zeros_like(w)
    key_dim = layer.shape[1] * layer.groups if layer.orientation == "conv" else None
    for unit, m in zip(units, np.asarray(multipliers, dtype=np.float64)):
        if key_dim is not None and not 0 <= unit < key_dim:
            raise RectifyError(f"CARE at '{layer.name}': unit {unit} out of range")
        index = _group_slices(layer, int(unit))
        delta[index] = (float(m) - 1.0) * w[index]
    return delta


@torch.no_grad()
def care_repair(graph: ShadowGraph, site: UnitSite, units: list[int], triggered: torch.Tensor,
                triggered_labels: torch.Tensor, eval_x: torch.Tensor, eval_y: torch.Tensor,
                target: int | None, bounds: tuple[float, float] = (-10.0, 10.0),
                objective: str = "rate", alpha: float = 0.2, max_drop: float = 0.005,
                particles: int = 20, iterations: int = 100, patience: int = 20,
                seed: int = 0, show_progress: bool | None = None,
                start: np.ndarray | None = None, guard: str = "accuracy",
                fidelity: float = 0.0, spread: float | None = None,
                centre: torch.Tensor | None = None) -> CareRepair:
    """Search multipliers of ``units`` at ``site`` (module docstring); ``centre`` (one
    value per unit of the site, or None for 0) is what each multiplier scales about. The
    graph is left unchanged: write the result with :func:`unit_scale_delta` (and
    :func:`centre_bias_delta` for a centre)."""
    if not units:
        raise RectifyError(f"CARE at '{site.consumer.name}': no units chosen")
    if objective not in OBJECTIVES:
        raise RectifyError(f"unknown CARE objective '{objective}' ({', '.join(OBJECTIVES)})")
    if not bounds[0] < bounds[1]:
        raise RectifyError(f"CARE multiplier range {bounds} is empty")
    if min(units) < 0 or max(units) >= site.units:
        raise RectifyError(f"CARE at '{site.consumer.name}': unit index out of range "
                           f"(it has {site.units})")
    if guard not in GUARDS:
        raise RectifyError(f"unknown CARE guard '{guard}' ({', '.join(GUARDS)})")
    runner = SiteRunner(graph, site, torch.cat([triggered, eval_x]))
    n_t = len(triggered)
    scaled = lambda m: scaled_logits(runner, units, m, centre)  # noqa: E731
    y = torch.cat([triggered_labels, eval_y]).to(runner.units.device)
    identity = np.ones(len(units))
    logits0 = scaled(identity).to(torch.float64)[n_t:]
    predicted0, logp0 = logits0.argmax(1), torch.log_softmax(logits0, 1)

    def terms(m: np.ndarray) -> tuple[float, float, float, float, float]:
        logits = scaled(m).to(torch.float64)
        predicted = logits.argmax(1)
        rate = misbehaviour_rate(logits[:n_t], y[:n_t], target)
        clean = len(y) > n_t
        error = float((predicted[n_t:] != y[n_t:]).to(torch.float64).mean()) if clean else 0.0
        changed = float((predicted[n_t:] != predicted0).to(torch.float64).mean()) \
            if clean else 0.0
        nll = torch.nn.functional.cross_entropy(logits, y, reduction="none")
        clean_nll = float(nll[n_t:].mean()) if clean else 0.0
        kl = float((logp0.exp() * (logp0 - torch.log_softmax(logits[n_t:], 1))).sum(1).mean()) \
            if clean and fidelity else 0.0
        return rate, error, float(nll[:n_t].mean()), clean_nll, changed, kl

    rate0, error0, fit0, clean0, _, _ = terms(identity)

    def value(m: np.ndarray) -> float:
        rate, error, fit, clean, changed, kl = terms(m)
        core = ((1 - alpha) * rate + alpha * error) if objective == "rate" else fit + clean
        core += fidelity * kl
        over = (error - error0) if guard == "accuracy" else changed
        return core + PENALTY * max(0.0, over - max_drop)

    with progress(particles * (iterations + 1), "particle swarm", show_progress) as bar:
        def swarm_values(positions: np.ndarray) -> np.ndarray:
            bar.update(len(positions))
            return np.array([value(p) for p in positions])

        result = particle_swarm(swarm_values, np.full(len(units), bounds[0]),
                                np.full(len(units), bounds[1]), particles=particles,
                                iterations=iterations, seed=seed,
                                start=identity if start is None else start, spread=spread,
                                patience=patience)
    rate1, error1, _, _, _, _ = terms(result.best)
    before = ((1 - alpha) * rate0 + alpha * error0) if objective == "rate" else fit0 + clean0
    return CareRepair(site.consumer.name, list(units), result.best, before, result.best_value,
                      rate0, rate1, 1 - error0, 1 - error1, result)


def scaled_logits(runner: SiteRunner, units: list[int], multipliers,
                  centre: torch.Tensor | None = None) -> torch.Tensor:
    """Logits with each unit u of ``units`` replaced by c_u + m_u (x_u - c_u) (c: ``centre``,
    indexed by unit; None: 0, CARE's plain multiplier)."""
    if centre is None:
        return runner.scaled_logits(units, multipliers)
    axis = runner.site.axis
    index = torch.as_tensor(units, device=runner.units.device, dtype=torch.long)
    old = runner.units.index_select(axis, index)
    shape = [1] * old.dim()
    shape[axis] = len(units)
    m = torch.as_tensor(np.asarray(multipliers, dtype=np.float64), device=old.device)
    c = centre.to(old.device).index_select(0, index).to(old.dtype).reshape(shape)
    return runner.logits_with(units, c + m.to(old.dtype).reshape(shape) * (old - c))


def centre_bias(graph: ShadowGraph, layer: EditableLayer) -> str | None:
    """The bias a centred multiplier's shift is written into: a Gemm's float initializer C
    with one value per output (None: no such bias, so multipliers scale about 0)."""
    node = graph.node_by_name[layer.name]
    if layer.op != "Gemm" or len(node.inputs) < 3 or not node.inputs[2]:
        return None
    try:
        bias = graph.constant(node.inputs[2])
    except (KeyError, AttributeError):
        return None
    outputs = layer.shape[1] if layer.orientation == "gemm" else layer.shape[0]
    if not bias.dtype.is_floating_point or bias.numel() != outputs:
        return None
    return node.inputs[2]


def clean_centres(graph: ShadowGraph, site: UnitSite, clean: torch.Tensor) -> torch.Tensor:
    """The median of each unit of ``site`` over ``clean`` inputs (float64, one per unit),
    for a dense consumer's 2-D input: a sparse (ReLU) unit's is 0, so its multiplier is
    CARE's plain one; a unit with a baseline (tanh, GELU, BatchNorm) is scaled about it."""
    units = SiteRunner(graph, site, clean).units
    if units.dim() != 2:
        raise RectifyError(f"CARE at '{site.consumer.name}': centred multipliers need a "
                           "dense layer's 2-D input")
    return units.to(torch.float64).median(0).values


def centre_bias_delta(graph: ShadowGraph, layer: EditableLayer, units: list[int],
                      multipliers, centre: torch.Tensor) -> torch.Tensor:
    """dC (the bias's shape, float64) with which a Gemm y = alpha x W + beta C, its rows u
    scaled by m_u (:func:`unit_scale_delta`), reads x_u as c_u + m_u (x_u - c_u):

        beta dC = alpha sum_u (1 - m_u) c_u W[u, :]     (W in key-by-output layout)"""
    attrs = graph.node_attributes(layer.name)
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    if beta == 0.0:
        raise RectifyError(f"CARE at '{layer.name}': beta = 0, the bias is not read")
    w = graph.weight(layer.weight).detach().to(torch.float64)
    if layer.orientation == "gemm_transposed":
        w = w.transpose(0, 1)
    index = torch.as_tensor(units, dtype=torch.long, device=w.device)
    m = torch.as_tensor(np.asarray(multipliers, dtype=np.float64), device=w.device)
    shift = (1.0 - m) * centre.to(w.device, torch.float64).index_select(0, index)
    delta = alpha * (shift[:, None] * w.index_select(0, index)).sum(0) / beta
    bias = graph.constant(graph.node_by_name[layer.name].inputs[2])
    return delta.reshape(bias.shape)


def shrunk(multipliers: np.ndarray, t: float) -> np.ndarray:
    """The multipliers a share ``t`` of the way from the identity: 1 + t (m - 1)."""
    return 1.0 + t * (np.asarray(multipliers, dtype=np.float64) - 1.0)


#: the share of the eval images held out of the search, to judge its accuracy
HELD_OUT = 1 / 3
#: weight of the clean images' mean KL divergence from the model's own predictions
FIDELITY = 0.1
#: units repaired in turn when their number is not given: the search grows k along this
#: schedule (each search starting from the previous best) while the trigger survives
GROWTH = (5, 10, 20, 40, 80)
#: after the first k, the swarm starts around the last best, this share of the box's width
#: apart (standard deviation per coordinate): drawn uniform in a box of 20+ dimensions,
#: nearly every particle changes too many clean predictions and the search stalls at once
GROWTH_SPREAD = 0.1
#: also search a dense consumer's units scaled about their clean median (written as a weight
#: scale plus a bias shift, :func:`centre_bias_delta`), where its bias allows, and keep the
#: search with the lower objective: a
#: unit with a clean baseline away from 0 (tanh, GELU, BatchNorm) can then be silenced to
#: that baseline (m = 0) without moving every clean input; a sparse ReLU unit's median is
#: 0, CARE's own multiplier
CENTRED = True
#: the triggered-set rate at which growing stops
RATE_DONE = 0.005
#: the share of the triggered set's misbehaviour rate a repair must remove to be kept:
#: rate_after <= (1 - MIN_RATE_REMOVED) rate_before. A repair that leaves more than half of
#: the triggered inputs misbehaving leaves the backdoor usable, and the accuracy it costs
#: buys nothing; measured repairs fall far on either side (working ones remove 98-100% of
#: it, stalled ones 5-20%: an MLP at 94% of 99%, a LeNet at 78-81% of 99%)
MIN_RATE_REMOVED = 0.5


def misbehaviour_rate(logits: torch.Tensor, labels: torch.Tensor, target: int | None) -> float:
    """The share of rows predicted as the attack's ``target`` (without one: not as their
    label), by argmax: CARE's attack success rate r(T)."""
    predicted = logits.argmax(1)
    bad = (predicted == target) if target is not None else (predicted != labels)
    return float(bad.to(torch.float64).mean())


def removes_enough(rate_before: float, rate_after: float) -> bool:
    """Whether a repair removes at least MIN_RATE_REMOVED of the misbehaviour rate."""
    return rate_after <= (1.0 - MIN_RATE_REMOVED) * rate_before + 1e-12


@dataclass
class GrowthStep:
    units: int
    rate_after: float
    accuracy_after: float
    objective_after: float
    iterations: int


def grown_repair(graph: ShadowGraph, site: UnitSite, order: list[int], schedule, *args,
                 **kwargs) -> tuple[CareRepair, list[GrowthStep]]:
    """:func:`care_repair` on the top k units of ``order`` for k along ``schedule``; the
    search for k starts from the best multipliers for the k before (one particle there,
    the new units at 1; the others around it, GROWTH_SPREAD of the box's width apart), so
    the objective never rises from one k to the next. A step that does not lower it is not taken (fewer units, same value),
    but the next k is still tried (a stalled k = 10 can be followed by a k = 20 that
    removes the trigger). Stops once the triggered-set rate is at most RATE_DONE.
    ``args``/``kwargs``: those of :func:`care_repair` after ``units``."""
    sizes = sorted({min(int(k), site.units) for k in schedule})
    best: CareRepair | None = None
    steps: list[GrowthStep] = []
    for k in sizes:
        start = np.ones(k)
        if best is not None:
            start[:len(best.units)] = best.multipliers
        repair = care_repair(graph, site, list(order[:k]), *args, start=start,
                             spread=None if best is None else GROWTH_SPREAD, **kwargs)
        steps.append(GrowthStep(k, repair.rate_after, repair.accuracy_after,
                                repair.objective_after, len(repair.swarm.history)))
        if best is None or repair.objective_after < best.objective_after - 1e-12:
            best = repair
        if best.rate_after <= RATE_DONE:
            break
    assert best is not None
    return best, steps
