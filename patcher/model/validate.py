"""What a model must be before any work: versions this onnx knows, text that is UTF-8, a graph
that runs as written (names, definitions, order, no cycle), and tensors whose dims, sizes and
values are consistent.
"""
from __future__ import annotations

from typing import Callable

import onnx
from onnx import ModelProto, TensorProto

from patcher.errors import BadModelError
from patcher.model.tensors import PACKED_BITS, element_count, iter_all_tensors

NodeCheck = Callable[[ModelProto, str], None]


def validate_model(model: ModelProto, where: str, require_order: bool = True,
                   node_check: NodeCheck | None = None) -> None:
    """Refuse versions newer than this onnx knows, graphs that cannot run as written (see
    :func:`check_graph`), and tensors whose dims or data are inconsistent (negative or
    overflowing dims, raw_data of the wrong size, NaN anywhere, Inf in weights)."""
    import numpy as np
    from onnx import helper

    _check_text_fields(model.graph, where)
    texts = [model.producer_name, model.producer_version,
             *(f for p in model.metadata_props for f in (p.key, p.value)),
             *(o.domain for o in model.opset_import)]
    if any(isinstance(t, bytes) for t in texts):
        raise BadModelError(f"{where}: producer, metadata or opset domain text is not valid "
                            "UTF-8 (corrupted file?)")
    if model.ir_version > onnx.IR_VERSION:
        raise BadModelError(f"{where}: IR version {model.ir_version} is newer than this onnx "
                            f"({onnx.__version__}) supports (IR {onnx.IR_VERSION}); upgrade onnx")
    newest = onnx.defs.onnx_opset_version()
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx") and o.version > newest:
            raise BadModelError(f"{where}: opset {o.version} is newer than this onnx supports "
                                f"({newest}); upgrade onnx")
    _check_attribute_types(model, where)
    check_graph(model, where, require_order, node_check)
    initializer_names = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in initializer_names:
            continue
        if vi.type.WhichOneof("value") is None:
            raise BadModelError(f"{where}: graph input '{vi.name}' has no type")
        if not vi.type.HasField("tensor_type"):
            continue
        elem = vi.type.tensor_type.elem_type
        if elem == TensorProto.UNDEFINED or elem not in TensorProto.DataType.values():
            raise BadModelError(f"{where}: graph input '{vi.name}' has no valid element type")
    weights = _weight_consumers(model.graph)
    for site in iter_all_tensors(model.graph):
        t, label = site.tensor, site.label
        if site.weight and not t.name:
            label = "tensor '<unnamed Constant>'"
        if t.data_type == TensorProto.UNDEFINED or t.data_type not in TensorProto.DataType.values():
            raise BadModelError(f"{where}: {label} has no valid element type "
                                f"({t.data_type})")
        count = element_count(t, f"{where}: {label}")
        weight_of = weights.get(t.name) if site.weight else None
        if weight_of is not None and count == 0:
            raise BadModelError(f"{where}: {label} (a weight of node '{weight_of}') has no "
                                f"elements (dims {list(t.dims)})")
        if t.data_type == TensorProto.STRING or t.data_location == TensorProto.EXTERNAL:
            continue
        try:
            itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        except (KeyError, TypeError, ValueError):
            continue
        if t.raw_data and t.data_type not in PACKED_BITS:
            if len(t.raw_data) != count * itemsize:
                raise BadModelError(f"{where}: {label} holds {len(t.raw_data)} bytes of "
                                    f"data, its dims {list(t.dims)} need {count * itemsize}")
        try:
            with np.errstate(all="ignore"):
                values = onnx.numpy_helper.to_array(t)
        except Exception as exc:  # numpy/onnx raise several kinds for inconsistent data
            raise BadModelError(f"{where}: {label}: its data does not match its dims "
                                f"{list(t.dims)} and type ({' '.join(str(exc).split())[:120]})") \
                from None
        if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE,
                           TensorProto.BFLOAT16) and count:
            if t.data_type == TensorProto.BFLOAT16:
                values = values.astype(np.float32)
            if np.isnan(values).any():
                raise BadModelError(f"{where}: {label} contains NaN values")
            if weight_of is not None and np.isinf(values).any():
                raise BadModelError(f"{where}: {label} (a weight of node "
                                    f"'{weight_of}') contains Inf values")


def _check_text_fields(graph: onnx.GraphProto, where: str) -> None:
    """Names must be text: protobuf hands back bytes for strings that are not UTF-8."""
    def bad(value) -> bool:
        return isinstance(value, bytes)

    for i, node in enumerate(graph.node):
        fields = [node.name, node.op_type, node.domain, *node.input, *node.output]
        if any(bad(f) for f in fields) or any(bad(a.name) for a in node.attribute):
            raise BadModelError(f"{where}: node {i} has a name, op type or tensor name that is "
                                "not valid UTF-8 (corrupted file?)")
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.UNDEFINED:
                raise BadModelError(f"{where}: node '{node.name or i}' attribute '{attr.name}' "
                                    "has no type (corrupted file?)")
            try:
                attr.s.decode("utf-8")
                for text in attr.strings:
                    text.decode("utf-8")
            except UnicodeDecodeError:
                raise BadModelError(f"{where}: node '{node.name or i}' attribute "
                                    f"'{attr.name}' holds text that is not valid UTF-8 "
                                    "(corrupted file?)") from None
    for kind, items in (("initializer", graph.initializer), ("graph input", graph.input),
                        ("graph output", graph.output), ("value info", graph.value_info)):
        for item in items:
            if bad(item.name):
                raise BadModelError(f"{where}: a {kind} name is not valid UTF-8 (corrupted file?)")


