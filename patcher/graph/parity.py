"""Shadow graph vs onnxruntime on the same input: element-wise differences and top-1 agreement.

Float outputs are judged element-wise in units of the output's own scale:

    |a_i - b_i| <= atol + rtol * (|b_i| + s),   s = RMS of b over the element's sample
                                                (its row along the first axis)

(b onnxruntime's value, a the shadow graph's). The scale term s is there because two
float implementations of the same graph differ by rounding of the sums that produced an
element, whose size follows the magnitudes summed, not the element: a logit near zero
after a 25,088-wide dot product differs by as much as a large one.

The float32 rtol follows the rounding behind the outputs (:class:`RoundingEstimate`, a
first-order running estimate over one forward): summing L products in another order
(blocking, FMA, threads) changes a sum by about u sqrt(L) of its terms' size (u = 2^-24,
roundings of random sign), an error already in the inputs is carried along, and both are
amplified where the sum cancels (kappa: the terms' size over the result's). With e that
estimate for the outputs, relative to their RMS,

    rtol = max(FP32_RTOL, ACCUMULATION_SAFETY * e).

A small 28x28 model stays at FP32_RTOL; the VGG16-style model of benchmarks/scale_models.py
(a trained head on a 25,088-wide dense layer whose outputs cancel: kappa about 100) gets
about 3e-3.
Top-1 agreement is required whatever the tolerance. An rtol given by the caller is used
as given.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np
import onnx
import torch

from patcher.model import dtypes
from patcher.errors import BadSamplesError
from patcher.model.runtime import open_session
from patcher.graph.shadow import ShadowGraph

#: Tolerances for fp32 models (issue 2): |a - b| <= atol + rtol * |b| element-wise.
FP32_RTOL, FP32_ATOL = 1e-4, 1e-5
#: Float32 unit roundoff u = 2^-24.
FLOAT32_ROUNDOFF = 2.0 ** -24
#: Safety factor of :func:`accumulation_rtol` over the estimate e, an RMS: the largest of
#: many differences of random sign is about sqrt(2 ln N), 3 to 4, times their RMS (the
#: largest measured, on the VGG16-style model after a patch: 1.2 e).
ACCUMULATION_SAFETY = 4.0
#: fp16 models: half precision rounding differs between kernels.
FP16_RTOL, FP16_ATOL = 1e-2, 1e-2
#: Quantized outputs: onnxruntime fuses QDQ groups into integer kernels (QLinearConv, QGemm)
#: whose rounding differs from the unfused graph by a step here and there.
QUANT_STEPS = 3
#: Dynamically quantized models (DynamicQuantizeLinear: activations to uint8 at run time, float
#: output): onnxruntime's fused kernels (DynamicQuantizeMatMul, MatMulIntegerToFloat) order
#: the scale arithmetic differently, so an activation at a rounding boundary lands one uint8
#: step (1/255 of its range) away; judged within QUANT_STEPS such steps, relative to the
#: output's scale, plus top-1 agreement.
DYNAMIC_RTOL = QUANT_STEPS / 255


@dataclass
class ParityResult:
    """How far the shadow graph's outputs are from onnxruntime's on one input batch."""

    max_abs_diff: float
    max_rel_diff: float
    within_tolerance: bool
    top1_agreement: float | None  # None when the first output is not [batch, classes]
    rtol: float
    atol: float
    provider: str
    batch: int
    #: what the tolerance was chosen from: "float32", "float16 compute" (the dtype the graph
    #: computes in, whatever its IO dtypes), "quantized output steps" or "dynamic
    #: quantization (uint8 activation steps)" (DYNAMIC_RTOL)
    basis: str = "float32"
    #: largest difference in output quantization steps (quantized outputs only)
    max_steps: float | None = None
    step_tolerance: int | None = None
    #: output elements that are Inf or NaN in either output (the model overflows on this
    #: input); they are left out of the comparison and of top-1 agreement
    nonfinite: int = 0
    #: output elements in all
    elements: int = 0
    #: e of :class:`RoundingEstimate` for the outputs (what a float32 rtol is derived from)
    rounding_estimate: float = 0.0

    @property
    def passed(self) -> bool:
        return self.within_tolerance and self.top1_agreement in (None, 1.0)

    def as_dict(self) -> dict:
        return asdict(self) | {"passed": self.passed}


def input_specs(model: onnx.ModelProto, batch: int = 2, default_dim: int = 64
                ) -> list[tuple[str, tuple[int, ...], int]]:
    """(name, concrete shape, elem_type) for each real graph input; symbolic dims
    become ``batch`` on the first axis and ``default_dim`` elsewhere (image sides)."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        if not inp.type.HasField("tensor_type"):
            raise BadSamplesError(f"graph input '{inp.name}' is not a tensor; random parity "
                                  "input can only be made for tensors")
        tt = inp.type.tensor_type
        dims = []
        for k, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(d.dim_value)
            else:
                dims.append(batch if k == 0 else default_dim)
        specs.append((inp.name, tuple(dims), tt.elem_type))
    return specs


