"""Causal localisation (interventions on the shadow graph), the particle swarm, and CARE's
repair end to end through the CLI."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import helper

from patcher.edits.care import apply_care, care_repair, shrink
from patcher.analysis.causal import (layer_causal_effects, neuron_causal_effects, rank_agreement,
                            swap_probabilities)
from patcher.cli import main
from patcher.errors import RectifyError
from patcher.graph.shadow import ShadowGraph
from patcher.edits.swarm import particle_swarm
from patcher.model.writeback import read_provenance
from tests.build import make_model, value_info
from tests.test_patch_end_to_end import _acc, patch_cli, trojaned  # noqa: F401  (fixture)

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


def test_care_repair_deltas_reproduce_the_searched_outputs():
    """Writing s*W_i and s*c_i + b into the tensors gives h_i' = s h_i + b exactly."""
    graph = _mlp()
    corrupted, clean, labels = _pair(graph, 4)
    layer = graph.layer("A")
    with torch.no_grad():
        before = graph.run_until("A", clean)["ha"].clone()
    repair = care_repair(graph, layer, [1, 4], corrupted, labels, clean, labels,
                         particles=6, iterations=3, seed=0)
    assert repair.objective_after <= repair.objective_before
    apply_care(graph, layer, repair)
    with torch.no_grad():
        after = graph.run_until("A", clean)["ha"]
    for j, i in enumerate(repair.neurons):
        expect = repair.scales[j] * before[:, i] + repair.shifts[j]
        assert torch.allclose(after[:, i], expect.to(after.dtype), atol=1e-5)
    untouched = [i for i in range(8) if i not in repair.neurons]
    assert torch.equal(after[:, untouched], before[:, untouched])
    apply_care(graph, layer, repair, sign=-1.0)
    with torch.no_grad():
        assert torch.allclose(graph.run_until("A", clean)["ha"], before, atol=1e-6)
    half = shrink(graph, layer, repair, 0.5)
    assert np.allclose(half.scales - 1, 0.5 * (repair.scales - 1))


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
    assert all(e["neurons"] for e in edits)
    assert _acc(trojaned / "model.onnx", trojaned) - _acc(out, trojaned) <= 0.05
    verify = CliRunner().invoke(main, ["verify", str(out), "--base", str(model), "--eval",
                                       str(trojaned / "eval.npz"), "--max-accuracy-drop", "0.05"])
    assert "PASS  provenance" in verify.output, verify.output
