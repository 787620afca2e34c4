"""Key statistics C per editable layer for one run: computed once, cached, exact on demand.

Ranking uses the statistics ``--statistics`` asks for (exact, or factored for wide layers
under ``auto``/``kronecker``); an edit needs the exact C^-1 of its layer, computed for
that layer alone when it was ranked with factored statistics. ``--cache-dir`` keeps the
partial sums on disk, keyed by the model's weights and the calibration data.
"""
from __future__ import annotations

import hashlib
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from patcher.analysis.moments import (CORRECTION_IMAGES, collect_moments, correct_spectra,
                                      iterate_batches, statistics_kind)
from patcher.analysis.stats import (KroneckerStatistics, LayerStatistics, MomentCache, data_hash,
                                    statistics_from_moments)
from patcher.graph.shadow import EditableLayer, ShadowGraph
from patcher.rectify.config import RectifyConfig
from patcher.rectify.timing import Timings


#: Exact key statistics (an edit's C, and under ``--statistics auto`` the ranking C of the
#: layers it does not factor) use at most KEYS_PER_DIM x Kd keys of a layer, and never fewer
#: than MIN_SAMPLED_KEYS: a seeded uniform sample beyond that (unless ``--stat-rows`` says
#: otherwise). The ridge-regularised C needs far fewer keys than a large map has (ResNet-18
#: at 224, 100 images: 313,600 keys of dimension 576 in a first-stage conv; a MobileNetV2
#: depthwise conv at 112x112: 120 million keys of dimension 9); sampling error of C is
#: about sqrt(Kd / keys) relative, 1/8 at this cap. The sampled keys are gathered from the
#: layer's input (:func:`patcher.graph.keys.sampled_conv_keys`), never unfolded.
KEYS_PER_DIM = 64
MIN_SAMPLED_KEYS = 1 << 15


def exact_key_cap(layer: EditableLayer) -> int:
    """The most keys the exact statistics of ``layer`` use (see :data:`KEYS_PER_DIM`)."""
    return max(KEYS_PER_DIM * layer.key_dim, MIN_SAMPLED_KEYS)


def hits(logits: torch.Tensor, labels: np.ndarray) -> int:
    """How many rows of ``logits`` have their argmax at ``labels``."""
    pred = logits.reshape(len(labels), -1).argmax(1).cpu().numpy()
    return int((pred == labels).sum())