#: Most elements one random parity input may hold (512 MiB of float32).
MAX_INPUT_ELEMENTS = 1 << 27


def random_inputs(model: onnx.ModelProto, seed: int = 0, batch: int = 2,
                  shapes: dict[str, tuple[int, ...]] | None = None) -> list[np.ndarray]:
    """Seeded random inputs in [0, 1) matching the model's input types. An input of more
    than :data:`MAX_INPUT_ELEMENTS` elements (huge fixed dims in the model) is refused."""
    import math

    from patcher.errors import RectifyError

    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or \
            not 0 <= seed < 2 ** 32:
        raise RectifyError(f"seed {seed!r}: expected an integer in 0..{2 ** 32 - 1}")
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise RectifyError(f"batch {batch!r}: expected a positive integer")
    rng = np.random.default_rng(seed)
    arrays = []
    for name, shape, elem in input_specs(model, batch):
        shape = tuple(shapes[name]) if shapes and name in shapes else shape
        if math.prod(shape) > MAX_INPUT_ELEMENTS:
            raise BadSamplesError(f"graph input '{name}': a parity input of shape "
                                  f"{list(shape)} would hold more than {MAX_INPUT_ELEMENTS} "
                                  "elements; give a smaller --input-shape or use --no-parity")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
        if np.issubdtype(dtype, np.floating):
            arrays.append(rng.random(shape, dtype=np.float32).astype(dtype))
        else:
            arrays.append(rng.integers(0, 2, size=shape).astype(dtype))
    return arrays


def compute_dtype(model: onnx.ModelProto) -> np.dtype | None:
    """The float dtype the graph computes in: the one holding most elements of its float
    initializers (an fp16 model with float32 inputs and outputs computes in float16); None
    when it has no float initializer."""
    counts: dict[int, int] = {}
    for t in model.graph.initializer:
        if t.data_type in _FLOAT_TYPES:
            counts[t.data_type] = counts.get(t.data_type, 0) + int(np.prod(t.dims, dtype=np.int64))
    if not counts:
        return None
    return onnx.helper.tensor_dtype_to_np_dtype(max(counts, key=counts.get))


_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)


def output_steps(model: onnx.ModelProto) -> list[float | None]:
    """For each graph output, one quantization step in its units when it is quantized: 1 for
    an integer output, the scale of the DequantizeLinear that produces it (the largest, per
    axis) for a dequantized one; None for other outputs."""
    producers = {out: n for n in model.graph.node for out in n.output}
    constants = {t.name: t for t in model.graph.initializer}
    constants.update({n.output[0]: a.t for n in model.graph.node if n.op_type == "Constant"
                      for a in n.attribute if a.name == "value"})
    steps: list[float | None] = []
    for out in model.graph.output:
        elem = out.type.tensor_type.elem_type
        node = producers.get(out.name)
        if elem in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16,
                    onnx.TensorProto.UINT16):
            steps.append(1.0)
        elif (node is not None and node.op_type == "DequantizeLinear" and len(node.input) > 1
              and node.input[1] in constants):
            scale = onnx.numpy_helper.to_array(constants[node.input[1]]).astype(np.float64)
            steps.append(float(np.max(np.abs(scale))) if scale.size else None)
        else:
            steps.append(None)
    return steps


