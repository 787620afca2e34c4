"""Causal localisation (interventions on the shadow graph), CARE's units and their rankings,
the particle swarm, the multiplier write-back (exact under onnxruntime through Flatten and
for Conv input channels), the rate objective, and CARE's repair end to end through the CLI."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import helper

import onnxruntime as ort

from patcher.edits.care import (MIN_RATE_REMOVED, PENALTY, RATE_DONE, care_repair,
                                centre_bias, centre_bias_delta, clean_centres, grown_repair,
                                misbehaviour_rate, removes_enough, scaled_logits, shrunk,
                                unit_scale_delta)
from patcher.analysis.causal import (SiteRunner, default_unit_site, layer_causal_effects,
                                     neuron_causal_effects, rank_agreement, swap_probabilities,
                                     unit_effects, unit_site)
from patcher.cli import main
from patcher.errors import RectifyError
from patcher.graph.shadow import ShadowGraph
from patcher.edits.swarm import particle_swarm
from patcher.model.modelio import load_model
from patcher.model.writeback import apply_deltas, read_provenance
from tests.build import make_model, value_info
from tests.test_patch_end_to_end import _acc, _asr, patch_cli, trojaned  # noqa: F401  (fixture)

RNG = np.random.default_rng(11)


def _mlp(residual: bool = False):
    """x[.,6] -> Gemm A (8) -> Relu -> Gemm B (5) [+ skip from x through Gemm S] -> logits."""
    w = lambda *s: RNG.standard_normal(s).astype(np.float32)  # noqa: E731
    nodes = [helper.make_node("Gemm", ["x", "wa", "ba"], ["ha"], name="A", transB=1),
             helper.make_node("Relu", ["ha"], ["ra"], name="relu"),
             helper.make_node("Gemm", ["ra", "wb", "bb"], ["hb"], name="B", transB=1)]
    inits = {"wa": w(8, 6), "ba": w(8), "wb": w(5, 8), "bb": w(5)}
    out = "hb"
    if residual:
        nodes += [helper.make_node("Gemm", ["x", "ws"], ["hs"], name="S", transB=1),
                  helper.make_node("Add", ["hb", "hs"], ["y"], name="add")]
        inits["ws"] = w(5, 6)
        out = "y"
    return ShadowGraph.from_onnx(make_model(nodes, [value_info("x", [None, 6])],
                                            [value_info(out, None)], inits))


def _pair(graph, n=3):
    x = torch.from_numpy(RNG.standard_normal((n, 6)).astype(np.float32))
    xt = x + torch.from_numpy(RNG.standard_normal((n, 6)).astype(np.float32))
    with torch.no_grad():
        labels = graph(x)[0].argmax(1)
    return xt, x, labels


def _p(graph, x, labels):
    with torch.no_grad():
        return torch.softmax(graph(x)[0].to(torch.float64), 1)[torch.arange(len(x)), labels]


@pytest.mark.parametrize("layer", ["A", "B"])
def test_swapping_a_layers_whole_output_restores_the_clean_prediction_exactly(layer):
    graph = _mlp()
    corrupted, clean, labels = _pair(graph)
    swapped = swap_probabilities(graph, graph.layer(layer), corrupted, clean, labels)
    assert torch.equal(swapped, _p(graph, clean, labels))
    assert not torch.equal(_p(graph, corrupted, labels), _p(graph, clean, labels))


def test_layer_effects_on_a_chain_are_all_complete_and_a_skip_path_breaks_that():
    chain = _mlp()
    corrupted, clean, labels = _pair(chain)
    effects = layer_causal_effects(chain, chain.editable_layers, corrupted, clean, labels, 0.5)
    assert all(e.restored == pytest.approx(1.0, abs=1e-9) for e in effects)
    assert [e.score for e in effects] == sorted((e.score for e in effects), reverse=True)
    residual = _mlp(residual=True)
    corrupted, clean, labels = _pair(residual)
    by_layer = {e.layer: e for e in layer_causal_effects(residual, residual.editable_layers,
                                                         corrupted, clean, labels, 0.5)}
    # A and B carry only part of the signal: x also reaches the output through S
    assert by_layer["A"].restored != pytest.approx(1.0, abs=1e-6)


def test_single_neuron_swap_effects_sum_to_the_whole_for_the_output_layer():
    """Swapping logits one at a time: each effect is that logit's own; the swapped set of
    all neurons is the whole swap."""
    graph = _mlp()
    corrupted, clean, labels = _pair(graph, 1)
    layer = graph.layer("B")
    all_neurons = swap_probabilities(graph, layer, corrupted, clean, labels, list(range(5)))
    assert torch.equal(all_neurons, swap_probabilities(graph, layer, corrupted, clean, labels))


def test_neuron_ace_is_zero_for_a_neuron_that_cannot_reach_the_output():
    graph = _mlp()
    with torch.no_grad():
        graph.weight("wb")[:, 3] = 0.0  # hidden unit 3 of A no longer reaches the output
    corrupted, clean, labels = _pair(graph)
    effects = neuron_causal_effects(graph, graph.layer("A"), corrupted, clean, labels, values=5)
    # zero up to float32 rounding of the logits (BLAS may sum in another order)
    assert effects.ace[3] < 1e-7 and abs(effects.swap[3]) < 1e-7
    assert effects.ace.max() > 1e-3
    assert effects.order[0] != 3 and len(effects.order) == 8


def test_the_swarm_is_deterministic_for_a_seed_and_finds_a_quadratics_minimum():
    target = np.array([0.3, -1.2, 2.0])
    f = lambda p: ((p - target) ** 2).sum(1)  # noqa: E731
    low, high = np.full(3, -3.0), np.full(3, 3.0)
    a = particle_swarm(f, low, high, particles=16, iterations=60, seed=5)
    b = particle_swarm(f, low, high, particles=16, iterations=60, seed=5)
    c = particle_swarm(f, low, high, particles=16, iterations=60, seed=6)
    assert np.array_equal(a.best, b.best) and a.history == b.history
    assert not np.array_equal(a.best, c.best)
    assert np.allclose(a.best, target, atol=1e-2)
    assert a.history == sorted(a.history, reverse=True)  # the best never gets worse
    start = particle_swarm(f, low, high, particles=4, iterations=0, seed=0, start=target)
    assert start.best_value == 0.0


def test_the_swarm_rejects_bad_bounds():
    with pytest.raises(RectifyError):
        particle_swarm(lambda p: p.sum(1), np.ones(2), np.zeros(2))


def _feature_model(head: str = "gemm_t", pool: bool = False, groups: int = 1):
    """x[., 2, 6, 6] -> Conv (4 ch, 3x3, pad 1) -> Relu -> Conv B (4 ch, groups) -> Relu ->
    [GlobalAveragePool] -> Flatten -> dense D (8) -> Relu -> Gemm E (3) -> logits. ``head``:
    how D stores its weight (Gemm transB=1 ``gemm_t``, transB=0 ``gemm``, ``matmul``)."""
    w = lambda *s: (0.5 * RNG.standard_normal(s)).astype(np.float32)  # noqa: E731
    nodes = [helper.make_node("Conv", ["x", "wa", "ba"], ["ha"], name="A", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["ha"], ["ra"], name="ra"),
             helper.make_node("Conv", ["ra", "wb"], ["hb"], name="B", pads=[1, 1, 1, 1],
                              group=groups),
             helper.make_node("Relu", ["hb"], ["rb"], name="rb")]
    inits = {"wa": w(4, 2, 3, 3), "ba": w(4), "wb": w(4, 4 // groups, 3, 3)}
    feature = "rb"
    if pool:
        nodes.append(helper.make_node("GlobalAveragePool", ["rb"], ["pooled"], name="gap"))
        feature = "pooled"
    nodes.append(helper.make_node("Flatten", [feature], ["flat"], name="flatten"))
    k = 4 if pool else 4 * 36
    if head == "gemm_t":
        nodes.append(helper.make_node("Gemm", ["flat", "wd", "bd"], ["hd"], name="D", transB=1))
        inits.update(wd=w(8, k), bd=w(8))
    elif head == "gemm":
        nodes.append(helper.make_node("Gemm", ["flat", "wd", "bd"], ["hd"], name="D"))
        inits.update(wd=w(k, 8), bd=w(8))
    else:
        nodes.append(helper.make_node("MatMul", ["flat", "wd"], ["hd"], name="D"))
        inits.update(wd=w(k, 8))
    nodes += [helper.make_node("Relu", ["hd"], ["rd"], name="rd"),
              helper.make_node("Gemm", ["rd", "we", "be"], ["y"], name="E", transB=1)]
    inits.update(we=w(3, 8), be=w(3))
    return make_model(nodes, [value_info("x", [None, 2, 6, 6])], [value_info("y", None)], inits)


def _written_logits(tmp_path, proto, deltas, x):
    """Logits of ``proto`` with ``deltas`` written into its file, under onnxruntime."""
    path = tmp_path / "base.onnx"
    onnx.save(proto, str(path))
    patched, _ = apply_deltas(load_model(path), {k: v.numpy() for k, v in deltas.items()})
    session = ort.InferenceSession(patched.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x.numpy()})[0]


@pytest.mark.parametrize("head", ["gemm_t", "gemm", "matmul"])
def test_multipliers_on_flattened_units_are_exactly_a_weight_edit_under_onnxruntime(
        tmp_path, head):
    """Multipliers on units of the flattened map feeding D (channel x position), written as
    scales of D's weight slices: onnxruntime on the written file gives the shadow graph's
    logits with the units multiplied."""
    proto = _feature_model(head)
    graph = ShadowGraph.from_onnx(proto)
    x = torch.from_numpy(RNG.standard_normal((6, 2, 6, 6)).astype(np.float32))
    site = unit_site(graph, graph.layer("D"), x[:1])
    assert (site.units, site.axis, site.spatial) == (144, 1, True)
    assert "Flatten" in site.path
    units, multipliers = [0, 37, 71, 143], [-9.5, 0.0, 3.25, 0.5]
    runner = SiteRunner(graph, site, x)
    with torch.no_grad():
        expect = runner.scaled_logits(units, multipliers).numpy()
        base = runner.logits().numpy()
        assert np.allclose(base, graph(x)[0].numpy(), atol=1e-6)  # unreplaced: the model
    layer = graph.layer("D")
    delta = unit_scale_delta(layer, graph.weight(layer.weight), units, multipliers)
    assert int((delta != 0).any(dim=0 if head == "gemm_t" else 1).sum()) == 4
    got = _written_logits(tmp_path, proto, {layer.weight: delta}, x)
    assert np.allclose(got, expect, atol=1e-4) and not np.allclose(got, base, atol=1e-2)


@pytest.mark.parametrize("groups", [1, 2])
def test_multipliers_on_conv_input_channels_are_exactly_a_weight_edit(tmp_path, groups):
    """A unit of a Conv's input is a channel (every position alike); its multiplier is the
    scale of the weight's input-channel slice, within its group for a grouped Conv."""
    proto = _feature_model(groups=groups)
    graph = ShadowGraph.from_onnx(proto)
    x = torch.from_numpy(RNG.standard_normal((5, 2, 6, 6)).astype(np.float32))
    site = unit_site(graph, graph.layer("B"), x[:1])
    assert (site.units, site.axis, site.spatial) == (4, 1, False)
    units, multipliers = [1, 3], [-2.0, 4.0]
    runner = SiteRunner(graph, site, x)
    with torch.no_grad():
        expect = runner.scaled_logits(units, multipliers).numpy()
    layer = graph.layer("B")
    delta = unit_scale_delta(layer, graph.weight(layer.weight), units, multipliers)
    got = _written_logits(tmp_path, proto, {layer.weight: delta}, x)
    assert np.allclose(got, expect, atol=1e-4)
    touched = (delta != 0).flatten(2).any(2)  # [out channel, channel within group]
    if groups == 2:  # channel 1 is group 0's second, channel 3 group 1's second
        assert touched[:2, 1].all() and touched[2:, 1].all() and not touched[:, 0].any()
    else:
        assert touched[:, [1, 3]].all() and not touched[:, [0, 2]].any()


