"""Forward passes that resume at a layer instead of starting from the images.

After an edit at layer L only L and what follows it compute anything new; the images'
activations up to L's input are what they were. Where L's data input is the only
activation the rest of the graph reads (a *cut*: a dense head, the first conv of a
residual block), the workspace's passes over a fixed image set (the eval set, the gap
pairs) record that input once, in a pass they make anyway before any weight changes (the
statistics pass, the setup's gap pass), and later passes over the same set run the graph
from L on (:meth:`ShadowGraph.run_after`). ResNet-18 at 224 edited at its ``fc``: the
accuracy and gap passes after the edit cost a head instead of a whole network.

A recording is used only while no weight upstream of its layer has been touched since it
was taken (even an edit rolled back leaves float rounding behind), so a resumed pass
computes what a full pass computes, bit for bit: the same operations on the same tensors.
Recordings are bounded by RESUME_BYTES in all; when a pass would exceed it, the earliest
layer's recording is dropped first (the later a cut, the less a resumed pass computes).
"""
from __future__ import annotations

import torch

from patcher.graph.keys import data_input_index
from patcher.graph.shadow import EditableLayer, ShadowGraph

#: At most this much recorded layer input, over every layer and image set.
RESUME_BYTES = 48 << 20


class ResumePoints:
    """Recorded inputs of cut layers per image set, and passes that resume from them."""

    def __init__(self, graph: ShadowGraph, layers: list[EditableLayer],
                 probe: torch.Tensor) -> None:
        """``probe``: one input (a batch of one) to find the graph's constants with."""
        self.graph = graph
        self.order = {info.name: i for i, info in enumerate(graph.nodes)}
        #: layer name -> its data input's tensor name, for the cut layers
        self.cuts: dict[str, str] = {}
        #: (set key, layer) -> recorded input batches, in pass order
        self.recorded: dict[tuple[str, str], list[torch.Tensor]] = {}
        #: layers whose weight changed since the recordings were taken
        self.touched: set[str] = set()
        self._constants: dict[str, torch.Tensor] = {}
        self._upstream: dict[str, set[str]] = {}
        #: (set key, layer) whose recording was dropped for the budget
        self.dropped: set[tuple[str, str]] = set()
        self.resumed_batches = 0
        if graph.fixed_batch is None and layers:
            self._find_cuts(layers, probe)

    def _find_cuts(self, layers: list[EditableLayer], probe: torch.Tensor) -> None:
        """A layer is a cut when, at its step, the only non-constant tensor that any later
        step or the graph's outputs read is its own data input."""
        last = self.graph.nodes[-1].name
        with torch.no_grad():
            env = self.graph.run_until(last, probe)
        held = {id(t) for t in self.graph.parameters()} | {id(t) for t in self.graph.buffers()}
        self._constants = {k: v for k, v in env.items() if id(v) in held}
        nodes = self.graph.nodes
        for layer in layers:
            index = self.order[layer.name]
            if index == 0:
                continue
            produced = {o for info in nodes[index:] for o in info.outputs if o}
            read = {i for info in nodes[index:] for i in info.inputs if i}
            read |= set(self.graph.output_names)
            needed = read - produced - set(self._constants)
            data = nodes[index].inputs[data_input_index(layer)]
            if needed == {data}:
                self.cuts[layer.name] = data
        names = set(self.cuts)
        for layer in layers:  # which cut layers each editable layer feeds
            downstream = self.graph.downstream_nodes(layer.name)
            for cut in names & downstream:
                self._upstream.setdefault(cut, set()).add(layer.name)

    # ------------------------------------------------------------------ recording
    def record(self, key: str, batches: int):
        """A context: every forward while it is open appends the cut layers' inputs under
        ``key``; kept only when exactly ``batches`` forwards ran (a whole pass) and no
        weight was touched."""
        return _Recording(self, key, batches)

    def _bytes(self) -> int:
        return sum(t.numel() * t.element_size() for parts in self.recorded.values()
                   for t in parts)

    def _evict_for(self, slot: tuple[str, str], extra: int, pending: dict) -> None:
        """Drop the earliest layers' recordings (kept, being made in ``pending``, or the one
        ``slot`` would start) until ``extra`` more bytes for ``slot`` fit in RESUME_BYTES."""
        def size(parts):
            return sum(t.numel() * t.element_size() for t in parts)

        while self._bytes() + sum(size(p) for p in pending.values()) + extra > RESUME_BYTES:
            owners = sorted(set(self.recorded) | set(pending) | {slot},
                            key=lambda k: self.order[k[1]])
            self.recorded.pop(owners[0], None)
            pending.pop(owners[0], None)
            self.dropped.add(owners[0])
            if owners[0] == slot:
                return

    # ------------------------------------------------------------------ resuming
    def usable(self, key: str, batches: int) -> str | None:
        """The latest cut layer recorded for ``key`` (all ``batches``) with no touched
        weight upstream of it; None when there is none."""
        best = None
        for (k, layer), parts in self.recorded.items():
            if k != key or len(parts) != batches:
                continue
            if self._upstream.get(layer, set()) & self.touched:
                continue
            if best is None or self.order[layer] > self.order[best]:
                best = layer
        return best

    def forward(self, layer: str, key: str, index: int) -> tuple[torch.Tensor, ...]:
        """The graph's outputs for batch ``index`` of ``key``, run from ``layer`` on."""
        nodes = self.graph.nodes
        before = nodes[self.order[layer] - 1].name
        env = dict(self._constants)
        env[self.cuts[layer]] = self.recorded[(key, layer)][index]
        self.resumed_batches += 1
        return self.graph.run_after(before, env)

    def touch(self, layer: str) -> None:
        """``layer``'s weight changed: recordings at or before it stay usable, later ones
        downstream of it do not (:meth:`usable`)."""
        self.touched.add(layer)


class _Recording:
    def __init__(self, points: ResumePoints, key: str, batches: int) -> None:
        self.points, self.key, self.batches = points, key, batches
        self.pending: dict = {}
        self._handle = None

    def _hook(self, node, ins, outs):
        points = self.points
        data = ins[data_input_index(points.graph.layer(node.name))].detach()
        slot = (self.key, node.name)
        if slot in points.dropped:
            return None
        points._evict_for(slot, data.numel() * data.element_size(), self.pending)
        if slot not in points.dropped:
            self.pending.setdefault(slot, []).append(data)
        return None

    def __enter__(self) -> "_Recording":
        points = self.points
        if points.cuts and not points.touched:
            self._handle = points.graph.register_hook(self._hook, nodes=list(points.cuts))
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self._handle is None:
            return
        self._handle.remove()
        if exc_type is not None or self.points.touched:
            return
        for slot, parts in self.pending.items():
            if len(parts) == self.batches:
                self.points.recorded[slot] = parts
