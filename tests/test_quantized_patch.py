"""Editing int8 weights in place: the float analysis copy (graph/quantized_layers), the write-back
in the stored precision (model/quantized_writeback), and patch/verify/diff on the committed
int8 and fp16 samples (samples/backdoor_cnn/model_int8_*.onnx, model_fp16.onnx)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper

from patcher.cli import main
from patcher.graph.parity import QUANT_STEPS, output_steps
from patcher.graph.quantized_layers import analysis_model, dequantize
from patcher.graph.shadow import ShadowGraph
from patcher.graph.support import load_supported_model
from patcher.model.quantized_writeback import apply_quantized_deltas, delta_error, requantize
from patcher.model.runtime import open_session
from patcher.model.writeback import read_provenance

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
CNN = SAMPLES / "backdoor_cnn"
FILES = {"qdq": CNN / "model_int8_qdq.onnx", "qoperator": CNN / "model_int8_qoperator.onnx"}
EVAL = np.load(CNN / "eval.npz")["x"][:200]


def _ort(path_or_bytes, optimise: bool = True) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    if not optimise:
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    return onnxruntime.InferenceSession(path_or_bytes, options,
                                        providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("sample,fmt", [("backdoor_cnn", "qdq"), ("backdoor_cnn", "qoperator"),
                                        ("backdoor_resnet", "qdq"),
                                        ("backdoor_resnet", "qoperator")])
def test_analysis_copy_computes_what_onnxruntime_computes(sample, fmt):
    """The copy (weights folded to float, activation Q/DQ kept) gives the int8 file's
    predictions under onnxruntime's fused kernels, within the parity tolerance in steps."""
    path = SAMPLES / sample / f"model_int8_{fmt}.onnx"
    images = np.load(SAMPLES / sample / "eval.npz")["x"][:200]
    analysis = analysis_model(load_supported_model(path))
    graph = ShadowGraph(analysis.loaded)
    assert {l.weight for l in graph.editable_layers} == set(analysis.weights)
    assert all(graph.weight(w).dtype == torch.float32 for w in analysis.weights)
    ops = {n.op_type for n in analysis.loaded.proto.graph.node}
    assert "QuantizeLinear" in ops  # activation fake-quant kept
    assert not ops & {"QLinearConv", "QGemm", "QLinearMatMul"}
    with torch.no_grad():
        (got,) = graph(torch.from_numpy(images))
    expected = open_session(str(path), "cpu").run(images)[0]
    (step,) = output_steps(onnx.load(str(path)))
    assert np.mean(got.numpy().argmax(1) == expected.argmax(1)) == 1.0
    assert np.abs(got.numpy() - expected).max() / step <= QUANT_STEPS + 1e-3


def test_a_small_edit_keeps_the_existing_scales():
    rng = np.random.default_rng(0)
    q = rng.integers(-100, 100, size=(4, 6)).astype(np.int8)
    scale, zero = np.full(4, 0.01, np.float32), np.zeros(4, np.int8)
    delta = rng.normal(0, 0.02, size=q.shape)
    out = requantize(q, scale, zero, 0, delta, -128, 127)
    assert out.rescaled == [] and out.clamped == 0 and np.array_equal(out.scale, scale)
    target = dequantize(q, scale, zero, 0).astype(np.float64) + delta
    # round to nearest: every written value within half a step of the asked one
    assert np.abs(dequantize(out.q.astype(np.int8), scale, zero, 0) - target).max() \
        <= 0.5 * 0.01 + 1e-7


