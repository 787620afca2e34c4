"""Passes that resume at a recorded cut layer (patcher/rectify/resume.py)."""
from __future__ import annotations

import numpy as np
import torch
from onnx import helper

from patcher.graph.shadow import ShadowGraph
from tests.build import make_model, value_info


def _residual_model(tmp_path):
    """fc1 -> Relu -> (fc2 -> Relu) + skip -> fc3: fc2's input is also the skip, so fc2 is
    a cut (its input is all the rest reads); fc3 is one; fc1 is the first step."""
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["h1"], name="fc1", transB=1),
             helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
             helper.make_node("Gemm", ["r1", "w2"], ["h2"], name="fc2", transB=1),
             helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
             helper.make_node("Add", ["r1", "r2"], ["s"], name="skip"),
             helper.make_node("Gemm", ["s", "w3"], ["y"], name="fc3", transB=1)]
    weights = {"w1": rng.standard_normal((8, 5)).astype(np.float32),
               "w2": rng.standard_normal((8, 8)).astype(np.float32),
               "w3": rng.standard_normal((3, 8)).astype(np.float32)}
    model = make_model(nodes, [value_info("x", ["n", 5])], [value_info("y", ["n", 3])], weights)
    path = tmp_path / "r.onnx"
    path.write_bytes(model.SerializeToString())
    x = rng.standard_normal((300, 5)).astype(np.float32)
    y = ShadowGraph.from_onnx(path)(torch.from_numpy(x))[0].argmax(1).numpy()
    return path, x, y


def test_cut_layers_resume_to_the_full_forward_bit_for_bit(tmp_path):
    from patcher.rectify.resume import ResumePoints

    path, x, _ = _residual_model(tmp_path)
    graph = ShadowGraph.from_onnx(path).eval()
    xt = torch.from_numpy(x[:40])
    points = ResumePoints(graph, graph.editable_layers, xt[:1])
    assert set(points.cuts) == {"fc2", "fc3"}
    with torch.no_grad():
        with points.record("set", 2):
            full = [graph(xt[:20])[0], graph(xt[20:])[0]]
        assert {layer for _, layer in points.recorded} == {"fc2", "fc3"}
        assert points.usable("set", 2) == "fc3"  # the latest cut
        for layer in ("fc2", "fc3"):
            for i in range(2):
                assert torch.equal(points.forward(layer, "set", i)[0], full[i])
        with points.record("short", 2):  # one forward of two: not a whole pass, not kept
            graph(xt[:20])
        assert points.usable("short", 2) is None


def test_a_touched_weight_upstream_retires_a_recording_and_the_edited_layer_keeps_it(tmp_path):
    from patcher.rectify.resume import ResumePoints

    path, x, _ = _residual_model(tmp_path)
    graph = ShadowGraph.from_onnx(path).eval()
    xt = torch.from_numpy(x[:20])
    points = ResumePoints(graph, graph.editable_layers, xt[:1])
    with torch.no_grad():
        with points.record("set", 1):
            graph(xt)
        graph.weight("w3").add_(0.5)   # an edit of fc3: its own input is unchanged
        points.touch("fc3")
        assert points.usable("set", 1) == "fc3"
        assert torch.equal(points.forward("fc3", "set", 0)[0], graph(xt)[0])
        graph.weight("w2").add_(0.5)   # fc2 feeds fc3's input: fc3's recording is stale
        points.touch("fc2")
        assert points.usable("set", 1) == "fc2"
        assert torch.equal(points.forward("fc2", "set", 0)[0], graph(xt)[0])
        points.touch("fc1")            # upstream of every cut
        assert points.usable("set", 1) is None
        with points.record("later", 1):  # nothing is recorded once a weight changed
            graph(xt)
        assert points.usable("later", 1) is None


def test_the_workspace_accuracy_and_gaps_after_an_edit_are_those_of_a_full_pass(tmp_path):
    """The eval set is recorded by the statistics pass and the gap pairs by their first
    measure; after an edit of the last layer both resume there and give what a workspace
    without resume points measures."""
    from patcher.rectify import RectifyConfig
    from patcher.rectify.workspace import Workspace
    from patcher.samples import LabelledSet, Pairs

    path, x, y = _residual_model(tmp_path)
    pairs = Pairs(x[:30] + 2.0, x[:30], y[:30])
    spaces = [Workspace(ShadowGraph.from_onnx(path), pairs, LabelledSet(x, y), None,
                        RectifyConfig(transplant="none", batch=64)) for _ in range(2)]
    spaces[1].resume = None  # the reference: every pass from the inputs
    for ws in spaces:
        ws.base_accuracy(), ws.gaps(), ws.gaps()
        ws.add("w3", torch.from_numpy(np.random.default_rng(2).standard_normal((3, 8))
                                      .astype(np.float32)))
    assert spaces[0].resume.usable("eval", 5) == "fc3"
    before = spaces[0].resume.resumed_batches
    assert spaces[0].accuracy() == spaces[1].accuracy() < 1.0
    assert spaces[0].gaps() == spaces[1].gaps()
    assert spaces[0].resume.resumed_batches == before + 5 + 2  # 5 eval, 2 x 1 gap batches
