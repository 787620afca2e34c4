"""Editing dynamically quantized models (onnxruntime's ``quantize_dynamic``: DynamicQuantizeLinear
-> ConvInteger/MatMulInteger -> Cast -> Mul by x_scale * weight scale -> Add bias): the float
analysis copy (graph/quantized_layers), the int8 write-back (model/quantized_writeback), verify's
structural and provenance checks, and ``patch`` end to end on the committed sample
samples/backdoor_cnn/model_int8_dynamic.onnx (per_channel=True: per-tensor ConvInteger
weights, per-column MatMulInteger weights)."""
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
from patcher.gate.verify import check_provenance, diff_models
from patcher.graph.quantized_layers import analysis_model, dynamic_weight_scales
from patcher.graph.shadow import ShadowGraph
from patcher.graph.support import load_supported_model
from patcher.model.quantized_writeback import apply_quantized_deltas
from patcher.model.runtime import open_session
from patcher.model.writeback import read_provenance

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
CNN = SAMPLES / "backdoor_cnn"
DYNAMIC = CNN / "model_int8_dynamic.onnx"
EVAL = np.load(CNN / "eval.npz")["x"][:200]
LAYERS = {"features.0.0": "ConvInteger", "features.2.0": "ConvInteger",
          "features.3.0": "ConvInteger", "classifier.0": "MatMulInteger",
          "classifier.2": "MatMulInteger"}


def _ort(data: bytes, optimise: bool = True) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    if not optimise:
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    return onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def _agreement(analysis, path: Path, images: np.ndarray) -> tuple[float, float]:
    """(top-1 agreement, max |difference| / max |logit|) of the analysis copy and
    onnxruntime (default optimisation) on the int8 file."""
    with torch.no_grad():
        (got,) = ShadowGraph(analysis.loaded)(torch.from_numpy(images))
    expected = open_session(str(path), "cpu").run(images)[0]
    top1 = float(np.mean(got.numpy().argmax(1) == expected.argmax(1)))
    return top1, float(np.abs(got.numpy() - expected).max() / np.abs(expected).max())


@pytest.mark.parametrize("sample", ["backdoor_cnn", "backdoor_resnet"])
def test_analysis_copy_of_a_dynamic_model_computes_what_onnxruntime_computes(sample):
    """Every ConvInteger/MatMulInteger becomes a float Conv/MatMul of DequantizeLinear(x_q)
    and the dequantized weight; DynamicQuantizeLinear stays (fake-quant); the copy agrees with
    onnxruntime on every image's class (float instead of integer accumulation moves logits by
    well under 1% of their range)."""
    path = SAMPLES / sample / "model_int8_dynamic.onnx"
    file_ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"DynamicQuantizeLinear", "ConvInteger", "MatMulInteger"} <= file_ops
    analysis = analysis_model(load_supported_model(path))
    assert analysis.form == "dynamic"
    ops = {n.op_type for n in analysis.loaded.proto.graph.node}
    assert "DynamicQuantizeLinear" in ops and not ops & {"ConvInteger", "MatMulInteger", "Cast"}
    graph = ShadowGraph(analysis.loaded)
    assert {l.weight for l in graph.editable_layers} == set(analysis.weights)
    convs = [w for w in analysis.weights.values() if w.op == "ConvInteger"]
    matmuls = [w for w in analysis.weights.values() if w.op == "MatMulInteger"]
    assert convs and matmuls
    assert all(w.axis is None for w in convs)  # quantize_dynamic: per-tensor ConvInteger
    assert all(w.axis == 1 for w in matmuls)  # per column of B [K, N]
    assert all(w.form == "dynamic" and w.bias is None and w.input_scale is None
               and w.writable == (w.weight, w.scale) for w in analysis.weights.values())
    images = np.load(SAMPLES / sample / "eval.npz")["x"][:200]
    top1, rel = _agreement(analysis, path, images)
    assert top1 == 1.0 and rel < 1e-2, (top1, rel)


