"""Editable layers behind quantization, and the float *analysis copy* the engine edits.

A quantized file stores a layer's weight as int8/uint8 ``q`` with a scale ``s`` and zero point
``z`` (per tensor, or per output channel along ``axis``); its float value is
``W = (q - z) * s``. Three forms are recognised:

* **QDQ**: ``Conv/Gemm/MatMul(x, DequantizeLinear(q, s, z), DequantizeLinear(b32, s_b, 0))``;
* **QOperator**: ``QLinearConv``, ``QLinearMatMul`` and com.microsoft ``QGemm`` with the int8
  weight and int32 bias as inputs; the bias has no scale of its own (it is ``x_scale * s``);
* **dynamic** (onnxruntime's ``quantize_dynamic``): ``(x_q, x_s, x_z) =
  DynamicQuantizeLinear(x)``, ``y = Mul(Cast<float>(ConvInteger/MatMulInteger(x_q, q, x_z,
  z)), Mul(x_s, s))``, then a float ``Add`` of the bias. The weight scale ``s`` is only ever
  read by that scales ``Mul``: ``y = conv(x_q - x_z, q - z) * x_s * s``, which is the float
  op on the dequantized input and weight.

The analysis copy (:func:`analysis_model`) folds each such weight into a float initializer
named like the int8 tensor, and turns each QOperator layer into
``QuantizeLinear(Conv/Gemm/MatMul(DequantizeLinear(x), W, B))`` with the same scales, so that
every activation keeps its quantize/dequantize pair (fake-quant with straight-through
gradients in the shadow graph): dropping those pairs would drop the clamps that stand for the
quantizer's removed ReLUs. Node names are kept (unnamed nodes get their default names
``<op>_<index>`` of the file), so a layer of the copy is named as in the file. A dynamic
layer becomes ``Conv/MatMul(DequantizeLinear(x_q, x_s, x_z), W)`` writing the output Mul's
tensor (the Cast, that Mul and the scales Mul, read by nothing else, are dropped), so the
activation stays fake-quantized by DynamicQuantizeLinear with straight-through gradients.
A delta on a folded weight is written back in the stored precision by
:mod:`patcher.model.quantized_writeback`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from onnx import ModelProto, TensorProto, helper, numpy_helper

from patcher.graph.support import node_names
from patcher.model.modelio import LoadedModel

#: Integer weight types a layer may be stored in.
WEIGHT_TYPES = {TensorProto.INT8: "int8", TensorProto.UINT8: "uint8"}

#: Ops of onnxruntime's quantize_dynamic whose int8 weight (input 1) becomes editable.
DYNAMIC_OPS = ("ConvInteger", "MatMulInteger")

#: QOperator ops whose weight becomes editable: (weight input, scale, zero point, bias or None)
QOPERATOR_SLOTS = {"QLinearConv": (3, 4, 5, 8), "QLinearMatMul": (3, 4, 5, None),
                   "QGemm": (3, 4, 5, 6)}


@dataclass(frozen=True)
class QuantizedWeight:
    """How an editable layer's weight is stored in the file.

    ``axis`` is the axis of a per-channel scale (None: one scale for the tensor);
    ``bias_scale`` is the QDQ bias DequantizeLinear's scale (None in QOperator, where the
    bias scale is implicitly ``input_scale * scale``). In the ``dynamic`` form the input
    scale is computed at run time (None) and the bias is a float Add of its own."""

    layer: str
    form: str  # "QDQ", "QOperator" or "dynamic"
    op: str  # the file's op: Conv/Gemm/MatMul (QDQ), QLinearConv/QLinearMatMul/QGemm,
    #          ConvInteger/MatMulInteger (dynamic)
    weight: str
    dtype: str
    scale: str
    zero_point: str | None
    axis: int | None
    input_scale: str | None
    bias: str | None = None
    bias_scale: str | None = None
    alpha: float = 1.0
    #: tensors of the file a write-back may change
    writable: tuple[str, ...] = field(default=())

    @property
    def granularity(self) -> str:
        return "per-tensor" if self.axis is None else f"per-channel (axis {self.axis})"

    def as_dict(self) -> dict:
        out = asdict(self)
        out["writable"] = list(self.writable)
        out["granularity"] = self.granularity
        return out


@dataclass
class QuantizedAnalysis:
    """The float analysis copy of a quantized model and its quantized weights by name (the
    same name in the copy, float, and in the file, int8)."""

    loaded: LoadedModel
    weights: dict[str, QuantizedWeight]
    form: str



def _wiring(nodes: list) -> tuple[dict[str, list[int]], dict[str, int]]:
    """(tensor name -> indices of the nodes reading it, tensor name -> index of the node
    writing it) over ``nodes``."""
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for inp in node.input:
            if inp:
                consumers.setdefault(inp, []).append(i)
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    return consumers, producer

def _array(name: str, inits: dict) -> np.ndarray:
    return numpy_helper.to_array(inits[name])


def _scale_axis(scale: np.ndarray, axis: int | None, weight: np.ndarray) -> int | None:
    """None for a per-tensor scale, else the (non-negative) axis it runs along."""
    if scale.size == 1:
        return None
    axis = (axis or 0) % weight.ndim
    return axis


def dequantize(q: np.ndarray, scale: np.ndarray, zero: "np.ndarray | None",
               axis: int | None) -> np.ndarray:
    """W = (q - z) * s in float32 (onnxruntime's order), per tensor or along ``axis``."""
    shape = [1] * q.ndim
    if axis is not None:
        shape[axis] = -1
    s = scale.astype(np.float32).reshape(shape if axis is not None else ())
    z = (np.zeros((), np.int32) if zero is None
         else zero.astype(np.int32).reshape(shape if axis is not None else ()))
    return ((q.astype(np.int32) - z).astype(np.float32) * s).astype(np.float32)


def _float_init(name: str, values: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(values.astype(np.float32)), name)


def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _fresh(base: str, taken: set[str]) -> str:
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


def analysis_model(loaded: LoadedModel) -> QuantizedAnalysis | None:
    """The float analysis copy of ``loaded`` (see the module docstring), or None when no
    layer's weight is stored quantized in a form this module folds."""
    proto = loaded.proto
    graph = proto.graph
    nodes = list(graph.node)
    names = node_names(nodes)
    inits = {t.name: t for t in graph.initializer}
    consumers, producer = _wiring(nodes)
    taken = set(names) | {o for n in nodes for o in n.output} | set(inits) | \
        {i.name for i in graph.input}

    weights: dict[str, QuantizedWeight] = {}
    new_inits: dict[str, TensorProto] = {}
    drop: set[int] = set()
    replace: dict[int, list] = {}
    forms = set()

    def int_weight(name: str) -> bool:
        t = inits.get(name)
        return (t is not None and t.data_type in WEIGHT_TYPES and len(consumers.get(name, [])) == 1
                and name not in {i.name for i in graph.input})

    for i, node in enumerate(nodes):
        op = node.op_type
        if op in ("Conv", "Gemm", "MatMul") and node.domain in ("", "ai.onnx"):
            slots = (1,) if op != "MatMul" else (1, 0)
            for widx in slots:
                if widx >= len(node.input):
                    continue
                dq_i = producer.get(node.input[widx])
                if dq_i is None or nodes[dq_i].op_type != "DequantizeLinear":
                    continue
                dq = nodes[dq_i]
                if (not int_weight(dq.input[0]) or len(consumers[dq.output[0]]) != 1
                        or len(dq.input) < 2 or dq.input[1] not in inits
                        or (len(dq.input) > 2 and dq.input[2] and dq.input[2] not in inits)
                        or _attr(dq, "block_size", 0)):
                    continue
                x_dq = producer.get(node.input[1 - widx] if op == "MatMul" else node.input[0])
                if x_dq is None or nodes[x_dq].op_type != "DequantizeLinear":
                    continue  # the input scale is needed to requantize the bias
                q = _array(dq.input[0], inits)
                scale = _array(dq.input[1], inits)
                zname = dq.input[2] if len(dq.input) > 2 and dq.input[2] else None
                zero = _array(zname, inits) if zname else None
                axis = _scale_axis(scale, _attr(dq, "axis", 1), q)
                wname = dq.input[0]
                new_inits[wname] = _float_init(wname, dequantize(q, scale, zero, axis))
                drop.add(dq_i)
                bias = bias_scale = None
                writable = [wname, dq.input[1]]
                if op != "MatMul" and len(node.input) > 2 and node.input[2]:
                    b_i = producer.get(node.input[2])
                    if (b_i is not None and nodes[b_i].op_type == "DequantizeLinear"
                            and nodes[b_i].input[0] in inits and len(nodes[b_i].input) > 1
                            and nodes[b_i].input[1] in inits):
                        bias, bias_scale = nodes[b_i].input[0], nodes[b_i].input[1]
                        writable += [bias, bias_scale]
                weights[wname] = QuantizedWeight(
                    layer=names[i], form="QDQ", op=op, weight=wname,
                    dtype=WEIGHT_TYPES[inits[wname].data_type], scale=dq.input[1],
                    zero_point=zname, axis=axis, input_scale=nodes[x_dq].input[1], bias=bias,
                    bias_scale=bias_scale, alpha=float(_attr(node, "alpha", 1.0)),
                    writable=tuple(writable))
                rewired = helper.make_node(op, [wname if k == widx else v
                                                for k, v in enumerate(node.input)],
                                           list(node.output), name=names[i])
                rewired.attribute.extend(node.attribute)
                replace[i] = [rewired]
                forms.add("QDQ")
                break
        elif op in DYNAMIC_OPS and node.domain in ("", "ai.onnx"):
            wiring = dynamic_wiring(i, nodes, inits, producer, consumers)
            if wiring is None or not int_weight(node.input[1]):
                continue
            replacement, float_inits, qw = _fold_dynamic(node, names[i], wiring, inits, taken)
            replace[i] = replacement
            drop.update(wiring.dropped)
            new_inits.update(float_inits)
            weights[qw.weight] = qw
            forms.add("dynamic")
        elif op in QOPERATOR_SLOTS and node.domain in (("com.microsoft",) if op == "QGemm"
                                                       else ("", "ai.onnx")):
            folded = _fold_qoperator(node, names[i], inits, int_weight, taken)
            if folded is None:
                continue
            replacement, float_inits, qw = folded
            replace[i] = replacement
            new_inits.update(float_inits)
            weights[qw.weight] = qw
            forms.add("QOperator")
    if not weights:
        return None

    copy = ModelProto()
    copy.CopyFrom(proto)
    del copy.graph.node[:]
    for i, node in enumerate(nodes):
        if i in drop:
            continue
        if i in replace:
            copy.graph.node.extend(replace[i])
            continue
        named = copy.graph.node.add()
        named.CopyFrom(node)
        named.name = names[i]
    kept = [t for t in copy.graph.initializer if t.name not in new_inits]
    used = {inp for n in copy.graph.node for inp in n.input}
    kept = [t for t in kept if t.name in used or t.name in {o.name for o in graph.output}]
    del copy.graph.initializer[:]
    copy.graph.initializer.extend(kept + list(new_inits.values()))
    # value_info of tensors that changed type (the folded weights) would mislead inference
    stale = set(new_inits)
    infos = [v for v in copy.graph.value_info if v.name not in stale]
    del copy.graph.value_info[:]
    copy.graph.value_info.extend(infos)
    form = next(f for f in ("QOperator", "dynamic", "QDQ") if f in forms)
    return QuantizedAnalysis(
        LoadedModel(copy, None, f"{loaded.sha256 or 'in-memory'}:float-analysis", {}),
        weights, form)


def _fold_qoperator(node, name: str, inits: dict, int_weight, taken: set[str]):
    """``node`` (QLinearConv, QLinearMatMul, QGemm) as DequantizeLinear -> float op ->
    QuantizeLinear, with its weight and bias as float initializers; None when its weight,
    scales or bias are not constant initializers."""
    op = node.op_type
    w_i, s_i, z_i, b_i = QOPERATOR_SLOTS[op]
    inputs = list(node.input) + [""] * 9
    wname, sname, zname = inputs[w_i], inputs[s_i], inputs[z_i] or None
    x_scale, x_zero = inputs[1], inputs[2] or None
    if op == "QGemm":
        y_scale, y_zero = inputs[7] or None, inputs[8] or None
    else:
        y_scale, y_zero = inputs[6], inputs[7] or None
    needed = [sname, x_scale] + [n for n in (zname,) if n]
    if not int_weight(wname) or any(n not in inits for n in needed):
        return None
    q = _array(wname, inits)
    scale = _array(sname, inits)
    zero = _array(zname, inits) if zname else None
    trans_b = int(_attr(node, "transB", 0))
    alpha = float(_attr(node, "alpha", 1.0))
    if scale.size == 1:
        axis = None
    elif op == "QLinearConv":
        axis = 0
    elif op == "QGemm":
        axis = 0 if trans_b else 1
    else:
        axis = q.ndim - 1
    w_float = dequantize(q, scale, zero, axis)
    float_inits = {wname: _float_init(wname, w_float)}
    bname = inputs[b_i] if b_i is not None and inputs[b_i] else None
    x_s = float(_array(x_scale, inits).reshape(-1)[0])
    nodes = []
    x_deq = _fresh(f"{name}_input_dequantized", taken)
    nodes.append(helper.make_node("DequantizeLinear", [inputs[0], x_scale] + ([x_zero] if x_zero
                                                                                else []),
                                  [x_deq], name=_fresh(f"{name}_input_DequantizeLinear", taken)))
    float_bias = None
    if bname is not None:
        if bname not in inits:
            return None
        b32 = _array(bname, inits).astype(np.float64)
        s = scale.astype(np.float64).reshape(-1)
        factor = alpha if op == "QGemm" else 1.0
        float_bias = _fresh(f"{bname}_float", taken)
        float_inits[float_bias] = _float_init(
            float_bias, (b32 * x_s * factor * (s if s.size > 1 else s[0])).astype(np.float32))
    out = node.output[0]
    y_float = _fresh(f"{name}_float_output", taken) if y_scale else out
    float_op = {"QLinearConv": "Conv", "QLinearMatMul": "MatMul", "QGemm": "Gemm"}[op]
    args = [x_deq, wname] + ([float_bias] if float_bias else [])
    core = helper.make_node(float_op, args, [y_float], name=name)
    if op == "QLinearConv":
        core.attribute.extend(node.attribute)
    elif op == "QGemm":
        core.attribute.extend([a for a in node.attribute if a.name in ("alpha", "transA",
                                                                        "transB")])
    nodes.append(core)
    if y_scale:
        nodes.append(helper.make_node("QuantizeLinear", [y_float, y_scale]
                                      + ([y_zero] if y_zero else []), [out],
                                      name=_fresh(f"{name}_output_QuantizeLinear", taken)))
    writable = [wname, sname] + ([bname] if bname else [])
    qw = QuantizedWeight(layer=name, form="QOperator", op=op, weight=wname,
                         dtype=WEIGHT_TYPES[inits[wname].data_type], scale=sname,
                         zero_point=zname, axis=axis, input_scale=x_scale, bias=bname,
                         alpha=alpha, writable=tuple(writable))
    return nodes, float_inits, qw


@dataclass(frozen=True)
class DynamicWiring:
    """How ``quantize_dynamic`` wired one ConvInteger/MatMulInteger node (see the module
    docstring): its quantized input and the DynamicQuantizeLinear outputs it comes with, the
    weight scale initializer, the float tensor the output Mul writes, and the glue nodes
    (Cast, output Mul, scales Mul when nothing else reads it) the analysis copy drops."""

    x_quantized: str
    x_scale: str
    x_zero_point: str
    weight_scale: str
    output: str
    dropped: tuple[int, ...]


def _only(uses: "list[int] | None") -> int | None:
    return uses[0] if uses is not None and len(uses) == 1 else None


def dynamic_wiring(i: int, nodes: list, inits: dict, producer: dict, consumers: dict
                   ) -> DynamicWiring | None:
    """The wiring of ConvInteger/MatMulInteger node ``i`` when it is quantize_dynamic's
    (constant int8/uint8 weight in input 1 with a constant zero point, input from a
    DynamicQuantizeLinear, output through Cast to float and a Mul by ``x_scale * s`` with
    ``s`` a float initializer read by that Mul alone), else None."""
    node = nodes[i]
    xq, wq, xz, wz = (list(node.input) + ["", "", "", ""])[:4]
    if len(node.output) != 1 or wq not in inits or (wz and wz not in inits):
        return None
    d = producer.get(xq)
    if d is None or nodes[d].op_type != "DynamicQuantizeLinear" or len(nodes[d].output) < 3:
        return None
    dql = nodes[d]
    if dql.output[0] != xq or xz != dql.output[2]:
        return None
    cast_i = _only(consumers.get(node.output[0]))
    if cast_i is None or nodes[cast_i].op_type != "Cast" or \
            int(_attr(nodes[cast_i], "to", 0)) != TensorProto.FLOAT:
        return None
    mul_i = _only(consumers.get(nodes[cast_i].output[0]))
    if mul_i is None or nodes[mul_i].op_type != "Mul" or len(nodes[mul_i].input) != 2:
        return None
    mul = nodes[mul_i]
    scales = mul.input[1] if mul.input[0] == nodes[cast_i].output[0] else mul.input[0]
    sm_i = producer.get(scales)
    if sm_i is None or nodes[sm_i].op_type != "Mul" or dql.output[1] not in nodes[sm_i].input:
        return None
    pair = list(nodes[sm_i].input)
    if len(pair) != 2 or pair.count(dql.output[1]) != 1:
        return None
    ws = pair[1] if pair[0] == dql.output[1] else pair[0]
    if ws not in inits or inits[ws].data_type != TensorProto.FLOAT or \
            consumers.get(ws) != [sm_i]:
        return None
    q, s = _array(wq, inits), _array(ws, inits)
    channels = q.shape[0] if node.op_type == "ConvInteger" else q.shape[-1] if q.ndim else 1
    z = _array(wz, inits) if wz else None
    if s.size not in (1, channels) or (z is not None and z.size not in (1, s.size)) or \
            (node.op_type == "MatMulInteger" and q.ndim != 2):
        return None
    dropped = (cast_i, mul_i) + ((sm_i,) if consumers.get(scales) == [mul_i] else ())
    return DynamicWiring(xq, dql.output[1], dql.output[2], ws, mul.output[0], dropped)


def _fold_dynamic(node, name: str, wiring: DynamicWiring, inits: dict, taken: set[str]):
    """A dynamic layer as ``Conv/MatMul(DequantizeLinear(x_q, x_s, x_z), W)`` writing the
    output Mul's tensor, W = (q - z) * s as a float initializer named like q."""
    op = node.op_type
    wname = node.input[1]
    zname = node.input[3] if len(node.input) > 3 and node.input[3] else None
    q = _array(wname, inits)
    scale = _array(wiring.weight_scale, inits)
    zero = _array(zname, inits) if zname else None
    axis = None if scale.size == 1 else (0 if op == "ConvInteger" else q.ndim - 1)
    float_inits = {wname: _float_init(wname, dequantize(q, scale, zero, axis))}
    x_deq = _fresh(f"{name}_input_dequantized", taken)
    nodes = [helper.make_node("DequantizeLinear", [wiring.x_quantized, wiring.x_scale,
                                                   wiring.x_zero_point], [x_deq],
                              name=_fresh(f"{name}_input_DequantizeLinear", taken))]
    core = helper.make_node("Conv" if op == "ConvInteger" else "MatMul", [x_deq, wname],
                            [wiring.output], name=name)
    if op == "ConvInteger":
        core.attribute.extend(node.attribute)
    nodes.append(core)
    qw = QuantizedWeight(layer=name, form="dynamic", op=op, weight=wname,
                         dtype=WEIGHT_TYPES[inits[wname].data_type], scale=wiring.weight_scale,
                         zero_point=zname, axis=axis, input_scale=None,
                         writable=(wname, wiring.weight_scale))
    return nodes, float_inits, qw


def dynamic_weight_scales(graph) -> dict[str, str]:
    """Weight scale initializer -> the ConvInteger/MatMulInteger layer (node name, default
    ``<op>_<index>``) it scales, for every layer wired as quantize_dynamic wires it."""
    nodes = list(graph.node)
    names = node_names(nodes)
    inits = {t.name: t for t in graph.initializer}
    consumers, producer = _wiring(nodes)
    out = {}
    for i, node in enumerate(nodes):
        if node.op_type in DYNAMIC_OPS and node.domain in ("", "ai.onnx"):
            wiring = dynamic_wiring(i, nodes, inits, producer, consumers)
            if wiring is not None:
                out[wiring.weight_scale] = names[i]
    return out


def editable_copy(loaded: LoadedModel) -> tuple[LoadedModel, dict[str, QuantizedWeight]]:
    """The model the engine edits: the analysis copy and its quantized weights for a model
    whose weights are stored quantized in a form this module folds, else ``loaded`` itself
    and no quantized weights."""
    analysis = analysis_model(loaded)
    if analysis is None:
        return loaded, {}
    return analysis.loaded, analysis.weights
