"""Key statistics: float32 chunked products accumulated in float64 match the exact second
moment; a row cap keeps about that many keys, deterministically."""
from __future__ import annotations

import numpy as np
import torch
from onnx import helper

from patcher import stats
from patcher.keys import LayerTap, layer_keys
from patcher.shadow import ShadowGraph
from patcher.stats import KeyMoments, collect_moments, iterate_batches
from tests.build import make_model, value_info


def _conv_model():
    rng = np.random.default_rng(0)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="L", pads=[1, 1, 1, 1])
    return ShadowGraph.from_onnx(make_model([node], [value_info("x", [None, 3, 12, 12])],
                                            [value_info("y", None)],
                                            {"w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32)}))


def test_chunked_float32_products_match_the_float64_second_moment(monkeypatch):
    monkeypatch.setattr(stats, "CHUNK_ROWS", 100)  # several chunks per batch
    keys = torch.rand(7, 90, 1, 27) + 0.5  # non-centred, like ReLU outputs
    m = KeyMoments(torch.zeros(27, 27, dtype=torch.float64))
    m.add(keys)
    flat = keys.reshape(-1, 27).to(torch.float64)
    exact = flat.T @ flat / flat.shape[0]
    assert m.count == 630
    assert torch.allclose(m.second_moment, exact, rtol=1e-5, atol=0)
    # float64 keys stay float64
    m64 = KeyMoments(torch.zeros(27, 27, dtype=torch.float64))
    m64.add(flat.reshape(7, 90, 1, 27))
    assert torch.allclose(m64.second_moment, exact, rtol=1e-12, atol=0)


def test_row_cap_keeps_about_that_many_keys_and_is_seeded():
    graph = _conv_model()
    x = np.random.default_rng(1).random((40, 3, 12, 12), dtype=np.float32)
    layers = graph.editable_layers
    full = collect_moments(graph, layers, iterate_batches(x, 16), total=len(x))["L"]
    assert full.count == 40 * 144
    capped = collect_moments(graph, layers, iterate_batches(x, 16), total=len(x),
                             max_rows=600, seed=3)["L"]
    again = collect_moments(graph, layers, iterate_batches(x, 16), total=len(x),
                            max_rows=600, seed=3)["L"]
    other = collect_moments(graph, layers, iterate_batches(x, 16), total=len(x),
                            max_rows=600, seed=4)["L"]
    assert abs(capped.count - 600) <= 3
    assert torch.equal(capped.sum_kk, again.sum_kk)
    assert not torch.equal(capped.sum_kk, other.sum_kk)
    # a uniform sample estimates the same second moment
    rel = (capped.second_moment - full.second_moment).norm() / full.second_moment.norm()
    assert rel < 0.1
    # a cap above the number of keys changes nothing
    loose = collect_moments(graph, layers, iterate_batches(x, 16), total=len(x),
                            max_rows=10 ** 6)["L"]
    assert loose.count == full.count and torch.equal(loose.sum_kk, full.sum_kk)


def test_keys_fed_to_the_statistics_are_the_layers_keys():
    graph = _conv_model()
    x = torch.from_numpy(np.random.default_rng(2).random((5, 3, 12, 12), dtype=np.float32))
    layer = graph.editable_layers[0]
    with LayerTap(graph, [layer]) as tap:
        graph(x)
    keys = layer_keys(layer, tap.inputs["L"], graph.node_attributes("L")).reshape(-1, 27)
    m = collect_moments(graph, [layer], [x], total=5)["L"]
    expect = keys.to(torch.float64).T @ keys.to(torch.float64)
    assert torch.allclose(m.sum_kk, expect, rtol=1e-5)
