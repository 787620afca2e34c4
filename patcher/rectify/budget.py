"""An up-front estimate of the time and peak memory of ``locate`` and ``patch``, from the
model's shapes alone (ONNX shape inference at batch 1, no forward pass), and the
``--max-memory`` refusal built on it.

What it counts, per image (:func:`model_footprint`):

* ``macs``: multiply-accumulates of the Conv, Gemm and MatMul nodes,
  out_elements x (C_in / groups x prod(kernel)) for a Conv, out_elements x K otherwise;
* ``activation_bytes``: the bytes of every float tensor a forward computes (what autograd
  keeps for a backward pass), ``largest_activation`` the largest of them;
* each editable layer's key width d and key rows per image (output positions or tokens).

Time (:func:`estimate`): forward-equivalents x (macs + :data:`BYTE_MACS` x
activation_bytes) / the machine's measured rate (:func:`machine_rate`, a timed matmul in
this process's CPU seconds, times :data:`EFFICIENCY`). Forward-equivalents: the statistics pass over the calibration
images (:data:`STATISTICS_FORWARDS` each), the IG passes (steps x pairs, forward and
backward: 3 each), the gap measurements on the transplanted images, and for ``patch``
one round (the edited layer's exact statistics, :data:`EDIT_STATISTICS_FORWARDS` per
calibration image; the fit's forwards, corrupted and clean fit pairs; a gap pass and an
accuracy pass over the eval images) plus verify's two onnxruntime passes over the eval
images (:data:`ORT_FORWARD_SHARE` each image). That is a loop that stops after its first
round, as the dynamic loop does once an edit removes the corruption; the bound beside it
(``seconds_bound``) runs every round up to ``--max-rounds``, each ranking again.

Peak memory: a fixed runtime (:data:`RUNTIME_BYTES`: Python, torch, onnxruntime), three
copies of the weights (the proto, the shadow graph, the written copy), the data (eval and
calibration images, transplanted sets), the largest of the working sets: an IG block
(the interpolated inputs of one block, :func:`patcher.rectify.workspace.ig_chunk`: at most
IG_CHUNK, fewer when IG_MEMORY bounds them, x activation_bytes x
IG_BACKWARD_COPIES, activations and their gradients; both from the workspace), an
accuracy batch (batch x 2 largest activations) and a statistics batch (batch x rows x d
float32 keys of the widest layer; batch: ``config.batch``, else EVAL_BATCH bounded by
:data:`BATCH_MEMORY`) and, for ``patch``, the rank-one fit (:meth:`LayerKeys.fit_bytes`,
the largest over the layers); plus the statistics kept for ranking (two float64 copies
per layer: d^2 exact, channels^2 + kernel^2 + d Kronecker-factored for a spatial conv,
or a wide dense layer's low-rank key rows, :meth:`LayerKeys.statistics_bytes`) and, for
``patch``, the exact d x d statistics of the widest layer that may be edited (none for a
low-rank one).

Both are estimates (how close they come is measured by ``benchmarks/scale.py`` and
written in ``benchmarks/SCALE.md``); the refusal is for the case where the estimate is
far beyond what the machine can hold.
"""
from __future__ import annotations

import copy
import math
import re
import time
from dataclasses import dataclass, field

import onnx
from onnx import helper, shape_inference

from patcher.analysis.moments import MAX_KEY_ROWS, WIDE_KEY_DIM
from patcher.errors import RectifyError
from patcher.graph.support import node_names
from patcher.progress import status
from patcher.rectify.config import EVAL_BATCH, RectifyConfig