def test_only_saturating_channels_get_a_new_scale():
    rng = np.random.default_rng(1)
    q = rng.integers(-120, 120, size=(5, 8)).astype(np.int8)
    scale, zero = np.full(5, 0.01, np.float32), np.zeros(5, np.int8)
    delta = np.zeros(q.shape)
    delta[2, 3] = 3.0  # 300 steps of 0.01: beyond 127 from any q
    out = requantize(q, scale, zero, 0, delta, -128, 127)
    assert out.rescaled == [2] and out.clamped == 0
    assert np.array_equal(out.scale[[0, 1, 3, 4]], scale[[0, 1, 3, 4]])
    assert out.scale[2] > scale[2] and out.q.min() >= -128 and out.q.max() <= 127
    assert np.array_equal(out.q[[0, 1, 3, 4]], q[[0, 1, 3, 4]])  # nothing asked, nothing moved
    err = delta_error(delta, out.written_delta)
    assert err["relative_error"] < 0.01 and err["first_singular_value_share"] > 0.99


def test_a_channel_already_at_the_range_end_keeps_its_scale():
    """A symmetric quantizer puts each channel's largest weight at +127: such a channel,
    untouched by the edit (or edited within the range), keeps its scale while another
    channel saturates and is rescaled."""
    rng = np.random.default_rng(3)
    q = rng.integers(-100, 100, size=(4, 8)).astype(np.int8)
    q[:, 0] = 127  # every channel reaches +127
    scale, zero = np.full(4, 0.01, np.float32), np.zeros(4, np.int8)
    delta = np.zeros(q.shape)
    delta[1, 2] = 3.0  # saturates channel 1 only
    delta[3, 4] = -0.05  # channel 3 edited within its range
    out = requantize(q, scale, zero, 0, delta, -128, 127)
    assert out.rescaled == [1] and out.clamped == 0
    assert np.array_equal(out.scale[[0, 2, 3]], scale[[0, 2, 3]])
    assert np.array_equal(out.q[[0, 2]], q[[0, 2]]) and out.q[3, 4] == q[3, 4] - 5


def test_a_per_tensor_scale_takes_the_less_damaging_option():
    rng = np.random.default_rng(2)
    q = rng.integers(-127, 127, size=(6, 6)).astype(np.int8)
    scale, zero = np.array(0.01, np.float32), np.array(0, np.int8)
    for spike in (1.3, 5.0):  # a little over the range (clamp wins), far over (raise wins)
        delta = np.zeros(q.shape)
        delta[0, 0] = spike
        out = requantize(q, scale, zero, None, delta, -128, 127)
        target = dequantize(q, scale, zero, None).astype(np.float64) + delta
        kept = np.clip(np.rint(target / 0.01), -128, 127) * np.float64(np.float32(0.01))
        kept_err = np.linalg.norm(kept - target)
        written_err = np.linalg.norm(dequantize(out.q.astype(np.int8), out.scale, zero, None)
                                     - target)
        assert written_err <= kept_err + 1e-9
        assert ("raised" in out.option) == (out.rescaled == [0])
    assert "raised" in out.option  # the far spike


