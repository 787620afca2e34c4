"""What every strategy works on: the graph on its device, the data as tensors, the pair sets,
the statistics, and the two measurements the loop needs (gaps and accuracy).

Gap: delta* = mean over pairs of p_y(x) - p_y(x~). Target-class gap, for a corruption
with a target class t (the class most corrupted pairs are flipped to, as with a
backdoor): tau = mean over pairs of p_t(x~) - p_t(x). Accuracy drop: eps* = OA(base)
- OA(edited) on the eval set.
"""
from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import replace
from typing import NamedTuple

import numpy as np
import torch

from patcher.analysis.attribution import IG_CHUNK
from patcher.analysis.moments import graph_input
from patcher.graph.keys import stored_delta
from patcher.graph.shadow import EditableLayer, ShadowExecutionError, ShadowGraph
from patcher.graph.support import QUANTIZED_NOT_EDITABLE, quantized_storage
from patcher.errors import RectifyError
from patcher.progress import progress
from patcher.rectify.config import EVAL_BATCH, RectifyConfig, check_config
from patcher.rectify.resume import ResumePoints
from patcher.rectify.statcache import StatisticsCache, hits
from patcher.rectify.timing import Timings
from patcher.rectify.transplant import build_pair_sets


#: What the activations of one batch may take (the default batch): the largest activation
#: of one input, times ACTIVATION_COPIES live at once, times the batch, at most this.
BATCH_MEMORY = 256 << 20
ACTIVATION_COPIES = 4
#: the eval set's key among the image sets whose passes resume (:mod:`patcher.rectify.resume`)
EVAL_KEY = "eval"


class GapReading(NamedTuple):
    """One measure of the gap pairs (:meth:`Workspace.gaps`)."""

    gap: float              # delta*
    tau: float | None       # the target-class gap; None without a target class
    flipped: int | None     # pairs still flipped to the target class; None without one
    pairs: int              # gap pairs measured


#: What one Integrated-Gradients block may take: its interpolated inputs times the
#: activation bytes of one input's forward times IG_BACKWARD_COPIES (what autograd keeps
#: for the backward, and the gradients it makes), at most this (captum's
#: ``internal_batch_size``, chosen by memory). ViT-Ti/16 at 224 (94 MB per input): the
#: 16 steps of one pair in one block took 1.2 GB, 4 blocks of 4 take about 0.3 GB (blocks of
#: 3 cost 3 more CPU s of per-node overhead); ResNet-18 (22 MB): one block of 16, as before.
IG_MEMORY = 768 << 20
IG_BACKWARD_COPIES = 1.5


@torch.no_grad()
def activation_sizes(graph: ShadowGraph, sample: torch.Tensor) -> tuple[float, float] | None:
    """(largest tensor, all tensors) in bytes per input that a forward computes (views of
    one storage counted once), from one forward of ``sample`` (a few inputs) with a hook on
    every node; None when the graph cannot run ``sample`` (e.g. fewer inputs than a fixed
    batch)."""
    largest = 0
    storages: dict[int, object] = {}  # held until the end: a freed one's address is reused

    def measure(node, ins, outs):
        nonlocal largest
        for t in outs:
            if isinstance(t, torch.Tensor):
                largest = max(largest, t.numel() * t.element_size())
                storage = t.untyped_storage()
                storages[storage.data_ptr()] = storage

    handle = graph.register_hook(measure)
    try:
        graph(sample)
    except ShadowExecutionError:
        return None
    finally:
        handle.remove()
    count = max(len(sample), 1)
    return largest / count, sum(s.nbytes() for s in storages.values()) / count


_UNMEASURED = object()


