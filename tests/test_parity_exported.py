"""Whole models written in torch here, exported by torch's two ONNX exporters, then run
as a shadow graph: parity with onnxruntime and with the torch module itself, gradients
on every editable weight, and the editable-layer table against the module's layers.

Exporters, as torch 2.13 really behaves (asserted below):

* TorchScript (``dynamo=False``, opset 17). With ``do_constant_folding=True`` (its
  default) an eval-mode BatchNorm is folded into the Conv before it and the folded
  weight gets a generated name (``onnx::Conv_NN``). ``do_constant_folding=False`` or
  ``training=TrainingMode.PRESERVE`` keeps the BatchNormalization node. A Linear on a
  2-D input is a Gemm (transB=1, weight [out, in] under its state_dict name); on a
  3-D input a MatMul whose weight is a transposed copy named ``onnx::MatMul_NN``.
* dynamo (``dynamo=True``, the default; opset 20). Always folds BatchNorm into the Conv
  and keeps the *state_dict name* for the folded weight (``conv1.weight`` then holds
  folded values; a folded bias for a bias-free conv is ``<conv>.weight_bias``). MatMul
  weights are transposed copies with generated names (``val_N``). Weights larger
  than a few hundred bytes go to ``<file>.onnx.data`` (``external_data=True``).
"""
from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from patcher.graph.parity import FP16_ATOL, FP16_RTOL, FP32_ATOL, FP32_RTOL, compare, random_inputs
from patcher.graph.shadow import ShadowGraph

BATCH = 4


# ---------------------------------------------------------------------------- models
class PlainCNN(nn.Module):
    """conv-BN-relu x2, global pool, Linear."""

    # (module attribute, the BatchNorm right after it or None, the ONNX op it becomes)
    EDITABLE = [("conv1", "bn1", "Conv"), ("conv2", "bn2", "Conv"), ("fc", None, "Gemm")]
    INPUT = (3, 16, 16)

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class TinyResNet(nn.Module):
    """A stem and one residual block (bias-free convs, BN, residual Add)."""

    EDITABLE = [("stem", "bn0", "Conv"), ("conv_a", "bn_a", "Conv"), ("conv_b", "bn_b", "Conv"),
                ("head", None, "Gemm")]
    INPUT = (3, 12, 12)

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv_a = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(8)
        self.conv_b = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn_b = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        y = torch.relu(self.bn_a(self.conv_a(x)))
        y = self.bn_b(self.conv_b(y))
        x = torch.relu(x + y)
        return self.head(x.mean(dim=(2, 3)))


