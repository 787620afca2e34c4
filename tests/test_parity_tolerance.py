"""Parity's float32 tolerance follows the computation (patcher/graph/parity.py): honest
float32 models that are wide (a 25,088-wide dense layer whose outputs cancel) or deep (a
50-layer residual network) pass, small models keep rtol 1e-4, and real disagreements
(a weight that differs, a missing bias) still fail, also at the looser tolerances."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from patcher.graph.parity import (ACCUMULATION_SAFETY, FLOAT32_ROUNDOFF, FP32_RTOL,
                                  accumulation_rtol, compare, reduction_length, row_scale)
from patcher.graph.shadow import ShadowGraph

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "backdoor_cnn"


def _model(nodes, inits, x_shape, out_shape) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _wide_head(d: int = 25088, hidden: int = 64, classes: int = 5, seed: int = 0):
    """x [N, d] -> Gemm d x hidden -> Relu -> Gemm hidden x classes, as a trained head on
    positive features: every input is one shared positive pattern plus 1% of its own, and
    the first layer's rows are orthogonal to the pattern, so its outputs cancel (the terms
    are about 100x the sums, as after the VGG16-style model's 25,088-wide layer)."""
    rng = np.random.default_rng(seed)
    pattern = rng.random(d) + 0.5
    w1 = rng.standard_normal((hidden, d))
    w1 -= np.outer(w1 @ pattern / (pattern @ pattern), pattern)
    inits = {"w1": w1 * 0.05, "b1": rng.standard_normal(hidden) * 0.01,
             "w2": rng.standard_normal((classes, hidden)), "b2": np.zeros(classes)}
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc2", transB=1)]
    x = (pattern + 0.01 * rng.random((8, d))).astype(np.float32)
    return _model(nodes, inits, ["N", d], ["N", classes]), x


def _deep_residual(blocks: int = 25, channels: int = 16, side: int = 16, seed: int = 1):
    """A random residual network of 2 x ``blocks`` 3x3 convs (He-scaled, no BatchNorm),
    global average pooling and a dense layer: 2 x blocks + 2 reducing layers deep."""
    rng = np.random.default_rng(seed)
    scale = np.sqrt(2.0 / (channels * 9))
    inits = {"w_in": rng.standard_normal((channels, 3, 3, 3)) * np.sqrt(2.0 / 27)}
    nodes = [helper.make_node("Conv", ["x", "w_in"], ["t0"], name="stem", pads=[1] * 4)]
    current = "t0"
    for i in range(blocks):
        for j in range(2):
            inits[f"w{i}_{j}"] = rng.standard_normal((channels, channels, 3, 3)) * scale * 0.5
            inits[f"b{i}_{j}"] = rng.standard_normal(channels) * 0.01
        nodes += [
            helper.make_node("Conv", [current, f"w{i}_0", f"b{i}_0"], [f"a{i}"], name=f"c{i}a",
                             pads=[1] * 4),
            helper.make_node("Relu", [f"a{i}"], [f"r{i}"], name=f"relu{i}"),
            helper.make_node("Conv", [f"r{i}", f"w{i}_1", f"b{i}_1"], [f"c{i}"],
                             name=f"c{i}b", pads=[1] * 4),
            helper.make_node("Add", [current, f"c{i}"], [f"s{i}"], name=f"add{i}"),
        ]
        current = f"s{i}"
    inits["fc"] = rng.standard_normal((10, channels)) / np.sqrt(channels)
    nodes += [helper.make_node("GlobalAveragePool", [current], ["p"], name="pool"),
              helper.make_node("Flatten", ["p"], ["f"], name="flat"),
              helper.make_node("Gemm", ["f", "fc"], ["y"], name="head", transB=1)]
    x = rng.random((8, 3, side, side)).astype(np.float32)
    return _model(nodes, inits, ["N", 3, side, side], ["N", 10]), x


