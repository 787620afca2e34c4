"""Shadow graph vs onnxruntime on the same input: element-wise differences and top-1 agreement."""
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
#: fp16 models: half precision rounding differs between kernels.
FP16_RTOL, FP16_ATOL = 1e-2, 1e-2
#: Quantized outputs: onnxruntime fuses QDQ groups into integer kernels (QLinearConv, QGemm)
#: whose rounding differs from the unfused graph by a step here and there.
QUANT_STEPS = 3


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
    #: computes in, whatever its IO dtypes) or "quantized output steps"
    basis: str = "float32"
    #: largest difference in output quantization steps (quantized outputs only)
    max_steps: float | None = None
    step_tolerance: int | None = None
    #: output elements that are Inf or NaN in either output (the model overflows on this
    #: input); they are left out of the comparison and of top-1 agreement
    nonfinite: int = 0
    #: output elements in all
    elements: int = 0

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


def compare(graph: ShadowGraph, model: "bytes | str | os.PathLike", inputs: list[np.ndarray],
            provider: str = "cpu", rtol: float | None = None, atol: float | None = None,
            device: str | torch.device = "cpu") -> ParityResult:
    """Run both on ``inputs``; compare every output element-wise (relative differences
    are taken against max(|onnxruntime|, atol)), and top-1 of the first output when it
    is a [batch, classes] score matrix. ``model`` is the serialized model or its path
    (a path when weights are in external data)."""
    session = open_session(model, provider)
    expected = session.run(*inputs)
    with torch.no_grad():
        got = graph.to(device)(*[dtypes.numpy_to_torch(a).to(device) for a in inputs])
    proto = graph.model.proto
    half = (any(a.dtype == np.float16 for a in inputs) or expected[0].dtype == np.float16
            or compute_dtype(proto) == np.float16)
    rtol = rtol if rtol is not None else (FP16_RTOL if half else FP32_RTOL)
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
        g, e = g[finite], e[finite]
        diff = np.abs(g - e)
        if diff.size:
            max_abs = max(max_abs, float(diff.max()))
            max_rel = max(max_rel, float((diff / np.maximum(np.abs(e), atol)).max()))
            if step:  # quantized output: judged in its quantization steps
                in_steps = float(diff.max()) / step
                max_steps = max(max_steps or 0.0, in_steps)
                ok = ok and in_steps <= QUANT_STEPS + 1e-3
            else:
                ok = ok and bool(np.all(diff <= atol + rtol * np.abs(e)))
    basis = ("quantized output steps" if max_steps is not None
             else "float16 compute" if half else "float32")
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
                        elements)
