"""Options for real-size models (issue 21): --exclude-layer, the up-front estimate and
--max-memory of locate/patch, verify's --latency-runs and --batch."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from patcher.cli import main
from patcher.errors import RectifyError
from patcher.rectify import RectifyConfig
from patcher.rectify.budget import (Footprint, LayerKeys, check_memory, estimate,
                                    model_footprint, parse_memory)

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "backdoor_cnn"
MODEL, PAIRS, EVAL = SAMPLE / "model.onnx", SAMPLE / "pairs_n1.npz", SAMPLE / "eval.npz"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "patcher", *args], capture_output=True,
                          text=True, timeout=600)


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [l for l in proc.stderr.strip().splitlines() if "error" in l.lower()]
    assert len(errors) == 1, proc.stderr
    return errors[0]


# ---------------------------------------------------------------- sizes and the estimate

@pytest.mark.parametrize("text, expected", [("4G", 4 << 30), ("512M", 512 << 20),
                                            ("2.5GB", int(2.5 * 2 ** 30)), ("1000", 1000),
                                            ("64kib", 64 << 10)])
def test_memory_sizes_parse_in_binary_units(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["", "0", "4X", "-1G", "G", "1e9", "nan", "2048T"])
def test_memory_sizes_out_of_range_or_malformed_are_refused(text):
    with pytest.raises(RectifyError, match="--max-memory"):
        parse_memory(text)


def _conv_gemm_model():
    """x [N,3,8,8] -> Conv 4x3x3x3 (pad 1) -> Flatten -> Gemm 256x5: known MACs and bytes."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal((256, 5)).astype(np.float32), "b")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Flatten", ["c"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "b"], ["y"], name="fc")]
    graph = helper.make_graph(nodes, "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                             ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
                              [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_footprint_counts_macs_activations_and_key_widths_from_shapes():
    fp = model_footprint(_conv_gemm_model())
    assert fp.macs == 4 * 64 * 27 + 5 * 256           # out elements x key width, per layer
    assert fp.activation_bytes == 4 * (256 + 256 + 5)  # conv out, flatten out, logits
    assert fp.largest_activation == 4 * 256
    assert fp.input_bytes == 4 * 3 * 64
    assert fp.weight_bytes == 4 * (108 + 1280)
    assert [(l.name, l.key_dim, l.rows, l.kernel) for l in fp.layers] == [
        ("conv", 27, 64, 9), ("fc", 256, 1, 1)]


def test_estimate_grows_with_eval_size_and_drops_excluded_wide_layers():
    wide = LayerKeys("wide", 25088, 1)
    fp = Footprint(macs=10 ** 9, activation_bytes=1 << 20, largest_activation=1 << 18,
                   weight_bytes=1 << 20, input_bytes=600_000,
                   layers=[LayerKeys("conv", 576, 196, 9), wide])
    small, large = (estimate(fp, "patch", n, n, 1, RectifyConfig(), 1e10) for n in (100, 400))
    assert large.seconds > small.seconds and large.peak_bytes > small.peak_bytes
    assert small.memory_parts["exact statistics of the edited layer"] == 16 * 25088 ** 2
    without = estimate(fp, "patch", 100, 100, 1, RectifyConfig(exclude_layers=("wide",)), 1e10)
    assert without.memory_parts["exact statistics of the edited layer"] == 16 * 576 ** 2
    assert without.peak_bytes < small.peak_bytes - 9 * 2 ** 30
    assert estimate(fp, "locate", 100, 100, 1, RectifyConfig(), 1e10).seconds < small.seconds
    check_memory(small, None)
    check_memory(small, small.peak_bytes)
    with pytest.raises(RectifyError, match=r"would need about .* GB .*--max-memory"):
        check_memory(small, small.peak_bytes - 1)


def test_patch_estimate_is_one_round_with_the_max_rounds_bound_beside_it():
    """The patch figure is a loop that stops after its first round (what the dynamic loop
    does once an edit removes the corruption); the bound runs every round up to
    --max-rounds, each ranking again, and only the bound grows with it. A fixed layer
    (one round) prints no bound. The line keeps the form benchmarks/scale.py parses."""
    import re

    fp = Footprint(macs=10 ** 9, activation_bytes=1 << 20, largest_activation=1 << 18,
                   weight_bytes=1 << 20, input_bytes=600_000,
                   layers=[LayerKeys("conv", 576, 196, 9)])
    locate = estimate(fp, "locate", 100, 100, 1, RectifyConfig(), 1e10)
    ten, three = (estimate(fp, "patch", 100, 100, 1, RectifyConfig(max_rounds=r), 1e10)
                  for r in (10, 3))
    assert locate.seconds < ten.seconds == three.seconds < three.seconds_bound \
        < ten.seconds_bound
    assert locate.seconds_bound is None
    per_round = (three.seconds_bound - three.seconds) / 2   # rounds 2 and 3
    assert ten.seconds_bound == pytest.approx(three.seconds + 9 * per_round)
    line = ten.line()
    assert f"up to {ten.seconds_bound:.0f} s if all 10 rounds run" in line
    found = re.search(r"estimate: about ([\d.]+) s CPU .*?peak ([\d.]+) GB", line)
    assert found and float(found[1]) == round(ten.seconds)
    fixed = estimate(fp, "patch", 100, 100, 1, RectifyConfig(layer="conv"), 1e10)
    assert fixed.seconds_bound == pytest.approx(fixed.seconds) and "(one round)" in fixed.line()


def test_a_wide_dense_layer_is_estimated_by_its_key_rows_and_the_fit_is_counted():
    """A Gemm wider than WIDE_KEY_DIM keeps at most MAX_KEY_ROWS float32 key rows (and a
    float64 basis of the same size): the estimate counts those, not d^2 float64, and no
    exact statistics for its edit; patch counts the rank-one fit's working set."""
    from patcher.analysis.moments import MAX_KEY_ROWS

    wide = LayerKeys("fc1", 25088, 1, dense=True, values=64)
    conv = LayerKeys("conv", 144, 224 * 224, 9, values=16)
    fp = Footprint(macs=10 ** 9, activation_bytes=1 << 20, largest_activation=1 << 18,
                   weight_bytes=1 << 20, input_bytes=600_000, layers=[conv, wide])
    est = estimate(fp, "patch", 100, 100, 1, RectifyConfig(), 1e10)
    rows = min(MAX_KEY_ROWS, 100)
    assert wide.statistics_bytes("auto", 100) == 20 * rows * 25088 + 16 * rows ** 2
    assert est.memory_parts["statistics kept for ranking"] == (
        wide.statistics_bytes("auto", 100) + conv.statistics_bytes("auto", 100))
    assert est.memory_parts["exact statistics of the edited layer"] == 16 * 144 ** 2
    assert est.peak_bytes < 4 << 30
    fit = conv.fit_bytes(RectifyConfig().transplant_count)
    assert fit > wide.fit_bytes(RectifyConfig().transplant_count)
    assert est.memory_parts.get("rank-one fit", fit) == fit
    assert "rank-one fit" not in estimate(fp, "locate", 100, 100, 1, RectifyConfig(),
                                          1e10).memory_parts
    # many calibration images: the rows stop at the cap
    assert wide.key_rows(10 ** 6) == MAX_KEY_ROWS


# ---------------------------------------------------------------- locate / patch

def test_tiny_max_memory_refuses_before_any_work(tmp_path):
    out = tmp_path / "p.onnx"
    line = _one_line_error(_cli("patch", str(MODEL), "--pairs", str(PAIRS), "--eval", str(EVAL),
                                "-o", str(out), "--max-memory", "1M", "--device", "cpu"))
    assert "would need about" in line and "--max-memory 0.00 GB" in line
    assert not out.exists() and list(tmp_path.iterdir()) == []
    line = _one_line_error(_cli("locate", str(MODEL), "--pairs", str(PAIRS), "--eval", str(EVAL),
                                "--max-memory", "1M", "--device", "cpu"))
    assert line.startswith("onnx-rectify: error: locate would need about")


@pytest.mark.parametrize("value", ["0", "abc", "-3G"])
def test_max_memory_values_out_of_range_exit_2(value):
    result = CliRunner().invoke(main, ["locate", str(MODEL), "--pairs", str(PAIRS),
                                       "--max-memory", value])
    assert result.exit_code == 2 and "--max-memory" in result.output


def test_locate_prints_the_estimate_and_honours_exclude_layer(tmp_path):
    first = _cli("locate", str(MODEL), "--pairs", str(PAIRS), "--eval", str(EVAL),
                 "--device", "cpu", "--json", str(tmp_path / "a.json"))
    assert first.returncode == 0, first.stderr
    assert "estimate: about" in first.stderr and "peak" in first.stderr
    ranking = [r["layer"] for r in json.loads((tmp_path / "a.json").read_text())["ranking"]]
    top, second = ranking[0], ranking[1]
    again = _cli("locate", str(MODEL), "--pairs", str(PAIRS), "--eval", str(EVAL),
                 "--device", "cpu", "--exclude-layer", top, "--exclude-layer", second,
                 "--json", str(tmp_path / "b.json"))
    assert again.returncode == 0, again.stderr
    left = [r["layer"] for r in json.loads((tmp_path / "b.json").read_text())["ranking"]]
    assert top not in left and second not in left
    assert sorted(left) == sorted(set(ranking) - {top, second})


def test_exclude_layer_unknown_or_also_forced_exit_2(tmp_path):
    line = _one_line_error(_cli("locate", str(MODEL), "--pairs", str(PAIRS), "--device", "cpu",
                                "--exclude-layer", "no_such_layer"))
    assert "--exclude-layer 'no_such_layer' is not an editable layer" in line
    from patcher.graph.shadow import ShadowGraph
    from patcher.graph.support import load_supported_model

    name = ShadowGraph(load_supported_model(MODEL)).editable_layers[0].name
    out = tmp_path / "p.onnx"
    line = _one_line_error(_cli("patch", str(MODEL), "--pairs", str(PAIRS), "--eval", str(EVAL),
                                "-o", str(out), "--layer", name, "--exclude-layer", name,
                                "--device", "cpu"))
    assert f"--layer '{name}' is also given to --exclude-layer" in line
    assert not out.exists()


def test_excluded_layers_get_no_statistics_and_are_never_edited():
    from patcher.graph.shadow import ShadowGraph
    from patcher.graph.support import load_supported_model
    from patcher.rectify.workspace import Workspace
    from patcher.samples import InputSpec, load_labelled, load_pairs

    proto = load_supported_model(MODEL)
    spec = InputSpec.of(proto.proto)
    pairs, ev = load_pairs(PAIRS, spec, None), load_labelled(EVAL, spec, None)
    graph = ShadowGraph(proto)
    names = [l.name for l in graph.editable_layers]
    cfg = RectifyConfig(exclude_layers=tuple(names[:-1]))
    ws = Workspace(graph, pairs, ev, None, cfg)
    assert [l.name for l in ws.layers] == names[-1:]
    with pytest.raises(RectifyError, match="leaves no editable layer"):
        Workspace(graph, pairs, ev, None, RectifyConfig(exclude_layers=tuple(names)))


# ---------------------------------------------------------------- verify

@pytest.fixture()
def same_model(tmp_path):
    copy = tmp_path / "copy.onnx"
    shutil.copyfile(MODEL, copy)
    return copy


def _latency(tmp_path, *extra: str) -> dict:
    out = tmp_path / f"v{len(extra)}.json"
    result = CliRunner().invoke(main, ["verify", str(tmp_path / "copy.onnx"), "--base",
                                       str(MODEL), "--eval", str(EVAL), "--provider", "cpu",
                                       "--json", str(out), *extra])
    assert result.exit_code == 0, result.output
    return next(c for c in json.loads(out.read_text())["checks"] if c["name"] == "latency")


def test_verify_latency_runs_given_and_default(tmp_path, same_model):
    assert _latency(tmp_path, "--latency-runs", "3")["figures"]["runs"] == 3
    from patcher.gate.verify import (LATENCY_RUNS_MAX, LATENCY_RUNS_MIN,
                                     default_latency_runs)

    runs = _latency(tmp_path)["figures"]["runs"]
    assert LATENCY_RUNS_MIN <= runs <= LATENCY_RUNS_MAX
    assert default_latency_runs(1e-6) == LATENCY_RUNS_MAX     # a tiny model: the cap
    assert default_latency_runs(5.0) == LATENCY_RUNS_MIN      # 5 s per pair: the floor
    assert default_latency_runs(0.5) == 20                    # 10 s / 0.5 s


@pytest.mark.parametrize("option, value", [("--latency-runs", "0"), ("--batch", "0"),
                                           ("--batch", "5000"), ("--latency-runs", "x")])
def test_verify_option_ranges(tmp_path, same_model, option, value):
    result = CliRunner().invoke(main, ["verify", str(same_model), "--base", str(MODEL),
                                       "--eval", str(EVAL), option, value])
    assert result.exit_code == 2 and option in result.output


def test_verify_batch_bounds_every_onnxruntime_call(tmp_path, same_model, monkeypatch):
    import patcher.gate.verify as verify_module
    from patcher.graph.support import load_supported_model

    seen = []
    real = verify_module.predict

    def recording(session, x, batch=256, **kw):
        seen.append(batch)
        return real(session, x, batch=batch, **kw)

    monkeypatch.setattr(verify_module, "predict", recording)
    base, copy = load_supported_model(MODEL), load_supported_model(same_model)
    report = verify_module.verify(base, copy, EVAL, SAMPLE / "attack.npz", latency_runs=1,
                                  batch=7, provider="cpu")
    assert seen and set(seen) == {7}   # eval and attack sets, both models
    assert {c.name for c in report.checks} >= {"accuracy", "attack_success_rate", "latency"}
    seen.clear()
    verify_module.verify(base, copy, EVAL, latency_runs=1, provider="cpu")
    assert set(seen) == {verify_module.default_batch(base.proto)}
    assert 1 <= seen[0] <= verify_module.BATCH_MAX


# ---------------------------------------------------------------- wide layers' edits

def test_principal_direction_of_few_wide_keys_equals_the_dense_iteration():
    """With fewer keys than key dimensions the rank-one direction is found through the
    Q x Q Gram matrix (no Kd x Kd matrix): same unit vector as the dense power iteration,
    also with a low-rank C_reg^-1 operator (Woodbury) in place of the dense inverse."""
    import torch

    from patcher.analysis.moments import KeyRows
    from patcher.analysis.stats import LayerStatistics, LowRankStatistics
    from patcher.analysis.moments import KeyMoments
    from patcher.edits import rankone

    gen = torch.Generator().manual_seed(0)
    d, n, q = 300, 40, 6
    calib = torch.randn(n, d, generator=gen, dtype=torch.float64)
    keys = torch.randn(q, d, generator=gen, dtype=torch.float64)
    weights = torch.rand(q, generator=gen, dtype=torch.float64) + 0.1
    low = LowRankStatistics.from_moments("wide", KeyRows([calib.clone()], n))
    dense = LayerStatistics.from_moments("wide", KeyMoments(calib.T @ calib, n))
    assert torch.allclose(low.solver @ keys.T, dense.solver @ keys.T, rtol=1e-8, atol=1e-10)
    a = dense.inverse @ (keys.T * weights)
    # the reference: power iteration on the d x d matrix A A^T from A 1
    v = a.sum(1) / a.sum(1).norm()
    for _ in range(500):
        v = (a @ (a.T @ v)); v = v / v.norm()
    for operator in (dense.inverse, low.solver):
        got = rankone.principal_direction(operator, keys, weights)
        assert got.shape == (d,)
        assert abs(float(got @ v)) > 1 - 1e-8, float(got @ v)
    # Q >= Kd still takes the dense iteration and agrees with the SVD
    small = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    got = rankone.principal_direction(torch.eye(3, dtype=torch.float64), small,
                                      torch.ones(8, dtype=torch.float64))
    top = torch.linalg.svd(small.T)[0][:, 0]
    assert abs(float(got @ top)) > 1 - 1e-8


def test_rank_one_edit_of_a_wide_dense_layer_forms_no_square_matrix(monkeypatch):
    """solve_rank_one on a 12,000-wide key with a low-rank C: no tensor of Kd x Kd elements
    is ever made (torch.outer/matmul results checked by size), and the edit fits the pairs."""
    import torch

    from patcher.analysis.moments import KeyRows
    from patcher.analysis.stats import LowRankStatistics
    from patcher.edits import rankone

    gen = torch.Generator().manual_seed(1)
    d, n, q, v = 12_000, 64, 5, 7
    low = LowRankStatistics.from_moments(
        "wide", KeyRows([torch.randn(n, d, generator=gen)], n))
    keys = torch.randn(q, 1, 1, d, generator=gen)
    residual = torch.randn(q, 1, 1, v, generator=gen)
    biggest = {"elements": 0}
    real_matmul = torch.Tensor.__matmul__

    def watched(x, y):
        out = real_matmul(x, y)
        biggest["elements"] = max(biggest["elements"], out.numel())
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", watched)
    edit = rankone.solve_rank_one("wide", "w", keys, residual, low.solver)
    assert biggest["elements"] < d * d // 100, biggest
    assert edit.direction.shape == (d,) and edit.magnitude.shape == (v,)
    assert edit.fit_residual_after < edit.fit_residual_before


def test_rank_one_edit_of_many_conv_keys_equals_the_dense_solve():
    """Many keys (Q >= Kd: a conv at 224 has 12,544 per image) are folded by chunks into
    M = K^T diag(w^2) K and C^-1 M C^-1 instead of the Kd x Q matrix A and float64 copies
    of every key: the edit equals the dense reference (A A^T power iteration, Lambda by
    least squares per group), also with chunks much smaller than the keys."""
    import torch

    from patcher.analysis.moments import KeyMoments
    from patcher.analysis.stats import LayerStatistics
    from patcher.edits import rankone

    gen = torch.Generator().manual_seed(2)
    n, p, g, kd, vg = 3, 50, 2, 12, 4
    calib = torch.randn(500, kd, generator=gen, dtype=torch.float64)
    stats = LayerStatistics.from_moments("conv", KeyMoments(calib.T @ calib, 500))
    keys = torch.randn(n, p, g, kd, generator=gen)
    residual = torch.randn(n, p, g, vg, generator=gen)
    # the dense reference: the power iteration on A A^T with A = C^-1 K^T diag(w) formed
    k64, r64 = keys.to(torch.float64), residual.to(torch.float64)
    w = r64.reshape(-1, vg).norm(dim=1)
    v = rankone.principal_direction(stats.inverse, k64.reshape(-1, kd), w)
    a = torch.einsum("npgk,k->npg", k64, v)
    lam = torch.einsum("npg,npgv->gv", a, r64) / (a * a).sum(dim=(0, 1))[:, None]
    for chunk in (rankone.SOLVE_CHUNK_BYTES, 8 * kd * 7):
        rankone.SOLVE_CHUNK_BYTES, saved = chunk, rankone.SOLVE_CHUNK_BYTES
        try:
            edit = rankone.solve_rank_one("conv", "w", keys, residual, stats.solver)
            pieces = rankone.solve_rank_one("conv", "w", [keys[:1], keys[1:]], residual,
                                            stats.solver)
        finally:
            rankone.SOLVE_CHUNK_BYTES = saved
        sign = float(torch.sign(edit.direction @ v))
        assert torch.allclose(edit.direction * sign, v, atol=1e-9)
        assert torch.allclose(edit.magnitude * sign, lam.reshape(-1), rtol=1e-6, atol=1e-9)
        assert edit.fit_residual_after < edit.fit_residual_before
        assert torch.allclose(pieces.direction, edit.direction, atol=1e-12)  # pieces along n
        assert torch.allclose(pieces.magnitude, edit.magnitude, rtol=1e-10, atol=1e-12)


def test_rank_one_edit_from_layer_inputs_unfolded_by_chunks_equals_the_held_keys(monkeypatch):
    """UnfoldedKeys (the conv's inputs, unfolded a few images at a time whenever read) gives
    the edit of the joined keys, also when every chunk holds a single image."""
    import torch

    from patcher.analysis import moments
    from patcher.analysis.stats import statistics_from_moments
    from patcher.edits import rankone
    from patcher.graph.keys import layer_keys
    from patcher.graph.shadow import ShadowGraph

    graph = ShadowGraph.from_onnx(str(MODEL))
    layer = next(l for l in graph.editable_layers if l.orientation == "conv")
    attrs = graph.node_attributes(layer.name)
    x = torch.from_numpy(np.load(EVAL)["x"][:24])
    with torch.no_grad():
        data = graph.node_inputs([layer.name], x)[layer.name][0]
    calib = moments.collect_moments(graph, [layer], [x], total=len(x))[layer.name]
    solver = statistics_from_moments(layer.name, calib).solver
    keys = layer_keys(layer, data[:6], attrs)
    residual = torch.randn(*keys.shape[:3], 3, generator=torch.Generator().manual_seed(0))
    held = rankone.solve_rank_one(layer.name, layer.weight, keys, residual, solver)
    for chunk in (moments.CHUNK_BYTES, 1):
        monkeypatch.setattr(moments, "CHUNK_BYTES", chunk)
        lazy = rankone.solve_rank_one(layer.name, layer.weight,
                                      rankone.UnfoldedKeys(layer, [data[:2], data[2:6]], attrs),
                                      residual, solver)
        assert torch.allclose(lazy.direction, held.direction, atol=1e-10)
        assert torch.allclose(lazy.magnitude, held.magnitude, rtol=1e-8, atol=1e-12)


# ---------------------------------------------------------------- memory of IG and verify

def test_ig_blocks_are_bounded_by_memory_in_equal_whole_steps():
    """Unbounded (a small model) a block holds IG_CHUNK interpolated inputs as before; when
    IG_MEMORY binds, whole steps of every pair, as few blocks as fit, about equal."""
    from patcher.rectify.workspace import (IG_BACKWARD_COPIES, IG_CHUNK, IG_MEMORY,
                                           ig_chunk)

    assert ig_chunk(None, 16, 1) == IG_CHUNK
    assert ig_chunk((1e3, 1e5), 16, 1) == IG_CHUNK
    per_input = IG_MEMORY / IG_BACKWARD_COPIES / 15.5   # 15 inputs fit in a block
    assert ig_chunk((1.0, per_input), 16, 1) == 8       # two blocks of 8, not 15 + 1
    assert ig_chunk((1.0, per_input), 16, 5) == 15      # 3 steps x 5 pairs: 6 blocks
    assert ig_chunk((1.0, IG_MEMORY * 10), 16, 4) == 4  # never less than one step
    for points, pairs in ((16, 1), (17, 3), (16, 5)):
        chunk = ig_chunk((1.0, per_input), points, pairs)
        assert chunk % pairs == 0 and chunk * per_input * IG_BACKWARD_COPIES <= IG_MEMORY \
            or chunk == pairs


def test_activation_sizes_count_each_storage_once():
    """The per-input bytes of a forward: views (Reshape, Flatten) share their input's
    storage and are not counted again; the largest tensor is the widest output."""
    import torch

    from patcher.graph.shadow import ShadowGraph
    from patcher.graph.support import load_supported_model
    from patcher.rectify.workspace import activation_sizes, default_batch

    graph = ShadowGraph(load_supported_model(MODEL)).eval()
    x = torch.from_numpy(np.load(EVAL)["x"][:4])
    largest, total = activation_sizes(graph, x)
    outputs: list = []
    handle = graph.register_hook(lambda node, ins, outs: outputs.extend(
        t for t in outs if isinstance(t, torch.Tensor)))
    with torch.no_grad():
        graph(x)
    handle.remove()
    every = sum(t.numel() * t.element_size() for t in outputs) / 4
    distinct = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in outputs}
    assert largest == max(t.numel() * t.element_size() for t in outputs) / 4
    assert total == sum(distinct.values()) / 4 <= every
    assert default_batch(graph, x, (largest, total)) == default_batch(graph, x)


def test_patch_verifies_in_the_runs_batches_one_session_at_a_time(tmp_path, monkeypatch):
    """verify_written runs onnxruntime in the rectify run's batch (bounded by the
    activation size, not 256 images at once) and closes each session before the next
    opens, and parity compares PARITY_IMAGES images."""
    import patcher.patch as patch_module
    from patcher.graph import parity

    batches, alive, most = [], [], [0]
    real_predict, real_open = patch_module.predict, patch_module.open_session

    def predict(session, x, batch=256, **kw):
        batches.append(batch)
        return real_predict(session, x, batch=batch, **kw)

    from patcher.model.runtime import RuntimeSession

    class Tracked(RuntimeSession):
        def __del__(self):
            alive.pop()

    def open_session(model, provider):
        opened = real_open(model, provider)
        alive.append(None)  # one entry per live session (no reference to it)
        most[0] = max(most[0], len(alive))
        return Tracked(opened.session, opened.provider)

    compared = []
    real_compare = patch_module.compare

    def compare(graph, model, inputs, **kw):
        compared.append(len(inputs[0]))
        return real_compare(graph, model, inputs, **kw)

    monkeypatch.setattr(patch_module, "predict", predict)
    monkeypatch.setattr(patch_module, "open_session", open_session)
    monkeypatch.setattr(patch_module, "compare", compare)
    config = RectifyConfig(batch=9, max_rounds=1)
    report = patch_module.patch(MODEL, PAIRS, EVAL, None, tmp_path / "p.onnx", config,
                                device="cpu", provider="cpu")
    assert report.result.batch == 9 and report.result.deltas
    assert batches and set(batches) == {9}   # the eval set, input and written file
    assert most[0] == 1                     # never two sessions at once
    assert compared == [patch_module.PARITY_IMAGES]
