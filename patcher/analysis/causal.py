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


# ---------------------------------------------------------------- CARE's units
#
# CARE (its authors' code) cuts the network where the first dense layer reads the
# flattened feature map and treats every scalar of that flattened map as a neuron. Here a
# *unit site* is the data input of an editable layer (the consumer): one unit is one index
# along the consumer's key axis (a column of a Gemm/MatMul weight; an input channel of a
# Conv), so that a multiplier on the unit is exactly a scale of the consumer's weight
# slice that reads it (:func:`patcher.edits.care.unit_scale_delta`).

#: Ops a flattened map may pass through between the feature map and the dense layer.
RESHAPING_OPS = ("Flatten", "Reshape", "Squeeze", "Identity")
#: Ops that pool a feature map over its positions: their output has no spatial units.
POOLING_OPS = ("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "ReduceMean",
               "ReduceMax", "ReduceSum", "ReduceL2")


@dataclass
class UnitSite:
    """Where CARE's multipliers act: ``tensor`` (the consumer's data input), produced by
    node ``producer``; units are the indices of its axis ``axis``."""

    consumer: EditableLayer
    tensor: str
    producer: str
    axis: int
    units: int
    #: the units are positions of a feature map (a flattened map), not pooled channels
    spatial: bool
    #: how the feature map reaches the consumer, in words
    path: str
    #: the units come from a pooling op (one per channel) / straight from the model input
    pooled: bool = False
    from_input: bool = False


def _data_input(graph: ShadowGraph, layer: EditableLayer) -> str:
    node = graph.node_by_name[layer.name]
    if layer.op == "MatMul":
        return node.inputs[1 - layer.weight_input]
    return node.inputs[0]


def _site_axis(graph: ShadowGraph, layer: EditableLayer, rank: int) -> int:
    """The axis of the consumer's data input that its weight's key columns read."""
    if layer.op == "Gemm":
        if graph.node_attributes(layer.name).get("transA", 0):
            raise RectifyError(f"CARE at '{layer.name}': a Gemm with transA reads its input "
                               "transposed; its units are not supported")
        return 1
    if layer.orientation == "conv":
        return 1
    if layer.orientation == "matmul_right":
        return rank - 1
    return rank - 2  # matmul_left: W @ x, the keys are x's columns


@torch.no_grad()
def unit_site(graph: ShadowGraph, layer: EditableLayer, probe: torch.Tensor) -> UnitSite:
    """The unit site feeding ``layer`` (see above). ``probe``: a few inputs, run once to
    learn the shapes. Raises RectifyError when the data input is a graph input (no hidden
    units) or is read by another node too (a multiplier on it would not be a weight edit)."""
    tensor = _data_input(graph, layer)
    producer = next((n for n in graph.nodes if tensor in n.outputs), None)
    if producer is None:
        raise RectifyError(f"CARE at '{layer.name}': its input '{tensor}' is a graph input, "
                           "not hidden units")
    readers = [n.name for n in graph.nodes if tensor in n.inputs]
    if readers != [layer.name]:
        raise RectifyError(f"CARE at '{layer.name}': its input '{tensor}' is also read by "
                           f"{', '.join(r for r in readers if r != layer.name)}; a multiplier "
                           "there would not be an edit of this layer's weight")
    env = graph.run_until(producer.name, probe)
    value = env[tensor]
    axis = _site_axis(graph, layer, value.dim())
    # walk back through reshaping ops to the feature map the units come from
    node, steps = producer, []
    while node is not None and node.op_type in RESHAPING_OPS:
        steps.append(node.op_type)
        source = node.inputs[0]
        node = next((n for n in graph.nodes if source in n.outputs), None)
    source_name = node.outputs[0] if node is not None else None
    source = graph.run_until(node.name, probe)[source_name] if node is not None else value
    if layer.orientation == "conv":
        spatial = False  # a Conv's weight reads a channel at every position alike
    else:
        spatial = (node is None or node.op_type not in POOLING_OPS) and source.dim() >= 3 \
            and int(np.prod(source.shape[2:])) > 1
    origin = f"{node.op_type} '{node.name}' output" if node is not None else "the model input"
    path = f"{origin} {list(source.shape[1:])}" + \
        (f" through {' -> '.join(reversed(steps))}" if steps else "")
    return UnitSite(layer, tensor, producer.name, axis, int(value.shape[axis]), spatial, path,
                    pooled=node is not None and node.op_type in POOLING_OPS,
                    from_input=node is None)


