"""The attribution objective: silencing edits (patcher.edits.silence) and the loop that keeps them."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from patcher.gate import metrics
from patcher.cli import main
from patcher.analysis.input_attribution import attribution_share
from patcher.edits.silence import (corruption_key, corruption_masks, showing_corruption,
                             silencing_direction, silencing_edit, without_corruption)
from patcher.model.writeback import read_provenance

LEAKAGE = Path(__file__).resolve().parents[1] / "samples" / "leakage"


def test_silencing_edit_lowers_every_unit_by_the_scale_on_the_corruption_key():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    c = a @ a.T + 0.1 * torch.eye(6, dtype=torch.float64)
    k_star = torch.randn(6, generator=gen, dtype=torch.float64)
    edit = silencing_edit("layer", "w", silencing_direction("layer", k_star, torch.linalg.inv(c)),
                          value_dim=4, scale=0.7)
    delta = edit.delta
    assert delta.shape == (4, 6)
    assert torch.allclose(delta @ k_star, torch.full((4,), -0.7, dtype=torch.float64))
    assert int(torch.linalg.matrix_rank(delta)) == 1
    # the direction is the paper's C^-1 k*, only rescaled
    direction = torch.linalg.solve(c, k_star)
    cosine = float(edit.direction @ direction / (edit.direction.norm() * direction.norm()))
    assert cosine == pytest.approx(1.0, abs=1e-9)
    # a key C^-1-orthogonal to k* (d^T k = 0) is not moved
    other = torch.randn(6, generator=gen, dtype=torch.float64)
    other = other - (edit.direction @ other) / (edit.direction @ k_star) * k_star
    assert torch.allclose(delta @ other, torch.zeros(4, dtype=torch.float64), atol=1e-12)


def test_corruption_key_is_the_mean_corrupted_key_weighted_by_change():
    clean = torch.zeros(1, 3, 1, 2, dtype=torch.float64)
    corrupted = clean.clone()
    corrupted[0, 1, 0] = torch.tensor([3.0, 0.0])   # changed by 3
    corrupted[0, 2, 0] = torch.tensor([0.0, 1.0])   # changed by 1
    k = corruption_key(corrupted, clean)
    assert torch.allclose(k, torch.tensor([9.0, 1.0], dtype=torch.float64) / 4)
    with pytest.raises(Exception, match="identical"):
        corruption_key(clean, clean)


def test_images_that_already_show_a_pairs_corruption_are_found_where_they_show_it():
    corrupted = np.zeros((2, 1, 6, 6), np.float32)
    clean = corrupted.copy()
    corrupted[0, 0, 0, 0:2] = [1.0, 0.8]  # pair 0: a two-pixel bar top-left
    corrupted[1, 0, 5, 5] = 0.5           # pair 1: a dimmer dot bottom-right
    masks = corruption_masks(corrupted, clean)
    assert masks.sum() == 3
    images = np.zeros((5, 1, 6, 6), np.float32)
    images[0, 0, 0, 0:2] = [1.0, 0.8]     # pair 0's bar, in place
    images[1, 0, 3, 2:4] = [1.0, 0.82]    # pair 0's bar moved (3, 2), within tolerance
    images[2, 0, 5, 5] = 0.52             # pair 1's dot, in place
    images[3, 0, 2, 2:4] = [0.8, 1.0]     # the bar's values reversed: no
    images[4, 0, 1, 1] = 0.9              # another value: no
    owner, found, shifts = showing_corruption(corrupted, masks, images)
    assert owner.tolist() == [0, 0, 1, -1, -1]
    assert found[0, 0, 0, 0:2].tolist() == [1, 1] and found[0].sum() == 2
    assert found[1, 0, 3, 2:4].tolist() == [1, 1] and found[1].sum() == 2
    assert found[2, 0, 5, 5] == 1 and found[2].sum() == 1
    assert found[3].sum() == 0 and found[4].sum() == 0
    assert shifts.tolist() == [[0, 0], [3, 2], [0, 0], [0, 0], [0, 0]]


def test_images_that_show_the_corruption_get_the_pairs_clean_pixels_where_they_show_it():
    corrupted = np.zeros((1, 1, 6, 6), np.float32)
    clean = corrupted.copy()
    corrupted[0, 0, 0, 0:2] = [1.0, 0.8]  # a bar over a clean background of 0.1, 0.2
    clean[0, 0, 0, 0:2] = [0.1, 0.2]
    masks = corruption_masks(corrupted, clean)
    images = np.full((2, 1, 6, 6), 0.5, np.float32)
    images[0, 0, 3, 2:4] = [1.0, 0.8]     # the bar moved by (3, 2)
    owner, found, shifts = showing_corruption(corrupted, masks, images)
    assert owner.tolist() == [0, -1]
    restored = without_corruption(images, owner, found, shifts, clean)
    expected = np.full((2, 1, 6, 6), 0.5, np.float32)
    expected[0, 0, 3, 2:4] = [0.1, 0.2]   # the clean pixels, moved with the bar
    assert np.array_equal(restored, expected)
    assert images[0, 0, 3, 2] == 1.0      # the input is not modified


def test_attribution_share_is_the_leakage_measure():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 5), torch.nn.ReLU(),
                                torch.nn.Linear(5, 3))
    x = torch.rand(4, 1, 2, 4)
    y = torch.tensor([0, 1, 2, 0])
    mask = np.zeros((4, 1, 2, 4), np.float32)
    mask[:, :, 0] = 1
    share = attribution_share(model, x, y, torch.from_numpy(mask), steps=8, batch=3)
    expected = metrics.leakage(model, x.numpy(), y.numpy(), mask, steps=8)
    assert share == pytest.approx(expected, rel=1e-5)
    assert 0 < share < 1


def test_static_strategy_with_the_attribution_objective_is_refused(tmp_path):
    result = CliRunner().invoke(main, [
        "patch", str(LEAKAGE / "model.onnx"), "--pairs", str(LEAKAGE / "pairs_n1.npz"),
        "--eval", str(LEAKAGE / "eval.npz"), "--objective", "attribution",
        "--strategy", "static", "-o", str(tmp_path / "out.onnx")])
    assert result.exit_code == 2
    assert "--objective attribution needs --strategy dynamic" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out.onnx").exists()


def test_leakage_sample_patched_for_attribution_puts_less_attribution_on_the_null_block(
        tmp_path):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    result = CliRunner().invoke(main, [
        "patch", str(LEAKAGE / "model.onnx"), "--pairs", str(LEAKAGE / "pairs_n1.npz"),
        "--eval", str(LEAKAGE / "eval.npz"), "--objective", "attribution", "--steps", "8",
        "--max-rounds", "1", "-o", str(out), "--report", str(report)])
    assert result.exit_code == 0, result.output
    assert "share before" in result.output and "silenced (beta" in result.output
    data = json.loads(report.read_text())
    rounds = data["result"]["rounds"]
    assert len(rounds) == 1 and rounds[0]["kept"] and rounds[0]["scale"] > 0
    assert rounds[0]["gap_after"] < rounds[0]["gap_before"]
    assert data["result"]["objective"] == "attribution"
    edits = read_provenance(onnx.load(str(out)))["edits"]
    assert [e["rank"] for e in edits] == [1]
    # measured on held-out images the loop never saw: the test split's leakage set
    held_out = np.load(LEAKAGE / "leakage_test.npz")
    x, y, mask = (held_out[k][:50] for k in ("x", "y", "null_mask"))
    before = metrics.leakage(str(LEAKAGE / "model.onnx"), x, y, mask, steps=8)
    after = metrics.leakage(str(out), x, y, mask, steps=8)
    assert after < 0.85 * before
    test = np.load(LEAKAGE / "test.npz")
    drop = (metrics.accuracy(str(LEAKAGE / "model.onnx"), test["x"], test["y"])
            - metrics.accuracy(str(out), test["x"], test["y"]))
    assert drop <= 0.01


def test_identical_pairs_are_refused_for_the_attribution_objective(tmp_path):
    pairs = np.load(LEAKAGE / "pairs_n1.npz")
    same = tmp_path / "same.npz"
    np.savez(same, corrupted=pairs["clean"], clean=pairs["clean"], label=pairs["label"])
    result = CliRunner().invoke(main, [
        "patch", str(LEAKAGE / "model.onnx"), "--pairs", str(same),
        "--eval", str(LEAKAGE / "eval.npz"), "--objective", "attribution",
        "-o", str(tmp_path / "out.onnx")])
    assert result.exit_code == 2
    assert "equals its clean one" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out.onnx").exists()


def _conv_bn_relu(gamma):
    """Conv (2 output channels, 1x1 over 2 input channels) -> BatchNormalization -> Relu."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.array([[[[1.0]], [[0.5]]], [[[-0.5]], [[1.0]]]],
                                              np.float32), "w"),
             numpy_helper.from_array(np.array(gamma, np.float32), "gamma"),
             numpy_helper.from_array(np.zeros(2, np.float32), "beta"),
             numpy_helper.from_array(np.zeros(2, np.float32), "mean"),
             numpy_helper.from_array(np.ones(2, np.float32), "var")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"],
                              ["b"], name="bn"),
             helper.make_node("Relu", ["b"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, 2, 1, 1])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [1, 2, 1, 1])], inits)
    return helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17)])


