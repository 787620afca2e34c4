"""Torch implementations of ONNX ops, one small module per op family.

Importing this package fills the registry; :func:`lookup` finds an op.
"""
from patcher.graph.ops import activation, conv, elementwise, layout, linear, logic, norm, pool, reduce, resize, shape  # noqa: F401
from patcher.graph.ops import quantized, quantized_contrib  # noqa: F401  (after conv, pool)
from patcher.graph.ops import transformer  # noqa: F401  (after norm)
from patcher.graph.ops.registry import OpImpl, lookup, register, supported_ops

__all__ = ["OpImpl", "lookup", "register", "supported_ops"]