class DepthwiseSeparable(nn.Module):
    """Stem, depthwise 3x3 (groups = channels), pointwise 1x1, ReLU6/HardSwish, Linear."""

    EDITABLE = [("stem", None, "Conv"), ("dw", None, "Conv"), ("pw", None, "Conv"),
                ("fc", None, "Gemm")]
    INPUT = (3, 16, 16)

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16, 6)

    def forward(self, x):
        x = nn.functional.relu6(self.stem(x))
        x = nn.functional.relu6(self.dw(x))
        x = nn.functional.hardswish(self.pw(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class TokenMLP(nn.Module):
    """Linear layers on [B, T, D] tokens (MatMul), then a Linear head on the flat tokens (Gemm)."""

    EDITABLE = [("embed", None, "MatMul"), ("mix", None, "MatMul"), ("out", None, "Gemm")]
    INPUT = (6, 12)

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(12, 16)
        self.mix = nn.Linear(16, 16, bias=False)
        self.out = nn.Linear(6 * 16, 7)

    def forward(self, x):
        x = torch.relu(self.embed(x))
        x = nn.functional.gelu(self.mix(x))
        return self.out(torch.flatten(x, 1))


MODELS = {"cnn": PlainCNN, "residual": TinyResNet, "depthwise": DepthwiseSeparable,
          "mlp": TokenMLP}


def build(name: str) -> nn.Module:
    """The model with seeded weights and non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(0)
    module = MODELS[name]()
    gen = torch.Generator().manual_seed(1)
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            n = bn.num_features
            with torch.no_grad():
                bn.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
                bn.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                bn.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                bn.bias.copy_(torch.rand(n, generator=gen) * 0.4 - 0.2)
    return module.eval()


def example_input(module: nn.Module, batch: int, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(2)
    return torch.rand((batch, *module.INPUT), generator=gen).to(dtype)


# ---------------------------------------------------------------------------- exporting
#: exporter -> torch.onnx.export keyword arguments.
EXPORTERS = {
    "torchscript": dict(dynamo=False, opset_version=17, do_constant_folding=True),
    "torchscript-keep-bn": dict(dynamo=False, opset_version=17, do_constant_folding=False),
    "torchscript-preserve": dict(dynamo=False, opset_version=17,
                                 training=torch.onnx.TrainingMode.PRESERVE),
    "dynamo": dict(dynamo=True, external_data=True),
}


def export(module: nn.Module, x: torch.Tensor, path: Path, exporter: str) -> Path:
    """Export with a dynamic batch axis (the example batch is 2, the tests run batch 4)."""
    kwargs = dict(EXPORTERS[exporter])
    if kwargs["dynamo"]:
        pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript")
        kwargs["dynamic_shapes"] = {"x": {0: torch.export.Dim("batch")}}
        kwargs["verbose"] = False
    else:
        kwargs["dynamic_axes"] = {"x": {0: "batch"}, "y": {0: "batch"}}
        kwargs["output_names"] = ["y"]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), str(path), input_names=["x"], **kwargs)
    return path


@dataclass
class Exported:
    name: str
    exporter: str
    module: nn.Module
    path: Path
    proto: onnx.ModelProto  # as stored: external tensors not loaded

    @property
    def folds_bn(self) -> bool:
        has_bn = any(bn for _, bn, _ in self.module.EDITABLE)
        return has_bn and self.exporter in ("torchscript", "dynamo")

    def ops(self) -> set[str]:
        return {n.op_type for n in self.proto.graph.node}


CASES = [
    ("cnn", "torchscript"), ("cnn", "torchscript-keep-bn"), ("cnn", "torchscript-preserve"),
    ("cnn", "dynamo"),
    ("residual", "torchscript"), ("residual", "dynamo"),
    ("depthwise", "torchscript"), ("depthwise", "dynamo"),
    ("mlp", "torchscript"), ("mlp", "dynamo"),
]


@pytest.fixture(scope="module", params=CASES, ids=[f"{m}-{e}" for m, e in CASES])
def exported(request, tmp_path_factory) -> Exported:
    name, exporter = request.param
    module = build(name)
    folder = tmp_path_factory.mktemp(f"{name}-{exporter}")
    path = export(module, example_input(module, 2), folder / "model.onnx", exporter)
    return Exported(name, exporter, module, path, onnx.load(str(path), load_external_data=False))


def _inputs(case: Exported) -> list[np.ndarray]:
    return random_inputs(case.proto, seed=0, batch=BATCH)


# ---------------------------------------------------------------------------- tests
def test_export_is_what_we_think(exported):
    """Opset, BatchNorm folding and external data, as the module docstring says."""
    case = exported
    opset = next(o.version for o in case.proto.opset_import if o.domain in ("", "ai.onnx"))
    assert opset == 17 if case.exporter.startswith("torchscript") else opset >= 18
    assert case.proto.ir_version <= 10
    has_bn = any(bn for _, bn, _ in case.module.EDITABLE)
    assert ("BatchNormalization" in case.ops()) == (has_bn and not case.folds_bn), case.ops()
    external = [t.name for t in case.proto.graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL]
    data_file = case.path.with_name(case.path.name + ".data")
    if case.exporter == "dynamo":
        assert external and data_file.is_file(), "the dynamo exporter wrote no external data"
    else:
        assert not external and not data_file.exists()


def test_parity_with_onnxruntime(exported):
    graph = ShadowGraph.from_onnx(exported.path)
    # The path, not bytes: onnxruntime must find the .onnx.data file beside it.
    result = compare(graph, str(exported.path), _inputs(exported), provider="cpu")
    assert (result.rtol, result.atol) == (FP32_RTOL, FP32_ATOL)
    assert result.batch == BATCH
    assert result.passed, result


def test_shadow_matches_the_torch_module(exported):
    graph = ShadowGraph.from_onnx(exported.path)
    x = torch.from_numpy(_inputs(exported)[0])
    with torch.no_grad():
        (got,) = graph(x)
        want = exported.module(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_gradients_reach_every_editable_weight(exported):
    graph = ShadowGraph.from_onnx(exported.path)
    (out,) = graph(torch.from_numpy(_inputs(exported)[0]))
    out.sum().backward()
    assert graph.editable_layers
    for layer in graph.editable_layers:
        grad = graph.weight(layer.weight).grad
        assert grad is not None, layer.name
        assert torch.isfinite(grad).all(), layer.name
        assert grad.abs().max() > 0, layer.name


def _expected_weight(module: nn.Module, attr: str, bn_attr: str | None, op: str, folded: bool):
    w = getattr(module, attr).weight.detach()
    if op == "MatMul":
        return w.t()  # x @ W^T: the exporters store the transposed copy, [in, out]
    if folded and bn_attr:
        bn = getattr(module, bn_attr)
        scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
        return w * scale.reshape(-1, 1, 1, 1)
    return w


def test_editable_layer_table(exported):
    case = exported
    graph = ShadowGraph.from_onnx(case.path)
    layers = graph.editable_layers
    specs = case.module.EDITABLE
    assert [l.op for l in layers] == [op for _, _, op in specs]
    stored = {t.name: t for t in case.proto.graph.initializer}
    external = {n for n, t in stored.items() if t.data_location == onnx.TensorProto.EXTERNAL}
    state = case.module.state_dict()
    for layer, (attr, bn_attr, op) in zip(layers, specs):
        module = getattr(case.module, attr)
        what = f"{case.name}/{case.exporter}: {attr} -> {layer.name} ({layer.weight})"
        # Shapes exactly as stored in the file.
        assert layer.shape == tuple(stored[layer.weight].dims), what
        param = graph.weight(layer.weight)
        assert isinstance(param, nn.Parameter) and param.requires_grad
        assert tuple(param.shape) == layer.shape, what
        assert layer.dtype == "float32"
        # Values: the module's weight, BN-folded or transposed where the exporter did so.
        folded = case.folds_bn and bn_attr is not None
        expected = _expected_weight(case.module, attr, bn_attr, op, case.folds_bn)
        assert layer.shape == tuple(expected.shape), what
        torch.testing.assert_close(param.detach(), expected, rtol=1e-5, atol=1e-6, msg=what)
        if op == "Conv":
            assert layer.orientation == "conv" and layer.groups == module.groups, what
            assert (layer.value_dim, layer.key_dim) == (
                module.out_channels, module.in_channels // module.groups
                * module.kernel_size[0] * module.kernel_size[1]), what
        elif op == "Gemm":
            # transB=1: the weight keeps torch's [out, in].
            assert layer.orientation == "gemm_transposed", what
            assert layer.shape == tuple(module.weight.shape), what
            assert (layer.value_dim, layer.key_dim) == (module.out_features, module.in_features)
        else:
            assert layer.orientation == "matmul_right", what
            assert layer.shape == (module.in_features, module.out_features), what
        # Names.
        if op == "MatMul":
            assert layer.weight not in state, what
            if case.exporter.startswith("torchscript"):
                assert layer.weight.startswith("onnx::MatMul"), what
        elif folded and case.exporter == "torchscript":
            assert layer.weight.startswith("onnx::Conv"), what
        else:
            # Including dynamo's folded convs: the state_dict name now holds folded values.
            assert layer.weight == f"{attr}.weight", what
            if folded:
                assert not torch.allclose(param.detach(), state[layer.weight]), what
        # Storage: where the file keeps the tensor.
        assert layer.storage == ("external" if layer.weight in external else "initializer"), what
    if case.exporter == "dynamo":
        assert any(l.storage == "external" for l in layers)


def test_dynamo_folded_bias_of_a_bias_free_conv(tmp_path):
    """dynamo folds BN into a bias-free conv and names the new bias '<conv>.weight_bias'."""
    module = build("residual")
    path = export(module, example_input(module, 2), tmp_path / "model.onnx", "dynamo")
    graph = ShadowGraph.from_onnx(path)
    stem = graph.editable_layers[0]
    assert (stem.weight, stem.bias) == ("stem.weight", "stem.weight_bias")
    bn = module.bn0
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(graph.constant("stem.weight_bias"),
                               (bn.bias - bn.running_mean * scale).detach(),
                               rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- fp16
def _fp16_kernel_problem(path: Path, x: np.ndarray) -> str | None:
    """None when onnxruntime's CPU provider runs the fp16 model, else the failing op."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        session.run(None, {"x": x})
    except Exception as exc:  # NOT_IMPLEMENTED: Could not find an implementation for Conv(11)...
        return str(exc).strip().splitlines()[0]
    return None


@pytest.mark.parametrize("exporter", ["torchscript", "torchscript-keep-bn"])
def test_fp16_cnn(tmp_path, exporter):
    """The CNN cast with .half() and exported by TorchScript on the CPU: every tensor fp16."""
    module = build("cnn").half()
    path = export(module, example_input(module, 2, torch.float16), tmp_path / "model.onnx",
                  exporter)
    proto = onnx.load(str(path))
    assert ("BatchNormalization" in {n.op_type for n in proto.graph.node}) == \
        (exporter == "torchscript-keep-bn")
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert {t.data_type for t in proto.graph.initializer} == {onnx.TensorProto.FLOAT16}
    inputs = random_inputs(proto, seed=0, batch=BATCH)
    assert inputs[0].dtype == np.float16
    problem = _fp16_kernel_problem(path, inputs[0])
    if problem:
        pytest.skip(f"onnxruntime CPU has no fp16 kernel: {problem}")
    graph = ShadowGraph.from_onnx(path)
    assert graph.editable_layers
    assert {l.dtype for l in graph.editable_layers} == {"float16"}
    assert {graph.weight(l.weight).dtype for l in graph.editable_layers} == {torch.float16}
    result = compare(graph, str(path), inputs, provider="cpu")
    assert (result.rtol, result.atol) == (FP16_RTOL, FP16_ATOL)
    assert result.passed, result
    with torch.no_grad():
        (out,) = graph(torch.from_numpy(inputs[0]))
    assert out.dtype == torch.float16


# ---------------------------------------------------------------------------- CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_shadow_graph_on_cuda(tmp_path):
    module = build("cnn")
    path = export(module, example_input(module, 2), tmp_path / "model.onnx", "torchscript")
    graph = ShadowGraph.from_onnx(path).to("cuda")
    assert all(p.device.type == "cuda" for p in graph.parameters())
    assert all(b.device.type == "cuda" for b in graph.buffers())
    inputs = random_inputs(onnx.load(str(path)), seed=0, batch=BATCH)
    # TF32 convolutions/matmuls would miss the fp32 tolerance by design: keep full fp32.
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        result = compare(graph, str(path), inputs, provider="cpu", device="cuda")
        assert result.passed, result
        (out,) = graph(torch.from_numpy(inputs[0]).to("cuda"))
        out.sum().backward()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    for layer in graph.editable_layers:
        grad = graph.weight(layer.weight).grad
        assert grad is not None and grad.device.type == "cuda"
        assert torch.isfinite(grad).all() and grad.abs().max() > 0
