"""CARE's repair (Sun et al., ICSE 2022): optimise the few most responsible neurons with a
particle swarm, against the misbehaviour on the pairs and the loss on clean data.

Parameters. For each chosen neuron i of the layer (ranked by CARE's average causal
effect, :mod:`patcher.analysis.causal`), a scale s_i and, when the layer has its own bias, a shift
b_i, so that its output becomes h_i' = s_i h_i + b_i. In weights:

    W_i' = s_i W_i          (the neuron's row of the canonical weight, all its inputs)
    c_i' = s_i c_i + b_i / beta   (its bias; Gemm's beta divided out, 1 for Conv)

CARE searched the neurons' raw weights; for a Conv neuron that is C/g x kh x kw numbers
each, far too many for a swarm of tens of particles, so we search the 2 numbers per
neuron that act on its whole row (scale, and shift). s_i lies in [0, 1.5] (0 prunes the
neuron), b_i in [-2 sd_i, 2 sd_i] with sd_i the neuron's standard deviation on the data.

Objective, minimised by :func:`patcher.edits.swarm.particle_swarm` (one particle starts at the
identity, so the result is never worse than the model on the objective):

    f = mean over corrupted fit inputs of -log p_y(x~)
        + accuracy_weight * mean over clean eval inputs of -log p_y(x)
        + PENALTY * max(0, error(eval) - error_before(eval) - max_drop)

(cross-entropy rather than CARE's misbehaviour rate: a strong backdoor holds p_y(x~)
near 0 for every small change, so rates and probabilities give the swarm a flat landscape;
the last term keeps the search inside the accuracy budget: error is the top-1 error
rate on the same clean eval inputs, max_drop half the budget by default, since a few
hundred images measure accuracy only to a fraction of a point).

Only the part of the network after the layer is re-run for each particle
(:meth:`ShadowGraph.run_after`). The changed rows are not a rank-one edit: the
provenance calls them ``care`` edits and records the neurons.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from patcher.analysis.causal import label_probability, neuron_axis, neuron_slice
from patcher.errors import RectifyError
from patcher.graph.keys import canonical_weight, stored_delta
from patcher.progress import progress
from patcher.graph.shadow import EditableLayer, ShadowGraph
from patcher.edits.swarm import SwarmResult, particle_swarm

SCALE_RANGE = (0.0, 1.5)
SHIFT_SDS = 2.0
PENALTY = 1000.0  # per unit of error over max_drop: a hard wall next to CE values of ~1-20


@dataclass
class CareRepair:
    layer: str
    neurons: list[int]
    scales: np.ndarray
    shifts: np.ndarray
    objective_before: float
    objective_after: float
    weight_delta: torch.Tensor            # stored layout
    bias_name: str | None
    bias_delta: torch.Tensor | None       # stored layout
    swarm: SwarmResult


def editable_bias(graph: ShadowGraph, layer: EditableLayer) -> str | None:
    """The layer's bias tensor when a per-neuron shift can be written into it: a constant of
    one value per neuron that no other node reads."""
    if layer.bias is None or layer.bias not in graph._buffer_key:
        return None
    readers = [n.name for n in graph.nodes if layer.bias in n.inputs]
    if readers != [layer.name]:
        return None
    bias = graph.constant(layer.bias)
    if not bias.dtype.is_floating_point or bias.numel() != layer.value_dim:
        return None
    return layer.bias


@torch.no_grad()
def care_repair(graph: ShadowGraph, layer: EditableLayer, neurons: list[int],
                corrupted: torch.Tensor, labels: torch.Tensor, eval_x: torch.Tensor,
                eval_y: torch.Tensor, particles: int = 20, iterations: int = 30,
                accuracy_weight: float = 1.0, max_drop: float = 0.015,
                seed: int = 0, show_progress: bool | None = None) -> CareRepair:
    """Search scales and shifts of ``neurons`` of ``layer`` (module docstring); the graph is
    left unchanged: apply the returned deltas with :func:`apply_care`."""
    if not neurons:
        raise RectifyError(f"CARE repair of '{layer.name}': no neurons chosen")
    out_name = graph.node_by_name[layer.name].outputs[0]
    x = torch.cat([corrupted, eval_x])
    y = torch.cat([labels, eval_y])
    n_fit = len(corrupted)
    env = graph.run_until(layer.name, x)
    out = env[out_name]
    axis = neuron_axis(layer, out)
    if max(neurons) >= out.shape[axis] or min(neurons) < 0:
        raise RectifyError(f"CARE repair of '{layer.name}': neuron index out of range "
                           f"(it has {out.shape[axis]})")
    bias_name = editable_bias(graph, layer)
    k = len(neurons)
    sds = np.array([float(out[neuron_slice(axis, out.dim(), i)].to(torch.float64).std())
                    for i in neurons])
    low = np.full(k, SCALE_RANGE[0])
    high = np.full(k, SCALE_RANGE[1])
    start = np.ones(k)
    if bias_name is not None:
        low = np.concatenate([low, -SHIFT_SDS * sds])
        high = np.concatenate([high, SHIFT_SDS * sds])
        start = np.concatenate([start, np.zeros(k)])

    def modified(position: np.ndarray) -> torch.Tensor:
        new = out.clone()
        for j, i in enumerate(neurons):
            sel = neuron_slice(axis, out.dim(), i)
            shift = position[k + j] if bias_name is not None else 0.0
            new[sel] = out[sel] * float(position[j]) + float(shift)
        return new

    def terms(position: np.ndarray) -> tuple[float, float, float]:
        logits = graph.run_after(layer.name, env, (modified(position),))[0]
        flat = logits.reshape(len(logits), -1).to(torch.float64)
        nll = torch.nn.functional.cross_entropy(flat, y, reduction="none")
        wrong = (flat.argmax(1) != y)[n_fit:]
        fit = float(nll[:n_fit].mean())
        clean = float(nll[n_fit:].mean()) if len(nll) > n_fit else 0.0
        error = float(wrong.to(torch.float64).mean()) if len(wrong) else 0.0
        return fit, clean, error

    start_fit, start_clean, base_error = terms(start)

    def value(position: np.ndarray) -> float:
        fit, clean, error = terms(position)
        return (fit + accuracy_weight * clean
                + PENALTY * max(0.0, error - base_error - max_drop))

    with progress(particles * (iterations + 1), "particle swarm", show_progress) as bar:
        def swarm_values(positions: np.ndarray) -> np.ndarray:
            values = np.array([value(p) for p in positions])
            bar.update(len(positions))
            return values

        result = particle_swarm(swarm_values, low, high, particles=particles,
                                iterations=iterations, seed=seed, start=start)
    before = start_fit + accuracy_weight * start_clean  # the identity: no penalty
    scales = result.best[:k]
    shifts = result.best[k:] if bias_name is not None else np.zeros(k)
    weight_delta, bias_delta = _deltas(graph, layer, neurons, scales, shifts, bias_name)
    return CareRepair(layer.name, list(neurons), scales, shifts, before, result.best_value,
                      weight_delta, bias_name, bias_delta, result)


def _deltas(graph: ShadowGraph, layer: EditableLayer, neurons: list[int], scales: np.ndarray,
            shifts: np.ndarray, bias_name: str | None):
    """Stored-layout deltas of the weight (and bias) for the given scales and shifts."""
    weight = graph.weight(layer.weight)
    canonical = canonical_weight(layer, weight.detach().to(torch.float64))
    delta_c = torch.zeros_like(canonical)
    for j, i in enumerate(neurons):
        delta_c[i] = (float(scales[j]) - 1.0) * canonical[i]
    attrs = graph.node_attributes(layer.name)
    weight_delta = stored_delta(layer, delta_c, attrs)
    bias_delta = None
    if bias_name is not None:
        bias = graph.constant(bias_name).detach().to(torch.float64).cpu()
        beta = float(attrs.get("beta", 1.0)) if layer.op == "Gemm" else 1.0
        flat = torch.zeros(bias.numel(), dtype=torch.float64)
        for j, i in enumerate(neurons):
            flat[i] = (float(scales[j]) - 1.0) * bias.reshape(-1)[i] + float(shifts[j]) / beta
        bias_delta = flat.reshape(bias.shape)
    return weight_delta, bias_delta


def shrink(graph: ShadowGraph, layer: EditableLayer, repair: CareRepair, t: float) -> CareRepair:
    """The repair moved a share ``t`` of the way from the identity (s = 1, b = 0) to its
    parameters: the fallback when the full repair costs more accuracy than allowed."""
    scales = 1.0 + t * (repair.scales - 1.0)
    shifts = t * repair.shifts
    weight_delta, bias_delta = _deltas(graph, layer, repair.neurons, scales, shifts,
                                       repair.bias_name)
    return CareRepair(repair.layer, repair.neurons, scales, shifts, repair.objective_before,
                      repair.objective_after, weight_delta, repair.bias_name, bias_delta,
                      repair.swarm)


@torch.no_grad()
def apply_care(graph: ShadowGraph, layer: EditableLayer, repair: CareRepair,
               sign: float = 1.0) -> None:
    """Add (or, with sign -1, remove) the repair's deltas to the shadow graph's tensors."""
    weight = graph.weight(layer.weight)
    weight.add_((sign * repair.weight_delta).to(weight.dtype))
    if repair.bias_name is not None:
        bias = graph.constant(repair.bias_name)
        bias.add_((sign * repair.bias_delta).to(bias.dtype).to(bias.device))
