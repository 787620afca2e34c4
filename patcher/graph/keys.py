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
(1 except grouped Conv); a row-keyed layer (Gemm, MatMul x @ W) on tokens has one position
per token, whatever layout the export gives its input ([B, T, D], [T, B, D], [T*B, D]
rows: :func:`image_rows` regroups them per image); values as [n, P, G, V/G], the layer
output in the
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


def conv_key_grid(layer: EditableLayer, attrs: dict, spatial: tuple[int, ...]
                  ) -> tuple[list[int], list[int], list[int], list[int]]:
    """(output positions per axis, strides, dilations, ONNX pads) of a conv's keys over an
    input of ``spatial`` shape: key (py, px) reads padded pixels py*s + ky*d, px*s + kx*d."""
    dims = len(spatial)
    kernel = list(layer.shape[2:])
    strides = list(attrs.get("strides") or [1] * dims)
    dilations = list(attrs.get("dilations") or [1] * dims)
    pads = resolve_pads(list(spatial), kernel, strides, dilations, attrs.get("pads"),
                        attrs.get("auto_pad", "NOTSET"))
    out = [(spatial[i] + pads[i] + pads[i + dims] - dilations[i] * (kernel[i] - 1) - 1)
           // strides[i] + 1 for i in range(dims)]
    return out, strides, dilations, pads


def sampled_conv_keys(layer: EditableLayer, data: torch.Tensor, attrs: dict,
                      picks: torch.Tensor) -> torch.Tensor:
    """The keys numbered ``picks`` (indices into ``conv_keys(data).reshape(-1, Kd)``, i.e.
    image-major, then position, then group) as rows [len(picks), Kd], gathered from the
    input without unfolding the others or padding it (pixels in the padding are zeros): key (n, p, g) holds channels
    g*C/g .. (g+1)*C/g - 1 of image n at pixels p*s + o*d for every kernel offset o."""
    spatial = tuple(int(s) for s in data.shape[2:])
    dims = len(spatial)
    if dims not in (1, 2):
        raise UnsupportedOpError(f"layer '{layer.name}': keys of {dims}-D convolutions")
    out, strides, dilations, pads = conv_key_grid(layer, attrs, spatial)
    groups = max(layer.groups, 1)
    per_group = data.shape[1] // groups
    positions = int(torch.tensor(out).prod())
    picks = picks.to(data.device)
    image = picks // (positions * groups)
    position = (picks // groups) % positions
    group = picks % groups
    channels = group[:, None] * per_group + torch.arange(per_group, device=data.device)
    kernel = list(layer.shape[2:])

    def axis(at: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixel indices along axis i of the unpadded input (clamped) and whether each is
        inside it: a padded pixel is a zero, so the padded input is never built."""
        index = at[:, None] * strides[i] + \
            torch.arange(kernel[i], device=data.device) * dilations[i] - pads[i]
        inside = (index >= 0) & (index < spatial[i])
        return index.clamp(0, spatial[i] - 1), inside

    if dims == 1:
        at, inside = axis(position, 0)
        keys = data[image[:, None, None], channels[:, :, None], at[:, None, :]]
        mask = inside[:, None, :]
    else:
        (rows, row_in), (cols, col_in) = axis(position // out[1], 0), axis(position % out[1], 1)
        mask = (row_in[:, :, None] & col_in[:, None, :])[:, None]
        if groups == 1:  # whole pixels (all channels, one row each of a channels-last view)
            height, width = spatial
            flat = data.permute(0, 2, 3, 1).reshape(-1, data.shape[1])
            at = (image[:, None, None] * height + rows[:, :, None]) * width + cols[:, None, :]
            pixels = flat.index_select(0, at.reshape(-1))
            pixels = pixels.reshape(len(picks), *at.shape[1:], data.shape[1])
            if any(pads):
                pixels = pixels * mask[:, 0, :, :, None].to(pixels.dtype)
            return pixels.permute(0, 3, 1, 2).reshape(len(picks), -1)
        keys = data[image[:, None, None, None], channels[:, :, None, None],
                    rows[:, None, :, None], cols[:, None, None, :]]
    if any(pads):
        keys = keys * mask.to(keys.dtype)
    return keys.reshape(len(picks), -1)


def pointwise_pixels(layer: EditableLayer, data: torch.Tensor, attrs: dict
                     ) -> torch.Tensor | None:
    """For a 1x1 (pointwise), ungrouped, unpadded convolution: the input pixels its keys
    are, as ``data`` [n, C, *spatial] subsampled by the strides (a view, nothing copied);
    None for any other layer. Its key statistics are then the channels' covariance
    sum over pixels of x x^T, with no unfolding."""
    if layer.orientation != "conv" or layer.groups != 1 or \
            any(int(k) != 1 for k in layer.shape[2:]):
        return None
    spatial = len(layer.shape) - 2
    if spatial not in (1, 2):
        return None
    kernel = [1] * spatial
    strides = list(attrs.get("strides") or [1] * spatial)
    dilations = list(attrs.get("dilations") or [1] * spatial)
    pads = resolve_pads(data.shape[2:], kernel, strides, dilations, attrs.get("pads"),
                        attrs.get("auto_pad", "NOTSET"))
    if any(pads):
        return None
    index = (slice(None), slice(None)) + tuple(slice(None, None, int(s)) for s in strides)
    return data[index]


def patch_coverage(layer: EditableLayer, attrs: dict, spatial: tuple[int, ...]
                   ) -> tuple[torch.Tensor, int]:
    """How many (position, kernel offset) pairs of the conv's keys read each input pixel
    (zero padding excluded), as a tensor of the input's spatial shape, and the number of
    positions P. Sum over pixels of coverage x f(pixel) = sum over keys and offsets of f."""
    dims = len(spatial)
    kernel = list(layer.shape[2:])
    _, strides, dilations, pads = conv_key_grid(layer, attrs, spatial)
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
        if rows.dim() == 3:  # [batch, tokens, K] from image_rows: each token a key row
            return rows[:, :, None, :]
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
        scaled = output / float(attrs.get("alpha", 1.0))
        return scaled[:, :, None, :] if scaled.dim() == 3 else scaled[:, None, None, :]
    if o == "matmul_right":
        return output.reshape(output.shape[0], -1, 1, output.shape[-1])
    rows = output.transpose(-1, -2)
    return rows.reshape(rows.shape[0], -1, 1, rows.shape[-1])


#: Orientations whose keys are the rows of their data input (one key per row of the last axis).
ROW_KEYED = ("gemm", "gemm_transposed", "matmul_right")


def probe_row_layouts(graph: ShadowGraph, layers: list[EditableLayer],
                      inputs: tuple) -> dict[str, "tuple[int, bool] | str"]:
    """Which leading axis of each layer's data input carries the images, found by running the
    graph on two images, one of them all NaN (each way round; two passes for all layers): the
    rows that turn NaN are that image's (rows that depend on no image, a class token before
    attention, may sit anywhere). A layout is (axis, inner): the axis holds (image, token)
    rows when ``inner`` is False, (token, image) rows when True (a token-major [T*B, D] or
    [T, B, D] input, as in nn.MultiheadAttention's exports); where no axis fits, the
    one-line reason instead."""
    first = [x[:1] for x in inputs]
    blank = torch.full_like(first[0], float("nan"))
    others = [torch.cat([x, x]) for x in first[1:]]
    names = [l.name for l in layers]
    passes = []
    with torch.no_grad():
        for probe in (torch.cat([first[0], blank]), torch.cat([blank, first[0]])):
            passes.append(graph.node_inputs(names, probe, *others))
    layouts: dict[str, "tuple[int, bool] | str"] = {}
    for layer in layers:
        rows = [torch.isnan(p[layer.name][data_input_index(layer)]).any(dim=-1) for p in passes]
        layouts[layer.name] = _layout(*rows) or (
            f"layer '{layer.name}': cannot tell which rows of its input "
            f"{list(passes[0][layer.name][data_input_index(layer)].shape)} belong to which image")
    return layouts


def _layout(of_second: torch.Tensor, of_first: torch.Tensor) -> "tuple[int, bool] | None":
    """The (axis, inner) whose second half (or odd entries) holds every row that depends on
    the second image and none of the first's."""
    if not (of_second.any() and of_first.any()):
        return None
    for axis, size in enumerate(of_second.shape):
        if size % 2:
            continue
        index = torch.arange(size, device=of_second.device)
        for inner in (False, True):
            which = (index % 2) if inner else (index // (size // 2))
            shape = [1] * of_second.dim()
            shape[axis] = size
            second = (which == 1).reshape(shape).expand_as(of_second)
            if not (of_second & ~second).any() and not (of_first & second).any():
                return axis, inner
    return None


def sample_major(t: torch.Tensor, layout: tuple[int, bool], batch: int) -> torch.Tensor:
    """Rows of ``t`` (leading axes, last axis the features) regrouped as [batch, P, D] by a
    layout of :func:`probe_row_layouts`: one image per entry of the first axis."""
    axis, inner = layout
    size = t.shape[axis]
    split = (size // batch, batch) if inner else (batch, size // batch)
    t = t.reshape(*t.shape[:axis], *split, *t.shape[axis + 1:])
    t = t.movedim(axis + 1 if inner else axis, 0)
    return t.reshape(batch, -1, t.shape[-1])


def _grouped_already(graph: ShadowGraph, layer: EditableLayer, t: torch.Tensor,
                     batch: int) -> bool:
    """Whether a row-keyed layer's input or output ``t`` needs no regrouping: another kind
    of layer, one row per image ([batch, D]), or a Gemm with transA (keys are columns)."""
    if layer.orientation not in ROW_KEYED or (t.dim() == 2 and t.shape[0] == batch):
        return True
    return (layer.orientation.startswith("gemm")
            and bool(graph.node_attributes(layer.name).get("transA")))


def image_rows(graph: ShadowGraph, layer: EditableLayer, data: torch.Tensor,
               out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A row-keyed layer's data and output as [batch, tokens, D] (each token a key row) when
    they are not already [batch, D]: a MatMul on [B, T, D] or [T, B, D] tokens, a Gemm on
    [T*B, D] rows. The layout is probed once (all such layers together) and kept on the
    graph."""
    inputs = getattr(graph, "current_inputs", None)
    if not inputs or inputs[0].dim() == 0:
        return data, out
    batch = int(inputs[0].shape[0])
    if _grouped_already(graph, layer, data, batch):
        return data, out
    if batch == 1:
        return data.reshape(1, -1, data.shape[-1]), out.reshape(1, -1, out.shape[-1])
    layouts = graph.__dict__.setdefault("row_layouts", {})
    if layer.name not in layouts:  # every row-keyed layer of the graph, in two passes
        pending = [l for l in graph.editable_layers
                   if l.orientation in ROW_KEYED and l.name not in layouts]
        layouts.update(probe_row_layouts(graph, pending, inputs))
    layout = layouts[layer.name]
    if isinstance(layout, str):
        raise UnsupportedOpError(layout)
    return sample_major(data, layout, batch), sample_major(out, layout, batch)


def image_rows_of(graph: ShadowGraph, layer: EditableLayer, t: torch.Tensor,
                  batch: int) -> torch.Tensor:
    """``t`` (the layer's output or its gradient, from a pass over ``batch`` images) grouped
    as :func:`image_rows` groups the output, by the layout it found (a row-keyed layer's
    output has its input's leading axes)."""
    if _grouped_already(graph, layer, t, batch):
        return t
    if batch == 1:
        return t.reshape(1, -1, t.shape[-1])
    layout = getattr(graph, "row_layouts", {}).get(layer.name)
    return sample_major(t, layout, batch) if isinstance(layout, tuple) else t


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
        data, out = image_rows(self.graph, layer, ins[data_input_index(layer)], outs[0])
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