#: Ops that sum over one axis of their first input (softmax and normalisation sums).
_AXIS_SUMS = ("Softmax", "LogSoftmax", "LayerNormalization", "SimplifiedLayerNormalization",
              "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "LpNormalization")
#: Ops whose output element sums in.numel / out.numel input elements.
_POOLING_SUMS = ("GlobalAveragePool", "GlobalLpPool", "AveragePool", "LpPool", "ReduceSum",
                 "ReduceMean", "ReduceL1", "ReduceL2", "ReduceSumSquare", "ReduceLogSum",
                 "ReduceLogSumExp")


def reduction_length(op_type: str, attrs: dict, inputs: tuple, outputs: tuple) -> int:
    """How many terms one output element of a node sums (0: no sum): C_in/g x kernel for a
    Conv (its weight's shape), the inner dimension K for Gemm and MatMul-like ops, the
    reduced axis for softmax and normalisations, in/out elements for pooling and Reduce*."""
    def shape(k: int, where: tuple = inputs) -> tuple[int, ...] | None:
        return tuple(where[k].shape) if len(where) > k and torch.is_tensor(where[k]) else None

    first = shape(0)
    if first is None:
        return 0
    if op_type in ("Conv", "ConvInteger", "QLinearConv", "ConvTranspose"):
        w = shape(3 if op_type == "QLinearConv" else 1)
        if not w or len(w) < 2:
            return 0
        if op_type == "ConvTranspose":  # W [C_in, C_out/g, k...]: each output sums C_in/g x k
            return max(1, w[0] // max(int(attrs.get("group", 1)), 1)) * int(np.prod(w[2:]))
        return int(np.prod(w[1:]))
    if op_type == "Gemm":
        return first[0] if attrs.get("transA", 0) and len(first) == 2 else first[-1]
    if op_type in ("MatMul", "MatMulInteger", "QLinearMatMul", "FusedMatMul", "Attention",
                   "MultiHeadAttention", "Einsum") or op_type in _AXIS_SUMS:
        return first[-1] if first else 0
    if op_type in _POOLING_SUMS:
        out = shape(0, outputs)
        total = int(np.prod(first))
        return max(1, total // max(int(np.prod(out)) if out is not None else 1, 1))
    return 0


def _magnitude_ratio(op_type: str, attrs: dict, inputs: tuple, output) -> float:
    """kappa of :class:`RoundingEstimate` for a Conv, Gemm or MatMul: RMS of
    sqrt(|x|^2 . |W|^2) (the same op on squared inputs, no bias) over RMS of the output,
    on at most 4 inputs of the batch; 1 where it cannot be computed."""
    import torch.nn.functional as F

    try:
        x, w = inputs[0][:4].double(), inputs[1].double()
        if op_type == "Conv":
            dims = x.dim() - 2
            pads = list(attrs.get("pads", [0] * 2 * dims))
            if str(attrs.get("auto_pad", "NOTSET")) not in ("NOTSET", "VALID", b"NOTSET", b"VALID"):
                return 1.0
            torch_pads = []
            for k in reversed(range(dims)):
                torch_pads += [pads[k], pads[k + dims]]
            conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
            mag = conv(F.pad(x * x, torch_pads), w * w, None, attrs.get("strides", 1),
                       0, attrs.get("dilations", 1), attrs.get("group", 1))
        elif op_type == "Gemm":
            a = x.T if attrs.get("transA", 0) else x
            b = w.T if attrs.get("transB", 0) else w
            mag = (a * a) @ (b * b)
        else:  # MatMul
            mag = (x * x) @ (w * w)
        out = output[:4].double()
        out_rms = float(out.pow(2).mean().sqrt())
        ratio = float(mag.clamp_min(0).sqrt().pow(2).mean().sqrt()) / out_rms
        return ratio if np.isfinite(ratio) and ratio > 0 else 1.0
    except Exception:  # an unusual layout: no estimate of cancellation, kappa = 1
        return 1.0


class RoundingEstimate:
    """e of :func:`accumulation_rtol` for every tensor of one forward (a graph hook):
    the expected float32 difference between two implementations, relative to the tensor's
    RMS. Inputs and constants: 0. A node that sums L terms (:func:`reduction_length`):

        e_out = kappa (e_in + u sqrt(L)),   kappa = RMS(sqrt(x^2 . W^2)) / RMS(y)

    (errors and roundings of random sign add in quadrature over the L terms, whose size is
    sqrt(x^2 . W^2) per output element; kappa >> 1 where the output cancels, as after
    a trained head's 25,088-wide dense layer, about 100 there); kappa = 1 for sums
    without a weight (softmax, normalisations, pooling). Add, Sub and Sum add their inputs'
    absolute errors (:meth:`_summed`); other nodes pass on the largest e of their inputs.
    It overestimates blocked and pairwise sums (their error grows slower than sqrt(L)):
    the largest measured differences were 1/20 to 1/9 of it on the models of
    tests/test_parity_tolerance.py, 0.6 to 1.2 times it on the VGG16-style model."""

    def __init__(self, graph: ShadowGraph) -> None:
        self.graph = graph
        self.error: dict[str, float] = {}

    def __call__(self, info, inputs, outputs) -> None:
        before = max((self.error.get(n, 0.0) for n in info.inputs if n), default=0.0)
        if info.op_type in ("Add", "Sub", "Sum") and outputs and torch.is_tensor(outputs[0]):
            before = self._summed(info, inputs, outputs[0], before)
        attrs = self.graph.node_attributes(info.name)
        length = reduction_length(info.op_type, attrs, inputs, outputs)
        here = before
        if length > 1:
            kappa = 1.0
            if info.op_type in ("Conv", "Gemm", "MatMul") and len(inputs) > 1 and \
                    torch.is_tensor(inputs[1]) and torch.is_tensor(outputs[0]) and \
                    inputs[0].is_floating_point() and outputs[0].numel():
                kappa = _magnitude_ratio(info.op_type, attrs, inputs, outputs[0])
            here = kappa * (before + FLOAT32_ROUNDOFF * float(np.sqrt(length)))
        for name in info.outputs:
            if name:
                self.error[name] = here

    def _summed(self, info, inputs, output, fallback: float) -> float:
        """A sum of tensors adds their absolute errors (in quadrature): e_out =
        sqrt(sum_i (e_i RMS(x_i))^2) / RMS(out), e.g. a residual branch's error shrinks
        by how small the branch is against the trunk."""
        def rms(t) -> float:
            return float(t.detach().double().pow(2).mean().sqrt()) if t.numel() else 0.0

        out = rms(output)
        if not out > 0 or not np.isfinite(out):
            return fallback
        total = sum((self.error.get(n, 0.0) * rms(t)) ** 2
                    for n, t in zip(info.inputs, inputs) if n and torch.is_tensor(t))
        return float(np.sqrt(total)) / out

    def of_outputs(self, names) -> float:
        return max((self.error.get(n, 0.0) for n in names), default=0.0)


def accumulation_rtol(error: float) -> float:
    """Float32 rtol for outputs whose expected rounding difference is ``error`` (e of
    :class:`RoundingEstimate`): max(FP32_RTOL, ACCUMULATION_SAFETY x e)."""
    return max(FP32_RTOL, ACCUMULATION_SAFETY * error)


def row_scale(values: np.ndarray) -> np.ndarray:
    """s of the module docstring, broadcastable to ``values``: the RMS of each sample's
    elements (rows along the first axis; the whole array for a 0- or 1-d output)."""
    if values.ndim < 2:
        return np.full(values.shape, np.sqrt(np.mean(values ** 2)) if values.size else 0.0)
    flat = values.reshape(values.shape[0], -1)
    rms = np.sqrt(np.mean(flat ** 2, axis=1))
    return np.broadcast_to(rms.reshape((-1,) + (1,) * (values.ndim - 1)), values.shape)


def compare(graph: ShadowGraph, model: "bytes | str | os.PathLike", inputs: list[np.ndarray],
            provider: str = "cpu", rtol: float | None = None, atol: float | None = None,
            device: str | torch.device = "cpu") -> ParityResult:
    """Run both on ``inputs``; compare every output element-wise (relative differences
    are taken against max(|onnxruntime| + s, atol), s the sample's RMS: module docstring),
    and top-1 of the first output when it
    is a [batch, classes] score matrix. ``model`` is the serialized model or its path
    (a path when weights are in external data)."""
    session = open_session(model, provider)
    expected = session.run(*inputs)
    depth = RoundingEstimate(graph)
    with torch.no_grad(), graph.register_hook(depth):
        got = graph.to(device)(*[dtypes.numpy_to_torch(a).to(device) for a in inputs])
    proto = graph.model.proto
    half = (any(a.dtype == np.float16 for a in inputs) or expected[0].dtype == np.float16
            or compute_dtype(proto) == np.float16)
    accumulation = depth.of_outputs(o.name for o in proto.graph.output)
    dynamic = rtol is None and not half and any(n.op_type == "DynamicQuantizeLinear"
                                                for n in proto.graph.node)
    rtol = rtol if rtol is not None else (FP16_RTOL if half else accumulation_rtol(accumulation))
    if dynamic:
        rtol = max(rtol, DYNAMIC_RTOL)
    atol = atol if atol is not None else (FP16_ATOL if half else FP32_ATOL)
    steps = output_steps(proto)
    max_abs = max_rel = 0.0
    max_steps: float | None = None
    ok = True
    nonfinite = elements = 0
    for g, e, step in zip(got, expected, steps):
        g = dtypes.torch_to_numpy(g).astype(np.float64)
        e = np.asarray(e).astype(np.float64)
        if g.shape != e.shape:
            ok = False
            max_abs = max_rel = float("inf")
            continue
        # where either side overflowed (Inf/NaN) the model is outside float range and the two
        # are not compared; those elements are counted and reported instead
        finite = np.isfinite(g) & np.isfinite(e)
        elements += finite.size
        nonfinite += int((~finite).sum())
        e_all = e
        g, e = g[finite], e[finite]
        diff = np.abs(g - e)
        if diff.size:
            reference = np.abs(e) + row_scale(np.where(finite, np.nan_to_num(e_all), 0.0))[finite]
            max_abs = max(max_abs, float(diff.max()))
            max_rel = max(max_rel, float((diff / np.maximum(reference, atol)).max()))
            if step:  # quantized output: judged in its quantization steps
                in_steps = float(diff.max()) / step
                max_steps = max(max_steps or 0.0, in_steps)
                ok = ok and in_steps <= QUANT_STEPS + 1e-3
            else:
                ok = ok and bool(np.all(diff <= atol + rtol * reference))
    basis = ("quantized output steps" if max_steps is not None
             else "float16 compute" if half
             else "dynamic quantization (uint8 activation steps)" if dynamic else "float32")
    g0 = dtypes.torch_to_numpy(got[0]).astype(np.float64)
    e0 = np.asarray(expected[0]).astype(np.float64)
    top1 = None
    if g0.ndim == 2 and g0.shape == e0.shape and g0.shape[1] > 1:
        rows = np.isfinite(g0).all(1) & np.isfinite(e0).all(1)  # top-1 where no score overflowed
        if rows.any():
            top1 = float(np.mean(g0[rows].argmax(1) == e0[rows].argmax(1)))
    return ParityResult(max_abs, max_rel, ok, top1, rtol, atol, session.provider,
                        int(inputs[0].shape[0]) if inputs and inputs[0].ndim else 1, basis,
                        max_steps, QUANT_STEPS if max_steps is not None else None, nonfinite,
                        elements, accumulation)
