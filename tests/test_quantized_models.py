"""Whole quantized models: samples/backdoor_cnn quantized by onnxruntime's own quantizer (QDQ
per-channel, QOperator per-channel, dynamic) runs in the shadow graph as onnxruntime runs it,
carries gradients, and passes ``inspect``'s parity; an fp16 model with float32 IO is judged
with float16 tolerances."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

from onnx_rectify_samples.quantized import keep_io_fp16  # the samples' fp16 keep-io form
from patcher.gate.summary import format_summary, summarize
from patcher.graph.parity import (DYNAMIC_RTOL, FP16_ATOL, FP16_RTOL, QUANT_STEPS, compare,
                                  compute_dtype, output_steps)
from patcher.graph.shadow import ShadowGraph
from patcher.graph.support import load_supported_model
from patcher.model.runtime import open_session

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "backdoor_cnn"
EVAL = np.load(SAMPLE / "eval.npz")["x"][:200]
CALIBRATION = np.load(SAMPLE / "test.npz")["x"][:4]  # disjoint from the eval images
FORMATS = ("qdq", "qoperator", "dynamic")
#: ops each format must contain (so a changed quantizer cannot make the test vacuous)
EXPECTED_OPS = {"qdq": {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm"},
                "qoperator": {"QuantizeLinear", "QLinearConv", "QGemm", "DequantizeLinear"},
                "dynamic": {"DynamicQuantizeLinear", "ConvInteger", "MatMulInteger"}}


def _quantize_sample(sample: Path, out: Path, calibration: np.ndarray,
                     formats=FORMATS) -> dict[str, Path]:
    """The sample's model quantized by onnxruntime: static QDQ and QOperator (per-channel,
    calibrated on ``calibration``) and dynamic."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, quantize_dynamic,
                                          quantize_static)

    source = str(sample / "model.onnx")
    name = onnx.load(source).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{name: calibration[i:i + 1]} for i in range(len(calibration))])

        def get_next(self):
            return next(self.batches, None)

    paths = {f: out / f"{f}.onnx" for f in formats}
    for fmt, form in (("qdq", QuantFormat.QDQ), ("qoperator", QuantFormat.QOperator)):
        if fmt in paths:
            quantize_static(source, str(paths[fmt]), Reader(), quant_format=form,
                            per_channel=True)
    if "dynamic" in paths:
        quantize_dynamic(source, str(paths["dynamic"]))
    return paths


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> dict[str, Path]:
    return _quantize_sample(SAMPLE, tmp_path_factory.mktemp("quantized"), CALIBRATION)


def _agreement(path: Path, images: np.ndarray) -> tuple[float, float | None, float]:
    """(top-1 agreement, max difference in output steps or None, max abs difference)."""
    expected = open_session(str(path), "cpu").run(images)[0]
    with torch.no_grad():
        (got,) = ShadowGraph.from_onnx(path)(torch.from_numpy(images))
    diff = float(np.abs(got.numpy().astype(np.float64) - expected).max())
    (step,) = output_steps(onnx.load(str(path)))
    top1 = float(np.mean(got.numpy().argmax(1) == expected.argmax(1)))
    return top1, (diff / step if step else None), diff


@pytest.mark.parametrize("fmt", FORMATS)
def test_shadow_graph_agrees_with_onnxruntime_on_eval_images(quantized, fmt):
    proto = onnx.load(str(quantized[fmt]))
    assert EXPECTED_OPS[fmt] <= {n.op_type for n in proto.graph.node}
    expected = open_session(str(quantized[fmt]), "cpu").run(EVAL)[0]
    with torch.no_grad():
        (got,) = ShadowGraph.from_onnx(quantized[fmt])(torch.from_numpy(EVAL))
    got = got.numpy()
    assert got.dtype == expected.dtype == np.float32
    assert np.mean(got.argmax(1) == expected.argmax(1)) >= 0.99
    (step,) = output_steps(proto)
    diff = np.abs(got.astype(np.float64) - expected)
    if fmt == "dynamic":  # float output (MatMulInteger -> Cast -> Mul -> Add)
        assert step is None
        assert diff.max() <= 1e-5 * np.abs(expected).max()
    else:
        assert step is not None and step > 0
        assert diff.max() / step <= QUANT_STEPS + 1e-3


