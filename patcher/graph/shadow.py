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
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from onnx import ModelProto

from patcher.model import dtypes
from patcher.errors import BadModelError, RectifyError, UnsupportedOpError
from patcher.graph.support import (default_opset, find_unsupported, load_supported_model,
                                   node_opset, opsets_of)
from patcher.model.modelio import LoadedModel
from patcher.graph.layers import EDITABLE_OPS, EditableLayer, editable_layer
from patcher.graph.nodes import (NodeInfo, attribute_value, consumers_of, declared_types,
                                 graph_constants, last_uses, topological_order,
                                 unique_node_names)
from patcher.graph.ops import lookup
from patcher.graph.ops.registry import OpImpl
from patcher.graph.per_image import PerImage, fixed_batch, joined, split

__all__ = ["EDITABLE_OPS", "EditableLayer", "HookHandle", "NodeInfo", "ShadowExecutionError",
           "ShadowGraph"]


class ShadowExecutionError(RectifyError):
    """A node could not run on the given inputs (usually: inputs of the wrong shape)."""


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


class _Env(dict):
    """Live tensors of :meth:`ShadowGraph.run_until`, fixed-batch pieces joined; ``pieces``
    remembers how to cut them again for :meth:`ShadowGraph.run_after`."""

    def __init__(self, env: dict) -> None:
        super().__init__({k: joined(v) for k, v in env.items()})
        self.pieces = {k: len(v) for k, v in env.items() if isinstance(v, PerImage)}