def test_quantize_dynamics_default_settings_fold_too(tmp_path):
    """quantize_dynamic with its defaults (per-tensor everywhere): every Conv and Gemm of the
    sample is an editable int8 layer, and the copy agrees with onnxruntime."""
    from onnxruntime.quantization import quantize_dynamic

    path = tmp_path / "dynamic.onnx"
    quantize_dynamic(str(CNN / "model.onnx"), str(path))
    analysis = analysis_model(load_supported_model(path))
    assert sorted(w.weight for w in analysis.weights.values()) == sorted(
        f"{n}.weight_quantized" for n in LAYERS)
    assert {w.weight.rsplit(".", 1)[0]: w.op for w in analysis.weights.values()} == LAYERS
    assert all(w.axis is None for w in analysis.weights.values())
    top1, rel = _agreement(analysis, path, EVAL[:100])
    assert top1 == 1.0 and rel < 1e-2, (top1, rel)


def test_weight_scales_are_found_through_the_scales_mul():
    """The weight scale is read by Mul(x_scale, s) only; dynamic_weight_scales maps it to
    the integer layer it scales (what verify's structural check accepts changing)."""
    proto = onnx.load(str(DYNAMIC))
    scales = dynamic_weight_scales(proto.graph)
    integer = {n.name: n for n in proto.graph.node if n.op_type in set(LAYERS.values())}
    assert set(scales.values()) == set(integer) and len(scales) == len(LAYERS)
    for scale, layer in scales.items():
        assert scale == integer[layer].input[1].replace("_quantized", "_scale")


def _write(delta_at, weight: str):
    loaded = load_supported_model(DYNAMIC)
    analysis = analysis_model(loaded)
    info = analysis.weights[weight]
    w = numpy_helper.to_array(next(t for t in analysis.loaded.proto.graph.initializer
                                   if t.name == info.weight))
    delta = np.zeros(w.shape)
    delta_at(delta, w)
    proto, _, records = apply_quantized_deltas(loaded, {info.weight: delta}, analysis.weights,
                                               {"tool": "test", "edits": []})
    old = {t.name: numpy_helper.to_array(t) for t in loaded.proto.graph.initializer}
    new = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    return loaded, info, proto, records, old, new


def test_a_saturating_column_gets_a_new_scale_and_nothing_else_changes():
    """A delta that saturates output column 3 of the last MatMulInteger: that column's weight
    scale grows (no bias to requantize: the bias is a float Add), every other column keeps
    its integers and scale; same nodes and tensor dtypes; onnxruntime fused (default) and
    unfused agree; verify's diff sees exactly the weight and its scale, both declared."""
    def spike(delta, w):
        delta[:, 3] = 4 * np.abs(w[:, 3]).max() * np.sign(w[:, 3] + 1e-9)

    loaded, info, proto, records, old, new = _write(spike, "classifier.2.weight_quantized")
    assert records[0]["rescaled_channels"] == [3] and records[0]["clamped"] == 0
    assert [r["weight"] for r in records] == [info.weight, info.scale]
    s_old, s_new = old[info.scale], new[info.scale]
    assert s_new[3] > s_old[3] and np.array_equal(np.delete(s_new, 3), np.delete(s_old, 3))
    assert np.array_equal(np.delete(new[info.weight], 3, 1), np.delete(old[info.weight], 3, 1))
    changed = {k for k in old if not np.array_equal(old[k], new[k])}
    assert changed == {info.weight, info.scale}
    assert [(t.name, t.data_type, list(t.dims)) for t in proto.graph.initializer] == \
        [(t.name, t.data_type, list(t.dims)) for t in loaded.proto.graph.initializer]
    assert [str(n) for n in proto.graph.node] == [str(n) for n in loaded.proto.graph.node]
    data = proto.SerializeToString()
    fused = _ort(data).run(None, {"input": EVAL})[0]
    plain = _ort(data, optimise=False).run(None, {"input": EVAL})[0]
    assert np.mean(fused.argmax(1) == plain.argmax(1)) >= 0.99
    assert np.abs(fused - plain).max() <= 1e-4 * np.abs(plain).max()
    diff = diff_models(loaded.proto, proto)
    assert diff.structural == [] and {t.name for t in diff.tensors} == changed
    units = {t.name: t.unit for t in diff.tensors}
    assert units == {info.weight: "steps", info.scale: "value"}
    assert all(info.layer in t.feeds for t in diff.tensors)
    assert check_provenance(proto, diff).passed, check_provenance(proto, diff).message


