"""Quantized ops, one node each, against onnxruntime: values and dtypes (int8/uint8 outputs),
per-tensor and per-axis scales, int8 and uint8, and the straight-through gradient."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from patcher.graph.shadow import ShadowGraph
from patcher.model import dtypes
from patcher.model.runtime import open_session
from tests.build import IR_VERSION

RNG = np.random.default_rng(7)
MS = "com.microsoft"
_ONNX_TYPE = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
              np.dtype(np.int8): TensorProto.INT8, np.dtype(np.int16): TensorProto.INT16,
              np.dtype(np.uint8): TensorProto.UINT8, np.dtype(np.int32): TensorProto.INT32}


def _q(shape, dtype=np.uint8):
    info = np.iinfo(dtype)
    return RNG.integers(info.min, info.max + 1, size=shape).astype(dtype)


def _s(*values):
    """A float32 scale (a scalar for one value, else 1-D)."""
    return np.array(values[0] if len(values) == 1 else values, np.float32)


def _z(value, dtype=np.uint8, n=None):
    return np.array(value if n is None else [value] * n, dtype)


def _model(op, feeds: dict, inits: dict, opset=17, domain="", outputs=("y",), **attrs):
    """One node: graph inputs ``feeds`` (name -> array) and initializers ``inits``, in the
    node-input order given by the merged dicts' insertion order ('' skips an input)."""
    names = list(feeds) + list(inits)
    order = attrs.pop("order", names)
    node = helper.make_node(op, order, list(outputs), name="n", domain=domain, **attrs)
    inputs = [helper.make_tensor_value_info(k, _ONNX_TYPE[v.dtype], list(v.shape))
              for k, v in feeds.items()]
    graph = helper.make_graph([node], "q", inputs,
                              [helper.make_empty_tensor_value_info(o) for o in outputs],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(MS, 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=imports)
    model.ir_version = IR_VERSION
    return model, list(feeds.values())


def _ties(n, scale):
    """Floats whose quotient by ``scale`` is a multiple of 0.5 (ties included) over a range wider
    than int8's, plus random ones."""
    halves = np.arange(-2 * n, 2 * n + 1, dtype=np.float32) * np.float32(0.5) * np.float32(scale)
    return np.concatenate([halves, RNG.standard_normal(64).astype(np.float32) * 40 * scale])


X = RNG.standard_normal((2, 3, 6, 6)).astype(np.float32) * 3
CASES = {
    # QuantizeLinear
    "quantize_10_no_zero_point_uint8": _model(
        "QuantizeLinear", {"x": _ties(300, 0.5)}, {"s": _s(0.5)}, opset=10),
    "quantize_13_uint8": _model("QuantizeLinear", {"x": _ties(300, 0.25)},
                                {"s": _s(0.25), "z": _z(131)}, opset=13),
    "quantize_13_int8": _model("QuantizeLinear", {"x": _ties(300, 0.3)},
                               {"s": _s(0.3), "z": _z(-5, np.int8)}, opset=13),
    "quantize_13_per_axis_int8": _model(
        "QuantizeLinear", {"x": X}, {"s": _s(0.02, 0.05, 0.1), "z": _z([0, 3, -7], np.int8)},
        opset=13, axis=1),
    "quantize_19_per_axis_uint8_last": _model(
        "QuantizeLinear", {"x": X}, {"s": np.linspace(0.01, 0.1, 6, dtype=np.float32),
                                     "z": _z(np.arange(6) * 20, np.uint8)}, opset=19, axis=-1),
    "quantize_21_blocked_int8": _model(
        "QuantizeLinear", {"x": X.reshape(6, 36)},
        {"s": np.abs(RNG.standard_normal((6, 9))).astype(np.float32) * 0.05 + 0.01,
         "z": _q((6, 9), np.int8) // 8}, opset=21, axis=1, block_size=4),
    "quantize_19_float16_input": _model(
        "QuantizeLinear", {"x": (RNG.standard_normal((3, 50)) * 5).astype(np.float16)},
        {"s": np.array(0.05, np.float16), "z": _z(3, np.int8)}, opset=19),
    # DequantizeLinear
    "dequantize_19_float16_per_axis": _model(
        "DequantizeLinear", {"x": _q((3, 50), np.int8)},
        {"s": np.array([0.05, 0.01, 0.3], np.float16), "z": _z([3, 0, -1], np.int8)},
        opset=19, axis=0),
    "dequantize_21_int4_weight_per_axis": _model(
        "DequantizeLinear", {},
        {"w": RNG.integers(-8, 8, (4, 6)).astype(ml_dtypes.int4),
         "s": _s(0.1, 0.2, 0.3, 0.4), "z": np.array([0, 1, -2, 7], ml_dtypes.int4)},
        opset=21, axis=0),
    "dequantize_10_uint8": _model("DequantizeLinear", {"x": _q((4, 50))},
                                  {"s": _s(0.037), "z": _z(128)}, opset=10),
    "dequantize_13_int8_no_zero_point": _model("DequantizeLinear", {"x": _q((4, 50), np.int8)},
                                               {"s": _s(0.011)}, opset=13),
    "dequantize_13_per_axis_int8": _model(
        "DequantizeLinear", {"x": _q((2, 3, 4, 4), np.int8)},
        {"s": _s(0.1, 0.02, 0.003), "z": _z([0, -4, 9], np.int8)}, opset=13, axis=1),
    "dequantize_19_per_axis_uint8_axis0": _model(
        "DequantizeLinear", {"x": _q((3, 7))}, {"s": _s(0.5, 0.25, 0.125),
                                                "z": _z([0, 128, 255], np.uint8)}, axis=0,
        opset=19),
    "dequantize_13_int32_bias": _model(
        "DequantizeLinear", {"x": RNG.integers(-2**20, 2**20, 40).astype(np.int32)},
        {"s": _s(1.7e-4)}, opset=13),
    "dequantize_21_blocked_int8": _model(
        "DequantizeLinear", {"x": _q((6, 36), np.int8)},
        {"s": np.abs(RNG.standard_normal((6, 9))).astype(np.float32) * 0.05,
         "z": _q((6, 9), np.int8) // 8}, opset=21, axis=1, block_size=4),
    # DynamicQuantizeLinear
    "dynamic_quantize": _model("DynamicQuantizeLinear", {"x": X},
                               {}, opset=11, outputs=("y", "ys", "yz")),
    "dynamic_quantize_positive": _model("DynamicQuantizeLinear", {"x": np.abs(X) + 0.5},
                                        {}, opset=11, outputs=("y", "ys", "yz")),
    "dynamic_quantize_all_zero": _model("DynamicQuantizeLinear",
                                        {"x": np.zeros((2, 3), np.float32)}, {}, opset=11,
                                        outputs=("y", "ys", "yz")),
    "dynamic_quantize_negative": _model("DynamicQuantizeLinear", {"x": -np.abs(X) - 0.5},
                                        {}, opset=11, outputs=("y", "ys", "yz")),
    # opset 21 forms: blocked uint8 (both ops, both axes), output_dtype, per tensor / per axis
    "quantize_21_blocked_uint8": _model(
        "QuantizeLinear", {"x": X.reshape(6, 36)},
        {"s": np.abs(RNG.standard_normal((6, 9))).astype(np.float32) * 0.05 + 0.01,
         "z": _q((6, 9), np.uint8)}, opset=21, axis=1, block_size=4),
    "dequantize_21_blocked_uint8_axis0": _model(
        "DequantizeLinear", {"x": _q((8, 5))},
        {"s": np.abs(RNG.standard_normal((2, 5))).astype(np.float32) * 0.05,
         "z": _q((2, 5), np.uint8)}, opset=21, axis=0, block_size=4),
    "quantize_21_output_dtype_int8": _model("QuantizeLinear", {"x": X}, {"s": _s(0.04)},
                                            opset=21, output_dtype=TensorProto.INT8),
    "quantize_21_per_tensor_uint8": _model("QuantizeLinear", {"x": X},
                                           {"s": _s(0.04), "z": _z(100)}, opset=21),
    "dequantize_21_per_axis_uint8": _model(
        "DequantizeLinear", {"x": _q((2, 3, 4))}, {"s": _s(0.1, 0.2, 0.3),
                                                   "z": _z([1, 128, 255])}, opset=21, axis=1),
    # MatMulInteger / ConvInteger (onnxruntime 1.31's CPU kernels refuse a per-channel
    # ConvInteger weight zero point and a per-row MatMulInteger A zero point: not cased)
    "matmul_integer_uint8": _model("MatMulInteger", {"a": _q((5, 33))},
                                   {"b": _q((33, 7)), "az": _z(120), "bz": _z(131)}, opset=10),
    "matmul_integer_uint8_int8_per_column": _model(
        "MatMulInteger", {"a": _q((2, 5, 33))},
        {"b": _q((33, 7), np.int8), "az": _z(3), "bz": _q((7,), np.int8)}, opset=10),
    "conv_integer_uint8": _model(
        "ConvInteger", {"x": _q((2, 3, 7, 7))}, {"w": _q((4, 3, 3, 3)), "xz": _z(128),
                                                 "wz": _z(120)},
        opset=10, pads=[1, 0, 1, 2], strides=[2, 1]),
    "conv_integer_int8_weight": _model(
        "ConvInteger", {"x": _q((1, 4, 6, 6))}, {"w": _q((4, 2, 3, 3), np.int8), "xz": _z(7)},
        opset=10, group=2, dilations=[2, 1]),
    # QLinearMatMul / QLinearConv
    "qlinear_matmul_uint8": _model(
        "QLinearMatMul", {"a": _q((4, 40))},
        {"as": _s(0.02), "az": _z(130), "b": _q((40, 6)), "bs": _s(0.01), "bz": _z(125),
         "ys": _s(0.6), "yz": _z(128)}, opset=10),
    "qlinear_matmul_int8_per_column_3d": _model(
        "QLinearMatMul", {"a": _q((2, 4, 40), np.int8)},
        {"as": _s(0.02), "az": _z(1, np.int8), "b": _q((40, 6), np.int8),
         "bs": np.linspace(0.002, 0.02, 6, dtype=np.float32), "bz": _z(0, np.int8, 6),
         "ys": _s(0.9), "yz": _z(-3, np.int8)}, opset=10),
    "qlinear_matmul_uint8_int8_extreme": _model(
        "QLinearMatMul", {"a": np.full((4, 64), 255, np.uint8)},
        {"as": _s(0.02), "az": _z(0), "b": np.full((64, 6), -128, np.int8), "bs": _s(0.01),
         "bz": _z(0, np.int8), "ys": _s(30.0), "yz": _z(128)}, opset=10),
    "qlinear_conv_uint8_x_int8_w_per_channel_bias": _model(
        "QLinearConv", {"x": _q((2, 3, 9, 9))},
        {"xs": _s(0.02), "xz": _z(128), "w": _q((5, 3, 3, 3), np.int8),
         "ws": np.linspace(0.001, 0.01, 5, dtype=np.float32), "wz": _z(0, np.int8, 5),
         "ys": _s(0.15), "yz": _z(120), "B": RNG.integers(-3000, 3000, 5).astype(np.int32)},
        opset=10, pads=[1, 1, 1, 1], strides=[2, 2]),
    "qlinear_conv_int8_groups_asymmetric_pads": _model(
        "QLinearConv", {"x": _q((1, 4, 8, 7), np.int8)},
        {"xs": _s(0.05), "xz": _z(-2, np.int8), "w": _q((4, 2, 3, 2), np.int8),
         "ws": _s(0.004), "wz": _z(0, np.int8), "ys": _s(0.3), "yz": _z(5, np.int8)},
        opset=10, group=2, pads=[0, 1, 2, 0]),
    "qlinear_conv_uint8_uint8_depthwise": _model(
        "QLinearConv", {"x": _q((1, 6, 6, 6))},
        {"xs": _s(0.02), "xz": _z(100), "w": _q((6, 1, 3, 3)), "ws": _s(0.01), "wz": _z(127),
         "ys": _s(0.2), "yz": _z(128)}, opset=10, group=6, pads=[1, 1, 1, 1]),
    # com.microsoft
    "qgemm_int8_per_column_bias_transB": _model(
        "QGemm", {"a": _q((5, 30), np.int8)},
        {"as": _s(0.03), "az": _z(2, np.int8), "b": _q((6, 30), np.int8),
         "bs": np.linspace(0.002, 0.02, 6, dtype=np.float32), "bz": _z(0, np.int8, 6),
         "c": RNG.integers(-4000, 4000, 6).astype(np.int32), "ys": _s(0.7),
         "yz": _z(-1, np.int8)}, domain=MS, transB=1, alpha=0.75),
    "qgemm_uint8_float_output": _model(
        "QGemm", {"a": _q((5, 30))},
        {"as": _s(0.03), "az": _z(128), "b": _q((30, 6), np.int8), "bs": _s(0.01),
         "bz": _z(0, np.int8), "c": RNG.integers(-4000, 4000, 6).astype(np.int32)}, domain=MS),
    "qgemm_uint8_transA_no_bias": _model(
        "QGemm", {"a": _q((30, 5))},
        {"as": _s(0.03), "az": _z(128), "b": _q((30, 6), np.int8), "bs": _s(0.01),
         "bz": _z(0, np.int8), "ys": _s(0.5), "yz": _z(128)}, domain=MS, transA=1,
        order=["a", "as", "az", "b", "bs", "bz", "", "ys", "yz"]),
    "matmul_integer_to_float_per_column_bias": _model(
        "MatMulIntegerToFloat", {"a": _q((4, 3, 40))},
        {"b": _q((40, 6), np.int8), "as": _s(0.02),
         "bs": np.linspace(0.001, 0.01, 6, dtype=np.float32), "az": _z(128),
         "bz": _z(0, np.int8, 6), "bias": RNG.standard_normal(6).astype(np.float32)}, domain=MS),
    "dynamic_quantize_matmul": _model(
        "DynamicQuantizeMatMul", {"a": RNG.standard_normal((5, 40)).astype(np.float32)},
        {"b": _q((40, 6), np.int8), "bs": _s(0.01), "bz": _z(0, np.int8),
         "bias": RNG.standard_normal(6).astype(np.float32)}, domain=MS),
    "ms_quantize_int8_per_axis": _model(
        "QuantizeLinear", {"x": X}, {"s": _s(0.02, 0.05, 0.1), "z": _z([0, 3, -7], np.int8)},
        domain=MS, axis=1),
    "ms_quantize_uint16": _model("QuantizeLinear", {"x": X},
                                 {"s": _s(0.0001), "z": np.array(30000, np.uint16)}, domain=MS),
    "ms_dequantize_int16": _model(
        "DequantizeLinear", {"x": RNG.integers(-30000, 30000, (3, 20)).astype(np.int16)},
        {"s": _s(0.001), "z": np.array(-5, np.int16)}, domain=MS),
    "qlinear_add_uint8_broadcast": _model(
        "QLinearAdd", {"a": _q((2, 3, 4, 5))},
        {"as": _s(0.05), "az": _z(128), "b": _q((1, 3, 1, 5)), "bs": _s(0.11), "bz": _z(100),
         "cs": _s(0.09), "cz": _z(110)}, domain=MS),
    "qlinear_add_int8": _model(
        "QLinearAdd", {"a": _q((3, 40), np.int8), "b": _q((3, 40), np.int8)},
        {"as": _s(0.05), "az": _z(3, np.int8), "bs": _s(0.02), "bz": _z(-10, np.int8),
         "cs": _s(0.07), "cz": _z(-2, np.int8)}, domain=MS,
        order=["a", "as", "az", "b", "bs", "bz", "cs", "cz"]),
    "qlinear_mul_int8": _model(
        "QLinearMul", {"a": _q((3, 40), np.int8)},
        {"as": _s(0.05), "az": _z(3, np.int8), "b": _q((3, 40), np.int8), "bs": _s(0.02),
         "bz": _z(-10, np.int8), "cs": _s(0.07), "cz": _z(-2, np.int8)}, domain=MS),
    "qlinear_global_average_pool_uint8": _model(
        "QLinearGlobalAveragePool", {"x": _q((2, 5, 7, 7))},
        {"xs": _s(0.04), "xz": _z(128), "ys": _s(0.01), "yz": _z(128)}, domain=MS),
    "qlinear_global_average_pool_int8_channels_last": _model(
        "QLinearGlobalAveragePool", {"x": _q((2, 6, 6, 5), np.int8)},
        {"xs": _s(0.04), "xz": _z(-3, np.int8), "ys": _s(0.003), "yz": _z(1, np.int8)},
        domain=MS, channels_last=1),
    "qlinear_average_pool_uint8_pads": _model(
        "QLinearAveragePool", {"x": _q((2, 3, 8, 8))},
        {"xs": _s(0.04), "xz": _z(128), "ys": _s(0.03), "yz": _z(120)}, domain=MS,
        kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    "qlinear_average_pool_int8_include_pad": _model(
        "QLinearAveragePool", {"x": _q((1, 3, 7, 7), np.int8)},
        {"xs": _s(0.04), "xz": _z(2, np.int8), "ys": _s(0.02), "yz": _z(-1, np.int8)},
        domain=MS, kernel_shape=[2, 2], pads=[1, 1, 0, 0], count_include_pad=1),
    "qlinear_concat_uint8": _model(
        "QLinearConcat", {"a": _q((2, 3, 4)), "b": _q((2, 5, 4))},
        {"ys": _s(0.05), "yz": _z(128), "as": _s(0.03), "az": _z(100), "bs": _s(0.05),
         "bz": _z(128)}, domain=MS, axis=1, order=["ys", "yz", "a", "as", "az", "b", "bs", "bz"]),
    "qlinear_sigmoid_uint8": _model(
        "QLinearSigmoid", {"x": np.arange(256).astype(np.uint8)},
        {"xs": _s(0.05), "xz": _z(128), "ys": _s(1 / 256), "yz": _z(0)}, domain=MS),
    "qlinear_sigmoid_int8": _model(
        "QLinearSigmoid", {"x": np.arange(-128, 128).astype(np.int8)},
        {"xs": _s(0.07), "xz": _z(0, np.int8), "ys": _s(1 / 256), "yz": _z(-128, np.int8)},
        domain=MS),
    "qlinear_leaky_relu_int8": _model(
        "QLinearLeakyRelu", {"x": np.arange(-128, 128).astype(np.int8)},
        {"xs": _s(0.07), "xz": _z(5, np.int8), "ys": _s(0.05), "yz": _z(-20, np.int8)},
        domain=MS, alpha=0.1),
}

def _run(model, feeds):
    graph = ShadowGraph.from_onnx(model)
    with torch.no_grad():
        return graph(*[torch.from_numpy(f) for f in feeds])


@pytest.mark.parametrize("name", sorted(CASES))
def test_quantized_node_matches_onnxruntime(name):
    model, feeds = CASES[name]
    expected = open_session(model.SerializeToString(), "cpu").run(*feeds)
    got = [dtypes.torch_to_numpy(g) for g in _run(model, feeds)]
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype, (g.dtype, e.dtype)
        assert g.shape == e.shape
        if e.dtype == np.float32:
            np.testing.assert_array_equal(g, e)  # dequantized / float outputs are exact too
            continue
        np.testing.assert_array_equal(g, e)  # integer results are exact


NICE_SCALES = [0.05, 0.02, 0.07, 0.1, 0.03, 0.3, 0.01, 0.15, 0.11, 0.5, 0.25, 1 / 256]


def _every_pair(dtype):
    """Every (a, b) pair of the type's values: 65,536 elements."""
    values = np.arange(np.iinfo(dtype).min, np.iinfo(dtype).max + 1)
    return np.repeat(values, values.size).astype(dtype), np.tile(values, values.size).astype(dtype)


@pytest.mark.parametrize("dtype", [np.int8, np.uint8], ids=["int8", "uint8"])
@pytest.mark.parametrize("op", ["QLinearAdd", "QLinearMul", "QLinearAdd_scalar_a",
                                "QLinearAdd_scalar_b"])
def test_every_value_pair_matches_onnxruntime_with_round_scales(op, dtype):
    """Round scales (0.05, 0.02, ...) make exact ties (x.5) common: the float32 evaluation order
    of onnxruntime's kernels (fused multiply-adds in QLinearAdd) decides them, so this compares
    every value pair under seeded configurations, element for element."""
    rng = np.random.default_rng([len(op), np.iinfo(dtype).min + 200])
    info = np.iinfo(dtype)
    a, b = _every_pair(dtype)
    for _ in range(3):
        scales = [np.array(v, np.float32) for v in rng.choice(NICE_SCALES, 3)]
        zeros = [np.array(v, dtype) for v in rng.integers(info.min, info.max + 1, 3)]
        inits = {"as": scales[0], "az": zeros[0], "bs": scales[1], "bz": zeros[1],
                 "cs": scales[2], "cz": zeros[2]}
        if op == "QLinearAdd_scalar_b":
            model, feeds = _model("QLinearAdd", {"a": a[::256].copy()},
                                  {"as": scales[0], "az": zeros[0], "b": np.array(b[7], dtype),
                                   "bs": scales[1], "bz": zeros[1], "cs": scales[2],
                                   "cz": zeros[2]}, domain=MS)
        elif op == "QLinearAdd_scalar_a":  # onnxruntime swaps the operands
            model, feeds = _model("QLinearAdd", {"a": np.array([a[300]], dtype),
                                                 "b": b[:256].copy()}, inits, domain=MS,
                                  order=["a", "as", "az", "b", "bs", "bz", "cs", "cz"])
        else:
            model, feeds = _model(op, {"a": a, "b": b}, inits, domain=MS,
                                  order=["a", "as", "az", "b", "bs", "bz", "cs", "cz"])
        expected = open_session(model.SerializeToString(), "cpu").run(*feeds)[0]
        (got,) = _run(model, feeds)
        np.testing.assert_array_equal(got.numpy(), expected)


@pytest.mark.parametrize("a_size", [2, 1])
def test_a_known_tie_is_decided_like_onnxruntime(a_size):
    """0.03 / 0.5 * (5 - 105) + 0.25 / 0.5 * (1 - 18) + 19 = 4.5 exactly. With vector operands
    onnxruntime's fused multiply-adds land on 4.5 (rounded to 4); with a one-element A it swaps
    the operands, lands on 4.500001 and gives 5."""
    model, feeds = _model("QLinearAdd", {"a": np.full(a_size, 5, np.uint8),
                                         "b": np.full(a_size, 1, np.uint8)},
                          {"as": _s(0.03), "az": _z(105), "bs": _s(0.25), "bz": _z(18),
                           "cs": _s(0.5), "cz": _z(19)}, domain=MS,
                          order=["a", "as", "az", "b", "bs", "bz", "cs", "cz"])
    expected = open_session(model.SerializeToString(), "cpu").run(*feeds)[0]
    (got,) = _run(model, feeds)
    assert expected.tolist() == [4 if a_size == 2 else 5] * a_size
    assert got.tolist() == expected.tolist()


def test_cases_cover_the_quantized_ops():
    ops = {CASES[name][0].graph.node[0].op_type for name in CASES}
    domains = {(n.domain, n.op_type) for name in CASES for n in CASES[name][0].graph.node}
    assert {(MS, "QuantizeLinear"), (MS, "DequantizeLinear")} <= domains
    assert ops == {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger",
                   "ConvInteger", "QLinearMatMul", "QLinearConv", "QGemm", "QLinearAdd",
                   "QLinearMul", "QLinearGlobalAveragePool", "QLinearAveragePool",
                   "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu", "MatMulIntegerToFloat",
                   "DynamicQuantizeMatMul"}


def test_rounding_is_half_to_even_and_saturates():
    model, _ = _model("QuantizeLinear", {"x": np.zeros(9, np.float32)},
                      {"s": _s(1.0), "z": _z(0, np.int8)}, opset=13)
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 300.0, -300.0], np.float32)
    (got,) = _run(model, [x])
    assert got.dtype == torch.int8
    assert got.tolist() == [0, 2, 2, 0, -2, -2, 126, 127, -128]


@pytest.mark.parametrize("narrow", ["int4", "uint4"])
def test_sub_byte_quantize_saturates_to_its_own_range(narrow):
    """The zero point's declared INT4/UINT4 type (carried in int8/uint8) sets the range:
    QuantizeLinear -> DequantizeLinear at opset 21 equals onnxruntime (which cannot hand an
    int4 tensor to numpy, hence the DequantizeLinear)."""
    dtype = getattr(ml_dtypes, narrow)
    zero = np.array([0, 2, -3] if narrow == "int4" else [0, 2, 9], dtype)
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q", axis=0),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="d", axis=0)]
    graph_proto = helper.make_graph(
        nodes, "q4", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 6, 6])],
        [numpy_helper.from_array(_s(0.1, 0.3, 0.05), "s"), numpy_helper.from_array(zero, "z")])
    model = helper.make_model(graph_proto, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = IR_VERSION
    x = X[0]
    expected = open_session(model.SerializeToString(), "cpu").run(x)[0]
    graph = ShadowGraph.from_onnx(model)
    seen = {}

    def keep(info, inputs, outputs) -> None:
        seen[info.name] = outputs[0]

    graph.register_hook(keep, ["q"])
    with torch.no_grad():
        (got,) = graph(torch.from_numpy(x))
    np.testing.assert_array_equal(got.numpy(), expected)
    low, high = (-8, 7) if narrow == "int4" else (0, 15)
    q = seen["q"].to(torch.int64)
    assert q.min() == low and q.max() == high  # saturated at the narrow type's bounds


def _qdq(scale: float, zero: int, dtype=np.int8):
    q = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q")
    d = helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="d")
    graph = helper.make_graph(
        [q, d], "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
        [numpy_helper.from_array(_s(scale), "s"), numpy_helper.from_array(_z(zero, dtype), "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = IR_VERSION
    return ShadowGraph.from_onnx(model)


def test_straight_through_gradient_is_one_inside_the_range_zero_outside():
    graph = _qdq(0.1, 10)  # int8 range [-128, 127] -> x in [-13.8, 11.7]
    x = torch.tensor([-20.0, -13.9, -13.7, -5.04, 0.0, 0.33, 11.6, 11.8, 40.0],
                     requires_grad=True)
    (y,) = graph(x)
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    with torch.no_grad():
        (y_plain,) = graph(x)
    assert torch.equal(y.detach(), y_plain)  # same values with and without autograd


def test_integer_output_is_carried_in_float_under_autograd():
    model, _ = _model("QuantizeLinear", {"x": np.zeros(5, np.float32)},
                      {"s": _s(0.5), "z": _z(3, np.int8)}, opset=13)
    graph = ShadowGraph.from_onnx(model)
    x = torch.tensor([-100.0, -1.3, 0.2, 7.75, 100.0], requires_grad=True)
    (carried,) = graph(x)
    with torch.no_grad():
        (plain,) = graph(x)
    assert plain.dtype == torch.int8 and carried.dtype == torch.float32
    assert carried.detach().tolist() == plain.to(torch.float32).tolist()
    carried.sum().backward()
    assert x.grad.tolist() == [0.0, 2.0, 2.0, 2.0, 0.0]  # 1 / scale inside the range


def test_gradient_flows_through_a_qoperator_chain_like_the_float_conv():
    """DequantizeLinear(QLinearConv(QuantizeLinear(x))) has, where nothing saturates, the input
    gradient of the float conv with the dequantized weight."""
    w = _q((4, 2, 3, 3), np.int8)
    ws = np.float32(0.01)
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q"),
             helper.make_node("QLinearConv", ["xq", "xs", "xz", "w", "ws", "wz", "ys", "yz"],
                              ["yq"], name="c", pads=[1, 1, 1, 1]),
             helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"], name="d")]
    inits = {"xs": _s(0.05), "xz": _z(128), "w": w, "ws": _s(ws), "wz": _z(0, np.int8),
             "ys": _s(0.5), "yz": _z(128)}
    graph_proto = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 5, 5])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph_proto, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = IR_VERSION
    x = torch.from_numpy(RNG.uniform(-2, 2, (1, 2, 5, 5)).astype(np.float32)).requires_grad_()
    (y,) = ShadowGraph.from_onnx(model)(x)
    assert y.detach().abs().max() < 0.5 * 127  # no output saturates
    y.sum().backward()
    x2 = x.detach().clone().requires_grad_()
    wf = torch.from_numpy(w.astype(np.float32) * ws)
    torch.nn.functional.conv2d(x2, wf, padding=1).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
    expected = open_session(model.SerializeToString(), "cpu").run(x.detach().numpy())[0]
    np.testing.assert_array_equal(y.detach().numpy(), expected)


def test_unsupported_quantized_op_is_named_as_such():
    from patcher.errors import UnsupportedOpError

    model, _ = _model("QLinearSoftmax", {"x": _q((2, 5))},
                      {"xs": _s(0.1), "xz": _z(0), "ys": _s(1 / 256), "yz": _z(0)},
                      domain=MS, axis=-1, opset=13)
    with pytest.raises(UnsupportedOpError, match=r"QOperator op com\.microsoft\.QLinearSoftmax "
                                                 r"is not supported .*QuantFormat\.QDQ"):
        ShadowGraph.from_onnx(model)
