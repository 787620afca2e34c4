"""Gemm and MatMul. Weights keep their stored orientation; alpha is never folded."""
from __future__ import annotations

import torch

from patcher.graph.ops.registry import register


@register("Gemm", since=7)
def gemm(a, b, c=None, *, alpha=1.0, beta=1.0, transA=0, transB=0):
    """Y = alpha * A' B' + beta * C with A' = A^T if transA, B' = B^T if transB."""
    a = a.transpose(0, 1) if transA else a
    b = b.transpose(0, 1) if transB else b
    y = torch.matmul(a, b)
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c if beta == 1.0 else c * beta)
    return y


@register("MatMul", since=1)
def matmul(a, b):
    """numpy.matmul semantics (batched, 1-D operands promoted)."""
    return torch.matmul(a, b)
