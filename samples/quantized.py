"""Shipped-precision variants of a sample's model: int8 by onnxruntime's own quantizer and
float16 with float32 input and output.

    python samples/quantized.py backdoor_cnn [--fp16]

Writes, beside the sample's model.onnx:

* ``model_int8_qdq.onnx``: ``quantize_static`` QDQ, per-channel int8 weights (int8
  activations, MinMax calibration);
* ``model_int8_qoperator.onnx``: the same in QOperator form (QLinearConv, com.microsoft QGemm,
  QLinearAdd, QLinearGlobalAveragePool);
* ``model_int8_dynamic.onnx``: ``quantize_dynamic`` (int8 weights, per-tensor for ConvInteger
  and per-column for MatMulInteger with ``per_channel=True``; uint8 activations quantized at
  run time by DynamicQuantizeLinear; no calibration);
* with ``--fp16``, ``model_fp16.onnx``: every float initializer in float16, a Cast after the
  input and before the output (onnxconverter-common's ``keep_io_types=True`` form);

and ``figures_quantized.json``: clean accuracy (test.npz) and attack success rate
(attack.npz) of each file under onnxruntime at its default optimisation level (the fused int8
kernels a deployment runs). The calibration images are the first 100 of eval.npz (disjoint
from test.npz and attack.npz). The build scripts call :func:`write_variants` after exporting
model.onnx.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

#: Variant file names by format.
VARIANTS = {"qdq": "model_int8_qdq.onnx", "qoperator": "model_int8_qoperator.onnx",
            "dynamic": "model_int8_dynamic.onnx", "fp16": "model_fp16.onnx"}
CALIBRATION_IMAGES = 100


def quantize_int8(source: Path, out: Path, calibration: np.ndarray, fmt: str) -> Path:
    """``source`` quantized by onnxruntime (static, per-channel int8) in ``fmt`` ("qdq" or
    "qoperator"), calibrated one image at a time on ``calibration``."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    name = onnx.load(str(source)).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{name: calibration[i:i + 1]} for i in range(len(calibration))])

        def get_next(self):
            return next(self.batches, None)

    form = QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator
    with tempfile.TemporaryDirectory() as tmp:  # the quantizer writes helper files
        staged = Path(tmp) / "model.onnx"
        quantize_static(str(source), str(staged), Reader(), quant_format=form,
                        per_channel=True)
        model = onnx.load(str(staged))
    onnx.save(model, str(out))
    return out


def quantize_dynamic_int8(source: Path, out: Path) -> Path:
    """``source`` quantized by onnxruntime's ``quantize_dynamic`` (int8 weights of every Conv,
    MatMul and Gemm, per channel where the quantizer supports it)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "model.onnx"
        quantize_dynamic(str(source), str(staged), per_channel=True,
                         weight_type=QuantType.QInt8)
        model = onnx.load(str(staged))
    onnx.save(model, str(out))
    return out


def keep_io_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with float16 weights and computation and float32 input and output:
    each float32 initializer becomes float16, a Cast to float16 follows the input and a Cast
    to float32 precedes the output."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    for i, t in enumerate(g.initializer):
        if t.data_type == TensorProto.FLOAT:
            half = numpy_helper.to_array(t).astype(np.float16)
            g.initializer[i].CopyFrom(numpy_helper.from_array(half, t.name))
    inp, out = g.input[0].name, g.output[0].name
    for n in g.node:
        n.input[:] = [f"{inp}_fp16" if x == inp else x for x in n.input]
        n.output[:] = [f"{out}_fp16" if x == out else x for x in n.output]
    nodes = ([helper.make_node("Cast", [inp], [f"{inp}_fp16"], name="cast_in",
                               to=TensorProto.FLOAT16)] + list(g.node)
             + [helper.make_node("Cast", [f"{out}_fp16"], [out], name="cast_out",
                                 to=TensorProto.FLOAT)])
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    return m


def measure(model: Path, folder: Path) -> dict[str, float]:
    """Clean accuracy on test.npz and attack success rate on attack.npz, under onnxruntime
    (default optimisation level)."""
    from patcher.gate import metrics

    test, attack = np.load(folder / "test.npz"), np.load(folder / "attack.npz")
    return {"clean_accuracy": metrics.accuracy(model, test["x"], test["y"], provider="cpu"),
            "attack_success_rate": metrics.attack_success_rate(
                model, attack["x"], attack["y"], int(attack["target"]), provider="cpu")}


def write_variants(folder: Path, fp16: bool = False) -> dict:
    """Write the int8 (and with ``fp16`` the float16) variants of ``folder``/model.onnx and
    figures_quantized.json; return the figures."""
    import onnxruntime

    folder = Path(folder)
    source = folder / "model.onnx"
    calibration = np.load(folder / "eval.npz")["x"][:CALIBRATION_IMAGES]
    figures = {"float32": {"file": "model.onnx", **measure(source, folder)}}
    for fmt in ("qdq", "qoperator"):
        path = quantize_int8(source, folder / VARIANTS[fmt], calibration, fmt)
        figures[fmt] = {"file": path.name, "bytes": path.stat().st_size, **measure(path, folder)}
    path = quantize_dynamic_int8(source, folder / VARIANTS["dynamic"])
    figures["dynamic"] = {"file": path.name, "bytes": path.stat().st_size,
                          **measure(path, folder)}
    if fp16:
        path = folder / VARIANTS["fp16"]
        onnx.save(keep_io_fp16(onnx.load(str(source))), str(path))
        figures["fp16"] = {"file": path.name, "bytes": path.stat().st_size,
                           **measure(path, folder)}
    figures["calibration"] = f"eval.npz x[:{CALIBRATION_IMAGES}], MinMax, per-channel int8"
    figures["onnxruntime"] = onnxruntime.__version__
    (folder / "figures_quantized.json").write_text(json.dumps(figures, indent=2,
                                                              sort_keys=True) + "\n")
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a sample's int8 and fp16 variants.")
    parser.add_argument("sample", help="sample folder name under samples/ or a path")
    parser.add_argument("--fp16", action="store_true", help="also write model_fp16.onnx")
    args = parser.parse_args(argv)
    folder = Path(args.sample)
    if not folder.is_dir():
        folder = Path(__file__).resolve().parent / args.sample
    print(json.dumps(write_variants(folder, args.fp16)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