def test_silencing_lowers_the_normalised_output_also_behind_a_negative_batchnorm_scale():
    from patcher.graph.keys import stored_delta
    from patcher.graph.shadow import ShadowGraph
    from patcher.edits.silence import output_signs

    graph = ShadowGraph.from_onnx(_conv_bn_relu([2.0, -3.0]))
    layer = graph.layer("conv")
    signs = output_signs(graph, layer)
    assert signs.tolist() == [1.0, -1.0]
    k_star = torch.tensor([1.0, 1.0], dtype=torch.float64)
    edit = silencing_edit("conv", "w", silencing_direction("conv", k_star, torch.eye(
        2, dtype=torch.float64)), 2, 0.5, signs)
    x = torch.ones(1, 2, 1, 1)
    with torch.no_grad():
        before = graph.run_until("bn", x)["b"].flatten()
        graph.weight("w").add_(stored_delta(layer, edit.delta, graph.node_attributes("conv"))
                               .to(torch.float32))
        after = graph.run_until("bn", x)["b"].flatten()
    # each unit's pre-activation (after the BatchNorm) drops: by 0.5 x |gamma| on k*
    assert torch.allclose(after - before, torch.tensor([-1.0, -1.5]), atol=1e-6)
    # without a BatchNorm after it, every sign is +1
    plain = ShadowGraph.from_onnx(_conv_bn_relu([2.0, 3.0]))
    assert output_signs(plain, plain.layer("conv")).tolist() == [1.0, 1.0]


