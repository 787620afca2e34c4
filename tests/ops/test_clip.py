"""Clip as one clamp: onnxruntime's values for every bound form, and a usable gradient."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import helper

from patcher.graph.ops.activation import clip_11
from patcher.graph.shadow import ShadowGraph
from patcher.model.runtime import open_session
from tests.build import make_model, value_info


def _clip_model(inputs: list[str], inits: dict):
    node = helper.make_node("Clip", inputs, ["y"], name="n")
    return make_model([node], [value_info("x", [4, 6])],
                      [helper.make_empty_tensor_value_info("y")], inits, opset=17)


@pytest.mark.parametrize("inputs, inits", [
    (["x", "lo", "hi"], {"lo": np.array(0.0, np.float32), "hi": np.array(6.0, np.float32)}),
    (["x", "lo"], {"lo": np.array(-0.25, np.float32)}),
    (["x", "", "hi"], {"hi": np.array(0.3, np.float32)}),
    (["x", "lo", "hi"], {"lo": np.array(1.0, np.float32), "hi": np.array(-1.0, np.float32)}),
    (["x"], {}),
])
def test_clip_matches_onnxruntime_including_ties_and_inverted_bounds(inputs, inits):
    x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32) * 4
    x[0, :3] = [0.0, 6.0, 0.3]  # exactly at the bounds
    x[1, 0] = np.nan
    model = _clip_model(inputs, inits)
    want = open_session(model.SerializeToString(), "cpu").run(x)[0]
    with torch.no_grad():
        got = ShadowGraph.from_onnx(model)(torch.from_numpy(x))[0].numpy()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.nan_to_num(got), np.nan_to_num(want))


def test_clip_gradient_is_whole_on_the_closed_interval_and_zero_outside():
    x = torch.tensor([-1.0, 0.0, 3.0, 6.0, 7.0], requires_grad=True)
    clip_11(x, torch.tensor(0.0), torch.tensor(6.0)).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
