"""What ``onnx-rectify inspect`` reports about a model: structure, editable layers, parity."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import onnx

from patcher.errors import BadModelError, RectifyError
from patcher.model.modelio import LoadedModel
from patcher.graph.parity import ParityResult, compare, input_specs, random_inputs
from patcher.graph.quantized_layers import editable_copy
from patcher.graph.shadow import ShadowGraph
from patcher.graph.support import (QUANTIZED_NOT_EDITABLE, find_unsupported, node_names,
                                   op_histogram, opsets_of, quantized_storage)


@dataclass
class TensorInfo:
    name: str
    shape: list
    dtype: str


@dataclass
class ModelSummary:
    """Everything ``inspect`` prints; ``as_dict`` is the JSON form."""

    path: str | None
    sha256: str | None
    ir_version: int
    opsets: dict[str, int]
    producer: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    op_histogram: dict[str, int]
    editable_layers: list[dict] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)
    overridable_initializers: list[str] = field(default_factory=list)
    #: how the weights are stored quantized (QDQ, QOperator, dynamic-quantization), or None
    quantized: str | None = None
    parity: ParityResult | None = None
    parity_error: str | None = None

    def as_dict(self) -> dict:
        out = asdict(self)
        out["parity"] = self.parity.as_dict() if self.parity else None
        return out


def _value_infos(values, skip=()) -> list[TensorInfo]:
    infos = []
    for v in values:
        if v.name in skip:
            continue
        tt = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                for d in tt.shape.dim]
        infos.append(TensorInfo(v.name, dims, onnx.TensorProto.DataType.Name(tt.elem_type)))
    return infos


def summarize(model: LoadedModel, parity: bool = True, seed: int = 0, batch: int = 2,
              provider: str = "auto", shapes: dict[str, tuple[int, ...]] | None = None
              ) -> ModelSummary:
    """Describe ``model``; with ``parity``, run shadow and onnxruntime on seeded random input."""
    proto = model.proto
    graph = proto.graph
    inits = {t.name for t in graph.initializer}
    producer = " ".join(p for p in (proto.producer_name, proto.producer_version) if p)
    summary = ModelSummary(
        path=str(model.path) if model.path else None, sha256=model.sha256,
        ir_version=proto.ir_version,
        opsets=opsets_of(proto),
        producer=producer, inputs=_value_infos(graph.input, inits),
        outputs=_value_infos(graph.output), op_histogram=op_histogram(proto),
        quantized=quantized_storage(graph.node))
    opset = summary.opsets.get("ai.onnx", 0)
    summary.unsupported = find_unsupported(list(graph.node), node_names(graph.node), opset,
                                           summary.opsets)
    if summary.unsupported:
        return summary
    shadow = ShadowGraph(model)
    summary.editable_layers = [layer.as_dict() for layer in shadow.editable_layers]
    if summary.quantized:  # layers behind quantization: those of the float analysis copy
        edited, stored = editable_copy(model)
        if stored:
            summary.editable_layers = [
                dict(layer.as_dict(), storage=f"{stored[layer.weight].dtype} "
                     f"{'per-tensor' if stored[layer.weight].axis is None else 'per-channel'}",
                     quantized=stored[layer.weight].as_dict())
                if layer.weight in stored else layer.as_dict()
                for layer in ShadowGraph(edited).editable_layers]
    summary.overridable_initializers = list(shadow.overridable_initializers)
    if parity:
        try:
            unknown = set(shapes or {}) - {t.name for t in summary.inputs}
            if unknown:
                raise RectifyError(f"--input-shape names no graph input: {', '.join(sorted(unknown))} "
                                   f"(inputs: {', '.join(t.name for t in summary.inputs)})")
            inputs = random_inputs(proto, seed=seed, batch=batch, shapes=shapes)
            # from the file when there is one: a model over 2 GB cannot be serialised again
            source = model.path if model.path is not None else proto.SerializeToString()
            summary.parity = compare(shadow, source, inputs, provider=provider)
        except BadModelError as exc:  # onnxruntime refuses a model the shadow can run
            summary.parity_error = str(exc)
    return summary


def format_summary(s: ModelSummary) -> str:
    """The human-readable report."""
    lines = [f"model      {s.path or '<in memory>'}"]
    if s.sha256:
        lines.append(f"sha256     {s.sha256}")
    opsets = ", ".join(f"{d} {v}" for d, v in s.opsets.items())
    lines += [f"IR         {s.ir_version}   opsets: {opsets}",
              f"producer   {s.producer or '-'}"]
    for kind, infos in (("input", s.inputs), ("output", s.outputs)):
        for t in infos:
            lines.append(f"{kind:<10} {t.name}  {t.dtype}  [{', '.join(str(d) for d in t.shape)}]")
    hist = ", ".join(f"{op} {n}" for op, n in s.op_histogram.items())
    lines.append(f"ops        {sum(s.op_histogram.values())} nodes: {hist}")
    if s.unsupported:
        lines.append(f"UNSUPPORTED ({len(s.unsupported)}):")
        lines += [f"  {p}" for p in s.unsupported]
        return "\n".join(lines)
    if s.overridable_initializers:
        lines.append(f"warning    {len(s.overridable_initializers)} initializer(s) are also graph "
                     "inputs; a runtime feed could override them (and an edit)")
    lines.append(f"editable layers ({len(s.editable_layers)}):")
    if s.quantized and not s.editable_layers:
        lines.append(f"  none: the weights are stored quantized ({s.quantized}); inspect and "
                     f"parity work, {QUANTIZED_NOT_EDITABLE}")
    if s.editable_layers:
        w_name = max(len(l["name"]) for l in s.editable_layers)
        w_weight = max(len(l["weight"]) for l in s.editable_layers)
        lines.append(f"  {'#':>3}  {'layer':<{w_name}}  {'op':<6}  {'weight':<{w_weight}}  "
                     f"{'shape':<18} {'key dim':>7}  {'groups':>6}  storage      shared")
        for i, l in enumerate(s.editable_layers):
            shape = "x".join(str(d) for d in l["shape"])
            shared = ", ".join(l["shared_with"]) or "-"
            lines.append(f"  {i:>3}  {l['name']:<{w_name}}  {l['op']:<6}  {l['weight']:<{w_weight}}  "
                         f"{shape:<18} {l['key_dim']:>7}  {l['groups']:>6}  {l['storage']:<11}  {shared}")
            if l.get("quantized"):
                q = l["quantized"]
                bias = (f"; bias {q['bias']} int32, scale "
                        f"{q['bias_scale'] or q['input_scale'] + ' x ' + q['scale']}"
                        if q["bias"] else "")
                lines.append(f"       stored {q['form']} {q['dtype']} {q['granularity']}: "
                             f"{q['weight']}, scale {q['scale']}, zero point "
                             f"{q['zero_point'] or '-'}{bias}")
    if s.parity is not None:
        p = s.parity
        verdict = "PASS" if p.passed else "FAIL"
        if p.max_steps is not None:
            tolerance = (f"max diff {p.max_steps:.3g} output quantization step(s), tolerance "
                         f"{p.step_tolerance}")
        else:
            tolerance = (f"max rel diff {p.max_rel_diff:.3g} (rtol {p.rtol:g}, atol {p.atol:g}"
                         + (", the graph computes in float16" if p.basis == "float16 compute"
                            else "") + ")")
        lines.append(f"parity     {verdict}  shadow vs onnxruntime ({p.provider}), seeded random "
                     f"input, batch {p.batch}: max abs diff {p.max_abs_diff:.3g}, {tolerance}, "
                     + ("top-1 agreement n/a" if p.top1_agreement is None
                      else f"top-1 agreement {p.top1_agreement:.0%}")
                     + (f"; {p.nonfinite} of {p.elements} output elements are Inf or NaN (the model overflows "
                        "on this input; compared where finite)" if p.nonfinite else ""))
    elif s.parity_error:
        lines.append(f"parity     not run: {s.parity_error}")
    return "\n".join(lines)
