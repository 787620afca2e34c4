"""ONNX's own backend node test cases, regenerated from the installed onnx package.

onnx 1.23 no longer ships the case files; ``collect_testcases`` rebuilds them
(models plus expected outputs). A case is "ours" when every node in it is an op
the shadow graph is meant to cover.
"""
from __future__ import annotations

import functools
import io
import warnings
import contextlib

import numpy as np
import torch
from onnx import TensorProto, numpy_helper

from patcher import dtypes
from patcher.shadow import ShadowGraph

LISTED_OPS = frozenset("""
Conv ConvTranspose Gemm MatMul BatchNormalization Relu LeakyRelu PRelu Sigmoid HardSigmoid
HardSwish Clip Tanh Softmax MaxPool AveragePool GlobalAveragePool Flatten Reshape Transpose
Concat Split Pad Squeeze Unsqueeze Gather Slice Shape Expand Where Equal Cast Constant
ConstantOfShape Identity Dropout ReduceMean LayerNormalization Gelu Erf Sqrt Pow Add Sub Mul
Div Sum Mean Max Min Neg Exp Log Abs Resize Elu Selu Celu ThresholdedRelu Softplus Softsign
Mish LogSoftmax
""".split())


@functools.lru_cache(maxsize=1)
def listed_cases():
    import onnx.backend.test.case.node as node_cases

    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        cases = node_cases.collect_testcases(None)
    return [c for c in cases
            if c.model.graph.node and {n.op_type for n in c.model.graph.node} <= LISTED_OPS]


def _as_float64(a: np.ndarray) -> np.ndarray:
    if a.dtype.kind in "biuf" and a.dtype.name not in ("int4", "uint4", "int2", "uint2"):
        return a.astype(np.float64)
    return np.asarray(a).astype(np.float32).astype(np.float64)


def _array(value) -> np.ndarray:
    if isinstance(value, TensorProto):
        return numpy_helper.to_array(value)
    return np.asarray(value)


def run_case(case) -> None:
    """Raise AssertionError (or any error) unless the shadow graph reproduces the case."""
    graph = ShadowGraph.from_onnx(case.model)
    for inputs, expected in case.data_sets:
        feeds = [dtypes.numpy_to_torch(_array(a)) for a in inputs]
        with torch.no_grad():
            outs = graph(*feeds)
        assert len(outs) == len(expected)
        for got, want in zip(outs, expected):
            want = _array(want)
            got_np = dtypes.torch_to_numpy(got)
            assert tuple(got_np.shape) == tuple(want.shape), (got_np.shape, want.shape)
            if want.dtype == bool:
                np.testing.assert_array_equal(got_np.astype(bool), want)
                continue
            np.testing.assert_allclose(_as_float64(got_np), _as_float64(want), rtol=case.rtol,
                                       atol=case.atol, equal_nan=True)