def default_batch(graph: ShadowGraph, sample: torch.Tensor,
                  sizes: tuple[float, float] | None | object = _UNMEASURED) -> int:
    """Inputs per forward such that batch x ACTIVATION_COPIES x (the largest tensor one
    input's forward computes) stays within BATCH_MEMORY; between 1 and EVAL_BATCH. One
    forward of ``sample`` (a few inputs) measures the largest tensor (ResNet-18 at 224:
    its 64 x 112 x 112 stem output, 3.2 MB per input, so 20 inputs; a 28x28 CNN:
    EVAL_BATCH); ``sizes``: :func:`activation_sizes` already measured (None included:
    the graph could not run the sample)."""
    if sizes is _UNMEASURED:
        sizes = activation_sizes(graph, sample)
    if sizes is None:  # the graph cannot run the sample: the old default
        return EVAL_BATCH
    per_input = sizes[0] * ACTIVATION_COPIES
    return int(max(1, min(EVAL_BATCH, BATCH_MEMORY // max(per_input, 1))))


def ig_chunk(sizes: tuple[float, float] | None, points: int, pairs: int) -> int:
    """Interpolated inputs per IG block (:func:`patcher.analysis.attribution.
    layer_integrated_gradients`' ``chunk``) for ``points`` interpolation points of
    ``pairs`` pairs: IG_CHUNK unless IG_MEMORY bounds a block (``sizes`` from
    :func:`activation_sizes`); then whole steps of every pair, as few blocks as the bound
    allows, of about equal size (16 steps at most 15 a block: two blocks of 8, not 15
    and 1)."""
    if sizes is None:
        return IG_CHUNK
    most = int(IG_MEMORY // max(sizes[1] * IG_BACKWARD_COPIES, 1))
    if most >= IG_CHUNK:
        return IG_CHUNK
    pairs = max(pairs, 1)
    per_block = max(1, most // pairs)
    blocks = -(-points // per_block)
    return -(-points // blocks) * pairs


class Workspace:
    """The shadow graph on the run's device, the data as tensors, and the statistics."""

    def __init__(self, graph: ShadowGraph, pairs, eval_set, calib_x: np.ndarray | None,
                 config: RectifyConfig, device: str | torch.device = "cpu",
                 ranking_only: bool = False) -> None:
        """``ranking_only``: the workspace only ranks layers (``locate``): no transplanted
        pair sets and their gap passes, no resume recordings (nothing is edited); the
        ranking reads the pairs and the statistics alone, so it is the same."""
        check_config(config)
        self.graph = graph.to(device).eval()
        # every gradient a strategy takes is of layer outputs (IG) or of its own tensors;
        # weight gradients would cost a third of each backward pass (IG on ResNet-18 at
        # 224: 5.1 -> 3.6 CPU s without them, same attributions). The fine-tune edit turns
        # its one weight's on itself.
        for p in self.graph.parameters():
            p.requires_grad_(False)
        self.device = torch.device(device)
        self.config = config
        self.timings = Timings()
        self.pairs = pairs
        self.pair_corrupted = self.tensor(pairs.corrupted)
        self.pair_clean = self.tensor(pairs.clean)
        self.pair_label = self.tensor(pairs.label)
        self.eval_x, self.eval_y = eval_set.x, eval_set.y
        calib = calib_x if calib_x is not None else eval_set.x
        self.calib_x = calib[:config.calib_limit]
        #: the calibration inputs are the whole eval set, in order (the default)
        self.calibrates_on_eval = calib_x is None and len(self.calib_x) == len(self.eval_x)
        self.layers = self._candidate_layers()
        self._gap_sets_seen: dict[int, tuple] = {}  # the gap sets measured (see _measure_gaps)
        self._base_clean: dict[int, torch.Tensor] = {}  # their clean inputs' p, as loaded
        self._pass_batches = 0
        #: inputs per forward (--batch, or from the activation size): bounds peak memory
        sizes = activation_sizes(self.graph, self.pair_clean[:8])
        self.batch = config.batch or default_batch(self.graph, self.pair_clean[:8], sizes)
        #: interpolated inputs per Integrated-Gradients block (bounded by IG_MEMORY)
        self.ig_chunk = ig_chunk(sizes, config.steps + (config.attribution_form == "path"),
                                 len(pairs))
        self.resume = None if ranking_only else self._resume_points()
        self.target_class = self._flipped_to(pairs)
        sets = build_pair_sets(pairs, self.eval_x, self.eval_y, len(self.calib_x),
                               self.target_class,
                               replace(config, transplant="none") if ranking_only else config)
        self.fit = tuple(self.tensor(a) for a in sets.fit)
        self.gap_sets = tuple(self.tensor(a) for a in sets.gap)
        self.gap_source = sets.gap_source
        if self.gap_source != "pairs" and not ranking_only:
            self._use_pairs_if_transplant_misses(pairs)
        self.statistics = StatisticsCache(
            self.graph, self.layers, self.calib_x, config, self.device, self.timings,
            self.eval_y if self.calibrates_on_eval else None, batch=self.batch)
        if self.calibrates_on_eval and self.resume is not None:  # it records resume points
            self.statistics.recording = lambda: self._pass(EVAL_KEY, self._batches(self.eval_x))
        #: eval images the last accuracy pass saw (fewer when it stopped early)
        self.last_evaluated = len(self.eval_x)

    def _use_pairs_if_transplant_misses(self, pairs) -> None:
        """The transplanted pairs must carry the corruption: when the pairs' own gap
        (tau with a target class, else delta*) is above the target and the transplanted
        gap set's is at most a third of it, fit and judge on the pairs themselves, and say
        so. (Pasting only the pixels where a pair's two images differ loses a trigger that
        lives where they agree, e.g. a strikethrough over text: the transplanted tau was
        -0.06 against the pairs' 0.35, and the loop stopped at once with the attack live.)"""
        own = tuple(self.tensor(np.asarray(a)) for a in (pairs.corrupted, pairs.clean,
                                                          pairs.label))
        moved = self.gap_sets

        results = {}

        def measured(sets) -> float:
            self.gap_sets = sets
            reading = results[id(sets)] = self._measure_gaps()
            return reading.tau if reading.tau is not None else reading.gap

        own_gap, moved_gap = measured(own), measured(moved)
        self.gap_sets = moved
        if own_gap > self.config.gap and moved_gap <= own_gap / 3:
            logging.getLogger("onnx_rectify").warning(
                "the transplanted trigger does not carry the corruption (gap %.4f on "
                "transplanted pairs against %.4f on the pairs themselves): fitting and "
                "judging on the pairs themselves", moved_gap, own_gap)
            self.fit = own
            self.gap_sets = own
            self.gap_source = "pairs (the transplanted trigger did not carry the corruption)"
        self._setup_gaps = (self.gap_sets, results[id(self.gap_sets)])

    def tensor(self, array: np.ndarray) -> torch.Tensor:
        """``array`` as a tensor on the run's device (an image batch in the graph's
        fastest layout, :func:`patcher.analysis.moments.graph_input`)."""
        return graph_input(torch.from_numpy(np.ascontiguousarray(array)).to(self.device))

    def layer(self, name: str) -> EditableLayer:
        return next(l for l in self.layers if l.name == name)

    def _resume_points(self) -> ResumePoints | None:
        """Passes over the eval set and the gap pairs resume at a cut layer once recorded
        (:mod:`patcher.rectify.resume`): for the rank-one strategies with the prediction
        objective, whose weights change through :meth:`add` only."""
        if self.config.strategy not in ("dynamic", "static") or \
                self.config.objective != "prediction":
            return None
        try:
            return ResumePoints(self.graph, self.layers, self.pair_clean[:1])
        except ShadowExecutionError:  # e.g. a fixed batch the probe does not fill
            return None

    def _batches(self, x) -> int:
        return -(-len(x) // self.batch)

    def _outputs(self, key: str | None, index: int, batch) -> tuple[torch.Tensor, ...]:
        """The graph's outputs for batch ``index`` of the image set ``key``, resumed at
        the latest usable recorded layer when there is one; ``batch()`` gives the inputs
        (only called for a full pass)."""
        points = self.resume
        layer = points.usable(key, self._pass_batches) if points and key else None
        if layer is not None:
            return points.forward(layer, key, index)
        return self.graph(batch())

    def _pass(self, key: str | None, batches: int):
        """A context for one pass over ``batches`` batches of the image set ``key``: it
        records the resume points unless they are recorded already."""
        self._pass_batches = batches
        points = self.resume
        if points is None or key is None or points.usable(key, batches) is not None:
            return nullcontext()
        return points.record(key, batches)

    def _candidate_layers(self) -> list[EditableLayer]:
        known = [l.name for l in self.graph.editable_layers]
        excluded = set(self.config.exclude_layers)
        unknown = [n for n in self.config.exclude_layers if n not in known]
        if unknown:
            raise RectifyError(f"--exclude-layer '{unknown[0]}' is not an editable layer of "
                               f"this model (editable: {', '.join(known)})")
        layers = []
        for layer in self.graph.editable_layers:
            if layer.name in excluded:
                continue
            if layer.shared_with and not self.config.allow_shared:
                continue
            if layer.orientation == "conv" and len(layer.shape) not in (3, 4):
                continue
            layers.append(layer)
        if not layers and excluded:
            raise RectifyError("--exclude-layer leaves no editable layer that can be patched")
        if not layers:
            form = quantized_storage(self.graph.model.proto.graph.node)
            if form is not None:
                raise RectifyError(f"the model's weights are stored quantized ({form}): "
                                   f"{QUANTIZED_NOT_EDITABLE}")
            raise RectifyError("the model has no editable layer that can be patched "
                               "(Conv, Gemm, or MatMul with one constant operand, not shared)")
        return layers

    def hidden_layers(self) -> list[EditableLayer]:
        """Layers with another editable layer downstream: their neurons are hidden units, as
        in CARE (the output layer's neurons are the logits themselves; swapping the label's
        logit restores the prediction trivially). All layers when none is hidden."""
        names = {l.name for l in self.layers}
        hidden = [l for l in self.layers
                  if (self.graph.downstream_nodes(l.name) - {l.name}) & names]
        return hidden or list(self.layers)

    @torch.no_grad()
    def _flipped_to(self, pairs) -> set[int]:
        """The corruption's target class, if it has one: the class the model predicts for
        more than half of the corrupted inputs while their label is another (a backdoor's
        target). Scattered misclassifications (a spurious pattern, leakage) name none."""
        logits = torch.cat([self.graph(self.pair_corrupted[i:i + self.batch])[0]
                            .reshape(len(self.pair_corrupted[i:i + self.batch]), -1)
                            for i in range(0, len(pairs), self.batch)])
        predicted = logits.argmax(1).cpu().numpy()
        flips = [int(p) for p, y in zip(predicted, pairs.label) if p != y]
        if not flips:
            return set()
        target = max(set(flips), key=flips.count)
        return {target} if flips.count(target) > len(pairs) / 2 else set()

    # -------------------------------------------------------------- measurements
    @torch.no_grad()
    def probabilities(self, x: torch.Tensor, key: str | None = None) -> torch.Tensor:
        """Softmax over the classes, one row per input; ``key`` names the image set when
        its passes may resume at a recorded layer (:meth:`_outputs`)."""
        out = []
        with self._pass(key, self._batches(x)):
            for index, i in enumerate(range(0, len(x), self.batch)):
                logits = self._outputs(key, index, lambda: x[i:i + self.batch])[0]
                out.append(torch.softmax(logits.reshape(len(logits), -1), 1))
        return torch.cat(out)

    def gaps(self) -> GapReading:
        """delta*, tau and the target flips on the gap pairs (:meth:`_measure_gaps`). The
        check of the transplanted pairs at setup leaves its result for the first call (the
        loop's base measure: one pass over the gap pairs less), unless a weight changed
        (:meth:`add`) or the gap pairs did in between."""
        kept, self._setup_gaps = getattr(self, "_setup_gaps", None), None
        if kept is not None and kept[0] is self.gap_sets:
            return kept[1]
        return self._measure_gaps()

    def _measure_gaps(self) -> GapReading:
        """One pass over the gap pairs: delta* = mean of p_y(x) - p_y(x~); tau = mean of
        p_t(x~) - p0_t(x) for the corruption's target class t (None without one), p0 the
        model as loaded (its first measure of these pairs); flipped = pairs whose corrupted
        input's argmax is t while their clean input's was not, as loaded.

        Against the clean inputs as loaded, not as edited: an edit that sends clean and
        corrupted inputs to t alike (MobileNetV2 at 224: 12% of held-out triggered and
        12.5% of held-out clean images of other classes, 6.9% clean before) leaves
        p_t(x~) - p_t(x) near zero and flips no pair, though the edit itself put
        p_t(x~) there."""
        start = time.perf_counter()
        corrupted, clean, labels = self.gap_sets
        self._gap_sets_seen[id(self.gap_sets)] = self.gap_sets  # ids stay theirs
        key = f"gap sets {id(self.gap_sets)}"
        p_clean = self.probabilities(clean, key + " clean")
        p_corrupted = self.probabilities(corrupted, key + " corrupted")
        self.timings.add("gaps", start)
        rows = torch.arange(len(labels))
        tau = flipped = None
        if self.target_class:
            t = next(iter(self.target_class))
            p_base = self._base_clean.setdefault(id(self.gap_sets), p_clean)
            tau = float((p_corrupted[:, t] - p_base[:, t]).mean())
            flipped = int(((p_corrupted.argmax(1) == t) & (p_base.argmax(1) != t)).sum())
        gap = float((p_clean[rows, labels] - p_corrupted[rows, labels]).mean())
        return GapReading(gap, tau, flipped, len(labels))

    def base_accuracy(self) -> float:
        """Accuracy of the graph as loaded. When the calibration inputs are the eval set and
        the strategy needs key statistics, the statistics pass measures it on the way."""
        if self.calibrates_on_eval and self.config.strategy in ("dynamic", "static") \
                and not self.statistics.stats:
            self.statistics.compute()
            if self.statistics.calib_accuracy is not None:
                return self.statistics.calib_accuracy
        return self.accuracy()

    @torch.no_grad()
    def accuracy(self, at_least: float | None = None) -> float:
        """Accuracy on the eval set. With ``at_least``, the pass stops once the result is
        certainly below it (even if every image left were right) and returns that upper
        bound instead; :attr:`last_evaluated` says how many images were seen."""
        start = time.perf_counter()
        correct, total = 0, len(self.eval_x)
        self.last_evaluated = total
        with progress(total, "evaluating", self.config.show_progress) as bar, \
                self._pass(EVAL_KEY, self._batches(self.eval_x)):
            for index, i in enumerate(range(0, total, self.batch)):
                logits = self._outputs(EVAL_KEY, index,
                                       lambda: self.tensor(self.eval_x[i:i + self.batch]))[0]
                correct += hits(logits, self.eval_y[i:i + self.batch])
                seen = min(i + self.batch, total)
                bar.update(seen - i)
                if at_least is not None and seen < total and \
                        (correct + total - seen) / total < at_least - 1e-9:
                    self.last_evaluated = seen
                    correct += total - seen
                    break
        self.timings.add("evaluation", start)
        return correct / max(total, 1)

    # -------------------------------------------------------------- weights
    def stored(self, layer: EditableLayer, delta_canonical: torch.Tensor) -> torch.Tensor:
        """A canonical [V, K] delta in ``layer``'s stored weight layout and working dtype."""
        weight = self.graph.weight(layer.weight)
        delta = stored_delta(layer, delta_canonical, self.graph.node_attributes(layer.name))
        return delta.to(weight.dtype if weight.dtype == torch.float64 else torch.float32)

    @torch.no_grad()
    def add(self, tensor: str, delta: torch.Tensor, sign: float = 1.0) -> None:
        """Add ``sign * delta`` to a weight (a Parameter) or another constant (a bias)."""
        self._setup_gaps = None
        if self.resume is not None:
            changed = [l.name for l in self.graph.editable_layers if l.weight == tensor]
            for name in changed or [l.name for l in self.graph.editable_layers]:
                self.resume.touch(name)  # not a layer's weight: nothing recorded is usable
        try:
            target = self.graph.weight(tensor)
        except KeyError:  # a bias (CARE's shifts): a buffer, maybe on another device
            target = self.graph.constant(tensor)
            target.add_((sign * delta).to(target.dtype).to(target.device))
            return
        target.add_((sign * delta).to(target.dtype))