def _check_attribute_types(model: ModelProto, where: str) -> None:
    """Each attribute of a default-domain node has the type its op's schema declares."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        return
    for i, node in enumerate(model.graph.node):
        if node.domain not in ("", "ai.onnx"):
            continue
        try:
            schema = onnx.defs.get_schema(node.op_type, opset, "")
        except Exception:  # unknown op: reported as unsupported later
            continue
        for attr in node.attribute:
            declared = schema.attributes.get(attr.name)
            if declared is not None and int(declared.type) != int(attr.type):
                raise BadModelError(
                    f"{where}: node '{node.name or i}' attribute '{attr.name}' has type "
                    f"{onnx.AttributeProto.AttributeType.Name(attr.type)}, its op expects "
                    f"{onnx.AttributeProto.AttributeType.Name(int(declared.type))}")


#: Ops whose constant inputs are weights: Inf there is corruption (elsewhere, +-Inf is a
#: legitimate constant, e.g. an attention mask or a Clip bound).
WEIGHT_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization",
              "LayerNormalization", "InstanceNormalization"}


def _weight_consumers(graph: onnx.GraphProto) -> dict[str, str]:
    """Tensor name -> the first weight-op node that reads it."""
    out: dict[str, str] = {}
    for i, node in enumerate(graph.node):
        if node.op_type in WEIGHT_OPS:
            for name in node.input:
                out.setdefault(name, node.name or f"{node.op_type}_{i}")
    # Constant nodes: their tensor may be unnamed; key it by the node's output name too
    for node in graph.node:
        if node.op_type == "Constant" and node.output and node.output[0] in out:
            for attr in node.attribute:
                if attr.name == "value" and attr.HasField("t") and attr.t.name:
                    out.setdefault(attr.t.name, out[node.output[0]])
    return out


def check_graph(model: ModelProto, where: str, require_order: bool = True,
                node_check: NodeCheck | None = None) -> None:
    """The graph must be runnable as written: unique names, every tensor defined once and
    before it is used (topological order, no cycle, no dangling input), every graph output
    produced. ``node_check`` (which ops the shadow graph runs:
    :func:`patcher.graph.support.require_supported`) runs first. ``require_order=False`` accepts nodes out
    of order (the shadow graph sorts them) but still refuses cycles."""
    from collections import Counter

    graph = model.graph
    nodes = list(graph.node)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        raise BadModelError(f"{where}: the model imports no default-domain opset")
    names = [n.name or f"{n.op_type}_{i}" for i, n in enumerate(nodes)]
    if node_check is not None:
        node_check(model, where)

    def dupes(items) -> list[str]:
        return sorted(k for k, c in Counter(items).items() if c > 1)

    if d := dupes(n.name for n in nodes if n.name):
        raise BadModelError(f"{where}: duplicate node names: {', '.join(d[:10])}")
    if d := dupes(t.name for t in graph.initializer):
        raise BadModelError(f"{where}: duplicate initializer names: {', '.join(d[:10])}")
    if d := dupes(o.name for o in graph.output):
        raise BadModelError(f"{where}: graph output '{d[0]}' is listed more than once")
    if d := dupes(i.name for i in graph.input):
        raise BadModelError(f"{where}: graph input '{d[0]}' is listed more than once")
    defined: dict[str, str] = {}
    for vi in graph.input:
        defined[vi.name] = "graph input"
    for t in graph.initializer:
        defined.setdefault(t.name, "initializer")  # an initializer may also be a graph input
    producer: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for out in node.output:
            if not out:
                continue
            if out in defined:
                raise BadModelError(f"{where}: tensor '{out}' is defined twice: by node "
                                    f"'{names[i]}' and by {defined[out]}")
            defined[out] = f"node '{names[i]}'"
            producer[out] = i
    done: set[str] = {vi.name for vi in graph.input} | {t.name for t in graph.initializer}
    for i, node in enumerate(nodes):
        for inp in node.input:
            if not inp or inp in done:
                continue
            if inp not in producer:
                raise BadModelError(f"{where}: node '{names[i]}' reads '{inp}', which no node, "
                                    "initializer or graph input defines")
            j = producer[inp]
            if _reaches(nodes, producer, start=j, target=i):
                raise BadModelError(f"{where}: the graph has a cycle through nodes "
                                    f"'{names[i]}' and '{names[j]}' (tensor '{inp}')")
            if require_order:
                raise BadModelError(f"{where}: node '{names[i]}' reads '{inp}' before node "
                                    f"'{names[j]}' makes it (the graph is not in topological "
                                    "order, as ONNX requires)")
        done.update(o for o in node.output if o)
    for o in graph.output:
        if o.name not in defined:
            raise BadModelError(f"{where}: graph output '{o.name}' is not made by any node")


def _reaches(nodes, producer: dict[str, int], start: int, target: int) -> bool:
    """Whether node ``start`` depends (through its inputs) on node ``target``."""
    seen, stack = set(), [start]
    while stack:
        k = stack.pop()
        if k == target:
            return True
        if k in seen:
            continue
        seen.add(k)
        stack.extend(producer[n] for n in nodes[k].input if n in producer)
    return False