#: Python + torch + onnxruntime resident before any model is read (255 MB measured
#: after the imports, plus sessions and allocator slack).
RUNTIME_BYTES = 300 << 20
#: Without --batch, images per forward such that 4 x the largest activation of each stays
#: under this (the workspace's default batch).
BATCH_MEMORY = 256 << 20
#: Forward-equivalents per calibration image for the key statistics (the forward, the
#: key products and the factored statistics' eigenvalue correction: about 5 on ResNet-18
#: at 224, issue 21).
STATISTICS_FORWARDS = 5.0
#: onnxruntime's forward of one image (verify's passes over the eval set) in the
#: estimate's forward-equivalents: ResNet-18 at 224 3.3 s per 100 images against 11 s for
#: 100 forward-equivalents, ViT-Ti/16 4.2 s against 12.7 s (issue 21's measurements).
ORT_FORWARD_SHARE = 0.3
#: Forward-equivalents per calibration image of one round's exact statistics for the
#: layer it edits (a factored conv's exact C: the forward up to the layer, then K^T K at
#: about 9 C_in / C_out times the conv's own cost for a 3x3 kernel).
EDIT_STATISTICS_FORWARDS = 2.0
#: The timed matmul rate's multiple that a whole model's passes reach per CPU second,
#: fitted with BYTE_MACS and STARTUP_SECONDS to the locates of ResNet-18, ViT-Ti/16 and
#: MobileNetV2 at 224, eval 100, after the statistics' gathers got cheaper and OpenMP
#: stopped spinning (patcher/__init__; 18.3, 29.4 and 15.4 CPU s measured at load 4 with
#: a rate of 5.0e10 MAC/s; the estimate gives 1.21x, 1.01x and 1.07x of them, and for
#: patch, one round, 1.18x and 0.89x of ResNet-18's 31 and ViT's 57 s). Above 1: the
#: forward-equivalents count the statistics pass at STATISTICS_FORWARDS, which it no
#: longer costs (the old 0.4 was fitted to spin-inflated runs, 2.6-4.4x high since).
EFFICIENCY = 1.9
#: Multiply-accumulates one byte of activations costs as much as (memory traffic: the
#: narrow 1x1 and depthwise convs, Clip, Add of MobileNetV2; LayerNorm, Softmax and GELU of
#: a ViT; per image: MobileNetV2 300 M MACs and 50 MB of activations, ViT 1,075 M and
#: 89 MB, ResNet-18 1,814 M and 22 MB). Fitted with EFFICIENCY (above); the earlier 12 was.
BYTE_MACS = 25.0
#: Fixed CPU seconds: imports (2.7 s measured), loading, onnxruntime sessions, shape
#: checks, and the per-node Python overhead that dominates small models.
STARTUP_SECONDS = 5.0

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20,
          "MB": 1 << 20, "MIB": 1 << 20, "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30,
          "T": 1 << 40, "TB": 1 << 40, "TIB": 1 << 40}


