"""Every TensorProto of a model, wherever it sits, and the weights among them by name."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import onnx
from onnx import TensorProto

from patcher.errors import BadModelError



def iter_tensors(graph: onnx.GraphProto):
    """Every TensorProto that holds weights: initializers and Constant node values."""
    yield from graph.initializer
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.HasField("t"):
                    yield attr.t


def named_tensors(graph: onnx.GraphProto) -> dict[str, TensorProto]:
    """Weight tensors by the name the graph uses for them: initializers by their name,
    Constant values by the node's output name (the inner tensor may be unnamed)."""
    out = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value" and attr.HasField("t"):
                    out[node.output[0]] = attr.t
    return out


@dataclass(frozen=True)
class TensorSite:
    """Where a TensorProto sits in a model: ``label`` names it in messages; ``weight`` is
    True for initializers and Constant values (the tensors :func:`iter_tensors` yields,
    whose external storage write-back keeps)."""

    tensor: TensorProto
    label: str
    weight: bool


def iter_all_tensors(graph: onnx.GraphProto, _prefix: str = "") -> Iterator[TensorSite]:
    """Every TensorProto of a graph, wherever it sits: initializers, sparse initializers
    (values and indices), TENSOR, TENSORS and SPARSE_TENSOR(S) attributes of any node, and
    the same inside subgraphs (If, Loop, Scan bodies), recursively."""
    for t in graph.initializer:
        yield TensorSite(t, f"{_prefix}tensor '{t.name}'", not _prefix)
    for i, sparse in enumerate(graph.sparse_initializer):
        name = sparse.values.name or f"#{i}"
        yield TensorSite(sparse.values, f"{_prefix}sparse initializer '{name}' (values)", False)
        yield TensorSite(sparse.indices, f"{_prefix}sparse initializer '{name}' (indices)",
                         False)
    for i, node in enumerate(graph.node):
        node_name = node.name or f"{node.op_type}_{i}"
        for attr in node.attribute:
            where = f"{_prefix}attribute '{attr.name}' of node '{node_name}'"
            constant = not _prefix and node.op_type == "Constant" and attr.name == "value"
            if attr.HasField("t"):
                label = f"tensor '{attr.t.name}'" if constant and attr.t.name else where
                yield TensorSite(attr.t, label, constant)
            for k, t in enumerate(attr.tensors):
                yield TensorSite(t, f"{where} (#{k})", False)
            sparse_list = ([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []) + \
                list(attr.sparse_tensors)
            for sp in sparse_list:
                yield TensorSite(sp.values, f"{where} (sparse values)", False)
                yield TensorSite(sp.indices, f"{where} (sparse indices)", False)
            subgraphs = ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)
            for sub in subgraphs:
                yield from iter_all_tensors(sub, f"{where}, subgraph '{sub.name}': ")


def element_count(tensor: TensorProto, label: str) -> int:
    """The element count ``tensor``'s dims declare; BadModelError (naming ``label``) for a
    negative dimension or more than :data:`MAX_ELEMENTS` elements."""
    count = 1
    for d in tensor.dims:
        if d < 0:
            raise BadModelError(f"{label} has a negative dimension {d}")
        count *= d
        if count > MAX_ELEMENTS:
            raise BadModelError(f"{label} declares more than 2^40 elements")
    return count


#: Largest element count a tensor may declare (guards against overflowing dims).
MAX_ELEMENTS = 1 << 40

#: Bits per element of the packed sub-byte types (two or four elements a byte).
PACKED_BITS = {TensorProto.INT4: 4, TensorProto.UINT4: 4, TensorProto.FLOAT4E2M1: 4,
                TensorProto.INT2: 2, TensorProto.UINT2: 2}
