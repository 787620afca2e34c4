"""Keys and values of editable layers: each is a linear associative memory v = W k.

Every editable layer is viewed through a *canonical* weight W_c of shape
[V, Kd] with value = W_c @ key:

| layer            | stored weight      | W_c                     | key                                  |
|------------------|--------------------|-------------------------|--------------------------------------|
| Conv (groups g)  | [M, C/g, kh, kw]   | reshape [M, C/g*kh*kw]  | unfolded input patch of one group    |
| Gemm, transB=1   | B [N, K]           | B                       | a row of A (A^T if transA)           |
| Gemm, transB=0   | B [K, N]           | B^T                     | a row of A                           |
| MatMul x @ W     | W [K, N]           | W^T                     | a row of x (last axis)               |
| MatMul W @ x     | W [M, K]           | W                       | a column of x                        |

Keys come out as [n, P, G, Kd]: n samples, P positions per sample, G groups
(1 except grouped Conv); values as [n, P, G, V/G], the layer output in the
canonical value space (Gemm's alpha divided out, bias and beta*C left in: they
cancel in every difference of values).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from patcher.errors import UnsupportedOpError
from patcher.graph.ops.conv import resolve_pads, torch_pad_list
from patcher.graph.shadow import EditableLayer, ShadowGraph


def data_input_index(layer: EditableLayer) -> int:
    """Which node input carries the keys (the non-weight operand)."""
    return 1 if layer.orientation == "matmul_left" else 0


def canonical_weight(layer: EditableLayer, weight: torch.Tensor) -> torch.Tensor:
    """W_c [V, Kd] as a view/transposition of the stored weight (no copy of values changed)."""
    o = layer.orientation
    if o == "conv":
        return weight.reshape(weight.shape[0], -1)
    if o in ("gemm_transposed", "matmul_left"):
        return weight
    if o in ("gemm", "matmul_right"):
        return weight.transpose(0, 1)
    raise UnsupportedOpError(f"layer '{layer.name}': unknown orientation {o}")


def stored_delta(layer: EditableLayer, delta_canonical: torch.Tensor, attrs: dict) -> torch.Tensor:
    """The change of the stored tensor that realises a canonical change dW_c.

    W_c is the stored tensor up to reshaping or transposition (Gemm's alpha scales the
    value space, see :func:`layer_values`, not the weight), so only the layout changes."""
    o = layer.orientation
    if o == "conv":
        return delta_canonical.reshape(layer.shape)
    if o == "matmul_left":
        return delta_canonical
    if o == "matmul_right":
        return delta_canonical.transpose(0, 1)
    if o == "gemm_transposed":
        return delta_canonical
    return delta_canonical.transpose(0, 1)


def conv_keys(x: torch.Tensor, layer: EditableLayer, attrs: dict) -> torch.Tensor:
    """Unfolded patches [n, P, G, C/g*kh*kw], honouring pads (asymmetric, auto_pad),
    strides and dilations, in the layout of W.reshape(M, -1)."""
    spatial = len(layer.shape) - 2
    if spatial not in (1, 2):
        raise UnsupportedOpError(f"layer '{layer.name}': keys of {spatial}-D convolutions")
    kernel = list(layer.shape[2:])
    strides = list(attrs.get("strides") or [1] * spatial)
    dilations = list(attrs.get("dilations") or [1] * spatial)
    pads = resolve_pads(x.shape[2:], kernel, strides, dilations, attrs.get("pads"),
                        attrs.get("auto_pad", "NOTSET"))
    if any(pads):
        x = F.pad(x, torch_pad_list(pads))
    if spatial == 1:
        x, kernel, strides, dilations = x.unsqueeze(2), [1] + kernel, [1] + strides, [1] + dilations
    cols = F.unfold(x, kernel, dilation=dilations, stride=strides)  # [n, C*kh*kw, L]
    groups = layer.groups
    n, ck, positions = cols.shape
    return cols.reshape(n, groups, ck // groups, positions).permute(0, 3, 1, 2)


def patch_coverage(layer: EditableLayer, attrs: dict, spatial: tuple[int, ...]
                   ) -> tuple[torch.Tensor, int]:
    """How many (position, kernel offset) pairs of the conv's keys read each input pixel
    (zero padding excluded), as a tensor of the input's spatial shape, and the number of
    positions P. Sum over pixels of coverage x f(pixel) = sum over keys and offsets of f."""
    dims = len(spatial)
    kernel = list(layer.shape[2:])
    strides = list(attrs.get("strides") or [1] * dims)
    dilations = list(attrs.get("dilations") or [1] * dims)
    pads = resolve_pads(list(spatial), kernel, strides, dilations, attrs.get("pads"),
                        attrs.get("auto_pad", "NOTSET"))
    ones = F.pad(torch.ones((1, 1, *spatial), dtype=torch.float64), torch_pad_list(pads))
    if dims == 1:
        ones, kernel, strides, dilations = ones.unsqueeze(2), [1] + kernel, [1] + strides, [1] + dilations
    cols = F.unfold(ones, kernel, dilation=dilations, stride=strides)
    counts = F.fold(cols, ones.shape[2:], kernel, dilation=dilations, stride=strides)[0, 0]
    if dims == 1:
        counts = counts[0]
    crop = tuple(slice(pads[i], pads[i] + spatial[i]) for i in range(dims))
    return counts[crop], int(cols.shape[-1])


def layer_keys(layer: EditableLayer, data: torch.Tensor, attrs: dict) -> torch.Tensor:
    """Keys [n, P, G, Kd] from the layer's data input."""
    o = layer.orientation
    if o == "conv":
        return conv_keys(data, layer, attrs)
    if o.startswith("gemm"):
        rows = data.transpose(0, 1) if attrs.get("transA", 0) else data
        return rows[:, None, None, :]
    if o == "matmul_right":
        return data.reshape(data.shape[0], -1, 1, data.shape[-1])
    # matmul_left: W @ x, keys are the columns of x
    cols = data.transpose(-1, -2)
    return cols.reshape(cols.shape[0], -1, 1, cols.shape[-1])