def test_default_site_is_the_flattened_map_and_pooled_features_are_refused():
    x = torch.zeros(1, 2, 6, 6)
    graph = ShadowGraph.from_onnx(_feature_model())
    assert default_unit_site(graph, graph.editable_layers, x).consumer.name == "D"
    pooled = ShadowGraph.from_onnx(_feature_model(pool=True))
    with pytest.raises(RectifyError, match="pooled channels"):
        default_unit_site(pooled, pooled.editable_layers, x)
    with pytest.raises(RectifyError, match="graph input"):
        unit_site(graph, graph.layer("A"), x)
    mlp = _mlp()  # A reads the graph input with no node between: the units are those B reads
    site = default_unit_site(mlp, mlp.editable_layers, torch.zeros(1, 6))
    assert site.consumer.name == "B" and not site.spatial and site.units == 8


def _image_mlp(trans_b: int = 1, alpha: float = 1.0, beta: float = 1.0):
    """x[., 1, 4, 4] -> Flatten -> Gemm A (8) -> Relu -> Gemm B (3): an MLP on images
    (its own seed: the other tests' models stay as they were)."""
    rng = np.random.default_rng(5)
    w = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    nodes = [helper.make_node("Flatten", ["x"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "wa", "ba"], ["ha"], name="A", transB=trans_b,
                              alpha=alpha, beta=beta),
             helper.make_node("Relu", ["ha"], ["ra"], name="relu"),
             helper.make_node("Gemm", ["ra", "wb", "bb"], ["y"], name="B", transB=1)]
    inits = {"wa": w(8, 16) if trans_b else w(16, 8), "ba": w(8), "wb": w(3, 8), "bb": w(3)}
    return make_model(nodes, [value_info("x", [None, 1, 4, 4])], [value_info("y", None)], inits)


