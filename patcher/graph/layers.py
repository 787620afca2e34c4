"""Editable layers: the Conv, Gemm and MatMul nodes whose weight a rank-one edit can change,
and how their stored weight maps keys to values."""
from __future__ import annotations

from dataclasses import dataclass

from onnx import helper

#: Ops whose constant weight makes them a linear associative memory v = W k.
EDITABLE_OPS = ("Conv", "Gemm", "MatMul")


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


def editable_layer(i: int, node, name: str, constants: dict, storage: dict,
                   consumers: dict) -> EditableLayer | None:
    """Node ``node`` (index ``i``, name ``name``) as an editable layer, or None: a Conv or Gemm
    whose weight input is a constant float tensor, or a MatMul with exactly one constant
    operand. ``consumers`` maps a tensor to the nodes reading it (a weight read elsewhere
    too is ``shared_with`` them)."""
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
