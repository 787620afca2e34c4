"""Torch implementations of ONNX ops, one small module per op family.

Importing this package fills the registry; :func:`lookup` finds an op.
"""
from . import activation, conv, elementwise, linear, norm, pool, reduce, resize, shape  # noqa: F401
from .registry import OpImpl, lookup, register, supported_ops

__all__ = ["OpImpl", "lookup", "register", "supported_ops"]