def test_an_mlps_default_site_is_its_input_pixels_and_their_multipliers_are_a_weight_edit(
        tmp_path):
    """On an MLP fed through Flatten, CARE's units are the pixels the first dense layer
    reads (a hidden unit mixes every pixel; a patch trigger lives in a few): scaling pixel
    u is exactly scaling row u of A's key axis, under onnxruntime."""
    model = _image_mlp()
    graph = ShadowGraph.from_onnx(model)
    x = torch.from_numpy(np.random.default_rng(6).random((5, 1, 4, 4)).astype(np.float32))
    site = default_unit_site(graph, graph.editable_layers, x[:1])
    assert site.consumer.name == "A" and site.from_input and site.units == 16
    assert "the model input" in site.path and "Flatten" in site.path
    units, m = [0, 5, 15], np.array([0.0, -2.0, 3.5])
    with torch.no_grad():
        expect = SiteRunner(graph, site, x).scaled_logits(units, m).numpy()
    layer = graph.layer("A")
    delta = unit_scale_delta(layer, graph.weight(layer.weight), units, m)
    got = _written_logits(tmp_path, model, {layer.weight: delta}, x)
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5)
    scaled = x.clone().reshape(5, 16)
    scaled[:, units] *= torch.from_numpy(m).float()
    with torch.no_grad():
        direct = graph(scaled.reshape(5, 1, 4, 4))[0].numpy()
    np.testing.assert_allclose(got, direct, rtol=1e-5, atol=1e-5)


