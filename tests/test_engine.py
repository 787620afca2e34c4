"""The rectification engine: keys reproduce layer outputs, the closed form is the least-squares
optimum, deltas land in the stored orientation, and the written file differs only where edited."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from patcher.edits.rankone import principal_direction, solve_rank_one
from patcher.graph.keys import LayerTap, canonical_weight, layer_keys, layer_values, stored_delta
from patcher.model.modelio import load_model
from patcher.graph.shadow import ShadowGraph
from patcher.model.writeback import apply_deltas, read_provenance, save_model
from tests.build import make_model, value_info

RNG = np.random.default_rng(3)


def _w(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


LAYER_CASES = {
    "conv_groups_asym_pads": (
        helper.make_node("Conv", ["x", "w", "b"], ["y"], name="L", group=2, pads=[0, 1, 2, 0],
                         strides=[2, 1], dilations=[1, 2]),
        [1, 4, 9, 8], {"w": _w(6, 2, 3, 3), "b": _w(6)}),
    "conv_same_upper": (
        helper.make_node("Conv", ["x", "w"], ["y"], name="L", auto_pad="SAME_UPPER", strides=[2, 2]),
        [2, 3, 7, 6], {"w": _w(5, 3, 2, 3)}),
    "conv_1d": (helper.make_node("Conv", ["x", "w"], ["y"], name="L", pads=[1, 1]),
                [2, 3, 10], {"w": _w(4, 3, 3)}),
    "gemm_transB_alpha": (
        helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="L", transB=1, alpha=0.7, beta=1.3),
        [3, 5], {"w": _w(4, 5), "b": _w(4)}),
    "gemm_transA": (helper.make_node("Gemm", ["x", "w"], ["y"], name="L", transA=1), [5, 3],
                    {"w": _w(5, 4)}),
    "matmul_right": (helper.make_node("MatMul", ["x", "w"], ["y"], name="L"), [2, 3, 5],
                     {"w": _w(5, 4)}),
    "matmul_left": (helper.make_node("MatMul", ["w", "x"], ["y"], name="L"), [2, 5, 3],
                    {"w": _w(4, 5)}),
}


def _layer_graph(name):
    """The one-node model of LAYER_CASES[name] as a shadow graph, its layer, the layer's
    attributes and an input."""
    node, shape, inits = LAYER_CASES[name]
    model = make_model([node], [value_info("x", shape)], [value_info("y", None)], inits)
    graph = ShadowGraph.from_onnx(model)
    return graph, graph.editable_layers[0], graph.node_attributes("L"), torch.from_numpy(_w(*shape))


@pytest.mark.parametrize("name", sorted(LAYER_CASES))
def test_keys_times_canonical_weight_reproduce_the_layer(name):
    """v = W_c k: differences of outputs equal W_c applied to differences of keys."""
    graph, layer, attrs, x = _layer_graph(name)
    x2 = x + torch.from_numpy(_w(*x.shape))
    batch_axis = 1 if attrs.get("transA") else 0  # Gemm transA: samples are columns of A
    with torch.no_grad(), LayerTap(graph, [layer]) as tap:
        graph(torch.cat([x, x2], dim=batch_axis))
    keys = layer_keys(layer, tap.inputs["L"], attrs)
    values = layer_values(layer, tap.outputs["L"], attrs)
    n = x.shape[batch_axis]
    w_c = canonical_weight(layer, graph.weight(layer.weight).detach())
    groups = keys.shape[2]
    w_g = w_c.reshape(groups, -1, w_c.shape[1])
    predicted = torch.einsum("gvk,npgk->npgv", w_g, keys[n:] - keys[:n])
    torch.testing.assert_close(predicted, values[n:] - values[:n], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(LAYER_CASES))
def test_stored_delta_changes_the_output_by_the_canonical_delta(name):
    graph, layer, attrs, x = _layer_graph(name)
    with torch.no_grad():
        before = graph(x)[0].clone()
        with LayerTap(graph, [layer]) as tap:
            graph(x)
        keys = layer_keys(layer, tap.inputs["L"], attrs)
        w_c = canonical_weight(layer, graph.weight(layer.weight))
        d_c = torch.from_numpy(_w(*w_c.shape))
        graph.weight(layer.weight).add_(stored_delta(layer, d_c, attrs))
        after = graph(x)[0]
    # value space: outputs / alpha; a change dW_c moves values by dW_c k
    groups = keys.shape[2]
    moved = torch.einsum("gvk,npgk->npgv", d_c.reshape(groups, -1, d_c.shape[1]), keys)
    got = layer_values(layer, after, attrs) - layer_values(layer, before, attrs)
    torch.testing.assert_close(got, moved, rtol=1e-4, atol=1e-4)


def test_closed_form_matches_brute_force_least_squares():
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(3, 7, 1, 6, generator=gen, dtype=torch.float64)
    residual = torch.randn(3, 7, 1, 4, generator=gen, dtype=torch.float64)
    a = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    c_inv = torch.linalg.inv(a @ a.T + torch.eye(6, dtype=torch.float64))
    edit = solve_rank_one("L", "w", keys, residual, c_inv)
    # direction: top left singular vector of C^-1 K^T diag(||r||)
    k = keys.reshape(-1, 6)
    w = residual.reshape(-1, 4).norm(dim=1)
    u = torch.linalg.svd(c_inv @ (k.T * w))[0][:, 0]
    assert abs(float(u @ edit.direction)) == pytest.approx(1.0, abs=1e-8)
    assert float(principal_direction(c_inv, k, w).norm()) == pytest.approx(1.0)
    # magnitude: least squares of R ~ a Lambda^T over all keys
    proj = (k @ edit.direction)[:, None]
    lam, *_ = torch.linalg.lstsq(proj, residual.reshape(-1, 4))
    torch.testing.assert_close(edit.magnitude, lam[0], rtol=1e-9, atol=1e-9)
    assert torch.linalg.matrix_rank(edit.delta) == 1
    assert edit.fit_residual_after <= edit.fit_residual_before


def test_single_key_direction_is_c_inverse_k():
    c_inv = torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))
    keys = torch.tensor([[[[1.0, 1.0, 1.0]]]], dtype=torch.float64)
    edit = solve_rank_one("L", "w", keys, torch.ones(1, 1, 1, 2, dtype=torch.float64), c_inv)
    expected = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    torch.testing.assert_close(edit.direction.abs(), expected / expected.norm())


def _two_weight_model():
    w_const = _w(3, 4)
    nodes = [helper.make_node("Constant", [], ["wc"], name="wc_node",
                              value=numpy_helper.from_array(w_const, "wc")),
             helper.make_node("Gemm", ["x", "w1"], ["h"], name="fc1", transB=1),
             helper.make_node("MatMul", ["h", "wc"], ["y"], name="fc2")]
    return make_model(nodes, [value_info("x", ["n", 5])], [value_info("y", ["n", 4])],
                      {"w1": _w(3, 5), "untouched": _w(7)})


def test_written_file_differs_only_in_edited_tensors_and_provenance(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(_two_weight_model().SerializeToString())
    loaded = load_model(path)
    deltas = {"w1": np.outer(_w(3), _w(5)).astype(np.float64),
              "wc": np.outer(_w(3), _w(4)).astype(np.float64)}
    proto, written = apply_deltas(loaded, deltas, {"tool": "test", "edits": [{"layer": "fc1"}]})
    out = tmp_path / "out.onnx"
    assert save_model(proto, loaded, out) == [out]
    reread = onnx.load(str(out))
    base = onnx.load(str(path))
    new_w1 = numpy_helper.to_array([t for t in reread.graph.initializer if t.name == "w1"][0])
    old_w1 = numpy_helper.to_array([t for t in base.graph.initializer if t.name == "w1"][0])
    np.testing.assert_allclose(new_w1 - old_w1, deltas["w1"], rtol=1e-5, atol=1e-6)
    written_delta = new_w1.astype(np.float64) - old_w1
    sv = np.linalg.svd(written_delta, compute_uv=False)
    assert (sv > 1e-5 * sv[0]).sum() == 1  # rank one up to float32 rounding
    new_wc = numpy_helper.to_array(reread.graph.node[0].attribute[0].t)
    old_wc = numpy_helper.to_array(base.graph.node[0].attribute[0].t)
    np.testing.assert_allclose(new_wc - old_wc, deltas["wc"], rtol=1e-5, atol=1e-6)
    assert read_provenance(reread)["edits"] == [{"layer": "fc1"}]
    # everything else is byte-identical
    for m in (reread, base):
        del m.metadata_props[:]
        for t in m.graph.initializer:
            if t.name == "w1":
                t.ClearField("raw_data")
        m.graph.node[0].attribute[0].t.ClearField("raw_data")
    assert reread.SerializeToString() == base.SerializeToString()
    assert {w.name for w in written} == {"w1", "wc"}


def test_fp16_weights_keep_their_dtype_and_report_rounding(tmp_path):
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")],
                       [value_info("x", [1, 4], onnx.TensorProto.FLOAT16)],
                       [value_info("y", [1, 3], onnx.TensorProto.FLOAT16)],
                       {"w": _w(4, 3).astype(np.float16)})
    path = tmp_path / "h.onnx"
    path.write_bytes(model.SerializeToString())
    loaded = load_model(path)
    delta = np.full((4, 3), 1e-3)
    proto, written = apply_deltas(loaded, {"w": delta})
    tensor = proto.graph.initializer[0]
    assert tensor.data_type == onnx.TensorProto.FLOAT16
    assert 0 < written[0].rounding_error < 1e-2


def test_external_weights_go_to_a_fresh_data_file(tmp_path):
    model = _two_weight_model()
    path = tmp_path / "ext.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="ext.bin",
                    size_threshold=0)
    before = (tmp_path / "ext.bin").read_bytes()
    loaded = load_model(path)
    proto, _ = apply_deltas(loaded, {"w1": np.ones((3, 5))})
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    files = save_model(proto, loaded, out_dir / "p.onnx")
    assert [f.name for f in files] == ["p.onnx", "p.onnx.data"]
    assert (tmp_path / "ext.bin").read_bytes() == before
    again = ShadowGraph.from_onnx(out_dir / "p.onnx")
    np.testing.assert_allclose(again.weight("w1").detach().numpy(),
                               ShadowGraph(loaded).weight("w1").detach().numpy() + 1, rtol=1e-6)


def test_whitening_by_the_cholesky_factor_matches_the_inverse():
    from patcher.analysis.moments import KeyMoments
    from patcher.analysis.stats import LayerStatistics

    keys = torch.randn(200, 6, dtype=torch.float64)
    moments = KeyMoments(torch.zeros(6, 6, dtype=torch.float64))
    moments.add(keys)
    st = LayerStatistics.from_moments("L", moments, ridge=1e-2)
    cov = keys.T @ keys / 200
    reg = cov + 1e-2 * torch.diagonal(cov).mean() * torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(st.inverse, torch.linalg.inv(reg))
    b = torch.randn(3, 6, dtype=torch.float64)
    whitened = st.whiten_rows(b)
    torch.testing.assert_close((whitened ** 2).sum(), torch.trace(b @ torch.linalg.inv(reg) @ b.T))
    evals = torch.linalg.eigvalsh(cov)
    assert st.condition_number == pytest.approx(float(evals.max() / evals.min()))


def test_downstream_nodes_follow_the_data():
    model = _two_weight_model()
    graph = ShadowGraph.from_onnx(model)
    assert graph.downstream_nodes("fc1") == {"fc2"}
    assert graph.downstream_nodes("fc2") == set()


def test_key_statistics_are_cached_and_reused(tmp_path):
    from patcher.rectify import RectifyConfig
    from patcher.rectify.workspace import Workspace
    from patcher.samples import LabelledSet, Pairs

    path = tmp_path / "m.onnx"
    path.write_bytes(_two_weight_model().SerializeToString())
    x = RNG.random((30, 5), dtype=np.float32)
    pairs = Pairs(x[:1] + 1, x[:1], np.array([0]))
    cfg = RectifyConfig(cache_dir=str(tmp_path / "cache"), transplant="none")
    first = Workspace(ShadowGraph.from_onnx(path), pairs, LabelledSet(x, np.zeros(30, np.int64)),
                      None, cfg).statistics
    first.compute()
    assert first.cache_hits == 0 and len(list((tmp_path / "cache").iterdir())) == 2
    second = Workspace(ShadowGraph.from_onnx(path), pairs,
                       LabelledSet(x, np.zeros(30, np.int64)), None, cfg).statistics
    second.compute()
    assert second.cache_hits == 2
    for name, st in first.stats.items():
        torch.testing.assert_close(second.stats[name].inverse, st.inverse)


def test_iterative_solver_reaches_a_rank_one_fit_close_to_the_closed_form():
    from patcher.edits.rankone import solve_rank_one_iterative

    gen = torch.Generator().manual_seed(1)
    keys = torch.randn(4, 5, 1, 6, generator=gen, dtype=torch.float64)
    true = torch.outer(torch.randn(3, generator=gen, dtype=torch.float64),
                       torch.randn(6, generator=gen, dtype=torch.float64))
    residual = torch.einsum("vk,npgk->npgv", true, keys)  # exactly rank-one explainable
    edit = solve_rank_one_iterative("L", "w", keys, residual, lr=5e-2, epochs=400)
    assert torch.linalg.matrix_rank(edit.delta) == 1
    assert edit.fit_residual_after < 1e-3 * edit.fit_residual_before
    torch.testing.assert_close(edit.delta, true, rtol=1e-2, atol=1e-2)


def test_transplant_pastes_local_corruptions_and_adds_global_ones():
    from patcher.rectify.transplant import transplant

    clean = np.zeros((1, 4, 4), np.float32)
    local = clean.copy()
    local[0, :2, :2] = 1.0
    images = np.full((3, 1, 4, 4), 0.5, np.float32)
    pasted = transplant(local, clean, images, "paste")
    assert (pasted[:, 0, :2, :2] == 1.0).all() and (pasted[:, 0, 2:, 2:] == 0.5).all()
    stripes = clean + 0.1 * (1 + np.arange(16).reshape(1, 4, 4) % 2)  # every pixel changes
    moved = transplant(stripes.astype(np.float32), clean, images, "paste")
    np.testing.assert_allclose(moved, np.clip(images + stripes, 0, 1), rtol=1e-6)


def test_transplant_of_a_global_blend_recovers_the_blend_on_other_images():
    """x~ = (1 - phi) x + phi t over every pixel: phi is fitted from the one pair, and the
    transplanted z~ is (1 - phi) z + phi t, without the pair image's ghost that adding
    x~ - x would leave; an additive corruption gets phi ~ 0."""
    from patcher.rectify.transplant import blend_weight, transplant

    rng = np.random.default_rng(4)
    x = rng.random((1, 16, 16)).astype(np.float32)
    t = (0.5 + 0.5 * np.sin(np.arange(16) / 2))[None, None, :].repeat(16, 1).astype(np.float32)
    blended = (0.8 * x + 0.2 * t).astype(np.float32)
    assert blend_weight(blended, x) == pytest.approx(0.2, abs=0.03)
    images = rng.random((4, 1, 16, 16)).astype(np.float32)
    moved = transplant(blended, x, images, "paste")
    expect = 0.8 * images + 0.2 * t
    ghost = np.clip(images + (blended - x), 0, 1)
    assert np.abs(moved - expect).max() < 0.02
    assert np.abs(ghost - expect).max() > 0.1  # what plain adding would have given
    noise = np.clip(x + rng.normal(0, 0.05, x.shape), 0, 1).astype(np.float32)
    assert blend_weight(noise, x) < 0.05


# --------------------------------------------------------------- loop: reuse, stopping, exit
def _gemm_classifier(tmp_path):
    """Two dense layers (fc1 -> Relu -> fc2), symbolic batch; 40 inputs with labels."""
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w2"], ["y"], name="fc2", transB=1)]
    rng = np.random.default_rng(0)  # its own draws: the same model whatever ran before
    model = make_model(nodes, [value_info("x", ["n", 5])], [value_info("y", ["n", 3])],
                       {"w1": rng.standard_normal((6, 5)).astype(np.float32),
                        "w2": rng.standard_normal((3, 6)).astype(np.float32)})
    path = tmp_path / "g.onnx"
    path.write_bytes(model.SerializeToString())
    x = rng.standard_normal((40, 5)).astype(np.float32)
    y = ShadowGraph.from_onnx(path)(torch.from_numpy(x))[0].argmax(1).numpy()
    return path, x, y


class _NoChange:
    """An edit kind whose one candidate changes nothing (a zero delta): always rejected
    as too small."""

    def propose(self, ws, layer):
        from patcher.rectify.editkinds import Candidate, CandidateGroup

        zero = torch.zeros_like(ws.graph.weight(layer.weight))
        yield CandidateGroup(iter([Candidate(layer, {layer.weight: zero}, [], 0.0)]))

    def kept(self, ws, candidate):
        pass


def test_a_rejected_round_recomputes_nothing(tmp_path, monkeypatch):
    """After a round that kept nothing the weights are unchanged: the next round takes the
    next layer of the same ranking (no second IG pass, no second statistics pass)."""
    from importlib import import_module

    locators = import_module("patcher.rectify.locators")
    statcache = import_module("patcher.rectify.statcache")
    from patcher.rectify import RectifyConfig
    from patcher.rectify.locators import AttributionLocator
    from patcher.rectify.loop import Plan, run
    from patcher.rectify.objectives import GapObjective
    from patcher.rectify.workspace import Workspace
    from patcher.samples import LabelledSet, Pairs

    path, x, y = _gemm_classifier(tmp_path)
    calls = {"ig": 0, "statistics": 0}

    def counting(name, real):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(locators, "layer_integrated_gradients",
                        counting("ig", locators.layer_integrated_gradients))
    monkeypatch.setattr(statcache, "collect_moments",
                        counting("statistics", statcache.collect_moments))
    pairs = Pairs(x[:2] + 2.0, x[:2], y[:2])
    ws = Workspace(ShadowGraph.from_onnx(path), pairs, LabelledSet(x, y), None,
                   RectifyConfig(transplant="none"))
    plan = Plan(AttributionLocator(), _NoChange(), GapObjective(ws, 0.0, False), rounds=3)
    base = plan.objective.measure()
    assert base.value > 0.1  # a gap to remove, so that the loop tries the layers
    out = run(ws, plan, ws.base_accuracy(), base, lambda msg: None)
    assert [r.kept for r in out.rounds] == [False, False]  # both layers tried, then none left
    assert sorted(r.layer for r in out.rounds) == ["fc1", "fc2"]
    assert calls == {"ig": 1, "statistics": 1}


class _Gaps:
    """A workspace stand-in whose gaps() returns the given (delta*, tau) in turn, with
    ``flips`` = (pairs still flipped to the target, pairs) beside each."""

    def __init__(self, eval_images: int, *gaps, flips=(1, 200)) -> None:
        self.gap_source, self.eval_x, self._gaps = "held-out pairs", np.zeros((eval_images, 1)), \
            iter(gaps)
        self.flips = flips

    def gaps(self):
        from patcher.rectify.workspace import GapReading

        gap, tau = next(self._gaps)
        flipped, pairs = self.flips
        return GapReading(gap, tau, None if tau is None else flipped, pairs)


@pytest.mark.parametrize("eval_images, base_tau, tau, flips, reached", [
    (100, 0.99, 0.04, (0, 40), True),     # ResNet-18 224: tau 4% of base, no pair flipped
    (100, 0.99, 0.04, (1, 40), False),    # one held-out pair still goes to the target
    (100, 0.99, 0.005, (1, 200), False),  # gelu n = 5: tau 0.5% of base, a pair still flips
    (100, 0.99, 0.0005, (3, 200), True),  # at most --gap: stops whatever flips
    (100, 0.99, 0.2, (0, 200), False),    # over 10% of its base: the effect is not gone
    (100, 0.99, 0.04, (0, 10), False),    # too few pairs to tell: 1% of base needed
    (100, 0.99, 0.009, (0, 10), True),    # ... under 1% of 0.99
    (10, 0.99, 0.05, (0, 10), True),      # removing it all would pay for half an eval image
    (10, 0.05, 0.05, (0, 10), False),     # ... but nothing was removed yet: the loop must start
])
def test_the_loop_stops_when_the_corruptions_effect_is_gone(eval_images, base_tau, tau, flips,
                                                             reached):
    """The stopping rule and the exit status are one rule (GapObjective.effect_gone): tau
    <= --gap, or no held-out pair flipped to the target and tau small (10% of its base on
    >= 20 pairs, 1% on fewer, or worth less than one eval image)."""
    from patcher.rectify.objectives import GapObjective

    objective = GapObjective(_Gaps(eval_images, (0.9, base_tau), (0.3, tau), flips=flips),
                             0.001, True)
    base, now = objective.measure(), objective.measure()
    assert not objective.reached(base)
    assert objective.reached(now) == reached
    assert objective.met(now, True, True) == reached  # the exit status: the same rule
    if reached and tau > 0.001:  # the reason is said
        assert f"none of the {flips[1]}" in objective.met_because
    assert not objective.met(now, True, False)         # never beyond the budget
    if reached:
        assert objective.note_reached(now).startswith("stopping: ")


def test_without_a_target_class_the_gap_alone_decides():
    from patcher.rectify.objectives import GapObjective

    objective = GapObjective(_Gaps(100, (0.9, None), (0.002, None), (0.0005, None)), 0.001, True)
    base, small, smaller = objective.measure(), objective.measure(), objective.measure()
    assert not objective.reached(small) and not objective.met(small, True, True)
    assert objective.reached(smaller) and objective.met(smaller, True, True)


def _trigger_classifier(tmp_path, strong: int):
    """One dense layer ``fc`` (3 classes, 5 inputs) with a backdoor: input 4 is the trigger
    and drives class 0 with weight 10, while the clean inputs' logits are 6 for their
    class, 0 for class 0 and -6 for the third. 200 pairs: the trigger at strength 1 on all,
    but 20 on the first ``strong`` of them; 300 clean eval inputs."""
    w = np.zeros((3, 5), np.float32)
    w[1, 0], w[2, 0], w[0, 4] = 3.0, -3.0, 10.0
    model = make_model([helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=1)],
                       [value_info("x", ["n", 5])], [value_info("y", ["n", 3])], {"w": w})
    path = tmp_path / "t.onnx"
    path.write_bytes(model.SerializeToString())
    rng = np.random.default_rng(0)
    clean = np.zeros((500, 5), np.float32)
    clean[:, 0] = 2.0 * rng.choice([-1.0, 1.0], 500)  # logits +-6 for classes 1 and 2
    labels = np.where(clean[:, 0] > 0, 1, 2).astype(np.int64)
    corrupted = clean[:200].copy()
    corrupted[:, 4] = 1.0
    corrupted[:strong, 4] = 20.0
    return path, (corrupted, clean[:200], labels[:200]), (clean[200:], labels[200:])


class _ScaleTrigger:
    """An edit kind that, in round i, sets fc's trigger weight to ``factors[i]`` of its
    original value (the accuracy cannot change: clean inputs have no trigger)."""

    def __init__(self, factors) -> None:
        self.factors, self.round = list(factors), 0

    def propose(self, ws, layer):
        from patcher.rectify.editkinds import Candidate, CandidateGroup

        weight = ws.graph.weight(layer.weight)
        delta = torch.zeros_like(weight)
        delta[0, 4] = 10.0 * self.factors[self.round] - weight[0, 4]
        yield CandidateGroup(iter([Candidate(layer, {layer.weight: delta}, [],
                                             float(delta.norm()))]))

    def kept(self, ws, candidate):
        self.round += 1


@pytest.mark.parametrize("strong, factors, rounds", [
    # one pair in 200 with a strong trigger still goes to the target after the first edit
    # while tau is under 1% of its base: the loop must go on (the gelu case's regression)
    (1, (0.05, 0.001, 0.0005), 2),
    # no pair flips after the first edit and tau is about 5% of its base: the corruption
    # no longer changes decisions, the loop stops (ResNet-18 224's case)
    (0, (0.3, 0.05, 0.001), 1),
])
def test_the_loop_stops_once_no_held_out_pair_flips_and_goes_on_while_one_does(
        tmp_path, strong, factors, rounds):
    from patcher.rectify import RectifyConfig
    from patcher.rectify.locators import FixedLocator
    from patcher.rectify.loop import Plan, run
    from patcher.rectify.objectives import GapObjective
    from patcher.rectify.workspace import Workspace
    from patcher.samples import LabelledSet, Pairs

    path, (corrupted, clean, labels), (eval_x, eval_y) = _trigger_classifier(tmp_path, strong)
    ws = Workspace(ShadowGraph.from_onnx(path), Pairs(corrupted, clean, labels),
                   LabelledSet(eval_x, eval_y), None, RectifyConfig(transplant="none"))
    assert ws.target_class == {0}
    objective = GapObjective(ws, 0.001, True)
    plan = Plan(FixedLocator("fc"), _ScaleTrigger(factors), objective, rounds=5)
    base = objective.measure()
    assert base.tau > 0.9 and base.flipped == 200 and base.pairs == 200
    out = run(ws, plan, ws.base_accuracy(), base, lambda msg: None)
    assert [r.kept for r in out.rounds] == [True] * rounds
    first = out.rounds[0].target_gap_after
    if strong:
        # what the old rule (tau at most 1% of its base) would have stopped on
        assert 0.001 < first <= 0.01 * base.tau
        assert out.measure.tau <= 0.001  # stopped on --gap after the second edit
    else:
        assert 0.01 * base.tau < first <= 0.1 * base.tau
        assert out.stopped.startswith("stopping: ") and "none of the 200" in out.stopped
    assert out.measure.flipped == 0
    assert objective.met(out.measure, True, True)


@pytest.mark.parametrize("final_tau, met, pair_gap, passed", [
    (0.004, True, 0.02, True),     # tau's rule met: exit 0 although the pair's gap is 0.02
    (0.3, False, 0.0005, False),   # tau's rule not met: exit 1 although the pair's gap is small
    (None, False, 0.0005, True),   # no target class: the pairs' gap decides
    (None, False, 0.02, False),
])
def test_patch_exit_status_is_judged_on_the_measure_the_loop_removes(final_tau, met, pair_gap,
                                                                    passed):
    from patcher.patch import Verification, _report
    from patcher.rectify import RectifyConfig
    from patcher.rectify.results import RectifyResult

    result = RectifyResult("dynamic", 0.98, 0.97, 0.98, 0.01, met,
                           base_target_gap=None if final_tau is None else 0.99,
                           final_target_gap=final_tau)
    verification = Verification("CPUExecutionProvider", 0.98, 0.98, 0.99, pair_gap,
                                {"within_tolerance": True})
    report = _report("m.onnx", "o.onnx", "p.npz", "e.npz", [], result, verification, {}, {},
                     torch.device("cpu"), {}, RectifyConfig())
    assert report.passed == passed


def test_transplanted_pairs_that_lose_the_corruption_give_way_to_the_pairs(tmp_path,
                                                                            monkeypatch):
    """When the transplanted gap set carries (almost) none of the pairs' own gap, the
    workspace fits and judges on the pairs themselves and warns; when it carries the gap,
    the transplanted sets stay."""
    import logging
    from importlib import import_module

    from patcher.rectify import RectifyConfig
    from patcher.rectify.transplant import PairSets
    from patcher.rectify.workspace import Workspace
    from patcher.samples import LabelledSet, Pairs

    workspace_module = import_module("patcher.rectify.workspace")
    path, x, y = _gemm_classifier(tmp_path)
    pairs = Pairs(x[:2] + 2.0, x[:2], y[:2])
    real = workspace_module.build_pair_sets

    def lost(*args, **kwargs):  # the "transplanted" corrupted images are the clean ones
        sets = real(*args, **kwargs)
        _, clean, labels = sets.gap
        return PairSets(sets.fit, (clean, clean, labels), sets.gap_source)

    class Kept(logging.Handler):  # the logger may not propagate (the CLI sets it so)
        def emit(self, record):
            records.append(record)

    logger, handler = logging.getLogger("onnx_rectify"), Kept(logging.WARNING)
    logger.addHandler(handler)
    try:
        for builder, falls_back in ((real, False), (lost, True)):
            monkeypatch.setattr(workspace_module, "build_pair_sets", builder)
            records = []
            ws = Workspace(ShadowGraph.from_onnx(path), pairs, LabelledSet(x, y), None,
                           RectifyConfig(transplant="paste"))
            _check_fallback(ws, records, pairs, falls_back)
    finally:
        logger.removeHandler(handler)


def _check_fallback(ws, records, pairs, falls_back: bool) -> None:
    warned = [r for r in records if "transplanted trigger" in r.getMessage()]
    assert ws.gap_source.startswith("pairs") == falls_back, ws.gap_source
    assert bool(warned) == falls_back
    if falls_back:
        assert len(ws.fit[0]) == len(pairs) and len(ws.gap_sets[0]) == len(pairs)


@pytest.mark.parametrize("keep", ["budget"])
def test_a_drop_equal_to_the_budget_is_within_it(keep):
    """0.99 - 0.98 is 0.010000000000000009 in floats: a round that costs exactly the budget
    (one image in a hundred) is kept, one that costs more is not."""
    from types import SimpleNamespace

    from patcher.rectify.loop import judge

    for new_accuracy, kept in ((0.98, True), (0.97, False)):
        ws = SimpleNamespace(config=SimpleNamespace(budget=0.01),
                             accuracy=lambda at_least=None, a=new_accuracy: a)
        plan = SimpleNamespace(keep=keep, objective=None)
        verdict = judge(ws, plan, SimpleNamespace(reason="edit"), None, None, 0.99, 0.99, "")
        assert verdict.kept == kept, (new_accuracy, verdict)


def test_the_base_gap_measure_reuses_the_setup_check_until_a_weight_changes(tmp_path):
    """The transplanted-pairs check at setup measures the gap pairs; the loop's base
    measure takes that result (one pass less), and any later call after a weight change
    measures again, with the new weights."""
    from patcher.rectify import RectifyConfig
    from patcher.rectify.workspace import Workspace
    from patcher.samples import LabelledSet, Pairs

    path, x, y = _gemm_classifier(tmp_path)
    pairs = Pairs(x[:2] + 2.0, x[:2], y[:2])
    ws = Workspace(ShadowGraph.from_onnx(path), pairs, LabelledSet(x, y), None,
                   RectifyConfig(transplant="paste"))
    passes = []
    real = ws._measure_gaps
    ws._measure_gaps = lambda: passes.append(1) or real()
    first = ws.gaps()
    assert passes == [] and first == real()  # the setup pass's result, and it is current
    again = ws.gaps()
    assert len(passes) == 1 and again == first  # measured now, same weights, same figures
    layer = ws.layers[0]
    ws.add(layer.weight, torch.ones_like(ws.graph.weight(layer.weight)))
    changed = ws.gaps()
    assert len(passes) == 2 and changed != first


def test_workspace_weights_take_no_gradients_and_finetune_still_trains(tmp_path):
    """IG differentiates layer outputs only: the workspace's weights do not require grad
    (a third of each backward pass saved); the fine-tune edit turns its weight's on and
    restores every flag afterwards."""
    from patcher.edits.finetune import finetune_in_place
    from patcher.rectify import RectifyConfig
    from patcher.rectify.workspace import Workspace
    from patcher.samples import LabelledSet, Pairs

    path, x, y = _gemm_classifier(tmp_path)
    pairs = Pairs(x[:2] + 2.0, x[:2], y[:2])
    ws = Workspace(ShadowGraph.from_onnx(path), pairs, LabelledSet(x, y), None,
                   RectifyConfig(transplant="none"))
    assert not any(p.requires_grad for p in ws.graph.parameters())
    layer = ws.layers[-1]
    delta = finetune_in_place(ws.graph, layer.weight, ws.tensor(x[:8]),
                              torch.from_numpy((y[:8] + 1) % 3), steps=5, lr=0.1)
    assert float(delta.abs().max()) > 0
    assert not any(p.requires_grad for p in ws.graph.parameters())


def test_the_target_class_gap_is_against_the_clean_inputs_as_loaded(tmp_path):
    """tau = mean p_t(x~) - p0_t(x), p0 the model as loaded: an edit that sends clean and
    corrupted inputs to the target alike (trigger weight removed, target bias raised) has
    not removed the corruption's effect, although p_t(x~) - p_t(x) is zero after it; the
    same edit without the bias has (MobileNetV2 at 224: such edits cost 8 held-out points
    under the old measure)."""
    from patcher.rectify import RectifyConfig
    from patcher.rectify.workspace import Workspace
    from patcher.samples import LabelledSet, Pairs

    w = np.zeros((3, 5), np.float32)
    w[1, 0], w[2, 0], w[0, 4] = 3.0, -3.0, 10.0
    model = make_model([helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc",
                                         transB=1)],
                       [value_info("x", ["n", 5])], [value_info("y", ["n", 3])],
                       {"w": w, "b": np.zeros(3, np.float32)})
    path = tmp_path / "tb.onnx"
    path.write_bytes(model.SerializeToString())
    rng = np.random.default_rng(0)
    clean = np.zeros((40, 5), np.float32)
    clean[:, 0] = 2.0 * rng.choice([-1.0, 1.0], 40)
    labels = np.where(clean[:, 0] > 0, 1, 2).astype(np.int64)
    corrupted = clean.copy()
    corrupted[:, 4] = 1.0
    ws = Workspace(ShadowGraph.from_onnx(path), Pairs(corrupted, clean, labels),
                   LabelledSet(clean, labels), None, RectifyConfig(transplant="none"))
    base = ws.gaps()
    assert base.tau > 0.9 and base.flipped == 40
    no_trigger = torch.zeros(3, 5)
    no_trigger[0, 4] = -10.0
    ws.add("w", no_trigger)
    fixed = ws.gaps()
    assert abs(fixed.tau) < 1e-6 and fixed.flipped == 0
    ws.add("b", torch.tensor([20.0, 0.0, 0.0]))  # every input to the target class now
    alike = ws.gaps()
    p_t = torch.softmax(ws.graph(ws.tensor(clean))[0], 1)[:, 0]
    assert float(p_t.min()) > 0.99  # the clean inputs too: p_t(x~) - p_t(x) is zero
    assert alike.tau > 0.9 and alike.flipped == 40


def test_a_ranking_only_workspace_ranks_as_a_full_one_without_the_pair_sets(tmp_path):
    """``locate``'s workspace builds no transplanted pair sets (no gap passes) and records
    no resume points; its ranking is the full workspace's, score for score."""
    from patcher.rectify import RectifyConfig
    from patcher.rectify.locators import AttributionLocator
    from patcher.rectify.workspace import Workspace
    from patcher.samples import LabelledSet, Pairs

    path, x, y = _gemm_classifier(tmp_path)
    pairs = Pairs(x[:2] + 2.0, x[:2], y[:2])
    full = Workspace(ShadowGraph.from_onnx(path), pairs, LabelledSet(x, y), None,
                     RectifyConfig(transplant="paste"))
    only = Workspace(ShadowGraph.from_onnx(path), pairs, LabelledSet(x, y), None,
                     RectifyConfig(transplant="paste"), ranking_only=True)
    assert full.gap_source != "pairs" and len(full.fit[0]) > len(pairs)
    assert only.gap_source == "pairs" and len(only.fit[0]) == len(pairs)
    assert only.resume is None and only.statistics.recording is None
    assert AttributionLocator().rank(only) == AttributionLocator().rank(full)