def layer_values(layer: EditableLayer, output: torch.Tensor, attrs: dict) -> torch.Tensor:
    """Values [n, P, G, V/G] (canonical value space) from the layer's output."""
    o = layer.orientation
    if o == "conv":
        n, m = output.shape[:2]
        flat = output.reshape(n, layer.groups, m // layer.groups, -1)
        return flat.permute(0, 3, 1, 2)
    if o.startswith("gemm"):
        return (output / float(attrs.get("alpha", 1.0)))[:, None, None, :]
    if o == "matmul_right":
        return output.reshape(output.shape[0], -1, 1, output.shape[-1])
    rows = output.transpose(-1, -2)
    return rows.reshape(rows.shape[0], -1, 1, rows.shape[-1])


class LayerTap:
    """Records the data input and output of chosen editable layers during forward passes.

    ``with LayerTap(graph, layers) as tap: graph(x)`` then ``tap.inputs[name]`` and
    ``tap.outputs[name]``. The hook is removed on exit, also on error.
    """

    def __init__(self, graph: ShadowGraph, layers: list[EditableLayer], detach: bool = True,
                 keep_inputs: bool = True, on_capture=None) -> None:
        self.graph, self.detach, self.keep_inputs = graph, detach, keep_inputs
        self.layers = {l.name: l for l in layers}
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.on_capture = on_capture
        self._handle = None

    def _hook(self, node, ins, outs):
        layer = self.layers[node.name]
        data = ins[data_input_index(layer)]
        out = outs[0]
        if self.detach:
            data, out = data.detach(), out.detach()
        if self.on_capture is not None:
            self.on_capture(layer, data, out)
        else:
            if self.keep_inputs:
                self.inputs[node.name] = data
            self.outputs[node.name] = out
        return None

    def __enter__(self) -> "LayerTap":
        self._handle = self.graph.register_hook(self._hook, nodes=list(self.layers))
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