@pytest.mark.parametrize("fmt", ["qdq", "qoperator"])
def test_write_back_requantizes_the_bias_of_rescaled_channels(fmt):
    """A delta that saturates channel 3 of the last layer: that channel's scale grows, its
    int32 bias becomes round(b * s / s') (QDQ: the bias scale x_scale * s'), every other
    channel keeps its integers; fused (default) and unfused onnxruntime agree on the result."""
    loaded = load_supported_model(FILES[fmt])
    analysis = analysis_model(loaded)
    info = analysis.weights["classifier.2.weight_quantized"]
    w = numpy_helper.to_array(next(t for t in analysis.loaded.proto.graph.initializer
                                   if t.name == info.weight))
    delta = np.zeros(w.shape)
    delta[3] = 4 * np.abs(w[3]).max() * np.sign(w[3] + 1e-9)
    proto, written, records = apply_quantized_deltas(
        loaded, {info.weight: delta}, analysis.weights, {"tool": "test", "edits": []})
    old = {t.name: numpy_helper.to_array(t) for t in loaded.proto.graph.initializer}
    new = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    s_old, s_new = old[info.scale], new[info.scale]
    assert records[0]["rescaled_channels"] == [3] and records[0]["clamped"] == 0
    assert s_new[3] > s_old[3] and np.array_equal(np.delete(s_new, 3), np.delete(s_old, 3))
    b_old, b_new = old[info.bias].astype(np.int64), new[info.bias].astype(np.int64)
    assert b_new[3] == np.rint(b_old[3] * np.float64(s_old[3]) / np.float64(s_new[3]))
    assert np.array_equal(np.delete(b_new, 3), np.delete(b_old, 3))
    assert np.array_equal(np.delete(new[info.weight], 3, 0), np.delete(old[info.weight], 3, 0))
    if fmt == "qdq":
        x_scale = np.float32(old[info.input_scale])
        assert new[info.bias_scale][3] == np.float32(x_scale * s_new[3])
    else:
        assert info.bias_scale is None
    # stored in the same dtypes and shapes, the same nodes
    assert [(t.name, t.data_type, list(t.dims)) for t in proto.graph.initializer] == \
        [(t.name, t.data_type, list(t.dims)) for t in loaded.proto.graph.initializer]
    assert [str(n) for n in proto.graph.node] == [str(n) for n in loaded.proto.graph.node]
    assert read_provenance(proto)["edits"] == records
    data = proto.SerializeToString()
    fused, plain = _ort(data).run(None, {"input": EVAL})[0], \
        _ort(data, optimise=False).run(None, {"input": EVAL})[0]
    (step,) = output_steps(proto)
    assert np.mean(fused.argmax(1) == plain.argmax(1)) >= 0.99
    assert np.abs(fused - plain).max() / step <= QUANT_STEPS + 1e-3


def _patch(model: Path, out: Path) -> "object":
    return CliRunner().invoke(main, ["patch", str(model), "--pairs", str(CNN / "pairs_n1.npz"),
                                     "--eval", str(CNN / "eval.npz"), "-o", str(out),
                                     "--device", "cpu", "--provider", "cpu"])


def _oa_asr(path: Path) -> tuple[float, float]:
    test, attack = np.load(CNN / "test.npz"), np.load(CNN / "attack.npz")
    session = open_session(str(path), "cpu")
    oa = float(np.mean(session.run(test["x"])[0].argmax(1) == test["y"]))
    keep = attack["y"] != attack["target"]
    asr = float(np.mean(session.run(attack["x"][keep])[0].argmax(1) == attack["target"]))
    return oa, asr


@pytest.mark.parametrize("fmt", ["qdq", "qoperator"])
def test_patch_writes_an_int8_file_that_removes_the_backdoor(fmt, tmp_path):
    """One pair: exit 0; the same nodes, tensor names, dtypes and shapes; ASR <= 2% at OA
    within 0.5 points of the int8 model, under onnxruntime's default optimisation; verify
    passes on it and diff counts the int8 changes in steps."""
    source, out = FILES[fmt], tmp_path / "patched.onnx"
    result = _patch(source, out)
    assert result.exit_code == 0, result.output
    a, b = onnx.load(str(source)), onnx.load(str(out))
    assert [str(n) for n in a.graph.node] == [str(n) for n in b.graph.node]
    assert [(t.name, t.data_type, list(t.dims)) for t in a.graph.initializer] == \
        [(t.name, t.data_type, list(t.dims)) for t in b.graph.initializer]
    oa0, _ = _oa_asr(source)
    oa, asr = _oa_asr(out)
    assert asr <= 0.02 and oa >= oa0 - 0.005, (oa0, oa, asr)
    kinds = {e["kind"] for e in read_provenance(b)["edits"]}
    assert {"rank-one", "quantized-writeback"} <= kinds
    verify = CliRunner().invoke(main, ["verify", "--base", str(source), str(out), "--eval",
                                       str(CNN / "eval.npz"), "--attack",
                                       str(CNN / "attack.npz"), "--json",
                                       str(tmp_path / "v.json")])
    assert verify.exit_code == 0, verify.output
    checks = {c["name"]: c for c in json.loads((tmp_path / "v.json").read_text())["checks"]}
    assert checks["structure"]["passed"] and checks["provenance"]["passed"]
    diff = CliRunner().invoke(main, ["diff", str(source), str(out)])
    assert "weight_quantized" in diff.output and "step(s)" in diff.output