def test_unit_rankings_give_nothing_to_a_unit_that_cannot_reach_the_output():
    graph = ShadowGraph.from_onnx(_feature_model())
    with torch.no_grad():
        graph.weight("wd")[:, 5] = 0.0  # unit 5 of the flattened map is never read
    x = torch.from_numpy(RNG.random((12, 2, 6, 6)).astype(np.float32))
    triggered = x.clone()
    triggered[:, :, 4:, 4:] = 1.0
    site = unit_site(graph, graph.layer("D"), x[:1])
    effects = unit_effects(graph, site, triggered, x, torch.zeros(12, dtype=torch.long), 0)
    assert effects.care[5] == 0.0 and abs(effects.swap[5]) < 1e-12
    assert effects.care.max() > 0 and effects.care_order[0] != 5
    assert len(effects.swap_order) == 144 and 0 <= effects.overlap(5) <= 5


def test_the_rate_objective_counts_argmax_hits_and_weighs_accuracy():
    """Before the search, CARE's objective is (1 - alpha) rate + alpha (1 - accuracy) with
    the rate the share of triggered inputs predicted as the target (or, without a target,
    misclassified); the search never ends above it (one particle is the identity)."""
    graph = ShadowGraph.from_onnx(_feature_model())
    x = torch.from_numpy(RNG.random((40, 2, 6, 6)).astype(np.float32))
    with torch.no_grad():
        predicted = graph(x)[0].argmax(1)
    site = unit_site(graph, graph.layer("D"), x[:1])
    labels = torch.full((20,), 2, dtype=torch.long)
    target = int(predicted[:20].mode().values)
    eval_y = predicted[20:].clone()
    eval_y[:5] = (eval_y[:5] + 1) % 3          # accuracy 75% on the clean part
    repair = care_repair(graph, site, [3, 40], x[:20], labels, x[20:], eval_y, target,
                         alpha=0.2, particles=4, iterations=0)
    rate = float((predicted[:20] == target).double().mean())
    assert repair.rate_before == pytest.approx(rate) and repair.accuracy_before == 0.75
    assert repair.objective_before == pytest.approx(0.8 * rate + 0.2 * 0.25)
    assert repair.objective_after <= repair.objective_before
    untargeted = care_repair(graph, site, [3], x[:20], labels, x[20:], eval_y, None,
                             particles=2, iterations=0)
    assert untargeted.rate_before == pytest.approx(float((predicted[:20] != 2).double().mean()))
    searched = care_repair(graph, site, [3, 40, 77], x[:20], labels, x[20:], eval_y, target,
                           particles=8, iterations=15, patience=5)
    assert searched.objective_after <= searched.objective_before
    assert len(searched.swarm.history) <= 15
    assert np.all(np.abs(searched.multipliers) <= 10.0)
    assert np.allclose(shrunk(searched.multipliers, 0.5) - 1, 0.5 * (searched.multipliers - 1))