def test_silencing_keys_come_from_the_pairs_and_from_eval_images_that_show_the_pattern():
    from patcher.rectify import RectifyConfig
    from patcher.rectify.editkinds import SilencingEditKind
    from patcher.rectify.objectives import ShareObjective
    from patcher.rectify.workspace import Workspace
    from patcher.samples import LabelledSet, Pairs
    from patcher.graph.shadow import ShadowGraph
    from patcher.graph.keys import LayerTap, layer_keys

    p, e = np.load(LEAKAGE / "pairs_n1.npz"), np.load(LEAKAGE / "eval.npz")
    pairs = Pairs(p["corrupted"], p["clean"], p["label"])
    x, y = e["x"][:300], e["y"][:300]
    graph = ShadowGraph.from_onnx(str(LEAKAGE / "model.onnx"))
    config = RectifyConfig(objective="attribution", show_progress=False, calib_limit=300)
    r = Workspace(graph, pairs, LabelledSet(x, y), None, config)
    share = ShareObjective(r, pairs)
    kind = SilencingEditKind(share.key_examples, len(pairs))
    share_images = len(share.share_set[0]) - len(pairs)
    set_aside = len(share.key_examples[0]) - len(pairs)
    assert share_images == 100 and set_aside > 0
    # the images set aside are not those the share is measured on
    shared = {a.tobytes() for a in share.share_set[0][len(pairs):].cpu().numpy()}
    assert not shared & {a.tobytes() for a in share.key_examples[0][len(pairs):]}
    by_name = {l.name: l for l in r.hidden_layers()}
    # the first conv sees the pattern through the same patches wherever it sits: the eval
    # images add nothing new there, and the duplicate direction is dropped
    first, _, _ = kind.parts(r, by_name["/features.0.0/Conv"])
    assert [s for s, _ in first] == ["the pairs"]
    layer = by_name["/features.4.0/Conv"]  # behind two poolings: the place matters
    directions, sigma, _ = kind.parts(r, layer)
    assert [s for s, _ in directions] == ["the pairs", "the pairs and eval images"]
    assert sigma > 0
    attrs = graph.node_attributes(layer.name)
    with LayerTap(graph, [layer]) as tap:
        graph(torch.cat([r.pair_corrupted, r.pair_clean]))
    keys = layer_keys(layer, tap.inputs[layer.name], attrs)
    expected = silencing_direction(layer.name, corruption_key(keys[:1], keys[1:]),
                                   r.statistics.for_edit(layer).inverse)
    assert torch.allclose(directions[0][1], expected, rtol=1e-6, atol=1e-12)

    # eval images that do not show the pattern (dimmed to half): the pairs' direction only
    r = Workspace(graph, pairs, LabelledSet(x * 0.5, y), None, config)
    share = ShareObjective(r, pairs)
    assert len(share.key_examples[0]) == len(pairs)
    directions, _, _ = SilencingEditKind(share.key_examples, len(pairs)).parts(r, layer)
    assert [s for s, _ in directions] == ["the pairs"]