class StatisticsCache:
    """C per layer from the clean calibration inputs only. The ridge keeps every k* in
    the span of C; adding corrupted keys (the pairs', or transplanted ones) makes the
    corruption's direction familiar to C, C^-1 stops singling it out, and edits
    generalise far worse: on samples/backdoor_cnn with 5 pairs, one edit of the
    first dense layer left ASR at 0.2% with C from clean data, 26.6% with the five
    corrupted inputs added (benchmarks/rectify_eval.py measures the whole loop)."""

    def __init__(self, graph: ShadowGraph, layers: list[EditableLayer], calib_x: np.ndarray,
                 config: RectifyConfig, device: torch.device, timings: Timings,
                 eval_labels: np.ndarray | None = None, batch: int = 128) -> None:
        """``eval_labels``: the calibration inputs are the eval set, in order, with these
        labels; the first statistics pass then also counts the accuracy. ``batch``: inputs
        per forward."""
        self.batch = batch
        self.graph, self.layers, self.calib_x = graph, layers, calib_x
        self.eval_labels = eval_labels
        self.config, self.device, self.timings = config, device, timings
        #: per layer: exact, or factored (ranking only) under --statistics auto/kronecker
        self.stats: dict[str, LayerStatistics | KroneckerStatistics] = {}
        self.exact_stats: dict[str, LayerStatistics] = {}  # for edits of factored layers
        #: accuracy measured by the first pass when the calibration inputs are the eval set
        self.calib_accuracy: float | None = None
        self.cache_hits = 0
        #: a context factory wrapped around the pass that counts the accuracy (the
        #: workspace records its resume points there, :mod:`patcher.rectify.resume`)
        self.recording: Callable | None = None

    def compute(self) -> None:
        """The ranking statistics. A run that edits one known layer (``static``, or
        ``--layer``) ranks nothing: it computes that layer's exact C alone. When the
        calibration inputs are the eval set the same pass counts the accuracy
        (:attr:`calib_accuracy`)."""
        layers, mode = self.layers, self.config.statistics
        if self.config.layer or self.config.strategy == "static":
            name = self.config.layer or self.layers[-1].name
            layers, mode = [l for l in self.layers if l.name == name] or self.layers, "exact"
        self.stats = self._statistics(layers, mode, self.eval_labels)

    def ensure_all(self) -> None:
        """Statistics for every layer (after a run that computed one forced layer only)."""
        if not self.stats:
            self.compute()
        missing = [l for l in self.layers if l.name not in self.stats]
        if missing:
            self.stats.update(self._statistics(missing, self.config.statistics))

    def for_edit(self, layer: EditableLayer) -> LayerStatistics:
        """The exact statistics of ``layer`` (an edit's C^-1): those of the ranking pass, or
        for a layer ranked with factored statistics, one more pass for this layer alone."""
        if not self.stats:
            self.compute()
        st = self.stats[layer.name]
        if st.kind in ("exact", "low-rank"):  # a wide layer's C is only kept factored
            return st
        if layer.name not in self.exact_stats:
            self.exact_stats.update(self._statistics([layer], "exact"))
        return self.exact_stats[layer.name]

    def refresh(self, edited: str) -> None:
        """Recompute C for the layers whose keys an edit of ``edited`` changed (downstream).

        Off by default (``RectifyConfig.refresh_statistics``): C comes from the base model,
        as in the paper. A rank-one edit moves downstream keys little; on every sample
        scenario the patched models' figures were identical with and without this, and
        it doubled the statistics time of multi-round runs (benchmarks/run.py)."""
        stale = self.graph.downstream_nodes(edited) & {l.name for l in self.layers}
        if not stale or not self.stats:
            return
        layers = [l for l in self.layers if l.name in stale]
        self.stats.update(self._statistics(layers, self.config.statistics))
        for name in stale:
            self.exact_stats.pop(name, None)

    def _model_key(self) -> str:
        """The model file's hash plus the current editable weights (edits change keys)."""
        digest = hashlib.sha256((self.graph.model.sha256 or "in-memory").encode())
        for p in self.graph.weights:
            digest.update(p.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def _row_caps(self, layers: list[EditableLayer], mode: str) -> dict[str, int]:
        """Key caps (:func:`exact_key_cap`) of the layers whose exact statistics this pass
        computes under ``mode``; none under ``--statistics exact``, which keeps every key."""
        if self.config.statistics == "exact":
            return {}
        return {l.name: exact_key_cap(l) for l in layers
                if statistics_kind(l, mode) == "exact"}

    def _statistics(self, layers: list[EditableLayer], mode: str,
                    eval_labels: np.ndarray | None = None
                    ) -> dict[str, LayerStatistics | KroneckerStatistics]:
        start = time.perf_counter()
        data = self.calib_x
        cache = MomentCache(Path(self.config.cache_dir)) if self.config.cache_dir else None
        moments: dict = {}
        keys = {}
        caps = self._row_caps(layers, mode)
        if cache is not None:
            model_key, data_key = self._model_key(), data_hash(data)
            if self.config.stat_rows:
                data_key += f"-rows{self.config.stat_rows}-seed{self.config.seed}"
            elif caps:
                data_key += f"-cap{KEYS_PER_DIM}x{MIN_SAMPLED_KEYS}-seed{self.config.seed}"
            for layer in layers:
                keys[layer.name] = f"{data_key}-{statistics_kind(layer, mode)}"
                hit = cache.get(model_key, layer, keys[layer.name])
                if hit is not None:
                    moments[layer.name] = hit
        missing = [l for l in layers if l.name not in moments]
        seen = correct = 0

        def count(batch, outputs):  # the calibration inputs are the eval set, in order
            nonlocal seen, correct
            correct += hits(outputs[0], eval_labels[seen:seen + len(batch)])
            seen += len(batch)

        on_output: Callable | None = count if eval_labels is not None else None
        if missing:
            recording = (self.recording() if self.recording is not None and
                         eval_labels is not None else nullcontext())
            with recording:
                fresh = collect_moments(self.graph, missing, iterate_batches(data, self.batch),
                                        total=len(data), show_progress=self.config.show_progress,
                                        max_rows=self.config.stat_rows or caps,
                                        seed=self.config.seed,
                                        mode=mode, on_output=on_output)
            correct_spectra(self.graph, missing, fresh,
                            iterate_batches(data[:CORRECTION_IMAGES], self.batch),
                            total=min(len(data), CORRECTION_IMAGES),
                            show_progress=self.config.show_progress)
            moments.update(fresh)
            if eval_labels is not None:
                self.calib_accuracy = correct / max(len(data), 1)
            if cache is not None:
                for layer in missing:
                    cache.put(model_key, layer, keys[layer.name], fresh[layer.name])
        self.cache_hits = len(layers) - len(missing)
        stats = {name: statistics_from_moments(name, m.to(self.device), self.config.ridge)
                 for name, m in moments.items()}
        self.timings.add("statistics", start)
        return stats