def _site_case(n: int = 40):
    """The feature model, its D site, inputs whose first half is 'triggered', the target
    (the commonest prediction there) and labels for the clean half."""
    graph = ShadowGraph.from_onnx(_feature_model())
    x = torch.from_numpy(RNG.random((n, 2, 6, 6)).astype(np.float32))
    with torch.no_grad():
        predicted = graph(x)[0].argmax(1)
    site = unit_site(graph, graph.layer("D"), x[:1])
    target = int(predicted[:n // 2].mode().values)
    return graph, site, x, predicted, target


def test_the_agreement_guard_bounds_changed_clean_predictions_not_accuracy():
    """guard="agreement": the penalty is PENALTY x (share of clean predictions that differ
    from the model's - max_drop)+, so a repair that breaks some clean predictions and fixes
    as many pays for the broken ones, where the accuracy guard sees no loss."""
    graph, site, x, predicted, target = _site_case()
    triggered, clean = x[:20], x[20:]
    labels = torch.full((20,), 2, dtype=torch.long)
    units, m = [3, 40, 77, 100], np.array([-8.0, 9.0, -7.0, 6.0])
    runner = SiteRunner(graph, site, torch.cat([triggered, clean]))
    with torch.no_grad():
        moved = runner.scaled_logits(units, m).argmax(1)
    changed = moved[20:] != predicted[20:]
    assert changed.any(), "the multipliers must change some clean predictions"
    # labels: half the changed predictions were right before, half become right after
    eval_y = predicted[20:].clone()
    flips = torch.nonzero(changed).flatten()
    eval_y[flips[::2]] = moved[20:][flips[::2]]
    rate = float((moved[:20] == target).double().mean())
    error = float((moved[20:] != eval_y).double().mean())
    error0 = float((predicted[20:] != eval_y).double().mean())
    share = float(changed.double().mean())
    for guard, over in (("agreement", share), ("accuracy", error - error0)):
        repair = care_repair(graph, site, units, triggered, labels, clean, eval_y, target,
                             particles=1, iterations=0, start=m, guard=guard, max_drop=0.0)
        expect = 0.8 * rate + 0.2 * error + PENALTY * max(0.0, over)
        assert repair.objective_after == pytest.approx(expect)
    assert share > error - error0  # the two guards differ on this repair
    with pytest.raises(RectifyError, match="unknown CARE guard"):
        care_repair(graph, site, units, triggered, labels, clean, eval_y, target, guard="x")


def test_the_fidelity_term_adds_the_clean_kl_divergence_from_the_model():
    graph, site, x, predicted, target = _site_case()
    labels = torch.full((20,), 2, dtype=torch.long)
    units, m = [3, 40], np.array([2.0, -1.0])
    plain = care_repair(graph, site, units, x[:20], labels, x[20:], predicted[20:], target,
                        particles=1, iterations=0, start=m, max_drop=1.0)
    kept = care_repair(graph, site, units, x[:20], labels, x[20:], predicted[20:], target,
                       particles=1, iterations=0, start=m, max_drop=1.0, fidelity=0.5)
    runner = SiteRunner(graph, site, x[20:])
    with torch.no_grad():
        p0 = torch.log_softmax(runner.logits().double(), 1)
        p1 = torch.log_softmax(runner.scaled_logits(units, m).double(), 1)
    kl = float((p0.exp() * (p0 - p1)).sum(1).mean())
    assert kl > 0 and kept.objective_after == pytest.approx(plain.objective_after + 0.5 * kl)


def test_growing_the_repaired_units_starts_from_the_last_best_and_stops_when_it_stalls():
    """k along the schedule, each search starting at the previous best (so the objective
    never rises), the units a prefix of the order; a step that does not lower the
    objective is not taken; growing stops once the rate is at most RATE_DONE."""
    graph, site, x, predicted, target = _site_case()
    labels = torch.full((20,), 2, dtype=torch.long)
    order = list(range(0, 144, 3))
    best, steps = grown_repair(graph, site, order, (1, 2, 4, 8, 16), x[:20], labels, x[20:],
                               predicted[20:], target, particles=6, iterations=4, seed=3)
    values = [s.objective_after for s in steps]
    assert all(b <= a + 1e-12 for a, b in zip(values, values[1:]))
    assert [s.units for s in steps] == [1, 2, 4, 8, 16][:len(steps)]
    assert best.units == order[:len(best.units)]
    taken = [s.units for s in steps].index(len(best.units))
    assert best.objective_after == values[taken] == min(values)
    assert all(v > values[taken] for v in values[:taken])  # the first k reaching it
    assert len(steps) == 5 or best.rate_after <= RATE_DONE  # stopped early only when done
    fixed, only = grown_repair(graph, site, order, (3,), x[:20], labels, x[20:],
                               predicted[20:], target, particles=4, iterations=2)
    assert len(only) == 1 and fixed.units == order[:3]


def test_the_swarm_starts_spread_over_the_box_with_one_particle_at_the_start():
    seen = []

    def f(p):
        seen.append(p.copy())
        return np.zeros(len(p))

    result = particle_swarm(f, np.full(3, -10.0), np.full(3, 10.0), particles=20,
                            iterations=50, seed=0, start=np.ones(3), patience=4)
    first = seen[0]
    assert np.array_equal(first[0], np.ones(3))
    assert (np.abs(first[1:] - 1).max(1) > 0.5).all() and first[1:].std(0).min() > 3
    assert (first >= -10).all() and (first <= 10).all()
    # a flat objective never improves: the early stop ends the search after 4 iterations
    assert len(result.history) == 4 and result.evaluations == 20 * 5


def test_a_spread_swarm_starts_around_its_start_point():
    """spread: the particles other than the start are start + N(0, (spread x width)^2),
    clipped to the box; the start itself is the first particle."""
    seen = []

    def f(p):
        seen.append(p.copy())
        return np.zeros(len(p))

    start = np.array([9.5, -3.0, 1.0, 0.0])
    particle_swarm(f, np.full(4, -10.0), np.full(4, 10.0), particles=400, iterations=0,
                   seed=1, start=start, spread=0.1)
    first = seen[0]
    assert np.array_equal(first[0], start)
    assert (first <= 10).all() and (first >= -10).all() and (first[:, 0] == 10).any()
    spreads = first[1:, 1:].std(0)  # 2 = 0.1 x the width 20, away from the wall
    assert np.allclose(spreads, 2.0, rtol=0.15), spreads
    assert np.allclose(first[1:, 1:].mean(0), start[1:], atol=0.4)


def test_rank_agreement():
    assert rank_agreement(["a", "b", "c"], ["a", "b", "c"])["spearman"] == 1.0
    flipped = rank_agreement(["a", "b", "c"], ["c", "b", "a"])
    assert flipped["spearman"] == -1.0 and not flipped["top1_same"]


def test_locate_causal_through_the_cli(trojaned, tmp_path):  # noqa: F811
    out = tmp_path / "causal.json"
    result = CliRunner().invoke(main, ["locate", str(trojaned / "model.onnx"), "--pairs",
                                       str(trojaned / "pairs.npz"), "--eval",
                                       str(trojaned / "eval.npz"), "--method", "causal",
                                       "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["tool"] == "onnx-rectify" and data["method"] == "causal"
    ranking = data["ranking"]
    assert len(ranking) == 4 and {"layer", "score", "restored_all"} <= set(ranking[0])
    assert "attribution ranking" in result.output and "Spearman" in result.output


def test_care_strategy_end_to_end_is_declared_and_passes_verify(trojaned, tmp_path):  # noqa: F811
    model = trojaned / "model.onnx"
    before = model.read_bytes()
    out = tmp_path / "care.onnx"
    result = patch_cli(model, trojaned, out, "--strategy", "care", "--gap", "0.05")
    assert result.exit_code in (0, 1), result.output
    assert model.read_bytes() == before
    edits = read_provenance(onnx.load(str(out)))["edits"]
    assert edits and {e["kind"] for e in edits} == {"care"}
    assert all(e["units"] and len(e["units"]) == len(e["multipliers"]) for e in edits)
    assert {e["layer"] for e in edits} == {e["layer"] for e in edits[:1]}
    assert _asr(out, trojaned) <= 0.05, result.output
    assert _acc(trojaned / "model.onnx", trojaned) - _acc(out, trojaned) <= 0.05
    verify = CliRunner().invoke(main, ["verify", str(out), "--base", str(model), "--eval",
                                       str(trojaned / "eval.npz"), "--max-accuracy-drop", "0.05"])
    assert "PASS  provenance" in verify.output, verify.output


def test_a_dense_consumers_batched_unit_sweep_equals_one_pass_per_variant():
    graph = ShadowGraph.from_onnx(_feature_model())
    x = torch.from_numpy(RNG.random((7, 2, 6, 6)).astype(np.float32))
    runner = SiteRunner(graph, unit_site(graph, graph.layer("D"), x[:1]), x)
    assert runner.linear
    sweeps = [(3, torch.linspace(-1, 2, 3)[:, None].expand(3, 7)),
              (100, torch.rand(2, 7))]
    with torch.no_grad():
        batched = runner.sweep(sweeps)
        for (u, values), got in zip(sweeps, batched):
            one = torch.cat([runner.logits_with([u], v[:, None]) for v in values])
            assert got.shape == (len(values) * 7, 3) and torch.allclose(got, one, atol=1e-5)


# --- CARE's options on the command line and in the API -------------------------------------

CARE_FLAGS = ["--care-min-multiplier", "-2.5", "--care-max-multiplier", "3", "--care-triggered",
              "7", "--care-eval", "50", "--care-objective", "ce", "--care-alpha", "0.1",
              "--care-ranking", "swap", "--care-particles", "6", "--care-iterations", "4",
              "--care-patience", "2", "--care-neurons", "3"]
CARE_FIELDS = {"care_range": (-2.5, 3.0), "care_triggered": 7, "care_eval": 50,
               "care_objective": "ce", "care_alpha": 0.1, "care_ranking": "swap",
               "care_particles": 6, "care_iterations": 4, "care_patience": 2, "care_neurons": 3}


def test_care_flags_reach_the_rectify_config(trojaned, tmp_path, monkeypatch):  # noqa: F811
    import importlib

    from patcher.rectify import RectifyConfig

    pipeline = importlib.import_module("patcher.patch")
    seen: list[RectifyConfig] = []

    def stop(model, pairs, eval_path, calib, out, config, *args, **kwargs):
        seen.append(config)
        raise RectifyError("stopped by the test")

    monkeypatch.setattr(pipeline, "patch", stop)
    result = patch_cli(trojaned / "model.onnx", trojaned, tmp_path / "o.onnx",
                       "--strategy", "care", *CARE_FLAGS)
    assert result.exit_code == 2 and "stopped by the test" in result.stderr, result.output
    assert {k: getattr(seen[0], k) for k in CARE_FIELDS} == CARE_FIELDS
    defaults = RectifyConfig()
    result = patch_cli(trojaned / "model.onnx", trojaned, tmp_path / "o.onnx")
    assert {k: getattr(seen[1], k) for k in CARE_FIELDS} == \
        {k: getattr(defaults, k) for k in CARE_FIELDS}


def test_care_keywords_reach_the_rectify_config():
    from patcher.api import _config

    keywords = {k: v for k, v in CARE_FIELDS.items() if k != "care_range"}
    config = _config(care_min_multiplier=-2.5, care_max_multiplier=3, **keywords)
    assert {k: getattr(config, k) for k in CARE_FIELDS} == CARE_FIELDS


@pytest.mark.parametrize("flags, message", [
    (["--care-alpha", "1.5"], "Invalid value for '--care-alpha'"),
    (["--care-max-multiplier", "1e4"], "Invalid value for '--care-max-multiplier'"),
    (["--care-min-multiplier", "nan"], "Invalid value for '--care-min-multiplier'"),
    (["--care-triggered", "-1"], "Invalid value for '--care-triggered'"),
    (["--care-particles", "0"], "Invalid value for '--care-particles'"),
    (["--care-objective", "mse"], "Invalid value for '--care-objective'"),
    (["--care-ranking", "ig"], "Invalid value for '--care-ranking'"),
    (["--care-min-multiplier", "3", "--care-max-multiplier", "2"],
     "CARE multiplier range 3.0..2.0 is empty: --care-min-multiplier must be below"),
])
def test_bad_care_options_are_refused_in_one_line(trojaned, tmp_path, flags, message):  # noqa: F811
    out = tmp_path / "o.onnx"
    result = patch_cli(trojaned / "model.onnx", trojaned, out, "--strategy", "care", *flags)
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnx-rectify: error: "), result.stderr
    assert message in lines[0], lines[0]
    assert "Traceback" not in result.output and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("options, message", [
    ({"care_alpha": 2}, "care_alpha=2: expected a value in [0.0, 1.0]"),
    ({"care_iterations": 1.5}, "care_iterations=1.5: expected an integer"),
    ({"care_ranking": "ig"}, "care_ranking='ig': expected one of 'care', 'swap'"),
    ({"care_min_multiplier": 4, "care_max_multiplier": 4},
     "care_min_multiplier=4: must be below care_max_multiplier=4"),
])
def test_bad_care_keywords_are_refused_before_anything_is_read(tmp_path, options, message):
    import patcher

    with pytest.raises(RectifyError) as info:  # no such model: the options are checked first
        patcher.patch(tmp_path / "missing.onnx", tmp_path / "p.npz", tmp_path / "e.npz",
                      strategy="care", **options)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    assert info.value.exit_code == 2


def test_a_care_run_obeys_its_multiplier_range_ranking_and_triggered_set(trojaned,  # noqa: F811
                                                                         tmp_path):
    out = tmp_path / "care.onnx"
    result = patch_cli(trojaned / "model.onnx", trojaned, out, "--strategy", "care",
                       "--gap", "0.05", "--care-min-multiplier", "-3",
                       "--care-max-multiplier", "0.75", "--care-triggered", "0",
                       "--care-ranking", "swap", "--care-neurons", "12",
                       "--care-iterations", "20", "--care-particles", "10")
    assert result.exit_code in (0, 1), result.output
    edits = read_provenance(onnx.load(str(out)))["edits"]
    assert edits, result.output
    pairs = len(np.load(trojaned / "pairs.npz")["label"])
    shifts = [e for e in edits if e.get("role") == "bias shift"]
    weights = [e for e in edits if e.get("role") != "bias shift"]
    assert len(weights) == 1  # a Gemm with a bias: searched about 0 and about the median
    assert set(weights[0]["objective_by_centre"]) == {"zero", "median"}
    assert weights[0]["centred"] == (min(weights[0]["objective_by_centre"].items(),
                                         key=lambda kv: (kv[1], kv[0] != "zero"))[0] == "median")
    if weights[0]["centred"]:
        assert [e["weight"] for e in shifts] == ["6.bias"]
        assert shifts[0]["units"] == weights[0]["units"]
    else:
        assert not shifts
    for e in weights:
        assert e["kind"] == "care" and e["ranking"] == "swap" and len(e["units"]) == 12
        assert e["units"] == e["swap_top"]
        assert e["triggered"] == pairs  # the pairs only
        # the found multipliers lie in the box; a shrunk share lies between them and 1
        assert all(-3 - 1e-6 <= m <= 1.0 + 1e-6 for m in e["multipliers"]), e["multipliers"]
        assert min(e["multipliers"]) < 0.75 + 1e-6


def test_the_keep_rule_asks_a_repair_to_remove_half_of_the_misbehaviour_rate():
    """A repair is kept only when rate_after <= (1 - MIN_RATE_REMOVED) rate_before; the
    rate is the argmax share at the target (or off the label without one)."""
    assert MIN_RATE_REMOVED == 0.5
    assert removes_enough(0.99, 0.0) and removes_enough(0.99, 0.495)
    assert not removes_enough(0.99, 0.50) and not removes_enough(0.99, 0.94)
    logits = torch.tensor([[0.0, 2.0], [3.0, 1.0], [0.0, 1.0], [1.0, 0.5]])
    labels = torch.tensor([0, 0, 1, 1])
    assert misbehaviour_rate(logits, labels, 1) == 0.5       # rows 0 and 2 hit the target
    assert misbehaviour_rate(logits, labels, None) == 0.5    # rows 0 and 3 miss the label


def test_a_care_repair_that_leaves_the_rate_is_not_kept(trojaned, tmp_path):  # noqa: F811
    """One particle at the identity and no iterations: the 'repair' changes nothing, so the
    keep rule refuses it and the written model carries no CARE edit."""
    out = tmp_path / "care.onnx"
    result = patch_cli(trojaned / "model.onnx", trojaned, out, "--strategy", "care",
                       "--care-neurons", "3", "--care-particles", "1",
                       "--care-iterations", "0")
    assert result.exit_code == 1, result.output
    assert "removes less than 50% of the rate" in result.output, result.output
    assert not read_provenance(onnx.load(str(out))).get("edits"), result.output
    assert _asr(out, trojaned) == _asr(trojaned / "model.onnx", trojaned)


@pytest.mark.parametrize("trans_b,alpha,beta", [(1, 1.0, 1.0), (0, 0.5, 2.0)])
def test_centred_multipliers_are_exactly_a_weight_scale_plus_a_bias_shift(tmp_path, trans_b,
                                                                          alpha, beta):
    """x_u -> c_u + m_u (x_u - c_u) at a Gemm's input (c: the clean median) is W[u] -> m_u W[u]
    plus beta dC = alpha sum_u (1 - m_u) c_u W[u]: onnxruntime on the written file gives the
    shadow graph's logits with the units so replaced; m = 1 changes nothing, m = 0 holds
    the unit at its centre."""
    model = _image_mlp(trans_b, alpha, beta)
    graph = ShadowGraph.from_onnx(model)
    x = torch.from_numpy(np.random.default_rng(7).random((6, 1, 4, 4)).astype(np.float32))
    layer = graph.layer("A")
    site = default_unit_site(graph, graph.editable_layers, x[:1])
    assert centre_bias(graph, layer) == "ba"
    centre = clean_centres(graph, site, x)
    assert torch.allclose(centre, x.reshape(6, 16).double().median(0).values, atol=1e-6)
    units, m = [1, 6, 9, 14], np.array([0.0, -2.5, 4.0, 1.0])
    runner = SiteRunner(graph, site, x)
    with torch.no_grad():
        expect = scaled_logits(runner, units, m, centre).numpy()
        held = x.reshape(6, 16).clone()
        held[:, 1] = float(centre[1])               # m = 0: the clean median itself
        held[:, [6, 9]] = (centre[[6, 9]] + torch.tensor([-2.5, 4.0], dtype=torch.float64)
                           * (held[:, [6, 9]].double() - centre[[6, 9]])).float()
        direct = graph(held.reshape(6, 1, 4, 4))[0].numpy()
    np.testing.assert_allclose(expect, direct, rtol=1e-5, atol=1e-5)
    deltas = {layer.weight: unit_scale_delta(layer, graph.weight(layer.weight), units, m),
              "ba": centre_bias_delta(graph, layer, units, m, centre)}
    got = _written_logits(tmp_path, model, deltas, x)
    np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-4)
    assert float(deltas["ba"].abs().max()) > 1e-3
    identity = centre_bias_delta(graph, layer, units, np.ones(4), centre)
    assert float(identity.abs().max()) == 0.0
    assert centre_bias(graph, graph.layer("B")) == "bb"
    matmul = ShadowGraph.from_onnx(_feature_model("matmul"))  # no bias: scaled about 0
    assert centre_bias(matmul, matmul.layer("D")) is None
