"""The shadow graph: editable-layer table, hooks, ordering, unsupported ops, gradients."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from patcher.errors import BadModelError, UnsupportedOpError
from patcher.graph.shadow import ShadowGraph
from tests.build import make_model, value_info

RNG = np.random.default_rng(1)


def _mlp_model():
    """x[2,6] -> Gemm(transB, alpha) -> Relu -> MatMul(right const) -> y; plus MatMul(left const)."""
    w1 = RNG.standard_normal((5, 6)).astype(np.float32)   # Gemm B with transB=1: [N, K]
    w2 = RNG.standard_normal((5, 3)).astype(np.float32)   # MatMul right: [K, N]
    w3 = RNG.standard_normal((4, 2)).astype(np.float32)   # MatMul left: W[M, K] @ x[K, N]
    const_w = helper.make_node("Constant", [], ["w2"], name="w2_const",
                               value=numpy_helper.from_array(w2, "w2"))
    nodes = [
        const_w,
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1, alpha=0.5),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
        helper.make_node("MatMul", ["w3", "x2"], ["z"], name="left"),
        helper.make_node("MatMul", ["x", "xt"], ["q"], name="dynamic"),
    ]
    inits = {"w1": w1, "b1": RNG.standard_normal(5).astype(np.float32), "w3": w3}
    inputs = [value_info("x", [2, 6]), value_info("x2", [2, 7]), value_info("xt", [6, 2])]
    outputs = [value_info("y", [2, 3]), value_info("z", [4, 7]), value_info("q", [2, 2])]
    return make_model(nodes, inputs, outputs, inits), (w1, w2, w3)


def test_editable_layers_keep_stored_orientation_and_storage():
    model, (w1, w2, w3) = _mlp_model()
    graph = ShadowGraph.from_onnx(model)
    layers = {l.name: l for l in graph.editable_layers}
    assert set(layers) == {"fc1", "fc2", "left"}  # MatMul of two graph inputs is not editable
    fc1, fc2, left = layers["fc1"], layers["fc2"], layers["left"]
    assert (fc1.orientation, fc1.shape, fc1.key_dim, fc1.value_dim) == ("gemm_transposed", (5, 6), 6, 5)
    assert fc1.storage == "initializer" and fc1.bias == "b1"
    assert (fc2.orientation, fc2.shape, fc2.key_dim, fc2.value_dim) == ("matmul_right", (5, 3), 5, 3)
    assert fc2.storage == "constant"
    assert (left.orientation, left.key_dim, left.value_dim, left.weight_input) == ("matmul_left", 2, 4, 0)
    np.testing.assert_array_equal(graph.weight("w1").detach().numpy(), w1)
    np.testing.assert_array_equal(graph.weight("w2").detach().numpy(), w2)
    np.testing.assert_array_equal(graph.weight("w3").detach().numpy(), w3)
    assert isinstance(graph.weight("w2"), torch.nn.Parameter)


def test_conv_key_dim_counts_one_group_and_shared_weights_are_reported():
    w = RNG.standard_normal((6, 2, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], name="c1", group=2, pads=[1] * 4),
             helper.make_node("Conv", ["a", "w"], ["b"], name="c2", group=3, pads=[1] * 4)]
    model = make_model(nodes, [value_info("x", [1, 4, 5, 5])], [value_info("b", None)], {"w": w})
    graph = ShadowGraph.from_onnx(model)
    c1, c2 = graph.editable_layers
    assert c1.key_dim == 2 * 3 * 3 and c1.groups == 2 and c1.shared_with == ("c2",)
    assert c2.groups == 3 and c2.shared_with == ("c1",)
    assert len(list(graph.weights)) == 1  # one Parameter for the shared tensor


def test_outputs_are_always_a_tuple_and_gradients_reach_weights():
    model, _ = _mlp_model()
    graph = ShadowGraph.from_onnx(model)
    x = torch.randn(2, 6, requires_grad=True)
    out = graph(x, torch.randn(2, 7), torch.randn(6, 2))
    assert isinstance(out, tuple) and [tuple(o.shape) for o in out] == [(2, 3), (4, 7), (2, 2)]
    out[0].sum().backward()
    assert torch.isfinite(graph.weight("w1").grad).all() and graph.weight("w1").grad.abs().sum() > 0
    assert graph.weight("w2").grad.abs().sum() > 0
    assert x.grad is not None


def test_hooks_see_every_node_can_replace_outputs_and_are_removed():
    model, _ = _mlp_model()
    graph = ShadowGraph.from_onnx(model)
    feeds = (torch.randn(2, 6), torch.randn(2, 7), torch.randn(6, 2))
    seen = []
    handle = graph.register_hook(lambda node, ins, outs: seen.append((node.name, len(ins), len(outs))))
    try:
        graph(*feeds)
    finally:
        handle.remove()
    assert [s[0] for s in seen] == ["fc1", "relu", "fc2", "left", "dynamic"]
    assert seen[0][1] == 3  # Gemm saw x, w1, b1

    with graph.register_hook(lambda node, ins, outs: (torch.zeros_like(outs[0]),), nodes=["relu"]):
        y = graph(*feeds)[0]
    assert torch.count_nonzero(y) == 0
    y_after = graph(*feeds)[0]
    assert torch.count_nonzero(y_after) > 0  # the context manager removed the hook
    with pytest.raises(KeyError):
        graph.register_hook(lambda *a: None, nodes=["no_such_node"])


def test_nodes_out_of_order_are_sorted_and_cycles_refused():
    model, _ = _mlp_model()
    reference = ShadowGraph.from_onnx(model)
    shuffled = onnx.ModelProto()
    shuffled.CopyFrom(model)
    nodes = list(shuffled.graph.node)
    del shuffled.graph.node[:]
    shuffled.graph.node.extend(reversed(nodes))
    feeds = (torch.randn(2, 6), torch.randn(2, 7), torch.randn(6, 2))
    for a, b in zip(reference(*feeds), ShadowGraph.from_onnx(shuffled)(*feeds)):
        torch.testing.assert_close(a, b)

    cyc = make_model([helper.make_node("Relu", ["b"], ["a"], name="r1"),
                      helper.make_node("Relu", ["a"], ["b"], name="r2")],
                     [value_info("x", [1])], [value_info("b", [1])])
    with pytest.raises(BadModelError, match="cycle"):
        ShadowGraph.from_onnx(cyc)


def test_duplicate_node_names_are_refused():
    model = make_model([helper.make_node("Relu", ["x"], ["a"], name="same"),
                        helper.make_node("Relu", ["a"], ["b"], name="same")],
                       [value_info("x", [1])], [value_info("b", [1])])
    with pytest.raises(BadModelError, match="duplicate node names: same"):
        ShadowGraph.from_onnx(model)


def test_unsupported_ops_are_all_named_at_once():
    then_graph = helper.make_graph([helper.make_node("Identity", ["x"], ["t"])], "then", [],
                                   [value_info("t", [1])])
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="ok"),
        helper.make_node("LSTM", ["a", "w", "r"], ["b"], name="rnn", hidden_size=2),
        helper.make_node("MyOp", ["a"], ["c"], name="custom", domain="com.example"),
        helper.make_node("If", ["cond"], ["d"], name="branch", then_branch=then_graph,
                         else_branch=then_graph),
        helper.make_node("Relu", ["a"], ["e"], name="odd_attr", bogus=3),
    ]
    model = make_model(nodes, [value_info("x", [1]), value_info("cond", [], TensorProto.BOOL)],
                       [value_info("b", None)])
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    with pytest.raises(UnsupportedOpError) as info:
        ShadowGraph.from_onnx(model)
    msg = str(info.value)
    assert msg.startswith("4 unsupported node(s)")
    for part in ("LSTM (domain ai.onnx, opset 17) at node 'rnn'",
                 "MyOp (domain com.example, opset 1) at node 'custom'",
                 "If (domain ai.onnx, opset 17) at node 'branch'",
                 "attribute 'bogus' not supported"):
        assert part in msg


def test_opset_ranges_pick_the_right_semantics():
    """Softmax before opset 13 normalises over the flattened tail; from 13 over one axis."""
    x = RNG.standard_normal((2, 3, 4)).astype(np.float32)
    results = {}
    for opset in (11, 13):
        model = make_model([helper.make_node("Softmax", ["x"], ["y"], name="s", axis=1)],
                           [value_info("x", [2, 3, 4])], [value_info("y", [2, 3, 4])], opset=opset)
        results[opset] = ShadowGraph.from_onnx(model)(torch.from_numpy(x))[0]
    assert torch.allclose(results[11].sum(dim=(1, 2)), torch.ones(2))
    assert torch.allclose(results[13].sum(dim=1), torch.ones(2, 4))


def test_initializer_listed_as_graph_input_is_flagged_not_fed():
    model, _ = _mlp_model()
    model.graph.input.append(value_info("w1", [5, 6]))
    graph = ShadowGraph.from_onnx(model)
    assert graph.overridable_initializers == ["w1"]
    assert graph.input_names == ["x", "x2", "xt"]


def test_a_node_that_cannot_run_is_named_in_the_error():
    from patcher.graph.shadow import ShadowExecutionError

    model = make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
                       [value_info("x", [1, 3, 4, 4])], [value_info("y", None)],
                       {"w": RNG.standard_normal((2, 3, 3, 3)).astype(np.float32)})
    graph = ShadowGraph.from_onnx(model)
    with pytest.raises(ShadowExecutionError, match=r"node 'conv' \(Conv\) failed on inputs of shape \[1x5x4x4, 2x3x3x3\]"):
        graph(torch.zeros(1, 5, 4, 4))
