"""Which nodes the shadow graph can run: the op-support check every loader applies.

A model is refused as a whole, with every unsupported node named at once, before any work.
"""
from __future__ import annotations

import os
from collections import Counter
from typing import Mapping, Sequence

from onnx import AttributeProto, ModelProto

from patcher.errors import UnsupportedOpError
from patcher.graph.ops import lookup
from patcher.model.modelio import LoadedModel, load_model


def op_histogram(proto: ModelProto) -> dict[str, int]:
    counts = Counter((f"{n.domain}." if n.domain not in ("", "ai.onnx") else "") + n.op_type
                     for n in proto.graph.node)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


#: What to do about a quantized op the shadow graph cannot run.
QUANTIZED_ADVICE = ("re-quantize the float model with onnxruntime.quantization in QDQ format "
                    "(quantize_static(..., quant_format=QuantFormat.QDQ)), or patch the float "
                    "model and quantize the patched file again")


def quantized_form(op_type: str, domain: str) -> str | None:
    """The quantized model form an op belongs to ("QDQ", "QOperator", "dynamic-quantization"),
    or None for an op that is not a quantized one."""
    if op_type in ("QuantizeLinear", "DequantizeLinear"):
        return "QDQ"
    if op_type.startswith("QLinear") or (domain == "com.microsoft" and op_type.startswith("Q")):
        return "QOperator"
    if (op_type.endswith("Integer") or "IntegerToFloat" in op_type
            or op_type.startswith("DynamicQuantize") or op_type == "MatMulNBits"):
        return "dynamic-quantization"
    return None


def quantized_storage(nodes) -> str | None:
    """How a model's weights are stored quantized, by the most telling form among its nodes
    ("QOperator", "dynamic-quantization", "QDQ"), or None for a float model."""
    forms = {quantized_form(n.op_type, n.domain or "ai.onnx") for n in nodes}
    return next((f for f in ("QOperator", "dynamic-quantization", "QDQ") if f in forms), None)


#: What to say where a quantized model has no editable layer (graph/quantized_layers edits
#: QDQ and QOperator int8 weights and quantize_dynamic's ConvInteger/MatMulInteger as it
#: wires them; not onnxruntime's fused forms or 4-bit MatMulNBits).
QUANTIZED_NOT_EDITABLE = ("no quantized weight is stored in a form that can be edited yet "
                          "(editable: QDQ and QOperator int8 weights, and ConvInteger/"
                          "MatMulInteger as quantize_dynamic wires them; not onnxruntime's "
                          "fused DynamicQuantizeMatMul/MatMulIntegerToFloat or MatMulNBits): "
                          "quantize the float model again without saving onnxruntime's "
                          "optimised graph, or patch the float model and quantize it again")


def node_opset(domain: str, opset: int, opsets: Mapping[str, int] | None = None) -> int:
    """The opset version a node of ``domain`` is looked up at: ``opset`` for the default domain,
    the model's import of that domain otherwise (1 when not given)."""
    if domain in ("", "ai.onnx"):
        return opset
    return (opsets or {}).get(domain, 1)


def find_unsupported(nodes, names: Sequence[str], opset: int,
                     opsets: Mapping[str, int] | None = None) -> list[str]:
    """One message per distinct problem (op, opset, attribute, control flow), with counts.

    ``opsets`` maps other domains (com.microsoft, ...) to the model's opset version of each."""
    problems: list[str] = []
    for i, node in enumerate(nodes):
        domain = node.domain or "ai.onnx"
        version = node_opset(node.domain, opset, opsets)
        impl = lookup(node.op_type, node.domain, version)
        where = f"{node.op_type} (domain {domain}, opset {version}) at node '{names[i]}'"
        if impl is None:
            form = quantized_form(node.op_type, domain)
            if form is not None:
                qualified = node.op_type if domain == "ai.onnx" else f"{domain}.{node.op_type}"
                problems.append(f"{form} op {qualified} is not supported (opset {version}, node "
                                f"'{names[i]}'); {QUANTIZED_ADVICE}")
            else:
                problems.append(where)
            continue
        known = impl.attribute_names
        for attr in node.attribute:
            if attr.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS):
                problems.append(f"{where}: control flow (subgraph attribute '{attr.name}')")
            elif attr.name not in known:
                problems.append(f"{where}: attribute '{attr.name}' not supported")
    return problems


def default_opset(model: ModelProto) -> int | None:
    """The version of the default (ai.onnx) opset the model imports, None without one."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def opsets_of(model: ModelProto) -> dict[str, int]:
    """Domain ("ai.onnx" for the default one) -> the opset version the model imports."""
    return {o.domain or "ai.onnx": o.version for o in model.opset_import}


def node_names(nodes) -> list[str]:
    """Each node's name, or ``<op>_<index>`` for an unnamed one."""
    return [n.name or f"{n.op_type}_{i}" for i, n in enumerate(nodes)]


def require_supported(model: ModelProto, where: str = "model") -> None:
    """Raise UnsupportedOpError naming every node the shadow graph cannot run."""
    nodes = list(model.graph.node)
    opset = default_opset(model)
    if opset is None:
        return  # load_model has refused such a model already
    problems = find_unsupported(nodes, node_names(nodes), opset, opsets_of(model))
    if problems:
        at = f" in {where}" if where != "model" else ""
        raise UnsupportedOpError(f"{len(problems)} unsupported node(s){at}: "
                                 f"{'; '.join(problems)}")


def load_supported_model(source: "str | os.PathLike | ModelProto",
                         base_dir: "str | os.PathLike | None" = None,
                         warn: bool = True) -> LoadedModel:
    """:func:`patcher.model.modelio.load_model`, then :func:`require_supported`."""
    return load_model(source, base_dir, warn, node_check=require_supported)
