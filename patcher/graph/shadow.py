"""The shadow graph: an ONNX model run as a differentiable torch ``nn.Module``.

Every node runs through the op registry (:mod:`patcher.graph.ops`). Weights stay
exactly as stored in the file (no folding, no transposes), and the weight of
each editable layer (Conv; Gemm's B; MatMul with one constant operand) is an
``nn.Parameter`` reachable by its ONNX tensor name, so a delta computed here
can be written back into the same tensor. Other constants are buffers, so
``.to(device)`` moves everything.

Hooks see every node's inputs and outputs, in one forward pass, and may replace
the outputs (attribution needs layer outputs and their gradients; interventions
replace them).
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from onnx import AttributeProto, ModelProto, helper

from patcher.model import dtypes
from patcher.errors import BadModelError, RectifyError, UnsupportedOpError
from patcher.graph.support import find_unsupported, load_supported_model, node_opset
from patcher.model.modelio import LoadedModel
from patcher.graph.ops import lookup
from patcher.graph.ops.registry import OpImpl

class ShadowExecutionError(RectifyError):
    """A node could not run on the given inputs (usually: inputs of the wrong shape)."""


#: Ops whose constant weight makes them a linear associative memory v = W k.
EDITABLE_OPS = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True)
class NodeInfo:
    """One graph node as the shadow graph runs it."""

    index: int
    name: str
    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class EditableLayer:
    """A layer whose weight a rank-one edit can change.

    ``orientation`` says how the stored weight maps keys to values:
    ``conv`` (W [M, C/g, k...], key = unfolded patch), ``gemm`` (B [K, N], v = k B),
    ``gemm_transposed`` (B [N, K], v = k B^T), ``matmul_right`` (x @ W, W [K, N]),
    ``matmul_left`` (W @ x, W [M, K], keys are columns of x).
    """

    name: str
    op: str
    weight: str
    storage: str  # "initializer", "constant" (a Constant node) or "external"
    shape: tuple[int, ...]
    dtype: str
    key_dim: int
    value_dim: int
    groups: int
    orientation: str
    node_index: int
    weight_input: int
    bias: str | None
    shared_with: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        return {
            "name": self.name, "op": self.op, "weight": self.weight, "storage": self.storage,
            "shape": list(self.shape), "dtype": self.dtype, "key_dim": self.key_dim,
            "value_dim": self.value_dim, "groups": self.groups, "orientation": self.orientation,
            "bias": self.bias, "shared_with": list(self.shared_with),
        }


Hook = Callable[[NodeInfo, tuple, tuple], "tuple | None"]


class HookHandle:
    """Returned by :meth:`ShadowGraph.register_hook`; ``remove()`` detaches the hook."""

    def __init__(self, hooks: dict, key: int) -> None:
        self._hooks, self._key = hooks, key

    def remove(self) -> None:
        self._hooks.pop(self._key, None)

    def __enter__(self) -> "HookHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@dataclass
class _Step:
    info: NodeInfo
    fn: Callable
    attrs: dict
    release: tuple[str, ...] = field(default_factory=tuple)


def _attribute_value(attr: AttributeProto):
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


def _declared_types(graph) -> dict[str, int]:
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


def _topological_order(nodes) -> list[int]:
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


class ShadowGraph(torch.nn.Module):
    """An ONNX graph as a torch module: ``graph(*inputs) -> tuple(outputs)``."""

    def __init__(self, model: LoadedModel) -> None:
        super().__init__()
        proto = model.proto
        graph = proto.graph
        self.model = model
        self.opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
                          None)
        if self.opset is None:
            raise BadModelError("the model imports no default-domain opset")
        self.ir_version = proto.ir_version
        initializers = {t.name: t for t in graph.initializer}
        self.input_names = [i.name for i in graph.input if i.name not in initializers]
        self.overridable_initializers = [i.name for i in graph.input if i.name in initializers]
        self.output_names = [o.name for o in graph.output]

        nodes = list(graph.node)
        names = self._node_names(nodes)
        self.opsets = {o.domain or "ai.onnx": o.version for o in proto.opset_import}
        problems = find_unsupported(nodes, names, self.opset, self.opsets)  # every node, at once
        if problems:
            raise UnsupportedOpError(f"{len(problems)} unsupported node(s): {'; '.join(problems)}")

        constant_nodes = {n.output[0]: (i, n) for i, n in enumerate(nodes)
                          if n.op_type == "Constant" and n.output}
        constants: dict[str, torch.Tensor] = {}
        storage: dict[str, str] = {}
        for name, t in initializers.items():
            constants[name] = dtypes.tensor_proto_to_torch(t)
            storage[name] = "external" if name in model.external else "initializer"
        for name, (i, node) in constant_nodes.items():
            attrs = {a.name: _attribute_value(a) for a in node.attribute}
            constants[name] = lookup("Constant", node.domain, self.opset).fn(**attrs)
            storage[name] = "constant"
        for name in constant_nodes:  # a Constant node's tensor external? (rare) keep the tag
            tensor_name = next((a.t.name for a in constant_nodes[name][1].attribute
                                if a.name == "value" and a.HasField("t")), "")
            if tensor_name in model.external:
                storage[name] = "external"

        consumers: dict[str, list[str]] = {}
        for i, node in enumerate(nodes):
            for inp in node.input:
                if inp:
                    consumers.setdefault(inp, []).append(names[i])

        self.editable_layers: list[EditableLayer] = []
        for i, node in enumerate(nodes):
            layer = self._editable(i, node, names[i], constants, storage, consumers)
            if layer is not None:
                self.editable_layers.append(layer)

        # Parameters for editable weights (keyed by position: ONNX names may contain dots),
        # buffers for every other constant.
        self.weights = torch.nn.ParameterList()
        self._param_index: dict[str, int] = {}
        for layer in self.editable_layers:
            if layer.weight not in self._param_index:
                self._param_index[layer.weight] = len(self.weights)
                self.weights.append(torch.nn.Parameter(constants[layer.weight], requires_grad=True))
        self._buffer_key: dict[str, str] = {}
        for k, (name, value) in enumerate(constants.items()):
            if name not in self._param_index:
                key = f"const_{k}"
                self.register_buffer(key, value, persistent=False)
                self._buffer_key[name] = key

        declared = _declared_types(graph)
        order = _topological_order(nodes)
        self.nodes: list[NodeInfo] = []
        self._steps: list[_Step] = []
        for i in order:
            node = nodes[i]
            if node.op_type == "Constant":
                continue
            info = NodeInfo(i, names[i], node.op_type, tuple(node.input), tuple(node.output))
            impl: OpImpl = lookup(node.op_type, node.domain,  # checked above
                                  node_opset(node.domain, self.opset, self.opsets))
            attrs = {a.name: _attribute_value(a) for a in node.attribute}
            if impl.wants_output_count:
                attrs["num_outputs_"] = len(node.output)
            if impl.wants_input_types:
                attrs["input_types_"] = tuple(declared.get(n, 0) for n in node.input)
            self.nodes.append(info)
            self._steps.append(_Step(info, impl.fn, attrs))
        self._plan_release(constants)
        self._hooks: dict[int, Hook] = {}
        self._next_hook = 0
        self.node_by_name = {info.name: info for info in self.nodes}

    # ------------------------------------------------------------------ building
    @staticmethod
    def _node_names(nodes) -> list[str]:
        names = [n.name or f"{n.op_type}_{i}" for i, n in enumerate(nodes)]
        dupes = [n for n, c in Counter(names).items() if c > 1]
        if dupes:
            raise BadModelError(f"duplicate node names: {', '.join(sorted(dupes)[:10])}")
        return names

    def _editable(self, i, node, name, constants, storage, consumers) -> EditableLayer | None:
        if node.op_type not in EDITABLE_OPS:
            return None
        inputs = list(node.input)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "MatMul":
            const = [k for k in (0, 1) if inputs[k] in constants]
            if len(const) != 1:
                return None
            widx = const[0]
        else:
            widx = 1
            if len(inputs) < 2 or inputs[1] not in constants:
                return None
        wname = inputs[widx]
        w = constants[wname]
        if not w.dtype.is_floating_point:
            return None
        shape = tuple(w.shape)
        groups = 1
        bias = inputs[2] if len(inputs) > 2 and inputs[2] else None
        if node.op_type == "Conv":
            groups = int(attrs.get("group", 1))
            key_dim = int(w[0].numel()) if w.dim() > 0 else 1
            value_dim, orientation = shape[0], "conv"
        elif node.op_type == "Gemm":
            if w.dim() != 2:
                return None
            if attrs.get("transB", 0):
                value_dim, key_dim, orientation = shape[0], shape[1], "gemm_transposed"
            else:
                key_dim, value_dim, orientation = shape[0], shape[1], "gemm"
        else:
            if w.dim() != 2:
                return None
            bias = None
            if widx == 1:
                key_dim, value_dim, orientation = shape[0], shape[1], "matmul_right"
            else:
                value_dim, key_dim, orientation = shape[0], shape[1], "matmul_left"
        shared = tuple(c for c in consumers.get(wname, []) if c != name)
        return EditableLayer(
            name=name, op=node.op_type, weight=wname, storage=storage[wname], shape=shape,
            dtype=str(w.dtype).replace("torch.", ""), key_dim=key_dim, value_dim=value_dim,
            groups=groups, orientation=orientation, node_index=i, weight_input=widx, bias=bias,
            shared_with=shared)

    def _plan_release(self, constants) -> None:
        """Drop intermediates after their last use (keeps inference memory flat)."""
        keep = set(self.output_names) | set(constants) | set(self.input_names)
        last: dict[str, int] = {}
        for k, step in enumerate(self._steps):
            for name in step.info.inputs:
                if name:
                    last[name] = k
        per_step: dict[int, list[str]] = {}
        for name, k in last.items():
            if name not in keep:
                per_step.setdefault(k, []).append(name)
        for k, step in enumerate(self._steps):
            step.release = tuple(per_step.get(k, ()))

    # ------------------------------------------------------------------ public
    @classmethod
    def from_onnx(cls, source: "str | os.PathLike | ModelProto | LoadedModel",
                  base_dir: "str | os.PathLike | None" = None) -> "ShadowGraph":
        """Build from a path, a ``ModelProto`` (external data relative to ``base_dir``)
        or an already loaded model."""
        model = (source if isinstance(source, LoadedModel)
                 else load_supported_model(source, base_dir))
        return cls(model)

    def weight(self, name: str) -> torch.nn.Parameter:
        """The Parameter holding ONNX weight tensor ``name`` (editable layers only)."""
        try:
            return self.weights[self._param_index[name]]
        except KeyError:
            raise KeyError(f"'{name}' is not the weight of an editable layer") from None

    def constant(self, name: str) -> torch.Tensor:
        """Any constant tensor (initializer or Constant output) by ONNX name."""
        if name in self._param_index:
            return self.weight(name)
        return getattr(self, self._buffer_key[name])

    def layer(self, name: str) -> EditableLayer:
        for layer in self.editable_layers:
            if layer.name == name:
                return layer
        known = ", ".join(l.name for l in self.editable_layers[:8])
        raise KeyError(f"no editable layer named '{name}' (editable layers: {known}...)")

    def node_attributes(self, name: str) -> dict:
        """The converted attributes of node ``name`` (as its op function receives them)."""
        for step in self._steps:
            if step.info.name == name:
                return dict(step.attrs)
        raise KeyError(f"unknown node '{name}'")

    def downstream_nodes(self, name: str) -> set[str]:
        """Names of the nodes that (transitively) consume node ``name``'s outputs."""
        consumers: dict[str, list[NodeInfo]] = {}
        for info in self.nodes:
            for inp in info.inputs:
                consumers.setdefault(inp, []).append(info)
        seen: set[str] = set()
        frontier = list(self.node_by_name[name].outputs)
        while frontier:
            tensor = frontier.pop()
            for info in consumers.get(tensor, ()):
                if info.name not in seen:
                    seen.add(info.name)
                    frontier.extend(info.outputs)
        return seen

    def register_hook(self, fn: Hook, nodes: Iterable[str] | None = None) -> HookHandle:
        """Call ``fn(node, inputs, outputs)`` after each node (or only the named ones).

        A non-None return value replaces the node's outputs (a tuple of the same length).
        """
        wanted = set(nodes) if nodes is not None else None
        if wanted is not None:
            unknown = wanted - set(self.node_by_name)
            if unknown:
                raise KeyError(f"unknown node(s): {', '.join(sorted(unknown))}")
        key = self._next_hook
        self._next_hook += 1
        self._hooks[key] = (fn, wanted)
        return HookHandle(self._hooks, key)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        env = self._initial_env(inputs)
        hooks = list(self._hooks.values())
        for step in self._steps:
            self._run_step(step, env, hooks)
        return tuple(env[n] for n in self.output_names)

    def run_until(self, name: str, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the graph up to and including node ``name``; return every live tensor.

        With :meth:`run_after` this splits one forward in two, so that the part before a
        layer runs once and the part after it many times (interventions, repair search).
        Hooks are not called."""
        stop = self._step_index(name)
        env = self._initial_env(inputs)
        for step in self._steps[:stop + 1]:
            self._run_step(step, env, ())
        return env

    def run_after(self, name: str, env: dict[str, torch.Tensor],
                  replace: "tuple[torch.Tensor, ...] | None" = None) -> tuple[torch.Tensor, ...]:
        """Resume from ``env`` (of :meth:`run_until`) after node ``name``, with its outputs
        optionally replaced. ``env`` is not modified, so it can be resumed again."""
        start = self._step_index(name)
        env = dict(env)
        if replace is not None:
            for out_name, value in zip(self._steps[start].info.outputs, replace):
                if out_name:
                    env[out_name] = value
        for step in self._steps[start + 1:]:
            self._run_step(step, env, ())
        return tuple(env[n] for n in self.output_names)

    def _step_index(self, name: str) -> int:
        for i, step in enumerate(self._steps):
            if step.info.name == name:
                return i
        raise KeyError(f"unknown node '{name}'")

    def _initial_env(self, inputs) -> dict[str, torch.Tensor]:
        if len(inputs) != len(self.input_names):
            raise TypeError(f"expected {len(self.input_names)} input(s) "
                            f"({', '.join(self.input_names)}), got {len(inputs)}")
        env: dict[str, torch.Tensor] = {}
        for name, idx in self._param_index.items():
            env[name] = self.weights[idx]
        for name, key in self._buffer_key.items():
            env[name] = self._buffers[key]
        env.update(zip(self.input_names, inputs))
        return env

    def _run_step(self, step: "_Step", env: dict, hooks) -> None:
        info = step.info
        args = [env[n] if n else None for n in info.inputs]
        try:
            out = step.fn(*args, **step.attrs)
        except RectifyError:
            raise
        except Exception as exc:  # torch's message, attributed to the node
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            shapes = ", ".join("x".join(map(str, a.shape)) if isinstance(a, torch.Tensor)
                               else "-" for a in args)
            raise ShadowExecutionError(
                f"node '{info.name}' ({info.op_type}) failed on inputs of shape "
                f"[{shapes}]: {first}") from exc
        if not isinstance(out, tuple):
            out = (out,)
        for fn, wanted in hooks:
            if wanted is None or info.name in wanted:
                replaced = fn(info, tuple(args), out)
                if replaced is not None:
                    out = tuple(replaced)
        for out_name, value in zip(info.outputs, out):
            if out_name:
                env[out_name] = value
        for released in step.release:
            env.pop(released, None)

    def run_numpy(self, *arrays, device: "torch.device | str | None" = None):
        """Convenience: numpy in, numpy out, no gradients."""
        device = device or next((b.device for b in self.buffers()), torch.device("cpu"))
        with torch.no_grad():
            outs = self(*[dtypes.numpy_to_torch(a).to(device) for a in arrays])
        return [dtypes.torch_to_numpy(o) for o in outs]