def parse_memory(text: str) -> int:
    """Bytes from a size such as ``4G``, ``512M``, ``2.5GB``, ``1000000`` (binary units:
    1G = 2^30 bytes). Refuses anything else, zero, and sizes of 2^50 bytes or more."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match[2].upper() if match else None
    if match is None or unit not in _UNITS:
        raise RectifyError(f"--max-memory '{text}' is not a size (e.g. 4G, 512M, 2.5GB)")
    value = float(match[1]) * _UNITS[unit]
    if not 1 <= value < 2 ** 50:
        raise RectifyError(f"--max-memory '{text}' is out of range (1 byte to 1 PiB)")
    return int(value)


def format_bytes(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GB" if n >= 2 ** 28 else f"{n / 2 ** 20:.0f} MB"


@dataclass
class LayerKeys:
    """An editable layer's keys: width d and rows per image."""

    name: str
    key_dim: int
    rows: int
    kernel: int = 1  # kernel positions of a conv (1 for a dense layer or a 1x1 conv)
    dense: bool = False  # a Gemm or MatMul (wide ones keep low-rank key rows)
    values: int = 0      # output channels or features (the edit's value width)

    def low_rank(self) -> bool:
        """Statistics kept as key rows (:data:`patcher.analysis.moments.WIDE_KEY_DIM`)."""
        return self.dense and self.key_dim > WIDE_KEY_DIM

    def key_rows(self, n_calib: int) -> int:
        """Key rows a low-rank layer keeps: every key, at most MAX_KEY_ROWS."""
        return max(1, min(MAX_KEY_ROWS, n_calib * self.rows))

    def statistics_bytes(self, mode: str, n_calib: int = MAX_KEY_ROWS) -> int:
        """Bytes of the statistics kept for ranking, two float64 copies (C and its
        inverse root): d x d exact; for a spatial conv under ``auto``/``kronecker`` the two
        Kronecker factors (channels^2 + kernel^2) and the eigenvalue correction (d); for
        a wide dense layer its n key rows (float32, a float64 copy while factorised, and
        the float64 basis V [d, n]: 20 n d) and the n x n Gram matrix and eigenvectors."""
        if self.low_rank():
            n = self.key_rows(n_calib)
            return 20 * n * self.key_dim + 16 * n * n
        if self.kernel > 1 and mode != "exact":
            channels = self.key_dim // self.kernel
            return 16 * (channels ** 2 + self.kernel ** 2 + self.key_dim)
        return 16 * self.key_dim ** 2

    def edit_statistics_bytes(self) -> int:
        """The exact statistics an edit of this layer computes: C and its Cholesky factor
        (16 d^2), none for a low-rank layer (its ranking statistics are exact)."""
        return 0 if self.low_rank() else 16 * self.key_dim ** 2

    def fit_bytes(self, fit_pairs: int) -> int:
        """The rank-one fit's working set (:func:`patcher.edits.rankone.solve_rank_one`):
        the fit pairs' layer inputs (float32, about d / kernel x rows per image), their values
        (corrupted and clean, float32) and the residual's float64 copies (3 x 8 bytes), a
        key chunk (64 MiB, float32 + float64 + weighted), and the Kd x Kd moment, C^-1 M and
        the Gram matrix (or A [Kd, Q] when there are fewer keys than Kd)."""
        q = fit_pairs * self.rows
        inputs = fit_pairs * (self.key_dim // self.kernel) * self.rows * 4
        values = q * max(self.values, 1) * (2 * 4 + 3 * 8)
        square = 3 * 8 * self.key_dim * min(self.key_dim, q)
        return inputs + values + 3 * (64 << 20) * (q > self.key_dim) + square


@dataclass
class Footprint:
    """A model's per-image work and memory, from shapes at batch 1."""

    macs: int
    activation_bytes: int
    largest_activation: int
    weight_bytes: int
    input_bytes: int
    layers: list[LayerKeys] = field(default_factory=list)


def _dims(value_info) -> list[int] | None:
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return None
    dims = []
    for d in t.shape.dim:
        if not d.HasField("dim_value") or d.dim_value <= 0:
            return None
        dims.append(int(d.dim_value))
    return dims


def _batch_one(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the graph (weights as shapes only) whose first input has batch 1."""
    model = onnx.ModelProto()
    model.ir_version, model.producer_name = proto.ir_version, proto.producer_name
    model.opset_import.extend(proto.opset_import)
    graph = model.graph
    graph.node.extend(proto.graph.node)
    graph.output.extend(proto.graph.output)
    inits = {t.name for t in proto.graph.initializer}
    for t in proto.graph.initializer:  # shape inference needs the shapes, not the values
        graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        if t.data_type == onnx.TensorProto.INT64 and math.prod(t.dims) <= 64:
            graph.initializer.append(t)  # shape constants (Reshape targets) keep values
    for inp in proto.graph.input:
        if inp.name in inits:
            continue
        inp = copy.deepcopy(inp)
        dims = inp.type.tensor_type.shape.dim
        if len(dims) and not dims[0].HasField("dim_value"):
            dims[0].Clear()
            dims[0].dim_value = 1
        graph.input.append(inp)
    return model


def model_footprint(proto: onnx.ModelProto) -> Footprint:
    """Per-image MACs, activation bytes and key widths of ``proto`` from ONNX shape
    inference at batch 1 (tensors whose shape it cannot state are not counted)."""
    inferred = shape_inference.infer_shapes(_batch_one(proto), data_prop=True).graph
    shapes = {v.name: _dims(v) for v in (*inferred.input, *inferred.value_info,
                                         *inferred.output)}
    inits = {t.name: t for t in proto.graph.initializer}
    weight_bytes = sum(math.prod(t.dims) * 4 for t in proto.graph.initializer)
    inputs = [i for i in proto.graph.input if i.name not in inits]
    first = shapes.get(inputs[0].name) if inputs else None
    input_bytes = 4 * math.prod(first) if first else 0
    float_types = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                   onnx.TensorProto.BFLOAT16)
    elem_type = {v.name: v.type.tensor_type.elem_type
                 for v in (*inferred.value_info, *inferred.output)}
    macs = act = largest = 0
    layers: list[LayerKeys] = []
    for node, node_name in zip(proto.graph.node, node_names(proto.graph.node)):
        for out in node.output:
            dims = shapes.get(out)
            if dims and elem_type.get(out) in float_types:
                size = 4 * math.prod(dims)
                act += size
                largest = max(largest, size)
        out = shapes.get(node.output[0]) if node.output else None
        if node.op_type not in ("Conv", "Gemm", "MatMul") or not out:
            continue
        weight = next((inits[n] for n in node.input[1:2] if n in inits), None)
        if node.op_type == "MatMul" and weight is None and node.input[0] in inits:
            weight = inits[node.input[0]]
        if node.op_type == "Conv":
            w = shapes.get(node.input[1]) or (list(weight.dims) if weight is not None else None)
            if not w:
                continue
            key = math.prod(w[1:])
            macs += math.prod(out) * key
            if weight is not None:
                layers.append(LayerKeys(node_name, key, math.prod(out[2:]),
                                        math.prod(w[2:]), values=w[0]))
        else:
            a = shapes.get(node.input[0])
            if not a:
                continue
            trans_a = any(x.name == "transA" and x.i for x in node.attribute)
            k = a[0] if (node.op_type == "Gemm" and trans_a) else a[-1]
            macs += math.prod(out) * k
            if weight is not None:
                layers.append(LayerKeys(node_name, k, max(1, math.prod(out[1:-1])),
                                        dense=True, values=out[-1]))
    return Footprint(macs, act, largest, weight_bytes, input_bytes, layers)


_RATE: dict[str, float] = {}


def machine_rate(device: str = "cpu") -> float:
    """Multiply-accumulates per second of a float32 512 x 512 x 512 matmul on ``device``:
    on a CPU in one thread, timed in this process's CPU time (so that other processes on
    a shared machine do not change it), on a GPU in wall time. Measured once per device."""
    import torch

    key = str(device)
    if key in _RATE:
        return _RATE[key]
    dev = torch.device(key)
    cuda = dev.type == "cuda"
    threads = torch.get_num_threads()
    if not cuda:
        torch.set_num_threads(1)
    try:
        a = torch.randn(512, 512, device=dev)
        b = torch.randn(512, 512, device=dev)
        torch.matmul(a, b)
        clock = time.perf_counter if cuda else time.process_time
        runs, t0 = 0, clock()
        while runs < 4 or clock() - t0 < 0.05:
            torch.matmul(a, b)
            runs += 1
        if cuda:
            torch.cuda.synchronize(dev)
        _RATE[key] = runs * 512 ** 3 / max(clock() - t0, 1e-6)
    finally:
        torch.set_num_threads(threads)
    return _RATE[key]


@dataclass
class Estimate:
    """Seconds and peak bytes of one verb, with the parts they were summed from."""

    verb: str
    seconds: float
    peak_bytes: int
    forwards: float          # forward-equivalent images
    memory_parts: dict[str, int]
    clock: str = "CPU"       # what the seconds are: CPU time, or GPU wall time
    widest_key: str = ""     # the layer with the widest key, and its width
    #: ``patch``: the seconds when every round up to ``rounds`` runs (``seconds`` is a
    #: loop that stops after its first round); None for ``locate``
    seconds_bound: float | None = None
    rounds: int = 1

    def line(self) -> str:
        """The one-line form printed before the work."""
        largest = max(self.memory_parts, key=self.memory_parts.get)
        more = ""
        if self.seconds_bound is not None:
            more = (f" if one round removes the corruption (up to {self.seconds_bound:.0f} s "
                    f"if all {self.rounds} rounds run)" if self.rounds > 1 else
                    " (one round)")
        return (f"estimate: about {self.seconds:.0f} s {self.clock} ({self.forwards:.0f} image "
                f"forward-equivalents){more}, peak {self.peak_bytes / 2 ** 30:.2f} GB (largest "
                f"part: {largest}, {format_bytes(self.memory_parts[largest])})")


def _rounds(config: RectifyConfig) -> int:
    """The most rounds ``patch`` may run: ``--max-rounds`` for the dynamic loop, else one."""
    if config.strategy == "dynamic" and not config.layer:
        return max(config.max_rounds, 1)
    return 1


def estimate(fp: Footprint, verb: str, n_eval: int, n_calib: int, n_pairs: int,
             config: RectifyConfig, rate: float) -> Estimate:
    """Time and peak memory of ``verb`` (locate or patch) on a model of footprint ``fp``
    with ``n_eval`` eval images, ``n_calib`` calibration images (at most
    ``config.calib_limit``) and ``n_pairs`` pairs; ``rate`` from :func:`machine_rate`.
    Excluded layers (``config.exclude_layers``) and a forced ``--layer`` narrow the
    statistics to the layers that get them."""
    n_calib = min(n_calib, config.calib_limit)
    transplanted = 0 if config.transplant == "none" else min(
        n_calib, config.transplant_count + config.heldout_count)
    ig = 3 * config.steps * n_pairs
    forwards = n_calib * STATISTICS_FORWARDS + ig + transplanted
    bound = forwards
    if verb == "patch":
        fit_pairs = config.transplant_count if config.transplant != "none" else n_pairs
        # a round: the edited layer's exact statistics, the fit's forwards, a gap pass and
        # an accuracy pass; rounds after the first rank again (IG)
        per_round = EDIT_STATISTICS_FORWARDS * n_calib + 2 * fit_pairs + transplanted + n_eval
        verify = 2 * n_eval * ORT_FORWARD_SHARE
        rounds = _rounds(config)
        bound = forwards + rounds * per_round + (rounds - 1) * ig + verify
        forwards += per_round + verify
    work = fp.macs + BYTE_MACS * fp.activation_bytes
    seconds = STARTUP_SECONDS + forwards * work / (rate * EFFICIENCY)
    seconds_bound = STARTUP_SECONDS + bound * work / (rate * EFFICIENCY)
    excluded = set(getattr(config, "exclude_layers", ()) or ())
    layers = [l for l in fp.layers if l.name not in excluded
              and (config.layer is None or l.name == config.layer)]
    widest = max(layers, key=lambda l: l.key_dim * l.rows, default=None)
    parts = {
        "runtime": RUNTIME_BYTES,
        "weights (3 copies)": 3 * fp.weight_bytes,
        "images": fp.input_bytes * (max(n_eval, n_calib) + 2 * transplanted + 2 * n_pairs),
        "statistics kept for ranking": sum(l.statistics_bytes(config.statistics, n_calib)
                                           for l in layers),
    }
    if verb == "patch":
        parts["exact statistics of the edited layer"] = max(
            (l.edit_statistics_bytes() for l in layers), default=0)
    # torch: loaded by then in every verb
    from patcher.rectify.workspace import IG_BACKWARD_COPIES, ig_chunk

    points = config.steps + (config.attribution_form == "path")
    block = ig_chunk((fp.largest_activation, fp.activation_bytes), points, n_pairs)
    ig_images = min(points, max(1, block // max(n_pairs, 1))) * n_pairs
    batch = getattr(config, "batch", None) or min(
        EVAL_BATCH, max(1, BATCH_MEMORY // max(4 * fp.largest_activation, 1)))
    working = {
        "IG block": int(ig_images * fp.activation_bytes * IG_BACKWARD_COPIES),
        "accuracy batch": min(batch, max(n_eval, 1)) * fp.largest_activation * 2,
        "statistics batch": (min(batch, max(n_calib, 1)) * widest.rows * widest.key_dim * 4
                             if widest else 0),
    }
    if verb == "patch":
        fit_pairs = config.transplant_count if config.transplant != "none" else n_pairs
        working["rank-one fit"] = max((l.fit_bytes(max(fit_pairs, n_pairs)) for l in layers),
                                      default=0)
    name = max(working, key=working.get)
    parts[name] = working[name]
    widest_key = max(layers, key=lambda l: l.key_dim, default=None)
    return Estimate(verb, seconds, int(sum(parts.values())), forwards, parts,
                    widest_key=(f"{widest_key.name}, d = {widest_key.key_dim}"
                                if widest_key else ""),
                    seconds_bound=seconds_bound if verb == "patch" else None,
                    rounds=_rounds(config))


def check_memory(est: Estimate, limit: int | None) -> None:
    """Refuse (one line, exit 2) when the estimated peak exceeds ``limit`` bytes."""
    if limit is None or est.peak_bytes <= limit:
        return
    largest = max(est.memory_parts, key=est.memory_parts.get)
    raise RectifyError(
        f"{est.verb} would need about {est.peak_bytes / 2 ** 30:.2f} GB at its peak "
        f"(largest part: {largest}, {format_bytes(est.memory_parts[largest])}), more than "
        f"--max-memory {limit / 2 ** 30:.2f} GB; fewer eval/calibration images, "
        f"--exclude-layer for a wide layer (widest key: {est.widest_key or '-'}) or --layer "
        f"may fit")


def preflight(proto: onnx.ModelProto, verb: str, n_eval: int, n_calib: int, n_pairs: int,
              config: RectifyConfig, device: str = "cpu") -> Estimate | None:
    """The estimate of ``verb``, printed as a status line (not under ``--quiet``) before
    the work, or the refusal when it exceeds ``config.max_memory``. None (with a status
    line) when shape inference cannot size the model: then nothing is refused."""
    try:
        fp = model_footprint(proto)
    except Exception as exc:  # onnx's shape inference raises its own types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        status(f"estimate: not available (shape inference: {first})")
        return None
    est = estimate(fp, verb, n_eval, n_calib, n_pairs, config, machine_rate(device))
    est.clock = "GPU" if str(device).startswith("cuda") else "CPU"
    check_memory(est, config.max_memory)
    status(est.line())
    return est