class SiteRunner:
    """The network split at a unit site: the part before runs once on ``x``; each call
    re-runs only the part after it with some units replaced (exactly the model when none
    are). For a dense consumer (Gemm without transA, x @ W) on a 2-D input, the part
    after starts behind the consumer: its output changes by alpha (x' - x)[:, U] W[U, :]
    for the replaced units U, so a call costs only the layers after it."""

    def __init__(self, graph: ShadowGraph, site: UnitSite, x: torch.Tensor,
                 batch: int = 4096) -> None:
        self.graph, self.site = graph, site
        layer = site.consumer
        dense = layer.op == "Gemm" or layer.orientation == "matmul_right"
        self.stop = layer.name
        probe = graph.run_until(site.producer, x[:1])[site.tensor]
        self.linear = dense and probe.dim() == 2
        if not self.linear:
            self.stop = site.producer
        self.envs, values, self.base = [], [], []
        out_name = graph.node_by_name[layer.name].outputs[0] if self.linear else site.tensor
        self.out_name = out_name
        for i in range(0, len(x), batch):
            env = graph.run_until(self.stop, x[i:i + batch])
            self.envs.append(env)
            # behind the consumer its input is no longer live: one more run to read it
            values.append(graph.run_until(site.producer, x[i:i + batch])[site.tensor]
                          if self.linear else env[site.tensor])
            self.base.append(env[out_name])
        self.units = torch.cat(values)
        self.outputs = graph.node_by_name[self.stop].outputs
        if self.linear:
            w = graph.weight(layer.weight)
            if layer.orientation == "gemm_transposed":
                w = w.transpose(0, 1)
            alpha = float(graph.node_attributes(layer.name).get("alpha", 1.0)) \
                if layer.op == "Gemm" else 1.0
            self.key_rows = (alpha * w).to(self.units.dtype)   # [K, N]

    def logits_with(self, units: list[int], new: torch.Tensor) -> torch.Tensor:
        """Logits [n, classes] with the site's ``units`` replaced by ``new`` (the shape of
        ``self.units.index_select(axis, units)``)."""
        index = torch.as_tensor(units, device=self.units.device, dtype=torch.long)
        out, start = [], 0
        for env, base in zip(self.envs, self.base):
            rows = slice(start, start + len(base))
            start += len(base)
            if self.linear:
                change = new[rows] - self.units[rows].index_select(1, index)
                value = base + change @ self.key_rows.index_select(0, index)
            else:
                value = base.clone()
                value.index_copy_(self.site.axis, index, new[rows])
            replace = tuple(value if name == self.out_name else env.get(name)
                            for name in self.outputs)
            logits = self.graph.run_after(self.stop, env, replace)[0]
            out.append(logits.reshape(len(logits), -1))
        return torch.cat(out)

    def sweep(self, unit_values: list[tuple[int, torch.Tensor]]) -> list[torch.Tensor]:
        """Logits for each (unit u, values [V, n]): row block v sets u alone to values[v]
        (one input per column), [V * n, classes] each. A dense consumer on one batch of
        inputs runs every unit's variants in one resumed pass (its output is linear in the
        unit); otherwise, or when the layers after it read other tensors of the batch, one
        pass per variant."""
        if self.linear and len(self.envs) == 1 and len(self.units) > 1:
            try:
                return self._sweep_linear(unit_values)
            except RuntimeError:  # the part after the consumer reads batch-sized tensors
                pass
        out = []
        for u, values in unit_values:
            shape = (1,) * (self.units.dim() - 1)
            out.append(torch.cat([self.logits_with([u], v.reshape((-1,) + shape)
                                                   .expand_as(self.units.narrow(
                                                       self.site.axis, u, 1)))
                                  for v in values]))
        return out

    def _sweep_linear(self, unit_values) -> list[torch.Tensor]:
        env, base = self.envs[0], self.base[0]
        n = len(base)
        index = torch.as_tensor([u for u, _ in unit_values], device=base.device)
        values = torch.stack([v for _, v in unit_values]).to(base.dtype)     # [U, V, n]
        change = values - self.units.index_select(1, index).T[:, None, :]    # [U, V, n]
        rows = self.key_rows.index_select(0, index)                          # [U, N]
        value = base[None, None] + change[..., None] * rows[:, None, None, :]
        flat = value.reshape(-1, base.shape[-1])
        replace = tuple(flat if name == self.out_name else env.get(name)
                        for name in self.outputs)
        logits = self.graph.run_after(self.stop, env, replace)[0]
        logits = logits.reshape(len(flat), -1)
        per_unit = values.shape[1] * n
        return [logits[i * per_unit:(i + 1) * per_unit] for i in range(len(unit_values))]

    def logits(self) -> torch.Tensor:
        """The model's logits on ``x``."""
        return self.logits_with([], self.units.index_select(self.site.axis, torch.zeros(
            0, dtype=torch.long, device=self.units.device)))

    def scaled_logits(self, units: list[int], multipliers) -> torch.Tensor:
        """Logits with ``units`` multiplied by ``multipliers``."""
        index = torch.as_tensor(units, device=self.units.device, dtype=torch.long)
        old = self.units.index_select(self.site.axis, index)
        shape = [1] * old.dim()
        shape[self.site.axis] = len(units)
        m = torch.as_tensor(np.asarray(multipliers, dtype=np.float64), device=old.device)
        return self.logits_with(units, old * m.to(old.dtype).reshape(shape))


@dataclass
class UnitEffects:
    """Two rankings of a site's units. ``care``: CARE's score, the spread (max - min) of the
    misbehaviour probability over triggered inputs as the unit is set to ``values`` evenly
    spaced values across its observed range on clean inputs. ``swap``: ours, the share of
    the misbehaviour probability removed when the unit alone takes its clean value in each
    triggered input (a transplanted pair's clean twin)."""

    care: np.ndarray
    swap: np.ndarray
    care_order: list[int]
    swap_order: list[int]

    def overlap(self, k: int) -> int:
        return len(set(self.care_order[:k]) & set(self.swap_order[:k]))


