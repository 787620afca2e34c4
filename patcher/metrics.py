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

from .progress import progress
from .runtime import RuntimeSession, open_session


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
    e = np.exp(scores - scores.max(1, keepdims=True))
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


def _first_output(graph: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The class scores: a shadow graph returns a tuple of outputs, a torch module a tensor."""
    out = graph(x)
    return out[0] if isinstance(out, (tuple, list)) else out


def input_integrated_gradients(graph: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor,
                               baseline: torch.Tensor | None = None, steps: int = 32
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """IG of p_y with respect to the input, from ``baseline`` (zeros) to ``x``:
    IG = (x - b) * mean_k d p_y / d x at b + (k + 1/2)/steps (x - b)  (midpoint rule).
    Returns (attributions, completeness error |sum IG - (p_y(x) - p_y(b))| per sample)."""
    baseline = torch.zeros_like(x) if baseline is None else baseline
    total = torch.zeros_like(x)
    rows = torch.arange(len(x))
    for k in range(steps):
        alpha = (k + 0.5) / steps
        point = (baseline + alpha * (x - baseline)).detach().requires_grad_(True)
        prob = torch.softmax(_first_output(graph, point), dim=1)[rows, labels]
        grad, = torch.autograd.grad(prob.sum(), point)
        total += grad
    attributions = (x - baseline) * total / steps
    with torch.no_grad():
        ends = [torch.softmax(_first_output(graph, v), dim=1)[rows, labels] for v in (x, baseline)]
    error = (attributions.flatten(1).sum(1) - (ends[0] - ends[1])).abs()
    return attributions.detach(), error


def attribution_share(graph: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor,
                      masks: torch.Tensor, steps: int = 32, batch: int = 64) -> float:
    """Mean over inputs of sum |IG| on the mask / sum |IG| (zero baseline, IG of p_y, the
    midpoint rule); ``masks`` [n, ...] is 1 on the region."""
    shares = []
    for i in range(0, len(x), batch):
        attr, _ = input_integrated_gradients(graph, x[i:i + batch], labels[i:i + batch],
                                             steps=steps)
        mass = attr.abs().flatten(1)
        on = (mass * masks[i:i + batch].to(mass.dtype).flatten(1)).sum(1)
        shares.append(on / mass.sum(1).clamp_min(1e-12))
    return float(torch.cat(shares).mean()) if shares else float("nan")


def leakage(model, x: np.ndarray, y: np.ndarray, null_mask: np.ndarray, steps: int = 32,
            batch: int = 64, device: str = "cpu") -> float:
    """Mean over samples of sum |IG| on the null region / sum |IG| over the whole input
    (:func:`attribution_share`). ``null_mask`` is [n, ...] (or broadcastable), 1 on the
    uninformative region."""
    from .shadow import ShadowGraph

    graph = model if isinstance(model, torch.nn.Module) else ShadowGraph.from_onnx(model)
    graph = graph.to(device)
    mask = np.broadcast_to(null_mask, x.shape)
    t = lambda a: torch.tensor(a, device=device)  # noqa: E731  (copies: npz arrays are read-only)
    return attribution_share(graph, t(x), t(y), t(mask), steps=steps, batch=batch)