class ShadowGraph(torch.nn.Module):
    """An ONNX graph as a torch module: ``graph(*inputs) -> tuple(outputs)``."""

    def __init__(self, model: LoadedModel) -> None:
        super().__init__()
        proto = model.proto
        graph = proto.graph
        self.model = model
        self.opset = default_opset(proto)
        if self.opset is None:
            raise BadModelError("the model imports no default-domain opset")
        self.ir_version = proto.ir_version
        initializers = {t.name: t for t in graph.initializer}
        self.input_names = [i.name for i in graph.input if i.name not in initializers]
        self.overridable_initializers = [i.name for i in graph.input if i.name in initializers]
        self.output_names = [o.name for o in graph.output]
        #: The batch size the model fixes (None: symbolic). A pass over more images runs
        #: each node on this many at a time (see :mod:`patcher.graph.per_image`).
        self.fixed_batch = fixed_batch(graph, initializers)

        nodes = list(graph.node)
        names = unique_node_names(nodes)
        self.opsets = opsets_of(proto)
        problems = find_unsupported(nodes, names, self.opset, self.opsets)  # every node, at once
        if problems:
            raise UnsupportedOpError(f"{len(problems)} unsupported node(s): {'; '.join(problems)}")

        constants, storage = graph_constants(nodes, initializers, model.external, self.opset)
        consumers = consumers_of(nodes, names)

        self.editable_layers: list[EditableLayer] = []
        for i, node in enumerate(nodes):
            layer = editable_layer(i, node, names[i], constants, storage, consumers)
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

        declared = declared_types(graph)
        order = topological_order(nodes)
        self.nodes: list[NodeInfo] = []
        self._steps: list[_Step] = []
        for i in order:
            node = nodes[i]
            if node.op_type == "Constant":
                continue
            info = NodeInfo(i, names[i], node.op_type, tuple(node.input), tuple(node.output))
            impl: OpImpl = lookup(node.op_type, node.domain,  # checked above
                                  node_opset(node.domain, self.opset, self.opsets))
            attrs = {a.name: attribute_value(a) for a in node.attribute}
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
    def _plan_release(self, constants) -> None:
        """Drop intermediates after their last use (keeps inference memory flat)."""
        keep = set(self.output_names) | set(constants) | set(self.input_names)
        release = last_uses([step.info.inputs for step in self._steps], keep)
        for k, step in enumerate(self._steps):
            step.release = release.get(k, ())

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
        outer, self.current_inputs = getattr(self, "current_inputs", None), inputs
        try:
            for step in self._steps:
                self._run_step(step, env, hooks)
        finally:
            self.current_inputs = outer  # hooks read the inputs of the pass they run in
        return tuple(joined(env[n]) for n in self.output_names)

    def node_inputs(self, names: Iterable[str], *inputs: torch.Tensor) -> dict[str, tuple]:
        """The input tensors each node of ``names`` receives when the graph runs on
        ``inputs`` (it runs up to the last of them only; hooks are not called)."""
        wanted = set(names)
        stop = max(self._step_index(n) for n in wanted)
        env = self._initial_env(inputs)
        found: dict[str, tuple] = {}
        for step in self._steps[:stop + 1]:
            if step.info.name in wanted:
                found[step.info.name] = tuple(joined(env[n]) if n else None
                                              for n in step.info.inputs)
            self._run_step(step, env, ())
        return found

    def run_until(self, name: str, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the graph up to and including node ``name``; return every live tensor.

        With :meth:`run_after` this splits one forward in two, so that the part before a
        layer runs once and the part after it many times (interventions, repair search).
        Hooks are not called."""
        stop = self._step_index(name)
        env = self._initial_env(inputs)
        for step in self._steps[:stop + 1]:
            self._run_step(step, env, ())
        return _Env(env)

    def run_after(self, name: str, env: dict[str, torch.Tensor],
                  replace: "tuple[torch.Tensor, ...] | None" = None) -> tuple[torch.Tensor, ...]:
        """Resume from ``env`` (of :meth:`run_until`) after node ``name``, with its outputs
        optionally replaced. ``env`` is not modified, so it can be resumed again."""
        start = self._step_index(name)
        pieces = getattr(env, "pieces", {})
        env = {k: split(v, pieces[k]) if k in pieces else v for k, v in env.items()}
        if replace is not None:
            for out_name, value in zip(self._steps[start].info.outputs, replace):
                if out_name:
                    env[out_name] = split(value, pieces[out_name]) if out_name in pieces else value
        for step in self._steps[start + 1:]:
            self._run_step(step, env, ())
        return tuple(joined(env[n]) for n in self.output_names)

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
        env.update(zip(self.input_names, self._fixed_batch_pieces(inputs)))
        return env

    def _fixed_batch_pieces(self, inputs) -> tuple:
        """The inputs as they are, or cut into pieces of the model's fixed batch size when a
        pass holds more images than that (see :mod:`patcher.graph.per_image`)."""
        fixed = self.fixed_batch
        if fixed is None or not inputs or inputs[0].dim() < 2 or inputs[0].shape[0] == fixed:
            return tuple(inputs)
        count = int(inputs[0].shape[0])
        if count % fixed:
            raise ShadowExecutionError(f"the model fixes its batch at {fixed} image(s); "
                                       f"{count} image(s) cannot be run {fixed} at a time")
        pieces = count // fixed
        return tuple(split(x, pieces) if x.dim() and x.shape[0] == count else x for x in inputs)

    def _call(self, step: "_Step", args: list) -> tuple:
        info = step.info
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
        return out if isinstance(out, tuple) else (out,)

    def _run_step(self, step: "_Step", env: dict, hooks) -> None:
        info = step.info
        args = [env[n] if n else None for n in info.inputs]
        pieces = next((len(a) for a in args if isinstance(a, PerImage)), 0)
        if pieces:  # a fixed-batch model: the node runs once per piece
            outs = [self._call(step, [a[i] if isinstance(a, PerImage) else a for a in args])
                    for i in range(pieces)]
            out = tuple(PerImage(o[k] for o in outs) for k in range(len(outs[0])))
        else:
            out = self._call(step, args)
        for fn, wanted in hooks:
            if wanted is None or info.name in wanted:
                replaced = fn(info, tuple(joined(a) for a in args),
                              tuple(joined(o) for o in out))
                if replaced is not None:
                    out = tuple(split(r, pieces) if pieces else r for r in replaced)
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
