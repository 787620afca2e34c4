"""Causal localisation by intervention on the shadow graph (after CARE, Sun et al., ICSE 2022).

Where :mod:`patcher.analysis.attribution` *estimates* a layer's share of the misbehaviour from
gradients, this module *measures* it by intervening on the layer's output and running
the rest of the network.

Layer level. For a pair (x~, x) with label y and an editable layer l with output
h_l, swap in the clean output and run the rest of the network on the corrupted input:

    restored_l = sum_pairs [p_y(x~ | do(h_l = h_l(x))) - p_y(x~)] / sum_pairs [p_y(x) - p_y(x~)]

(a ratio of sums, stable when single pairs have tiny gaps). In a network where every
path runs through l (a plain chain), this is exactly 1 for every layer: the full swap
cannot tell layers apart. The ranking therefore uses ``restored_top``: the same swap
restricted to the layer's ``top`` neurons by their own single-neuron swap effect, with
``top`` = ceil(``top_fraction`` x neurons). A layer where few neurons carry the
misbehaviour ranks first, which is also where a repair of few neurons (CARE) can work.

Neuron level (CARE's average causal effect). A neuron is one output channel of a Conv,
or one output unit of a Gemm/MatMul. For neuron n of layer l, do(n = a) sets it to a at
every position, for ``values`` evenly spaced a between the 1st and 99th percentile of
its observed values on the corrupted inputs and the reference (clean) inputs, and

    E_a = mean over corrupted inputs of p_y(x~ | do(n = a))
    ACE_n = mean_a | E_a - mean_a' E_a' |

the mean absolute deviation of the neuron's causal curve: how strongly the correct
class's probability on corrupted inputs depends on the neuron's value.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from patcher.errors import RectifyError
from patcher.progress import progress
from patcher.graph.shadow import EditableLayer, ShadowGraph


@dataclass
class LayerEffect:
    layer: str
    score: float            # restored share with the top neurons swapped (ranking key)
    restored: float         # restored share with the whole output swapped
    neurons: int
    top: int
    top_neurons: list[int]


@dataclass
class NeuronEffects:
    layer: str
    ace: np.ndarray         # [neurons], CARE's average causal effect
    swap: np.ndarray        # [neurons], restored share when only this neuron is swapped
    order: list[int]        # neurons, largest ACE first


def neuron_axis(layer: EditableLayer, output: torch.Tensor) -> int:
    """The axis of ``output`` that indexes the layer's neurons."""
    o = layer.orientation
    if o == "conv" or o.startswith("gemm"):
        return 1
    if o == "matmul_right":
        return output.dim() - 1
    if o == "matmul_left":
        return output.dim() - 2
    raise RectifyError(f"layer '{layer.name}': unknown orientation {o}")


