"""One-node models against onnxruntime, covering attribute variants the backend cases miss
(asymmetric pads, auto_pad, groups, dilations, ceil_mode, Gemm's alpha/beta/trans, ...)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper

from patcher.model.runtime import open_session
from patcher.graph.shadow import ShadowGraph
from tests.build import make_model, value_info

RNG = np.random.default_rng(0)


def _w(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def _case(op, x_shape, inits=None, extra_inputs=(), opset=17, **attrs):
    """(model, feeds) for one node: input x, then initializers, then extra const inputs."""
    inits = dict(inits or {})
    names = ["x"] + list(inits)
    node = helper.make_node(op, names + list(extra_inputs), ["y"], name="n", **attrs)
    model = make_model([node], [value_info("x", list(x_shape))],
                       [helper.make_empty_tensor_value_info("y")], inits, opset=opset)
    return model, [RNG.standard_normal(x_shape).astype(np.float32)]


CASES = {
    "conv_groups_dilation": _case("Conv", (2, 4, 9, 9), {"w": _w(6, 2, 3, 3), "b": _w(6)},
                                  group=2, dilations=[2, 1], strides=[1, 2]),
    "conv_asymmetric_pads": _case("Conv", (1, 3, 8, 7), {"w": _w(5, 3, 3, 2)},
                                  pads=[0, 1, 2, 0], strides=[2, 1]),
    "conv_same_upper": _case("Conv", (1, 3, 7, 8), {"w": _w(4, 3, 4, 3)}, auto_pad="SAME_UPPER",
                             strides=[2, 2]),
    "conv_same_lower": _case("Conv", (1, 3, 7, 8), {"w": _w(4, 3, 4, 3)}, auto_pad="SAME_LOWER",
                             strides=[2, 3]),
    "conv_depthwise": _case("Conv", (2, 6, 8, 8), {"w": _w(6, 1, 3, 3)}, group=6, pads=[1] * 4),
    "conv_1d": _case("Conv", (2, 3, 11), {"w": _w(4, 3, 3)}, pads=[2, 0], dilations=[2]),
    "convtranspose_outpad_groups": _case("ConvTranspose", (1, 4, 5, 5), {"w": _w(4, 3, 3, 3)},
                                         group=2, strides=[2, 2], output_padding=[1, 0],
                                         pads=[1, 0, 0, 1]),
    "convtranspose_output_shape": _case("ConvTranspose", (1, 2, 4, 4), {"w": _w(2, 3, 3, 3)},
                                        strides=[2, 2], output_shape=[9, 10]),
    "gemm_alpha_beta_transB": _case("Gemm", (3, 5), {"w": _w(4, 5), "c": _w(4)}, alpha=0.5,
                                    beta=2.0, transB=1),
    "gemm_transA": _case("Gemm", (5, 3), {"w": _w(5, 4)}, transA=1),
    "matmul_batched": _case("MatMul", (2, 3, 5), {"w": _w(5, 4)}),
    "maxpool_ceil_asym": _case("MaxPool", (1, 2, 9, 8), kernel_shape=[3, 2], strides=[2, 2],
                               pads=[1, 0, 0, 1], ceil_mode=1),
    "maxpool_dilated": _case("MaxPool", (1, 2, 10, 10), kernel_shape=[3, 3], dilations=[2, 2],
                             pads=[1, 1, 1, 1]),
    "avgpool_include_pad_ceil": _case("AveragePool", (1, 2, 7, 7), kernel_shape=[3, 3],
                                      strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1,
                                      ceil_mode=1),
    "avgpool_exclude_pad_asym": _case("AveragePool", (1, 2, 7, 6), kernel_shape=[2, 3],
                                      pads=[1, 0, 0, 2]),
    "avgpool_same_upper": _case("AveragePool", (1, 2, 7, 6), kernel_shape=[3, 3], strides=[2, 2],
                                auto_pad="SAME_UPPER"),
    "global_avgpool": _case("GlobalAveragePool", (2, 3, 5, 4)),
    "batchnorm": _case("BatchNormalization", (2, 3, 4, 4),
                       {"s": _w(3), "b": _w(3), "m": _w(3), "v": np.abs(_w(3)) + 0.1},
                       epsilon=1e-3),
    "layernorm": _case("LayerNormalization", (2, 3, 8), {"s": _w(8), "b": _w(8)}, axis=-1),
    "prelu_channel": _case("PRelu", (2, 3, 4, 4), {"slope": _w(3, 1, 1)}),
    "leakyrelu": _case("LeakyRelu", (3, 4), alpha=0.2),
    "hardsigmoid": _case("HardSigmoid", (3, 4), alpha=0.3, beta=0.4),
    "hardswish": _case("HardSwish", (3, 40)),
    "softmax_13_axis1": _case("Softmax", (2, 3, 4), axis=1),
    "softmax_11_flatten": _case("Softmax", (2, 3, 4), opset=11, axis=1),
    "gelu_tanh": _case("Gelu", (3, 7), opset=20, approximate="tanh"),
    "elu_alpha": _case("Elu", (2, 3, 5), alpha=0.5),
    "selu_custom": _case("Selu", (4, 6), alpha=1.5, gamma=0.9),
    "celu_alpha": _case("Celu", (4, 6), alpha=2.0),
    "softplus": _case("Softplus", (4, 6)),
    "mish": _case("Mish", (4, 6), opset=18),
    "logsoftmax_13_axis1": _case("LogSoftmax", (2, 3, 4), axis=1),
    "logsoftmax_11_flatten": _case("LogSoftmax", (2, 3, 4), opset=11, axis=1),
    "clip_bounds": _case("Clip", (3, 7), {"lo": np.array(-0.5, np.float32),
                                          "hi": np.array(0.7, np.float32)}),
    "pad_reflect": _case("Pad", (1, 2, 5, 5), {"pads": np.array([0, 0, 2, 1, 0, 0, 1, 2])},
                         mode="reflect"),
    "pad_edge_negative": _case("Pad", (1, 2, 5, 5), {"pads": np.array([0, 0, -1, 2, 0, 0, 1, -2])},
                               mode="edge"),
    "slice_negative_step": _case("Slice", (4, 10), {"st": np.array([-1]), "en": np.array([-100]),
                                                    "ax": np.array([1]), "sp": np.array([-3])}),
    "resize_nearest_asym_floor": _case(
        "Resize", (1, 2, 3, 4), {"roi": np.zeros(0, np.float32),
                                 "sc": np.array([1, 1, 2.5, 1.5], np.float32)},
        coordinate_transformation_mode="asymmetric", nearest_mode="floor", mode="nearest"),
    "resize_linear_half_pixel": _case(
        "Resize", (1, 2, 5, 4), {"roi": np.zeros(0, np.float32),
                                 "sc": np.array([1, 1, 0.6, 1.75], np.float32)}, mode="linear"),
    "resize_linear_align_corners_sizes": _case(
        "Resize", (1, 2, 5, 4), {"roi": np.zeros(0, np.float32), "sc": np.zeros(0, np.float32),
                                 "sz": np.array([1, 2, 9, 3], np.int64)},
        mode="linear", coordinate_transformation_mode="align_corners"),
    "resize_cubic": _case("Resize", (1, 1, 6, 6), {"roi": np.zeros(0, np.float32),
                                                   "sc": np.array([1, 1, 1.5, 0.5], np.float32)},
                          mode="cubic"),
    "reducemean_18": _case("ReduceMean", (2, 3, 4), {"axes": np.array([1, -1])}, opset=18,
                           keepdims=0),
    "reducemean_13": _case("ReduceMean", (2, 3, 4), opset=13, axes=[2]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_single_node_matches_onnxruntime(name):
    model, feeds = CASES[name]
    expected = open_session(model.SerializeToString(), "cpu").run(*feeds)
    graph = ShadowGraph.from_onnx(model)
    with torch.no_grad():
        got = graph(*[torch.from_numpy(f) for f in feeds])
    assert isinstance(got, tuple) and len(got) == len(expected)
    for g, e in zip(got, expected):
        assert tuple(g.shape) == e.shape
        np.testing.assert_allclose(g.numpy(), e, rtol=1e-4, atol=1e-5)


def test_gemm_alpha_is_not_folded_into_the_weight():
    model, _ = CASES["gemm_alpha_beta_transB"]
    graph = ShadowGraph.from_onnx(model)
    stored = [t for t in model.graph.initializer if t.name == "w"][0]
    np.testing.assert_array_equal(graph.weight("w").detach().numpy(),
                                  np.frombuffer(stored.raw_data, np.float32).reshape(4, 5))


_ELEM_TYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.int32): TensorProto.INT32,
               np.dtype(np.int64): TensorProto.INT64, np.dtype(np.uint8): TensorProto.UINT8}


def _feeds_case(op, feeds: dict, inits=None, outputs=1, domain="", opset=17, **attrs):
    """(model, feeds) for one node whose first inputs are graph inputs ``feeds`` (any dtype;
    a None value is an omitted optional input), then initializers ``inits``."""
    inits = dict(inits or {})
    names = [k if v is not None else "" for k, v in feeds.items()] + list(inits)
    node = helper.make_node(op, names, [f"y{i}" for i in range(outputs)],
                            name="n", domain=domain, **attrs)
    model = make_model([node], [value_info(k, list(v.shape), _ELEM_TYPES[v.dtype])
                                for k, v in feeds.items() if v is not None],
                       [helper.make_empty_tensor_value_info(f"y{i}") for i in range(outputs)],
                       inits, opset=opset)
    if domain:
        model.opset_import.append(helper.make_opsetid(domain, 1))
    return model, [v for v in feeds.values() if v is not None]


def _ints(*values, dtype=np.int32):
    return np.array(values, dtype)


TRANSFORMER_CASES = {
    "mod_int_sign_of_divisor": _feeds_case("Mod", {"a": _ints(-7, 7, -7, 7, 0, 9),
                                                   "b": _ints(3, -3, -3, 3, 5, 4)}),
    "mod_int_fmod": _feeds_case("Mod", {"a": _ints(-7, 7, -7, 7, 0, 9, dtype=np.int64),
                                        "b": _ints(3, -3, -3, 3, 5, 4, dtype=np.int64)}, fmod=1),
    "mod_uint8_broadcast": _feeds_case("Mod", {"a": _ints(200, 7, 255, dtype=np.uint8)},
                                       {"b": _ints(6, dtype=np.uint8)}),
    "mod_float_fmod": _feeds_case("Mod", {"a": _w(3, 4) * 5}, {"b": np.abs(_w(4)) + 0.5}, fmod=1),
    "softmax_13_axis0": _case("Softmax", (3, 2, 4), axis=0),
    "softmax_1_axis_last": _case("Softmax", (2, 3, 4), opset=11, axis=-1),
    "softmax_1_default_axis": _case("Softmax", (2, 3, 4), opset=11),
    "gelu_none": _case("Gelu", (3, 7), opset=20),
    "layernorm_opset13_contrib": _case("LayerNormalization", (2, 3, 8), {"s": _w(8), "b": _w(8)},
                                       opset=13, epsilon=1e-6),
    "layernorm_axis1_3d": _case("LayerNormalization", (2, 3, 8), {"s": _w(3, 8)}, axis=1),
    "simplified_layernorm": _case("SimplifiedLayerNormalization", (2, 3, 8), {"s": _w(8)},
                                  opset=13),
    "ms_bias_gelu": _feeds_case("BiasGelu", {"x": _w(2, 5, 8)}, {"b": _w(8)}, domain="com.microsoft"),
    "ms_fast_gelu_bias": _feeds_case("FastGelu", {"x": _w(2, 5, 8)}, {"b": _w(8)},
                                     domain="com.microsoft"),
    "ms_fast_gelu": _feeds_case("FastGelu", {"x": _w(2, 5, 8)}, domain="com.microsoft"),
    "ms_gelu": _feeds_case("Gelu", {"x": _w(2, 5, 8)}, domain="com.microsoft"),
    "ms_skip_layernorm_all_outputs": _feeds_case(
        "SkipLayerNormalization", {"x": _w(2, 5, 8), "skip": _w(2, 5, 8)},
        {"g": _w(8), "be": _w(8), "bias": _w(8)}, outputs=4, domain="com.microsoft",
        epsilon=1e-5),
    "ms_skip_layernorm_default_eps": _feeds_case(
        "SkipLayerNormalization", {"x": _w(2, 5, 8) * 1e-4, "skip": _w(2, 5, 8) * 1e-4},
        {"g": _w(8)}, domain="com.microsoft"),
    "ms_skip_simplified_layernorm": _feeds_case(
        "SkipSimplifiedLayerNormalization", {"x": _w(2, 5, 8), "skip": _w(2, 5, 8)},
        {"g": _w(8)}, domain="com.microsoft", epsilon=1e-6),
    "ms_attention": _feeds_case("Attention", {"x": _w(2, 5, 8)}, {"w": _w(8, 24), "b": _w(24)},
                                domain="com.microsoft", num_heads=2),
    "ms_attention_raw_mask_scale": _feeds_case(
        "Attention", {"x": _w(2, 5, 8)}, {"w": _w(8, 24), "b": _w(24),
                                          "m": _ints(1, 1, 1, 0, 0, 1, 1, 1, 1, 1).reshape(2, 5)},
        domain="com.microsoft", num_heads=4, scale=0.3),
    "ms_attention_mask_index_unequal_sizes": _feeds_case(
        "Attention", {"x": _w(2, 5, 8)}, {"w": _w(8, 20), "b": _w(20), "m": _ints(3, 5)}, domain="com.microsoft", num_heads=2,
        qkv_hidden_sizes=[6, 6, 8]),
    "ms_attention_unidirectional": _feeds_case(
        "Attention", {"x": _w(2, 5, 8)}, {"w": _w(8, 24), "b": _w(24)},
        domain="com.microsoft", num_heads=2, unidirectional=1),
    "ms_mha_separate_qkv_bias_mask": _feeds_case(
        "MultiHeadAttention", {"q": _w(2, 5, 8), "k": _w(2, 6, 8), "v": _w(2, 6, 4),
                               "bias": _w(20), "kpm": _ints(1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1)
                               .reshape(2, 6)}, domain="com.microsoft", num_heads=2),
    "ms_mha_attention_bias": _feeds_case(
        "MultiHeadAttention", {"q": _w(2, 5, 8), "k": _w(2, 6, 8), "v": _w(2, 6, 8), "bias": None,
                               "m": None, "ab": _w(1, 2, 5, 6)}, domain="com.microsoft",
        num_heads=2, scale=0.25),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMER_CASES))
def test_transformer_node_matches_onnxruntime(name):
    """Mod, Softmax axes, Gelu, LayerNormalization forms and the com.microsoft ops onnxruntime's
    transformer optimizer writes (Attention, MultiHeadAttention, BiasGelu, FastGelu,
    SkipLayerNormalization) against onnxruntime."""
    model, feeds = TRANSFORMER_CASES[name]
    expected = open_session(model.SerializeToString(), "cpu").run(*feeds)
    graph = ShadowGraph.from_onnx(model)
    with torch.no_grad():
        got = graph(*[torch.from_numpy(f) for f in feeds])
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert tuple(g.shape) == e.shape and g.numpy().dtype == e.dtype
        np.testing.assert_allclose(g.numpy(), e, rtol=1e-4, atol=1e-5)


def _tie_rich(*shape):
    """Values with ties (rounded to halves), so first/last index and stable order matter."""
    return np.round(_w(*shape) * 2) / 2


HEAD_AND_UTILITY_CASES = {
    "reducesum_13_axes_input": _case("ReduceSum", (2, 3, 4), {"axes": np.array([0, -1])},
                                     opset=13, keepdims=0),
    "reducesum_noop_empty_axes": _feeds_case("ReduceSum", {"x": _w(2, 3)},
                                             {"axes": np.zeros(0, np.int64)}, opset=18,
                                             noop_with_empty_axes=1),
    "reducemax_18": _case("ReduceMax", (2, 3, 4), {"axes": np.array([1])}, opset=18),
    "reducel2_11": _case("ReduceL2", (2, 3, 4), opset=11, axes=[2], keepdims=0),
    "reducelogsumexp_18": _case("ReduceLogSumExp", (2, 3, 4), {"axes": np.array([-1])}, opset=18),
    "argmax_last_index": _feeds_case("ArgMax", {"x": _tie_rich(3, 6)}, axis=1, keepdims=0,
                                     select_last_index=1),
    "argmin_first_index": _feeds_case("ArgMin", {"x": _tie_rich(3, 6)}, axis=0),
    "topk_smallest": _feeds_case("TopK", {"x": _w(3, 7)}, {"k": np.array([3])}, outputs=2,
                                 largest=0, axis=1),
    "topk_largest_axis0": _feeds_case("TopK", {"x": _w(6, 4)}, {"k": np.array([2])}, outputs=2,
                                      axis=0),
    "cumsum_exclusive_reverse": _case("CumSum", (2, 5), {"ax": np.array(1)}, exclusive=1,
                                      reverse=1),
    "less_broadcast": _feeds_case("Less", {"a": _w(3, 4), "b": _w(4)}),
    "greater_or_equal_int": _feeds_case("GreaterOrEqual", {"a": _ints(1, 5, 3), "b": _ints(2, 5, 1)}),
    "round_half_to_even": _feeds_case("Round", {"x": np.array([0.5, 1.5, 2.5, -0.5, -1.5, 2.4],
                                                            np.float32)}),
    "sign": _case("Sign", (3, 5)),
    "reciprocal": _feeds_case("Reciprocal", {"x": np.abs(_w(3, 4)) + 0.5}),
    "range_float": _feeds_case("Range", {"s": np.array(1.0, np.float32),
                                         "l": np.array(7.3, np.float32),
                                         "d": np.array(1.5, np.float32)}),
    "range_int_negative": _feeds_case("Range", {"s": np.array(10, np.int64),
                                                "l": np.array(2, np.int64),
                                                "d": np.array(-3, np.int64)}),
    "tile": _case("Tile", (2, 3), {"r": np.array([2, 3])}),
    "trilu_lower_k": _case("Trilu", (2, 4, 5), {"k": np.array(1)}, opset=14, upper=0),
    "depth_to_space_crd": _case("DepthToSpace", (1, 8, 2, 3), blocksize=2, mode="CRD"),
    "depth_to_space_dcr": _case("DepthToSpace", (1, 8, 2, 3), blocksize=2),
    "space_to_depth": _case("SpaceToDepth", (1, 2, 4, 6), blocksize=2),
    "einsum_batched_matmul": _feeds_case("Einsum", {"a": _w(2, 3, 4), "b": _w(2, 4, 5)},
                                         equation="bij,bjk->bik"),
    "einsum_transpose_sum": _feeds_case("Einsum", {"a": _w(3, 4)}, equation="ij -> j"),
    "global_max_pool": _case("GlobalMaxPool", (2, 3, 5, 4)),
    "instance_norm": _case("InstanceNormalization", (2, 3, 5, 4), {"s": _w(3), "b": _w(3)},
                           epsilon=1e-3),
    "group_norm_21": _case("GroupNormalization", (2, 6, 4, 3), {"s": _w(6), "b": _w(6)},
                           opset=21, num_groups=3),
    "lp_norm_l2": _case("LpNormalization", (3, 6), axis=1, p=2),
    "lp_norm_l1": _case("LpNormalization", (3, 6), axis=0, p=1),
}


@pytest.mark.parametrize("name", sorted(HEAD_AND_UTILITY_CASES))
def test_head_and_utility_node_matches_onnxruntime(name):
    """Reductions, ArgMax/TopK, comparisons, rounding and layout ops that exported heads and
    embedding models carry (ReduceSum, ArgMax, TopK, CumSum, Range, Tile, Einsum, ...): the
    shadow graph's outputs equal onnxruntime's in value, shape and dtype."""
    model, feeds = HEAD_AND_UTILITY_CASES[name]
    expected = open_session(model.SerializeToString(), "cpu").run(*feeds)
    graph = ShadowGraph.from_onnx(model)
    with torch.no_grad():
        got = graph(*[torch.from_numpy(np.asarray(f)) for f in feeds])
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        g = g.numpy()
        assert g.shape == e.shape and g.dtype == e.dtype, (g.shape, g.dtype, e.shape, e.dtype)
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)