def misbehaviour_probability(logits: torch.Tensor, labels: torch.Tensor,
                             target: int | None) -> torch.Tensor:
    """p_t (the attack's target class t) or, without one, 1 - p_y, per row (float64)."""
    p = torch.softmax(logits.to(torch.float64), 1)
    if target is not None:
        return p[:, target]
    return 1.0 - p[torch.arange(len(p)), labels]


@torch.no_grad()
def unit_effects(graph: ShadowGraph, site: UnitSite, triggered: torch.Tensor,
                 clean: torch.Tensor, labels: torch.Tensor, target: int | None,
                 values: int = 4, show_progress: bool | None = None) -> UnitEffects:
    """Both rankings of :class:`UnitEffects` over ``triggered`` inputs and their clean
    twins ``clean`` (the observed range comes from the clean ones)."""
    if values < 2:
        raise RectifyError("CARE's score needs at least 2 values per unit")
    clean_units = SiteRunner(graph, site, clean).units
    runner = SiteRunner(graph, site, triggered)
    base = misbehaviour_probability(runner.logits(), labels, target)
    total = float(base.sum())
    flat_clean = clean_units.movedim(site.axis, 0).reshape(site.units, -1).to(torch.float64)
    low, high = flat_clean.min(1).values, flat_clean.max(1).values
    steps = torch.linspace(0, 1, values, dtype=torch.float64)
    care, swap = np.zeros(site.units), np.zeros(site.units)
    flat_units = runner.units.movedim(site.axis, 0).reshape(site.units, len(triggered), -1)
    flat_twins = clean_units.movedim(site.axis, 0).reshape(site.units, len(triggered), -1)
    n = len(triggered)
    width = runner.base[0][0].numel()  # what one resumed row holds: at most 2^24 numbers
    chunk = max(1, (1 << 24) // max(1, (values + 1) * n * width))
    with progress(site.units, "unit effects", show_progress) as bar:
        for first in range(0, site.units, chunk):
            batch = []
            for u in range(first, min(first + chunk, site.units)):
                grid = (low[u] + steps * (high[u] - low[u])).to(runner.units.dtype)
                sweep = grid[:, None].expand(values, n)
                if flat_units.shape[2] == 1:  # the twin's own value, per input
                    sweep = torch.cat([sweep, flat_twins[u, :, 0][None]])
                batch.append((u, sweep))
            for (u, _), logits in zip(batch, runner.sweep(batch)):
                p = misbehaviour_probability(logits, labels.repeat(len(logits) // n),
                                             target).reshape(-1, n)
                curve = p[:values].mean(1)
                care[u] = float(curve.max() - curve.min())
                if len(p) > values:
                    removed = float((base - p[values]).sum())
                    swap[u] = removed / total if total > 1e-12 else 0.0
            bar.update(len(batch))
    if flat_units.shape[2] > 1:  # a unit spans positions (a channel): swap one at a time
        for u in range(site.units):
            twin = clean_units.index_select(site.axis, torch.tensor([u], device=base.device))
            p = misbehaviour_probability(runner.logits_with([u], twin), labels, target)
            swap[u] = float((base - p).sum()) / total if total > 1e-12 else 0.0
    order = lambda s: [int(i) for i in np.argsort(-s, kind="stable")]  # noqa: E731
    return UnitEffects(care, swap, order(care), order(swap))


@torch.no_grad()
def default_unit_site(graph: ShadowGraph, layers: list[EditableLayer],
                      probe: torch.Tensor) -> UnitSite:
    """CARE's site: the units feeding the first dense (Gemm/MatMul) layer of ``layers``: a
    flattened feature map (spatially resolved units, as CARE cuts a CNN), or on an MLP the
    flattened input pixels (``from_input``: where a patch trigger lives; a hidden unit of an
    MLP mixes every pixel). A dense layer that reads a graph input with no node between
    is passed over (a SiteRunner needs a producer), and one that reads pooled channels has
    no spatial units a weight edit could scale: RectifyError, naming what to pass instead."""
    for layer in (l for l in layers if l.op in ("Gemm", "MatMul")):
        try:
            site = unit_site(graph, layer, probe)
        except RectifyError:  # a graph input with no node between, or a tensor read elsewhere
            continue
        if site.pooled:
            raise RectifyError(f"CARE does not apply by default: the first dense layer "
                               f"'{layer.name}' reads {site.path}, pooled channels with no "
                               "spatially resolved units (multipliers there cost accuracy or "
                               "leave the backdoor: README, section CARE); use "
                               f"--strategy dynamic, or pass --layer {layer.name} to repair "
                               "those channels anyway, or --layer NAME for the input units of "
                               "another layer")
        return site
    raise RectifyError("CARE does not apply: no editable dense layer reads hidden units "
                       "CARE could repair (pass --layer NAME)")
