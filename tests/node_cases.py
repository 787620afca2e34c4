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

from patcher.model import dtypes
from patcher.graph.shadow import ShadowGraph

LISTED_OPS = frozenset("""
Conv ConvTranspose Gemm MatMul BatchNormalization Relu LeakyRelu PRelu Sigmoid HardSigmoid
HardSwish Clip Tanh Softmax MaxPool AveragePool GlobalAveragePool Flatten Reshape Transpose
Concat Split Pad Squeeze Unsqueeze Gather Slice Shape Expand Where Equal Cast Constant
ConstantOfShape Identity Dropout ReduceMean LayerNormalization Gelu Erf Sqrt Pow Add Sub Mul
Div Sum Mean Max Min Neg Exp Log Abs Resize Elu Selu Celu ThresholdedRelu Softplus Softsign
Mish LogSoftmax Mod
QuantizeLinear DequantizeLinear DynamicQuantizeLinear QLinearConv QLinearMatMul ConvInteger
MatMulInteger
ReduceSum ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceSumSquare ReduceLogSum
ReduceLogSumExp ArgMax ArgMin CumSum TopK Less LessOrEqual Greater GreaterOrEqual Not And Or
Xor IsNaN IsInf Floor Ceil Round Reciprocal Sign Sin Cos Range Tile Size Trilu DepthToSpace
SpaceToDepth Einsum GlobalMaxPool InstanceNormalization GroupNormalization LpNormalization
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


# Ranges of the sub-byte integer types a float may be cast to.
SUB_BYTE_RANGES = {TensorProto.INT4: (-8, 7), TensorProto.UINT4: (0, 15),
                   TensorProto.INT2: (-2, 1), TensorProto.UINT2: (0, 3)}


def float_to_sub_byte_range(case) -> tuple[int, int] | None:
    """The target range when ``case`` casts a float input to INT4/UINT4/INT2/UINT2, else None.

    The ONNX spec leaves a float cast to an integer type undefined out of range, and onnx
    generates these cases' expected outputs with ``ml_dtypes``' own cast, whose out-of-range
    result changed in ml_dtypes 0.7 (0.5/0.6 discard the high bits, as onnxruntime does).
    """
    nodes = case.model.graph.node
    if len(nodes) != 1 or nodes[0].op_type != "Cast":
        return None
    to = next((a.i for a in nodes[0].attribute if a.name == "to"), None)
    source = case.model.graph.input[0].type.tensor_type.elem_type
    if to not in SUB_BYTE_RANGES or source not in (TensorProto.FLOAT, TensorProto.FLOAT16,
                                                   TensorProto.DOUBLE, TensorProto.BFLOAT16):
        return None
    return SUB_BYTE_RANGES[to]


def run_case(case, defined_only: bool = False) -> None:
    """Raise AssertionError (or any error) unless the shadow graph reproduces the case.

    ``defined_only``: for a float -> sub-byte integer cast, compare only the elements whose
    input lies in the target type's range (the rest is undefined by the spec).
    """
    graph = ShadowGraph.from_onnx(case.model)
    bounds = float_to_sub_byte_range(case) if defined_only else None
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
            got64, want64 = _as_float64(got_np), _as_float64(want)
            if bounds is not None:
                source = _as_float64(_array(inputs[0]))
                in_range = (source >= bounds[0]) & (source <= bounds[1])
                assert in_range.any() and not in_range.all(), "expected some out-of-range inputs"
                got64, want64 = got64[in_range], want64[in_range]
            np.testing.assert_allclose(got64, want64, rtol=case.rtol, atol=case.atol,
                                       equal_nan=True)