def test_dynamic_model_saved_by_onnxruntimes_optimizer_runs(quantized, tmp_path):
    """onnxruntime's extended optimizations fuse DynamicQuantizeLinear + MatMulInteger + Cast +
    Mul into com.microsoft DynamicQuantizeMatMul; such a saved file runs too."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    onnxruntime.InferenceSession(str(quantized["dynamic"]), options,
                                 providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node}
    assert "DynamicQuantizeMatMul" in ops and "MatMulInteger" not in ops
    top1, _, diff = _agreement(Path(options.optimized_model_filepath), EVAL[:50])
    assert top1 == 1.0 and diff <= 1e-4


@pytest.mark.parametrize("fmt", FORMATS)
def test_gradients_flow_through_the_quantized_model(quantized, fmt):
    graph = ShadowGraph.from_onnx(quantized[fmt])
    x = torch.from_numpy(EVAL[:4].copy()).requires_grad_()
    (logits,) = graph(x)
    with torch.no_grad():
        (plain,) = graph(torch.from_numpy(EVAL[:4].copy()))
    assert torch.equal(logits.detach(), plain)  # autograd does not change the values
    logits.gather(1, logits.argmax(1, keepdim=True)).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad.flatten(1).abs().sum(1) > 0).all()  # every image gets a gradient


@pytest.mark.parametrize("fmt", FORMATS)
def test_inspect_passes_parity_on_quantized_models(quantized, fmt):
    summary = summarize(load_supported_model(quantized[fmt]), parity=True, provider="cpu")
    assert summary.unsupported == []
    assert summary.parity is not None and summary.parity.passed, summary.parity
    text = format_summary(summary)
    if fmt == "dynamic":  # activations quantized at run time: judged in uint8 steps
        assert summary.parity.basis == "dynamic quantization (uint8 activation steps)"
        assert summary.parity.rtol == DYNAMIC_RTOL
    else:
        assert summary.parity.basis == "quantized output steps"
        assert summary.parity.step_tolerance == QUANT_STEPS
        assert "output quantization step" in text
    assert "parity     PASS" in text
    form = {"qdq": "QDQ", "qoperator": "QOperator", "dynamic": "dynamic-quantization"}[fmt]
    assert summary.quantized == form
    # the int8 layers are editable, and the table says how each is stored
    assert [l["weight"] for l in summary.editable_layers] == [
        f"{n}.weight_quantized" for n in ("features.0.0", "features.2.0", "features.3.0",
                                          "classifier.0", "classifier.2")]
    if fmt == "dynamic":  # quantize_dynamic's defaults: per-tensor; the bias is a float Add
        assert all(l["storage"] == "int8 per-tensor" and l["quantized"]["form"] == "dynamic"
                   and l["quantized"]["bias"] is None for l in summary.editable_layers)
        assert "stored dynamic int8 per-tensor: classifier.0.weight_quantized, scale " \
               "classifier.0.weight_scale" in text
        return
    assert all(l["storage"] == "int8 per-channel" and l["quantized"]["form"] == form
               and l["quantized"]["bias"] for l in summary.editable_layers)
    assert f"stored {form} int8 per-channel (axis 0): classifier.0.weight_quantized, scale " \
           "classifier.0.weight_scale" in text


@pytest.mark.parametrize("verb", ["locate", "patch"])
def test_patching_onnxruntimes_fused_dynamic_form_is_refused_saying_why(verb, tmp_path):
    """onnxruntime's optimiser saves a dynamic model with DynamicQuantizeMatMul (its int8
    weight no longer behind MatMulInteger/Cast/Mul): it runs, but its weights cannot be
    edited yet; locate and patch say so and what to do (exit 2, one line)."""
    import onnxruntime
    from click.testing import CliRunner
    from onnx import helper, numpy_helper
    from onnxruntime.quantization import quantize_dynamic

    from patcher.cli import main

    # an MLP on the sample's images: every layer becomes DynamicQuantizeMatMul once fused
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.05).astype(np.float32), n)
             for n, s in (("w1", (784, 32)), ("b1", (32,)), ("w2", (32, 10)), ("b2", (10,)))]
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["f"], name="flatten"),
         helper.make_node("Gemm", ["f", "w1", "b1"], ["h"], name="fc1"),
         helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("Gemm", ["r", "w2", "b2"], ["logits"], name="fc2")], "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.save(model, str(tmp_path / "mlp.onnx"))
    quantize_dynamic(str(tmp_path / "mlp.onnx"), str(tmp_path / "dynamic.onnx"))
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "fused.onnx")
    onnxruntime.InferenceSession(str(tmp_path / "dynamic.onnx"), options,
                                 providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node}
    assert "DynamicQuantizeMatMul" in ops and not ops & {"MatMulInteger", "Gemm", "MatMul"}
    args = [verb, options.optimized_model_filepath, "--pairs", str(SAMPLE / "pairs_n1.npz"),
            "--eval", str(SAMPLE / "eval.npz")]
    if verb == "patch":
        args += ["-o", str(tmp_path / "p.onnx")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    lines = [l for l in result.output.splitlines() if l.strip()]
    # one error line, the last (an estimate line may precede it)
    assert [l for l in lines if l.startswith("onnx-rectify: error:")] == lines[-1:]
    assert lines[-1].startswith("onnx-rectify: error: the model's weights are stored "
                                "quantized (dynamic-quantization): no quantized weight is "
                                "stored in a form that can be edited yet"), result.output
    assert "DynamicQuantizeMatMul" in lines[-1] and "patch the float model" in lines[-1]
    assert not (tmp_path / "p.onnx").exists()


def test_residual_network_quantized_matches_onnxruntime(tmp_path):
    """samples/backdoor_resnet adds residual branches and a global average pool: QOperator
    turns them into com.microsoft QLinearAdd and QLinearGlobalAveragePool."""
    sample = SAMPLE.parent / "backdoor_resnet"
    paths = _quantize_sample(sample, tmp_path, np.load(sample / "test.npz")["x"][:4],
                             formats=("qdq", "qoperator"))
    ops = {n.op_type for n in onnx.load(str(paths["qoperator"])).graph.node}
    assert {"QLinearAdd", "QLinearGlobalAveragePool", "QLinearConv", "QGemm"} <= ops
    images = np.load(sample / "eval.npz")["x"][:100]
    for fmt in ("qdq", "qoperator"):
        top1, steps, _ = _agreement(paths[fmt], images)
        assert top1 >= 0.99 and steps is not None and steps <= QUANT_STEPS + 1e-3, (fmt, steps)


def test_fp16_model_with_float32_io_gets_float16_tolerances():
    proto = keep_io_fp16(onnx.load(str(SAMPLE / "model.onnx")))
    assert proto.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert compute_dtype(proto) == np.float16
    data = proto.SerializeToString()
    graph = ShadowGraph.from_onnx(proto)
    result = compare(graph, data, [EVAL[:16]], provider="cpu")
    assert (result.rtol, result.atol, result.basis) == (FP16_RTOL, FP16_ATOL, "float16 compute")
    assert result.passed, result
    # float32 tolerances would refuse it: fp16 kernels round differently
    strict = compare(graph, data, [EVAL[:16]], provider="cpu", rtol=1e-4, atol=1e-5)
    assert not strict.within_tolerance


def test_output_steps_and_compute_dtype_of_a_float_model():
    proto = onnx.load(str(SAMPLE / "model.onnx"))
    assert output_steps(proto) == [None]
    assert compute_dtype(proto) == np.float32


def test_a_dynamic_model_is_judged_in_activation_steps(tmp_path):
    """Gemm -> Tanh -> Gemm quantized dynamically: torch's and onnxruntime's tanh differ in
    the last float bit, which moves an activation at a uint8 rounding boundary by one step
    (1/255 of its range): float32 tolerances fail it, the dynamic-quantization basis (3 such
    steps relative to the output's scale, top-1 agreement) passes it."""
    from onnx import helper, numpy_helper
    from onnxruntime.quantization import quantize_dynamic

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(np.float32), n)
             for n, s in (("w1", (64, 256)), ("b1", (256,)), ("w2", (256, 10)), ("b2", (10,)))]
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1"),
         helper.make_node("Tanh", ["h"], ["t"], name="tanh"),
         helper.make_node("Gemm", ["t", "w2", "b2"], ["y"], name="fc2")], "tanh_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.save(model, str(tmp_path / "mlp.onnx"))
    quantize_dynamic(str(tmp_path / "mlp.onnx"), str(tmp_path / "dynamic.onnx"))
    x = rng.standard_normal((512, 64)).astype(np.float32)
    shadow = ShadowGraph.from_onnx(tmp_path / "dynamic.onnx")
    result = compare(shadow, str(tmp_path / "dynamic.onnx"), [x], provider="cpu")
    assert result.basis == "dynamic quantization (uint8 activation steps)"
    assert result.passed and result.rtol == DYNAMIC_RTOL
    strict = compare(shadow, str(tmp_path / "dynamic.onnx"), [x], provider="cpu", rtol=1e-4)
    assert not strict.within_tolerance and strict.top1_agreement == 1.0
    assert result.max_rel_diff < DYNAMIC_RTOL / 3  # about one step, not three