def label_probability(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """p_y from logits [n, ...] (float64 softmax)."""
    flat = logits.reshape(len(logits), -1)
    return torch.softmax(flat.to(torch.float64), 1)[torch.arange(len(flat)), labels]


def neuron_slice(axis: int, ndim: int, index) -> tuple:
    """An index selecting ``index`` along ``axis`` of an ``ndim``-dimensional tensor."""
    sel = [slice(None)] * ndim
    sel[axis] = index
    return tuple(sel)


class _Swap:
    """A layer's output on the clean and on the corrupted inputs, for swapping clean
    neurons into the corrupted run: the network before the layer runs once, each swap
    re-runs only the part after it."""

    def __init__(self, graph: ShadowGraph, layer: EditableLayer, corrupted: torch.Tensor,
                 clean: torch.Tensor, labels: torch.Tensor) -> None:
        out_name = graph.node_by_name[layer.name].outputs[0]
        self.graph, self.layer, self.labels = graph, layer, labels
        self.clean_out = graph.run_until(layer.name, clean)[out_name]
        self.env = graph.run_until(layer.name, corrupted)
        self.out = self.env[out_name]
        self.axis = neuron_axis(layer, self.out)
        self.neurons = self.out.shape[self.axis]

    def probabilities(self, neurons: "list[int] | int | None" = None) -> torch.Tensor:
        """p_y on the corrupted inputs with ``neurons`` (all when None) swapped."""
        if neurons is None:
            new = self.clean_out
        else:
            new = self.out.clone()
            sel = neuron_slice(self.axis, self.out.dim(), neurons)
            new[sel] = self.clean_out[sel]
        return label_probability(self.graph.run_after(self.layer.name, self.env, (new,))[0],
                                 self.labels)

    def single_shares(self, p_corrupted: torch.Tensor, total: float) -> np.ndarray:
        """Restored share of ``total`` per neuron, swapped alone."""
        if abs(total) <= 1e-12:
            return np.zeros(self.neurons)
        return np.array([float((self.probabilities(n) - p_corrupted).sum()) / total
                         for n in range(self.neurons)])


@torch.no_grad()
def swap_probabilities(graph: ShadowGraph, layer: EditableLayer, corrupted: torch.Tensor,
                       clean: torch.Tensor, labels: torch.Tensor,
                       neurons: "list[int] | None" = None) -> torch.Tensor:
    """p_y on the corrupted inputs with the layer's output (or only ``neurons``) replaced by
    its output on the clean inputs."""
    swap = _Swap(graph, layer, corrupted, clean, labels)
    return swap.probabilities(None if neurons is None else list(neurons))


@torch.no_grad()
def single_neuron_swaps(graph: ShadowGraph, layer: EditableLayer, corrupted: torch.Tensor,
                        clean: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """Restored share per neuron when only that neuron's output is swapped."""
    p_clean = label_probability(graph(clean)[0], labels)
    p_corrupted = label_probability(graph(corrupted)[0], labels)
    swap = _Swap(graph, layer, corrupted, clean, labels)
    return swap.single_shares(p_corrupted, float((p_clean - p_corrupted).sum()))


@torch.no_grad()
def layer_causal_effects(graph: ShadowGraph, layers: list[EditableLayer],
                         corrupted: torch.Tensor, clean: torch.Tensor, labels: torch.Tensor,
                         top_fraction: float = 0.1,
                         show_progress: bool | None = None) -> list[LayerEffect]:
    """Rank layers by intervention (see the module docstring), best first."""
    if not 0 < top_fraction <= 1:
        raise RectifyError(f"top fraction {top_fraction} must be in (0, 1]")
    p_clean = label_probability(graph(clean)[0], labels)
    p_corrupted = label_probability(graph(corrupted)[0], labels)
    total = float((p_clean - p_corrupted).sum())
    if abs(total) < 1e-12:
        raise RectifyError("the pairs' corrupted and clean inputs get the same probability "
                           "for their label: there is nothing for an intervention to restore")
    effects = []
    with progress(len(layers), "causal effects", show_progress) as bar:
        for layer in layers:
            effects.append(_layer_effect(graph, layer, corrupted, clean, labels, top_fraction,
                                         p_corrupted, total))
            bar.update(1)
    return sorted(effects, key=lambda e: -e.score)


def _layer_effect(graph, layer, corrupted, clean, labels, top_fraction, p_corrupted,
                  total) -> LayerEffect:
    """One layer's full-swap and top-neuron-swap shares of the gap ``total``."""
    swap = _Swap(graph, layer, corrupted, clean, labels)
    singles = swap.single_shares(p_corrupted, total)
    top = max(1, math.ceil(top_fraction * len(singles)))
    chosen = [int(i) for i in np.argsort(-singles, kind="stable")[:top]]
    share = lambda p: float((p - p_corrupted).sum()) / total  # noqa: E731
    return LayerEffect(layer.name, share(swap.probabilities(chosen)),
                       share(swap.probabilities()), len(singles), top, chosen)


@torch.no_grad()
def neuron_causal_effects(graph: ShadowGraph, layer: EditableLayer, corrupted: torch.Tensor,
                          clean: torch.Tensor, labels: torch.Tensor,
                          values: int = 8) -> NeuronEffects:
    """CARE's average causal effect of each neuron of ``layer`` (module docstring)."""
    if values < 2:
        raise RectifyError("the causal curve needs at least 2 intervention values")
    out_name = graph.node_by_name[layer.name].outputs[0]
    reference = graph.run_until(layer.name, clean)[out_name]
    n = len(corrupted)
    # Every intervention value gets its own copy of the corrupted inputs: one resumed run
    # per neuron covers its whole causal curve.
    repeated = corrupted.repeat((values,) + (1,) * (corrupted.dim() - 1))
    env = graph.run_until(layer.name, repeated)
    out = env[out_name]
    axis = neuron_axis(layer, out)
    both = torch.cat([out[:n], reference]).movedim(axis, 0).reshape(out.shape[axis], -1)
    low = torch.quantile(both.to(torch.float64), 0.01, dim=1)
    high = torch.quantile(both.to(torch.float64), 0.99, dim=1)
    steps = torch.linspace(0, 1, values, dtype=torch.float64)
    y = labels.repeat(values)
    ace = np.zeros(out.shape[axis])
    for neuron in range(out.shape[axis]):
        grid = (low[neuron] + steps * (high[neuron] - low[neuron])).to(out.dtype)
        new = out.clone()
        sel = neuron_slice(axis, out.dim(), neuron)
        shape = [values] + [1] * (new[sel].dim() - 1)
        per_copy = grid.repeat_interleave(n).reshape([values * n] + shape[1:])
        new[sel] = per_copy.expand_as(new[sel])
        p = label_probability(graph.run_after(layer.name, env, (new,))[0], y)
        curve = p.reshape(values, n).mean(1)
        ace[neuron] = float((curve - curve.mean()).abs().mean())
    swap = single_neuron_swaps(graph, layer, corrupted, clean, labels)
    order = [int(i) for i in np.argsort(-ace, kind="stable")]
    return NeuronEffects(layer.name, ace, swap, order)


def rank_agreement(first: list[str], second: list[str]) -> dict:
    """Top-1 agreement, top-3 overlap and Spearman's rho of two rankings of the same layers."""
    common = [l for l in first if l in second]
    if not common:
        return {"top1_same": False, "top3_overlap": 0, "spearman": float("nan")}
    r1 = {l: i for i, l in enumerate([l for l in first if l in common])}
    r2 = {l: i for i, l in enumerate([l for l in second if l in common])}
    n = len(common)
    if n < 2:
        rho = 1.0
    else:
        d2 = sum((r1[l] - r2[l]) ** 2 for l in common)
        rho = 1 - 6 * d2 / (n * (n * n - 1))
    return {"top1_same": first[0] == second[0],
            "top3_overlap": len(set(first[:3]) & set(second[:3])), "spearman": rho}
