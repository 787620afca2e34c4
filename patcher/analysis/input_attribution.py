"""Integrated Gradients with respect to the input, and the share of it on a region.

IG of p_y from a baseline b (zeros) to x, midpoint rule with m steps:

    IG(x) = (x - b) * mean_k  d p_y / d x  at  b + (k + 1/2)/m (x - b)

completeness error |sum IG - (p_y(x) - p_y(b))|. The attribution share of a region R is
sum_R |IG| / sum |IG|: the leakage measure (``patcher.gate.metrics.leakage``), the
attribution objective's measure, and the report's heatmaps.
"""
from __future__ import annotations

import torch


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
