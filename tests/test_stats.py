"""Key statistics: float32 chunked products accumulated in float64 match the exact second
moment; a row cap keeps about that many keys, deterministically; the Kronecker-factored
form is exact where its assumption holds, and edits still use the exact C; the statistics
pass measures the base accuracy; an accuracy pass stops once its verdict is certain."""
from __future__ import annotations

import dataclasses
import importlib

import numpy as np
import pytest
import torch
from onnx import helper

from patcher.analysis import moments as key_moments
from patcher.rectify.config import EVAL_BATCH
from patcher.graph.keys import LayerTap, layer_keys
from patcher.graph.shadow import ShadowGraph
from patcher.analysis.moments import KeyMoments, collect_moments, iterate_batches
from tests.build import make_model, value_info


def _conv_model():
    rng = np.random.default_rng(0)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="L", pads=[1, 1, 1, 1])
    return ShadowGraph.from_onnx(make_model([node], [value_info("x", [None, 3, 12, 12])],
                                            [value_info("y", None)],
                                            {"w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32)}))


def test_chunked_float32_products_match_the_float64_second_moment(monkeypatch):
    monkeypatch.setattr(key_moments, "CHUNK_ROWS", 100)  # several chunks per batch
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


# ---------------------------------------------------------------- Kronecker-factored C

def test_kronecker_solve_and_whitening_equal_the_dense_factored_matrix():
    from patcher.analysis.moments import KroneckerMoments
    from patcher.analysis.stats import KroneckerStatistics

    gen = torch.Generator().manual_seed(0)
    fa, fb = torch.randn(4, 6, generator=gen, dtype=torch.float64), \
        torch.randn(9, 12, generator=gen, dtype=torch.float64)
    a, b = fa @ fa.T, fb @ fb.T
    moments = KroneckerMoments(KeyMoments(a.clone(), 1), KeyMoments(b.clone(), 1))
    st = KroneckerStatistics.from_moments("L", moments, ridge=1e-2)
    dense = torch.kron(a, b / torch.diagonal(b).mean())
    torch.testing.assert_close(moments.dense(), dense)
    reg = dense + 1e-2 * torch.diagonal(a).mean() * torch.eye(36, dtype=torch.float64)
    rows = torch.randn(5, 36, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(st.solve_rows(rows), rows @ torch.linalg.inv(reg))
    torch.testing.assert_close((st.whiten_rows(rows) ** 2).sum(),
                               torch.trace(rows @ torch.linalg.inv(reg) @ rows.T))
    evals = torch.linalg.eigvalsh(dense)
    assert st.condition_number == pytest.approx(float(evals.max() / evals.min()), rel=1e-6)
    assert st.kind == "kronecker"


def _unpadded_conv(channels: int = 3):
    rng = np.random.default_rng(0)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="L")
    return ShadowGraph.from_onnx(make_model([node], [value_info("x", [None, channels, 10, 10])],
                                            [value_info("y", None)],
                                            {"w": rng.standard_normal((2, channels, 3, 3))
                                             .astype(np.float32)}))


def _relative_error(x: np.ndarray) -> float:
    graph = _unpadded_conv(x.shape[1])
    layers = graph.editable_layers
    exact = collect_moments(graph, layers, iterate_batches(x, 50), mode="exact")["L"]
    factored = collect_moments(graph, layers, iterate_batches(x, 50), mode="kronecker")["L"]
    c = exact.second_moment
    return float((factored.dense() - c).norm() / c.norm())


def test_kronecker_factors_recover_c_when_channels_share_their_spatial_statistics():
    rng = np.random.default_rng(3)
    mix = np.array([[1.0, 0, 0], [0.8, 0.6, 0], [0.2, -0.5, 1.0]], dtype=np.float32)
    white = rng.standard_normal((400, 3, 10, 10)).astype(np.float32)
    separable = np.einsum("cd,ndhw->nchw", mix, white)  # C = (M M^T) (x) I exactly
    assert _relative_error(separable) < 0.05
    # control: channel 0 constant over each image, channels 1-2 white: no Kronecker form
    mixed = white.copy()
    mixed[:, 0] = white[:, 0, :1, :1]
    assert _relative_error(mixed) > 0.3


def test_statistics_kind_factors_only_wide_spatial_convolutions():
    from patcher.analysis.moments import statistics_kind

    graph = _conv_model()  # 3 -> 4 channels, 3x3: Kd 27 > 4
    layer = graph.editable_layers[0]
    assert statistics_kind(layer, "auto") == "kronecker"
    assert statistics_kind(layer, "exact") == "exact"
    wide = dataclasses.replace(layer, value_dim=64)  # Kd 27 <= 64 outputs: exact is cheap
    assert statistics_kind(wide, "auto") == "exact"
    assert statistics_kind(wide, "kronecker") == "kronecker"
    pointwise = dataclasses.replace(layer, shape=(4, 3, 1, 1), key_dim=3)
    assert statistics_kind(pointwise, "kronecker") == "exact"
    depthwise = dataclasses.replace(layer, shape=(3, 1, 3, 3), key_dim=9, value_dim=3, groups=3)
    assert statistics_kind(depthwise, "kronecker") == "exact"  # one channel: nothing to factor
    with pytest.raises(ValueError):
        statistics_kind(layer, "approximate")


def _conv_classifier(tmp_path):
    """Conv 3->6 (3x3, pad 1) -> Relu -> GlobalAveragePool -> Flatten -> Gemm 6->3."""
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["g"], name="pool"),
             helper.make_node("Flatten", ["g"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "fw"], ["y"], name="fc", transB=1)]
    model = make_model(nodes, [value_info("x", [None, 3, 8, 8])], [value_info("y", None)],
                       {"w": rng.standard_normal((6, 3, 3, 3)).astype(np.float32),
                        "fw": rng.standard_normal((3, 6)).astype(np.float32)})
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    x = rng.random((600, 3, 8, 8), dtype=np.float32)
    graph = ShadowGraph.from_onnx(path)
    with torch.no_grad():
        y = graph(torch.from_numpy(x))[0].argmax(1).numpy()
    y[::7] = (y[::7] + 1) % 3  # some wrong labels
    return path, x, y


def _rectifier(path, x, y, **config):
    from patcher.rectify import RectifyConfig
    from patcher.rectify.workspace import Workspace
    from patcher.samples import LabelledSet, Pairs

    pairs = Pairs(np.clip(x[:2] + 0.5, 0, 1), x[:2], y[:2])
    cfg = RectifyConfig(transplant="none", show_progress=False, **config)
    return Workspace(ShadowGraph.from_onnx(path), pairs, LabelledSet(x, y), None, cfg)


def test_an_edit_of_a_factored_layer_uses_its_exact_statistics(tmp_path, monkeypatch):
    statcache = importlib.import_module("patcher.rectify.statcache")

    monkeypatch.setattr(statcache, "MIN_SAMPLED_KEYS", 1 << 30)  # every key (no sample)
    path, x, y = _conv_classifier(tmp_path)
    exact = _rectifier(path, x, y, statistics="exact")
    factored = _rectifier(path, x, y, statistics="kronecker")
    from patcher.rectify.editkinds import RankOneEditKind
    from patcher.rectify.locators import AttributionLocator

    factored.statistics.compute()
    stats = factored.statistics.stats
    assert stats["conv"].kind == "kronecker" and stats["fc"].kind == "exact"
    assert all(np.isfinite(s.score) for s in AttributionLocator().rank(factored))
    conv = next(l for l in factored.layers if l.name == "conv")
    a, b = RankOneEditKind().fit(exact, conv)[0], RankOneEditKind().fit(factored, conv)[0]
    assert factored.statistics.exact_stats["conv"].kind == "exact"
    torch.testing.assert_close(a.delta, b.delta)


def test_an_edits_exact_statistics_beyond_the_key_cap_use_a_sample(tmp_path, monkeypatch):
    """Above exact_key_cap keys the edit's exact C comes from a seeded sample of them: the
    edit is reproducible, differs from the one from every key, and fits the pairs no worse
    (this toy's principal direction is ill-determined: the full-key fit removes 12% of the
    residual, a sampled one 12-73% by the draw, so the deltas themselves are not
    compared)."""
    statcache = importlib.import_module("patcher.rectify.statcache")
    from patcher.rectify.editkinds import RankOneEditKind

    path, x, y = _conv_classifier(tmp_path)
    full = _rectifier(path, x, y, statistics="exact")
    conv = next(l for l in full.layers if l.name == "conv")
    keys = full.statistics.for_edit(conv).cholesky  # every key (--statistics exact)
    monkeypatch.setattr(statcache, "MIN_SAMPLED_KEYS", 256)
    monkeypatch.setattr(statcache, "KEYS_PER_DIM", 16)
    cap = statcache.exact_key_cap(conv)
    sampled, again = (_rectifier(path, x, y, statistics="kronecker") for _ in range(2))
    a, b = RankOneEditKind().fit(full, conv)[0], RankOneEditKind().fit(sampled, conv)[0]
    c = RankOneEditKind().fit(again, conv)[0]
    torch.testing.assert_close(b.delta, c.delta, rtol=0, atol=0)
    assert keys is not None and cap < len(x) * 64  # fewer keys than the layer has
    assert not torch.equal(a.delta, b.delta)
    ratio = lambda e: e.fit_residual_after / e.fit_residual_before  # noqa: E731
    assert ratio(b) < ratio(a) + 0.1, (ratio(a), ratio(b))  # fits the pairs no worse


def test_the_statistics_pass_measures_the_base_accuracy(tmp_path):
    path, x, y = _conv_classifier(tmp_path)
    r = _rectifier(path, x, y)
    from_statistics = r.base_accuracy()
    assert r.statistics.stats and "evaluation" not in r.timings  # no separate evaluation pass
    assert from_statistics == r.accuracy() == pytest.approx(float(np.mean(
        r.graph(torch.from_numpy(x))[0].argmax(1).numpy() == y)))
    # a calibration set other than the eval set measures nothing
    other = _rectifier(path, x, y, calib_limit=300)
    assert not other.calibrates_on_eval


def test_an_accuracy_pass_stops_once_it_cannot_reach_its_threshold(tmp_path):
    path, x, y = _conv_classifier(tmp_path)
    r = _rectifier(path, x, y)
    full = r.accuracy()
    assert r.last_evaluated == 600
    assert r.accuracy(at_least=0.0) == full and r.last_evaluated == 600
    bound = r.accuracy(at_least=1.01)  # unreachable: decided after the first batch
    batch = EVAL_BATCH
    assert r.last_evaluated == batch
    assert full <= bound < 1.01
    with torch.no_grad():
        first = int((r.graph(torch.from_numpy(x[:batch]))[0].argmax(1).numpy() == y[:batch]).sum())
    assert bound == pytest.approx((first + 600 - batch) / 600)


def test_eigenvalue_correction_measures_c_along_the_factored_basis(monkeypatch):
    from patcher.analysis.moments import correct_spectra

    monkeypatch.setattr(key_moments, "SPECTRUM_ROWS", 10 ** 6)  # every key, for an exact comparison
    rng = np.random.default_rng(4)
    x = rng.standard_normal((200, 3, 10, 10)).astype(np.float32)
    x[:, 0] = x[:, 0, :1, :1]  # no Kronecker form (see the control above)
    graph = _unpadded_conv(3)
    layers = graph.editable_layers
    exact = collect_moments(graph, layers, iterate_batches(x, 50), mode="exact")["L"].second_moment
    moments = collect_moments(graph, layers, iterate_batches(x, 50), mode="kronecker")
    plain = moments["L"].dense()
    correct_spectra(graph, layers, moments, iterate_batches(x, 50))
    corrected = moments["L"]
    _, ua, _, ub = corrected.basis()
    q = torch.kron(ua, ub)
    assert corrected.spectrum_count == 200 * 64  # all keys were measured
    moved = corrected.to("cpu")
    assert moved.basis()[1] is not None and torch.equal(moved.spectrum(), corrected.spectrum())
    torch.testing.assert_close(corrected.spectrum().reshape(-1), torch.diagonal(q.T @ exact @ q),
                               rtol=1e-4, atol=1e-6)
    # the best diagonal in that basis: closer to C than the plain Kronecker product
    assert (corrected.dense() - exact).norm() < 0.8 * (plain - exact).norm()
    # more data moves the basis, so the spectrum measured along the old one is dropped
    corrected.add(layers[0], torch.from_numpy(x[:10]), graph.node_attributes("L"))
    assert corrected.spectrum_sum is None and corrected.spectrum_count == 0


def test_factored_statistics_are_cached_with_their_correction(tmp_path):
    path, x, y = _conv_classifier(tmp_path)
    first = _rectifier(path, x, y, statistics="kronecker",
                       cache_dir=str(tmp_path / "cache")).statistics
    first.compute()
    second = _rectifier(path, x, y, statistics="kronecker",
                        cache_dir=str(tmp_path / "cache")).statistics
    second.compute()
    assert first.cache_hits == 0 and second.cache_hits == 2
    torch.testing.assert_close(second.stats["conv"].spectrum, first.stats["conv"].spectrum)
    # the spectrum comes back with the basis it was measured along, not a recomputed one
    assert torch.equal(second.stats["conv"].channel_vectors, first.stats["conv"].channel_vectors)
    assert torch.equal(second.stats["conv"].offset_vectors, first.stats["conv"].offset_vectors)
    # exact statistics of the same layer are a different cache entry; so are fc's, which
    # --statistics exact sums over every key and the other modes over a capped sample
    third = _rectifier(path, x, y, statistics="exact",
                       cache_dir=str(tmp_path / "cache")).statistics
    third.compute()
    assert third.cache_hits == 0 and third.stats["conv"].kind == "exact"
    fourth = _rectifier(path, x, y, statistics="exact",
                        cache_dir=str(tmp_path / "cache")).statistics
    fourth.compute()
    assert fourth.cache_hits == 2


@pytest.mark.parametrize("case", ["padded-strided", "grouped-dilated", "conv1d"])
def test_factored_channel_moment_is_the_exact_moment_averaged_over_offsets(case, monkeypatch):
    """A is read off coverage-weighted pixels; it must equal the exact C's channel blocks
    averaged over kernel offsets, whatever the padding, stride, dilation and groups."""
    from patcher.analysis.moments import correct_spectra

    rng = np.random.default_rng(6)
    if case == "conv1d":
        attrs, w, shape = dict(pads=[2, 1], strides=[2]), (4, 3, 3), [None, 3, 17]
        x = rng.random((40, 3, 17), dtype=np.float32)
    elif case == "grouped-dilated":
        attrs, w, shape = dict(pads=[1, 2, 2, 1], dilations=[2, 1], group=2), (4, 2, 3, 3), \
            [None, 4, 9, 11]
        x = rng.random((40, 4, 9, 11), dtype=np.float32)
    else:
        attrs, w, shape = dict(pads=[1, 1, 1, 1], strides=[2, 2]), (5, 3, 3, 3), [None, 3, 11, 11]
        x = rng.random((40, 3, 11, 11), dtype=np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="L", **attrs)
    graph = ShadowGraph.from_onnx(make_model([node], [value_info("x", shape)],
                                             [value_info("y", None)],
                                             {"w": rng.standard_normal(w).astype(np.float32)}))
    layers = graph.editable_layers
    exact = collect_moments(graph, layers, iterate_batches(x, 16), mode="exact")["L"]
    moments = collect_moments(graph, layers, iterate_batches(x, 16), mode="kronecker")
    factored = moments["L"]
    kk = int(np.prod(w[2:]))
    ca = w[1]
    c = exact.second_moment.reshape(ca, kk, ca, kk)
    averaged = torch.einsum("aobo->ab", c) / kk
    torch.testing.assert_close(factored.channels.second_moment, averaged, rtol=1e-5, atol=1e-7)
    assert factored.channels.count == exact.count * kk
    monkeypatch.setattr(key_moments, "SPECTRUM_ROWS", 10 ** 6)
    correct_spectra(graph, layers, moments, iterate_batches(x, 16))
    _, ua, _, ub = factored.basis()
    q = torch.kron(ua, ub)
    torch.testing.assert_close(factored.spectrum().reshape(-1),
                               torch.diagonal(q.T @ exact.second_moment @ q), rtol=1e-4, atol=1e-7)


def test_eigenvalue_correction_samples_at_most_spectrum_rows_keys_per_batch(monkeypatch):
    from patcher.analysis.moments import correct_spectra

    monkeypatch.setattr(key_moments, "SPECTRUM_ROWS", 100)
    x = np.random.default_rng(7).random((30, 3, 10, 10), dtype=np.float32)
    graph = _unpadded_conv(3)
    layers = graph.editable_layers

    def corrected():
        moments = collect_moments(graph, layers, iterate_batches(x, 10), mode="kronecker")
        correct_spectra(graph, layers, moments, iterate_batches(x, 10))
        return moments["L"]
    once, again = corrected(), corrected()
    assert once.spectrum_count == 3 * 100  # 3 batches of 640 keys, 100 kept from each
    assert torch.equal(once.spectrum_sum, again.spectrum_sum)  # seeded


def test_statistics_of_one_layer_stop_the_forward_after_it(tmp_path):
    path, x, y = _conv_classifier(tmp_path)
    graph = ShadowGraph.from_onnx(path)
    conv = [l for l in graph.editable_layers if l.name == "conv"]
    seen = []
    handle = graph.register_hook(lambda node, ins, outs: seen.append(node.name), nodes=["fc"])
    try:
        early = collect_moments(graph, conv, iterate_batches(x, 100))["conv"]
        assert seen == []  # the forward ended at the conv: the head never ran
        full = collect_moments(graph, conv, iterate_batches(x, 100),
                               on_output=lambda batch, outputs: None)["conv"]
        assert len(seen) == 6  # with on_output the whole graph runs, 6 batches
    finally:
        handle.remove()
    assert early.count == full.count and torch.equal(early.sum_kk, full.sum_kk)


def test_corruption_is_not_transplanted_onto_the_class_it_flips_to(tmp_path, monkeypatch):
    """Images of the class a corrupted pair is flipped to gain nothing from the corruption
    (zero residual, zero gap); transplant draws from the other classes. (What is checked is
    the draw: the fallback to the pairs when the transplant carries no gap, which this
    random model's transplants may trigger, is left out.)"""
    from patcher.rectify import RectifyConfig
    from patcher.rectify.workspace import Workspace
    from patcher.samples import LabelledSet, Pairs

    monkeypatch.setattr(Workspace, "_use_pairs_if_transplant_misses", lambda self, pairs: None)

    path, x, y = _conv_classifier(tmp_path)
    graph = ShadowGraph.from_onnx(path)
    with torch.no_grad():
        predicted = graph(torch.from_numpy(x))[0].argmax(1).numpy()
    flipped = int(np.flatnonzero(predicted != y)[0])  # predicted one class, labelled another
    pairs = Pairs(x[flipped:flipped + 1], x[flipped:flipped + 1] * 0.5, y[flipped:flipped + 1])
    cfg = RectifyConfig(transplant="add", transplant_count=30, heldout_count=30,
                        show_progress=False)
    r = Workspace(ShadowGraph.from_onnx(path), pairs, LabelledSet(x, y), None, cfg)
    target = int(predicted[flipped])
    assert r._flipped_to(pairs) == {target}
    fit_labels = r.fit[2][1:].numpy()  # the transplanted pairs after the given one
    gap_labels = r.gap_sets[2].numpy()
    assert len(fit_labels) == 30 and len(gap_labels) == 30
    assert target not in set(fit_labels) | set(gap_labels)
    assert (y == target).sum() > 50  # the class was there to draw from
    # a pair the model still gets right restricts nothing
    right = int(np.flatnonzero(predicted == y)[0])
    kept = Pairs(x[right:right + 1], x[right:right + 1] * 0.5, y[right:right + 1])
    r2 = Workspace(ShadowGraph.from_onnx(path), kept, LabelledSet(x, y), None, cfg)
    assert r2._flipped_to(kept) == set()
    # one flip among three pairs is no target (scattered misclassification); two are
    three = np.array([flipped, right, np.flatnonzero(predicted == y)[1]])
    scattered = Pairs(x[three], x[three] * 0.5, y[three])
    assert Workspace(ShadowGraph.from_onnx(path), scattered, LabelledSet(x, y), None,
                    cfg)._flipped_to(scattered) == set()
    other = np.flatnonzero((predicted != y) & (predicted == target))[1]
    two = np.array([flipped, other, right])
    agreeing = Pairs(x[two], x[two] * 0.5, y[two])
    assert Workspace(ShadowGraph.from_onnx(path), agreeing, LabelledSet(x, y), None,
                    cfg)._flipped_to(agreeing) == {target}


def test_a_static_run_computes_the_statistics_of_its_layer_only(tmp_path):
    path, x, y = _conv_classifier(tmp_path)
    static = _rectifier(path, x, y, strategy="static")
    assert static.base_accuracy() == pytest.approx(_rectifier(path, x, y).base_accuracy())
    assert set(static.statistics.stats) == {"fc"}
    assert static.statistics.stats["fc"].kind == "exact"
    forced = _rectifier(path, x, y, layer="conv")
    forced.statistics.compute()
    assert set(forced.statistics.stats) == {"conv"}
    assert forced.statistics.stats["conv"].kind == "exact"
    from patcher.rectify.locators import AttributionLocator

    assert len(AttributionLocator().rank(forced)) == 2  # ranking fills in the other layers


@pytest.mark.parametrize("cond, shown", [(5e7, "up to 5e+07"), (9.8e301, "above 1e+16"),
                                          (float("inf"), "above 1e+16"),
                                          (float("nan"), "undefined (NaN)")])
def test_the_conditioning_warning_prints_meaningful_numbers(cond, shown):
    import logging

    from patcher.model.modelio import LOG
    from patcher.patch import warn_conditioning

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # the CLI's logging setup may stop propagation: listen here
    LOG.addHandler(handler)
    try:
        warn_conditioning({"L": {"condition_number": cond, "ridge": 1e-3}})
    finally:
        LOG.removeHandler(handler)
    assert len(records) == 1 and f"condition number {shown} at L" in records[0].getMessage()


# --------------------------------------------------------------- streamed statistics paths
def _double(shape):
    return RNG_STREAM.standard_normal(shape)


RNG_STREAM = np.random.default_rng(21)
#: One float64 conv per case (so every path runs in float64): pointwise convs take the
#: channel-covariance path, the others are unfolded by chunks (narrow keys in float64).
STREAM_CASES = {
    "pointwise": ({}, [3, 6, 9, 7], (5, 6, 1, 1)),
    "pointwise_stride2": ({"strides": [2, 2]}, [3, 6, 9, 7], (5, 6, 1, 1)),
    "pointwise_small_map": ({}, [4, 12, 2, 3], (5, 12, 1, 1)),  # fewer pixels than channels
    "pointwise_padded": ({"pads": [1, 1, 1, 1]}, [2, 6, 5, 5], (5, 6, 1, 1)),  # unfolded
    "depthwise": ({"group": 6, "pads": [1, 1, 1, 1]}, [3, 6, 8, 8], (6, 1, 3, 3)),
    "grouped_strided": ({"group": 2, "strides": [2, 2], "pads": [0, 1, 1, 0]}, [3, 6, 9, 8],
                        (4, 3, 3, 3)),
    "wide_3x3": ({"pads": [1, 1, 1, 1]}, [2, 8, 6, 6], (4, 8, 3, 3)),  # Kd 72: float32 chunks
}


@pytest.mark.parametrize("case", sorted(STREAM_CASES))
def test_streamed_statistics_equal_the_exact_sum_of_key_products(case, monkeypatch):
    """sum k k^T by the streamed paths (pointwise channel covariance, chunked unfolding,
    per-group keys) equals the float64 sum over the layer's unfolded keys; no unfolded
    chunk is larger than CHUNK_BYTES unless one input alone is."""
    import patcher.analysis.moments as moments_module
    from onnx import TensorProto
    from patcher.graph.keys import pointwise_pixels

    attrs, shape, wshape = STREAM_CASES[case]
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="L", **attrs)
    model = make_model([node], [value_info("x", shape, TensorProto.DOUBLE)],
                       [value_info("y", None, TensorProto.DOUBLE)], {"w": _double(wshape)})
    graph = ShadowGraph.from_onnx(model)
    layer = graph.editable_layers[0]
    x = torch.from_numpy(_double(shape))
    reference = layer_keys(layer, x, graph.node_attributes("L")).reshape(-1, layer.key_dim)
    monkeypatch.setattr(moments_module, "CHUNK_BYTES", 2 * reference[0].numel() * 4 *
                        (reference.shape[0] // shape[0]))  # two inputs' keys per chunk
    monkeypatch.setattr(moments_module, "CHUNK_ROWS", 16)
    unfolded = []
    real_layer_keys = moments_module.layer_keys
    monkeypatch.setattr(moments_module, "layer_keys", lambda *a: unfolded.append(
        real_layer_keys(*a)) or unfolded[-1])
    m = collect_moments(graph, [layer], iterate_batches(x.numpy(), shape[0]),
                        mode="exact")["L"]
    torch.testing.assert_close(m.sum_kk, reference.T @ reference, rtol=1e-12, atol=1e-12)
    assert m.count == reference.shape[0]
    pointwise = pointwise_pixels(layer, x, graph.node_attributes("L")) is not None
    assert pointwise == (case.startswith("pointwise") and case != "pointwise_padded")
    if pointwise:
        assert not unfolded  # nothing unfolded at all
    else:
        assert len(unfolded) == -(-shape[0] // 2)  # chunks of two inputs
        assert max(k.numel() * 4 for k in unfolded) <= moments_module.CHUNK_BYTES


def test_the_spectrum_sample_is_the_same_unfolded_whole_or_by_chunks(monkeypatch):
    """The eigenvalue correction's seeded key sample, gathered chunk by chunk, gives the
    spectrum that the whole batch's keys give."""
    import patcher.analysis.moments as moments_module
    from patcher.analysis.moments import KroneckerMoments, correct_spectra

    node = helper.make_node("Conv", ["x", "w"], ["y"], name="L", pads=[1, 1, 1, 1])
    model = make_model([node], [value_info("x", [4, 3, 8, 8])], [value_info("y", None)],
                       {"w": RNG_STREAM.standard_normal((2, 3, 3, 3)).astype(np.float32)})
    graph = ShadowGraph.from_onnx(model)
    layer = graph.editable_layers[0]
    x = RNG_STREAM.standard_normal((4, 3, 8, 8)).astype(np.float32)
    monkeypatch.setattr(moments_module, "SPECTRUM_ROWS", 50)
    spectra = []
    for chunk_bytes in (1 << 30, 64 * 27 * 4):  # whole batch; one input per chunk
        monkeypatch.setattr(moments_module, "CHUNK_BYTES", chunk_bytes)
        moments = collect_moments(graph, [layer], iterate_batches(x, 4), mode="kronecker")
        assert isinstance(moments["L"], KroneckerMoments)
        correct_spectra(graph, [layer], moments, iterate_batches(x, 4))
        assert moments["L"].spectrum_count == 50
        spectra.append(moments["L"].spectrum())
    torch.testing.assert_close(spectra[0], spectra[1], rtol=1e-6, atol=1e-9)


def test_a_wide_dense_layer_keeps_its_keys_and_its_factored_c_is_the_exact_one(monkeypatch):
    """A Gemm wider than WIDE_KEY_DIM keeps its key rows, not a d x d sum: its whitening,
    solve and inverse (an operator, as edits use it) equal the dense exact statistics', with
    fewer keys than inputs (C singular, the ridge decides)."""
    import patcher.analysis.moments as moments_module
    from patcher.analysis.moments import KeyRows
    from patcher.analysis.stats import LayerStatistics, LowRankStatistics, statistics_from_moments
    from patcher.edits.rankone import solve_rank_one

    d = 40
    node = helper.make_node("Gemm", ["x", "w"], ["y"], name="L", transB=1)
    model = make_model([node], [value_info("x", ["n", d])], [value_info("y", None)],
                       {"w": RNG_STREAM.standard_normal((3, d)).astype(np.float32)})
    graph = ShadowGraph.from_onnx(model)
    layer = graph.editable_layers[0]
    x = RNG_STREAM.standard_normal((12, d)).astype(np.float32)
    exact = collect_moments(graph, [layer], iterate_batches(x, 5), total=12, mode="exact")["L"]
    monkeypatch.setattr(moments_module, "WIDE_KEY_DIM", 16)
    assert moments_module.statistics_kind(layer, "auto") == "low-rank"
    rows = collect_moments(graph, [layer], iterate_batches(x, 5), total=12)["L"]
    assert isinstance(rows, KeyRows) and tuple(rows.rows.shape) == (12, d) and rows.count == 12
    dense = LayerStatistics.from_moments("L", exact)
    low = statistics_from_moments("L", rows)
    assert isinstance(low, LowRankStatistics) and low.basis.shape == (d, 12)
    assert low.ridge_value == pytest.approx(dense.ridge_value, rel=1e-9)
    b = torch.from_numpy(RNG_STREAM.standard_normal((3, 2, d)))
    torch.testing.assert_close(low.solve_rows(b), dense.solve_rows(b), rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(low.whiten_rows(b).flatten(1).norm(dim=1),
                               dense.whiten_rows(b).flatten(1).norm(dim=1), rtol=1e-7, atol=1e-9)
    keys = torch.from_numpy(RNG_STREAM.standard_normal((4, 1, 1, d)))
    residual = torch.from_numpy(RNG_STREAM.standard_normal((4, 1, 1, 3)))
    a = solve_rank_one("L", "w", keys, residual, dense.inverse)
    b_edit = solve_rank_one("L", "w", keys, residual, low.inverse.to(torch.float64))
    torch.testing.assert_close(b_edit.direction, a.direction, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(b_edit.magnitude, a.magnitude, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("shape, attrs, spatial", [
    ((8, 4, 3, 3), {"pads": [1, 1, 1, 1], "strides": [2, 2]}, (9, 11)),
    ((6, 2, 3, 5), {"pads": [0, 2, 1, 0], "dilations": [2, 1], "group": 3}, (10, 12)),
    ((4, 1, 3, 3), {"pads": [1, 1, 1, 1], "group": 4}, (7, 7)),      # depthwise
    ((4, 4, 3, 3), {"auto_pad": "SAME_UPPER", "strides": [2, 2]}, (8, 7)),
    ((5, 3, 3), {"pads": [1, 2]}, (13,)),                             # 1-D
    ((5, 3, 3, 3), {}, (6, 6)),                                       # no padding
])
def test_sampled_conv_keys_are_the_unfolded_rows_without_padding_the_input(shape, attrs,
                                                                           spatial):
    """Keys gathered by index (padded pixels as zeros, the input never padded) equal the
    rows of the unfolded keys, in either memory layout."""
    from types import SimpleNamespace

    from patcher.graph.keys import conv_keys, sampled_conv_keys

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, shape[1] * attrs.get("group", 1), *spatial, generator=generator)
    layer = SimpleNamespace(name="L", shape=shape, groups=attrs.get("group", 1),
                            orientation="conv", key_dim=int(np.prod(shape[1:])))
    rows = conv_keys(x, layer, attrs)
    rows = rows.reshape(-1, rows.shape[-1])
    picks = torch.randint(rows.shape[0], (200,), generator=generator)
    assert torch.equal(sampled_conv_keys(layer, x, attrs, picks), rows[picks])
    if x.dim() == 4:
        last = x.contiguous(memory_format=torch.channels_last)
        assert torch.equal(sampled_conv_keys(layer, last, attrs, picks), rows[picks])
