"""The graph's nodes as the shadow graph runs them: names, attribute values, declared
types, and the topological order."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from onnx import AttributeProto, helper

from patcher.errors import BadModelError, UnsupportedOpError
from patcher.graph.ops import lookup
from patcher.graph.support import node_names
from patcher.model import dtypes


@dataclass(frozen=True)
class NodeInfo:
    """One graph node as the shadow graph runs it."""

    index: int
    name: str
    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def attribute_value(attr: AttributeProto):
    if attr.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS):
        raise UnsupportedOpError("subgraph attributes (control flow)")
    if attr.type == AttributeProto.SPARSE_TENSOR:
        raise UnsupportedOpError("sparse tensor attributes")
    value = helper.get_attribute_value(attr)
    if attr.type == AttributeProto.TENSOR:
        return dtypes.tensor_proto_to_torch(value)
    if attr.type == AttributeProto.STRING:
        return value.decode("utf-8")
    if attr.type == AttributeProto.STRINGS:
        return [v.decode("utf-8") for v in value]
    if attr.type == AttributeProto.INTS:
        return list(value)
    if attr.type == AttributeProto.FLOATS:
        return list(value)
    return value


def declared_types(graph) -> dict[str, int]:
    """ONNX element type of every tensor whose type the file declares (initializers, Constant
    outputs, graph inputs and outputs, value_info)."""
    types = {v.name: v.type.tensor_type.elem_type
             for v in list(graph.input) + list(graph.output) + list(graph.value_info)
             if v.type.HasField("tensor_type")}
    types.update({t.name: t.data_type for t in graph.initializer})
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                types[node.output[0]] = value.data_type
    return types


def topological_order(nodes) -> list[int]:
    """Indices of ``nodes`` in an order where every input is produced first (stable)."""
    producers: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for out in node.output:
            if out:
                producers[out] = i
    order: list[int] = []
    state = [0] * len(nodes)  # 0 new, 1 on stack, 2 done
    for start in range(len(nodes)):
        if state[start]:
            continue
        stack = [(start, iter(nodes[start].input))]
        state[start] = 1
        while stack:
            i, it = stack[-1]
            advanced = False
            for name in it:
                j = producers.get(name)
                if j is None:
                    continue
                if state[j] == 1:
                    raise BadModelError(f"the graph has a cycle through node '{nodes[j].name}'")
                if state[j] == 0:
                    state[j] = 1
                    stack.append((j, iter(nodes[j].input)))
                    advanced = True
                    break
            if not advanced:
                stack.pop()
                state[i] = 2
                order.append(i)
    return order


def unique_node_names(nodes) -> list[str]:
    """:func:`patcher.graph.support.node_names`, with duplicates refused."""
    names = node_names(nodes)
    dupes = [n for n, c in Counter(names).items() if c > 1]
    if dupes:
        raise BadModelError(f"duplicate node names: {', '.join(sorted(dupes)[:10])}")
    return names


def graph_constants(nodes, initializers: dict, external: dict, opset: int
                    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every constant tensor (initializers and Constant nodes' outputs) as a torch tensor, and
    where it is stored: "initializer", "constant" (a Constant node) or "external"."""
    constant_nodes = {n.output[0]: (i, n) for i, n in enumerate(nodes)
                      if n.op_type == "Constant" and n.output}
    constants: dict[str, torch.Tensor] = {}
    storage: dict[str, str] = {}
    for name, t in initializers.items():
        constants[name] = dtypes.tensor_proto_to_torch(t)
        storage[name] = "external" if name in external else "initializer"
    for name, (i, node) in constant_nodes.items():
        attrs = {a.name: attribute_value(a) for a in node.attribute}
        constants[name] = lookup("Constant", node.domain, opset).fn(**attrs)
        storage[name] = "constant"
    for name in constant_nodes:  # a Constant node's tensor external? (rare) keep the tag
        tensor_name = next((a.t.name for a in constant_nodes[name][1].attribute
                            if a.name == "value" and a.HasField("t")), "")
        if tensor_name in external:
            storage[name] = "external"
    return constants, storage


def consumers_of(nodes, names: list[str]) -> dict[str, list[str]]:
    """Tensor name -> the names of the nodes that read it."""
    consumers: dict[str, list[str]] = {}
    for i, node in enumerate(nodes):
        for inp in node.input:
            if inp:
                consumers.setdefault(inp, []).append(names[i])
    return consumers


def last_uses(step_inputs: list[tuple[str, ...]], keep: set[str]) -> dict[int, tuple[str, ...]]:
    """Step index -> the tensors (not in ``keep``) whose last reader that step is."""
    last: dict[str, int] = {}
    for k, inputs in enumerate(step_inputs):
        for name in inputs:
            if name:
                last[name] = k
    per_step: dict[int, list[str]] = {}
    for name, k in last.items():
        if name not in keep:
            per_step.setdefault(k, []).append(name)
    return {k: tuple(v) for k, v in per_step.items()}