def _altered(model: onnx.ModelProto, name: str, change) -> bytes:
    """A copy of ``model`` whose initializer ``name`` is ``change(array)``: what onnxruntime
    runs while the shadow graph keeps the original (a real disagreement)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for t in copy.graph.initializer:
        if t.name == name:
            t.CopyFrom(numpy_helper.from_array(change(numpy_helper.to_array(t).copy()), name))
    return copy.SerializeToString()


@pytest.fixture(scope="module")
def wide():
    return _wide_head()


@pytest.fixture(scope="module")
def deep():
    return _deep_residual()


def test_reduction_lengths_of_the_summing_ops():
    import torch

    x = torch.zeros(2, 8, 5, 5)
    w = torch.zeros(4, 2, 3, 3)
    assert reduction_length("Conv", {"group": 4}, (x, w), (torch.zeros(2, 4, 5, 5),)) == 18
    assert reduction_length("Gemm", {}, (torch.zeros(3, 7), torch.zeros(7, 2)), ()) == 7
    assert reduction_length("Gemm", {"transA": 1}, (torch.zeros(7, 3), torch.zeros(7, 2)), ()) == 7
    assert reduction_length("MatMul", {}, (torch.zeros(2, 3, 9), torch.zeros(9, 4)), ()) == 9
    assert reduction_length("GlobalAveragePool", {}, (x,), (torch.zeros(2, 8, 1, 1),)) == 25
    assert reduction_length("Softmax", {}, (torch.zeros(2, 10),), ()) == 10
    assert reduction_length("Relu", {}, (x,), (x,)) == 0


def test_row_scale_is_each_samples_rms():
    values = np.array([[3.0, 4.0], [0.0, 0.0]])
    assert np.allclose(row_scale(values), [[np.sqrt(12.5)] * 2, [0.0, 0.0]])
    assert np.allclose(row_scale(np.array([3.0, 4.0])), [np.sqrt(12.5)] * 2)


def test_a_small_model_keeps_the_strict_float32_tolerance():
    x = np.load(SAMPLE / "eval.npz")["x"][:16]
    path = str(SAMPLE / "model.onnx")
    result = compare(ShadowGraph.from_onnx(path), path, [x])
    assert result.rtol == FP32_RTOL and result.passed, result
    assert 0 < result.rounding_estimate * ACCUMULATION_SAFETY < FP32_RTOL


def test_a_wide_cancelling_dense_layer_gets_a_tolerance_from_its_rounding(wide):
    """The 25,088-wide layer's outputs cancel (the terms are far larger than the sums): the
    estimate rises above the strict tolerance, the honest float32 model passes, and the
    measured difference stays within a few times the estimate (its RMS-level size)."""
    model, x = wide
    result = compare(ShadowGraph.from_onnx(model), model.SerializeToString(), [x])
    assert result.rtol == accumulation_rtol(result.rounding_estimate) > FP32_RTOL, result
    # far above the u sqrt(L) of a sum whose terms do not cancel
    assert result.rounding_estimate > 10 * FLOAT32_ROUNDOFF * np.sqrt(25088)
    assert result.passed, result
    assert result.max_rel_diff <= ACCUMULATION_SAFETY * result.rounding_estimate


def test_a_deep_residual_network_passes(deep):
    model, x = deep
    result = compare(ShadowGraph.from_onnx(model), model.SerializeToString(), [x])
    assert result.passed, result
    assert result.max_rel_diff <= ACCUMULATION_SAFETY * result.rounding_estimate, result


@pytest.mark.parametrize("case, tensor, change", [
    ("wide", "w1", lambda w: np.concatenate([w[:1] * 1.1, w[1:]]).astype(np.float32)),
    ("wide", "b1", lambda b: (b * 0).astype(np.float32)),
    ("wide", "w2", lambda w: (w * 1.05).astype(np.float32)),
    ("deep", "w12_0", lambda w: (w * 1.01).astype(np.float32)),
    ("deep", "b3_1", lambda b: (b * 0).astype(np.float32)),
    ("deep", "fc", lambda w: (w + 1e-3 * np.abs(w).max() * (np.arange(w.size).reshape(w.shape)
                                                            % 2)).astype(np.float32)),
])
def test_real_disagreements_still_fail(case, tensor, change, wide, deep):
    """onnxruntime runs an altered copy, the shadow graph the original: on the deep network
    a layer 1% off, a missing bias, a head off by 1e-3 of its scale; on the cancelling wide
    head (derived rtol about 1.2e-2: its float32 sums are that uncertain) one row 10% off,
    a missing bias, the last layer 5% off. Parity fails at the derived tolerance."""
    model, x = wide if case == "wide" else deep
    result = compare(ShadowGraph.from_onnx(model), _altered(model, tensor, change), [x])
    assert not result.passed, result


def test_an_explicit_rtol_is_used_as_given(wide):
    model, x = wide
    result = compare(ShadowGraph.from_onnx(model), model.SerializeToString(), [x], rtol=1e-9)
    assert result.rtol == 1e-9 and not result.within_tolerance