def test_a_per_tensor_conv_weight_is_kept_or_raised_and_said_so():
    """ConvInteger weights have one scale: a far spike raises it for the whole tensor (the
    option and the rescale are recorded), and the file still runs in onnxruntime."""
    def spike(delta, w):
        delta[0, 0, 0, 0] = 20 * np.abs(w).max()

    _, info, proto, records, old, new = _write(spike, "features.2.0.weight_quantized")
    assert info.axis is None
    assert "raised" in records[0]["option"] and records[0]["rescaled_channels"] == [0]
    assert float(new[info.scale]) > float(old[info.scale])
    out = _ort(proto.SerializeToString()).run(None, {"input": EVAL[:8]})[0]
    assert np.isfinite(out).all()


def test_an_undeclared_change_of_a_dynamic_weight_or_scale_is_refused(tmp_path):
    """verify accepts exactly the declared tensors: an int8 weight or weight scale changed
    without provenance fails provenance; a changed weight zero point fails structure."""
    def tampered(name, bump):
        model = onnx.load(str(DYNAMIC))
        t = next(t for t in model.graph.initializer if t.name == name)
        t.CopyFrom(numpy_helper.from_array(bump(numpy_helper.to_array(t).copy()), name))
        return model

    base = onnx.load(str(DYNAMIC))
    weight = tampered("classifier.2.weight_quantized",
                      lambda v: np.where(np.arange(v.size).reshape(v.shape) == 0,
                                         np.int8(v.flat[0] // 2), v).astype(np.int8))
    scale = tampered("classifier.2.weight_scale", lambda v: (v * 1.5).astype(np.float32))
    zero = tampered("classifier.2.weight_zero_point", lambda v: (v + 1).astype(np.int8))
    for model, structural in ((weight, False), (scale, False), (zero, True)):
        diff = diff_models(base, model)
        assert bool(diff.structural) == structural, diff.structural
        if not structural:
            check = check_provenance(model, diff)
            assert not check.passed and "changed without provenance" in check.message
    assert any("non-float tensor 'classifier.2.weight_zero_point'" in s
               for s in diff_models(base, zero).structural)


def test_patch_removes_the_backdoor_of_the_dynamic_sample(tmp_path):
    """One pair: exit 0; the same nodes, tensor names, dtypes and shapes; ASR <= 2% at OA
    within 0.5 points of the int8 model under onnxruntime's default optimisation; verify
    passes; diff counts the int8 change in steps."""
    out = tmp_path / "patched.onnx"
    result = CliRunner().invoke(main, ["patch", str(DYNAMIC), "--pairs",
                                       str(CNN / "pairs_n1.npz"), "--eval",
                                       str(CNN / "eval.npz"), "-o", str(out), "--device", "cpu",
                                       "--provider", "cpu"])
    assert result.exit_code == 0, result.output
    a, b = onnx.load(str(DYNAMIC)), onnx.load(str(out))
    assert [str(n) for n in a.graph.node] == [str(n) for n in b.graph.node]
    assert [(t.name, t.data_type, list(t.dims)) for t in a.graph.initializer] == \
        [(t.name, t.data_type, list(t.dims)) for t in b.graph.initializer]
    test, attack = np.load(CNN / "test.npz"), np.load(CNN / "attack.npz")
    keep = attack["y"] != attack["target"]

    def oa_asr(path):
        session = open_session(str(path), "cpu")
        oa = float(np.mean(session.run(test["x"])[0].argmax(1) == test["y"]))
        asr = float(np.mean(session.run(attack["x"][keep])[0].argmax(1) == attack["target"]))
        return oa, asr

    (oa0, asr0), (oa, asr) = oa_asr(DYNAMIC), oa_asr(out)
    assert asr0 > 0.9 and asr <= 0.02 and oa >= oa0 - 0.005, (oa0, asr0, oa, asr)
    records = [e for e in read_provenance(b)["edits"] if e["kind"] == "quantized-writeback"]
    assert records and all(r["form"] == "dynamic" for r in records)
    verify = CliRunner().invoke(main, ["verify", "--base", str(DYNAMIC), str(out), "--eval",
                                       str(CNN / "test.npz"), "--attack", str(CNN / "attack.npz"),
                                       "--pairs", str(CNN / "pairs_n1.npz"), "--json",
                                       str(tmp_path / "v.json"), "--provider", "cpu"])
    assert verify.exit_code == 0, verify.output
    checks = {c["name"]: c for c in json.loads((tmp_path / "v.json").read_text())["checks"]}
    assert checks["structure"]["passed"] and checks["provenance"]["passed"]
    diff = CliRunner().invoke(main, ["diff", str(DYNAMIC), str(out)])
    assert diff.exit_code == 1 and "0 structural difference(s)" in diff.output
    assert "weight_quantized" in diff.output and "step(s)" in diff.output


def test_uint8_weights_with_zero_points_fold_and_write_back(tmp_path):
    """quantize_dynamic with weight_type=QUInt8 stores uint8 weights with non-zero zero
    points: the copy agrees with onnxruntime, and a saturating edit of one column is written
    as uint8 around the kept zero point (the written weight dequantizes to W + dW within half
    a step of the new scale), which onnxruntime runs."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = tmp_path / "uint8.onnx"
    quantize_dynamic(str(CNN / "model.onnx"), str(path), weight_type=QuantType.QUInt8,
                     per_channel=True)
    loaded = load_supported_model(path)
    analysis = analysis_model(loaded)
    assert {w.dtype for w in analysis.weights.values()} == {"uint8"}
    top1, rel = _agreement(analysis, path, EVAL[:100])
    assert top1 == 1.0 and rel < 1e-2, (top1, rel)
    info = analysis.weights["classifier.2.weight_quantized"]
    old = {t.name: numpy_helper.to_array(t) for t in loaded.proto.graph.initializer}
    zero = old[info.zero_point]
    assert zero.dtype == np.uint8 and np.any(zero != 0)
    w = (old[info.weight].astype(np.float64) - zero) * old[info.scale].astype(np.float64)
    delta = np.zeros(w.shape)
    delta[:, 5] = 3 * np.abs(w[:, 5]).max()
    proto, _, records = apply_quantized_deltas(loaded, {info.weight: delta}, analysis.weights)
    new = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    assert records[0]["rescaled_channels"] == [5] and new[info.weight].dtype == np.uint8
    assert np.array_equal(new[info.zero_point], zero)
    written = (new[info.weight].astype(np.float64) - zero) * new[info.scale].astype(np.float64)
    assert np.abs(written - (w + delta)).max() <= 0.5 * float(new[info.scale].max()) + 1e-7
    out = _ort(proto.SerializeToString()).run(None, {"input": EVAL[:16]})[0]
    assert np.isfinite(out).all()


def test_gradients_reach_the_input_and_the_float_weights_of_the_copy():
    """Attribution and key statistics run on the copy: DynamicQuantizeLinear passes the
    gradient straight through to the input, and every folded weight gets one."""
    analysis = analysis_model(load_supported_model(DYNAMIC))
    graph = ShadowGraph(analysis.loaded)
    x = torch.from_numpy(EVAL[:4].copy()).requires_grad_()
    (logits,) = graph(x)
    logits.gather(1, logits.argmax(1, keepdim=True)).sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad.flatten(1).abs().sum(1) > 0).all()
    for name in analysis.weights:
        grad = graph.weight(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