def test_verify_refuses_an_undeclared_int8_change(tmp_path):
    """The structural and provenance checks accept exactly the declared tensors: an int8
    weight changed with no provenance fails provenance."""
    model = onnx.load(str(FILES["qdq"]))
    t = next(t for t in model.graph.initializer if t.name == "classifier.2.weight_quantized")
    values = numpy_helper.to_array(t).copy()
    values[0, 0] = values[0, 0] + 1 if values[0, 0] < 127 else 126
    t.CopyFrom(numpy_helper.from_array(values, t.name))
    onnx.save(model, str(tmp_path / "tampered.onnx"))
    verify = CliRunner().invoke(main, ["verify", "--base", str(FILES["qdq"]),
                                       str(tmp_path / "tampered.onnx"), "--eval",
                                       str(CNN / "eval.npz"), "--json", str(tmp_path / "v.json")])
    assert verify.exit_code == 1, verify.output
    checks = {c["name"]: c for c in json.loads((tmp_path / "v.json").read_text())["checks"]}
    assert checks["structure"]["passed"]  # an int8 weight slot may change ...
    assert not checks["provenance"]["passed"]  # ... only when declared
    assert "changed without provenance" in checks["provenance"]["message"]


def test_the_fp16_keep_io_sample_patches_with_exit_0(tmp_path):
    source, out = CNN / "model_fp16.onnx", tmp_path / "patched.onnx"
    result = _patch(source, out)
    assert result.exit_code == 0, result.output
    a, b = onnx.load(str(source)), onnx.load(str(out))
    assert [(t.name, t.data_type) for t in a.graph.initializer] == \
        [(t.name, t.data_type) for t in b.graph.initializer]
    oa0, _ = _oa_asr(source)
    oa, asr = _oa_asr(out)
    assert asr <= 0.02 and oa >= oa0 - 0.005, (oa0, oa, asr)


def test_a_parity_failure_is_reported_as_one(tmp_path, monkeypatch):
    """When the written file's shadow graph and onnxruntime disagree, patch says parity
    failed (with its figures) and exits 1, instead of blaming the gap."""
    import dataclasses

    import patcher.patch

    real = patcher.patch.compare
    monkeypatch.setattr(patcher.patch, "compare", lambda *a, **k: dataclasses.replace(
        real(*a, **k), within_tolerance=False))
    out = tmp_path / "patched.onnx"
    result = CliRunner().invoke(main, ["patch", str(FILES["qdq"]), "--pairs",
                                       str(CNN / "pairs_n1.npz"), "--eval",
                                       str(CNN / "eval.npz"), "-o", str(out), "--strategy",
                                       "static", "--device", "cpu", "--provider", "cpu"])
    assert result.exit_code == 1, result.output
    assert "onnx-rectify: warning: parity FAILED" in result.output
    assert "output quantization step(s)" in result.output and "top-1 agreement" in result.output
    assert "did not meet --gap" not in result.output and "gap did not" not in result.output
    assert out.exists()  # the model is written, as for any exit 1


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int32])
def test_integer_values_are_written_in_the_field_the_tensor_uses(dtype):
    """An int8/uint8 weight or int32 bias stored in int32_data (not raw_data) keeps that
    field when the write-back replaces its values; one in raw_data keeps raw_data."""
    from onnx import helper

    from patcher.model.writeback import set_tensor_values

    values = np.array([[1, 2], [3, 4]], dtype)
    typed = helper.make_tensor("t", helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), [2, 2],
                               values.reshape(-1).tolist())
    raw = numpy_helper.from_array(values, "r")
    new = np.array([[5, 6], [7, 8]], dtype)
    for tensor in (typed, raw):
        set_tensor_values(tensor, new)
        np.testing.assert_array_equal(numpy_helper.to_array(tensor), new)
    assert not typed.raw_data and list(typed.int32_data) == [5, 6, 7, 8]
    assert raw.raw_data and not raw.int32_data
