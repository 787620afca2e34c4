"""The figures of unreliable behaviour, measured under onnxruntime on the ONNX file.

- OA (clean accuracy): share of clean inputs classified as their label.
- ASR (attack success rate): share of corrupted inputs whose true label is not the
  target that are classified as the target.
- spurious gap: accuracy on a class's inputs carrying the spurious pattern minus
  accuracy on the same class's clean inputs.
- leakage: share of input Integrated-Gradients attribution mass that falls on an
  uninformative region (BlockMNIST's null block). Gradients are not available in
  onnxruntime, so this one runs on the shadow graph (whose parity with onnxruntime
  is checked by ``inspect``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from patcher.analysis.input_attribution import attribution_share
from patcher.graph.shadow import ShadowGraph
from patcher.model.runtime import RuntimeSession, open_session
from patcher.progress import progress


def predict(session: RuntimeSession, x: np.ndarray, batch: int = 256, label: str = "evaluating",
            show_progress: bool | None = None) -> np.ndarray:
    """Class scores of ``x`` (first output), batched."""
    outs = []
    with progress(len(x), label, show_progress) as bar:
        for i in range(0, len(x), batch):
            outs.append(session.run(x[i:i + batch])[0])
            bar.update(min(batch, len(x) - i))
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def _session(model: "str | os.PathLike | bytes | RuntimeSession", provider: str) -> RuntimeSession:
    return model if isinstance(model, RuntimeSession) else open_session(model, provider)


def accuracy(model, x: np.ndarray, y: np.ndarray, provider: str = "auto", **kw) -> float:
    """OA = mean(argmax f(x) == y)."""
    scores = predict(_session(model, provider), x, **kw)
    return float(np.mean(scores.argmax(1) == y))


def attack_success_rate(model, x: np.ndarray, y: np.ndarray, target: int,
                        provider: str = "auto", **kw) -> float:
    """ASR = mean over corrupted inputs with y != target of [argmax f(x~) == target]."""
    keep = y != target
    if not keep.any():
        return float("nan")
    scores = predict(_session(model, provider), x[keep], **kw)
    return float(np.mean(scores.argmax(1) == target))


def softmax(scores: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64. An overflowed score (+-Inf) counts as the largest (smallest)
    float, so [Inf, 1] gives [1, 0]; a row with NaN gives NaN (no numpy warning either way)."""
    big = np.finfo(np.float64).max
    s = np.nan_to_num(np.asarray(scores, np.float64), nan=np.nan, posinf=big, neginf=-big)
    with np.errstate(over="ignore", invalid="ignore"):
        e = np.exp(s - s.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)


def pair_gap(model, corrupted: np.ndarray, clean: np.ndarray, labels: np.ndarray,
             provider: str = "auto") -> float:
    """delta* = mean over pairs of p_y(x) - p_y(x~) (softmax of the first output)."""
    session = _session(model, provider)
    rows = np.arange(len(labels))
    p_clean = softmax(predict(session, clean, show_progress=False))[rows, labels]
    p_corrupted = softmax(predict(session, corrupted, show_progress=False))[rows, labels]
    return float(np.mean(p_clean - p_corrupted))


@dataclass
class SpuriousGap:
    clean_accuracy: float
    spurious_accuracy: float

    @property
    def gap(self) -> float:
        """Accuracy with the spurious pattern minus accuracy without it."""
        return self.spurious_accuracy - self.clean_accuracy


def spurious_gap(model, clean_x, clean_y, spurious_x, spurious_y, provider: str = "auto",
                 **kw) -> SpuriousGap:
    session = _session(model, provider)
    return SpuriousGap(accuracy(session, clean_x, clean_y, **kw),
                       accuracy(session, spurious_x, spurious_y, **kw))


def leakage(model, x: np.ndarray, y: np.ndarray, null_mask: np.ndarray, steps: int = 32,
            batch: int = 64, device: str = "cpu") -> float:
    """Mean over samples of sum |IG| on the null region / sum |IG| over the whole input
    (:func:`patcher.analysis.input_attribution.attribution_share`). ``null_mask`` is [n, ...] (or broadcastable), 1 on the
    uninformative region."""
    graph = model if isinstance(model, torch.nn.Module) else ShadowGraph.from_onnx(model)
    graph = graph.to(device)
    mask = np.broadcast_to(null_mask, x.shape)
    t = lambda a: torch.tensor(a, device=device)  # noqa: E731  (copies: npz arrays are read-only)
    return attribution_share(graph, t(x), t(y), t(mask), steps=steps, batch=batch)
