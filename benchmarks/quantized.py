"""Patching shipped precisions: int8 in place vs fp32 vs "patch fp32, then quantize again".

    python benchmarks/quantized.py [--samples backdoor_cnn,backdoor_resnet] [--pairs 1]
                                   [--forms qdq,qoperator,dynamic] [--no-fp16]
                                   [--json FILE [--merge]] [--markdown FILE]
    python benchmarks/quantized.py --generalisation mnist-mlp-whitepatch,... [--cache DIR]
                                   [--forms qdq,qoperator] [--json FILE --merge]

For each sample (samples/<name>/model_int8_qdq.onnx, model_int8_qoperator.onnx,
model_int8_dynamic.onnx and, where it exists, model_fp16.onnx, written by samples/quantized.py) every row runs the command a user
runs, ``onnx-rectify patch MODEL --pairs pairs_n<N>.npz --eval eval.npz -o OUT`` with the
CLI's defaults, as a subprocess, and measures the written file under onnxruntime (CPU,
default optimisation level, i.e. the fused int8 kernels): OA on test.npz, ASR on attack.npz.
Rows:

* ``int8 <form>``: the int8 file patched in place (its float analysis copy edited, the edit
  written back in int8); also checks that the written file has the same nodes and the same
  tensor names, dtypes and shapes as the input;
* ``fp32``: model.onnx patched;
* ``fp32 -> int8 <form>``: the patched model.onnx quantized again by onnxruntime with the
  sample's calibration (what a user does today; ``dynamic``: quantize_dynamic, no
  calibration);
* ``fp16 keep-io``: model_fp16.onnx patched (float16 weights, float32 input/output).

``--generalisation CASES`` (comma-separated names from benchmarks/generalisation.py, or
``all``) does the same for that benchmark's unseen trojaned models instead of the samples:
each case is built by ``generalisation.build_case`` (seeded, full epochs, one torch thread)
into ``--cache``/<case> unless model.onnx and its npz files are already there, quantized
with the samples' quantizer and calibration (``quantize_int8``, eval.npz x[:100], cached
beside it as model_int8_<form>.onnx), and only the ``int8 <form>`` rows are run (sample
column: the case's name), with ``--fp32`` also the ``fp32`` row (the case's model.onnx
patched the same way, for comparison), with ``--twin`` a ``clean twin`` row (the case trained
without poisoned images, quantized per ``--forms``, not patched: the share of triggered images
a model that never learned the backdoor sends to the target).

A dynamically quantized model's activation scales come from each batch it is given (its
DynamicQuantizeLinear takes the batch's min and max), so its rows also give OA/ASR with one
image per run (``batch1``: what a deployment that classifies one image at a time sees);
the main figures use metrics' batches of 256 like every other row.

Each row records the exit status, wall and CPU seconds of the patch process (CPU: user +
system of the child), and OA/ASR before and after. Targets (issue 18): int8, n = 1: ASR <= 2%
at OA within 0.5 points of the int8 model; fp16: exit 0.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnx_rectify_samples import quantized  # noqa: E402

MAX_ASR, MAX_DROP = 0.02, 0.005


def _signature(path: Path) -> tuple:
    """Nodes (op, domain, inputs, outputs, attributes) and tensors (name, dtype, shape)."""
    m = onnx.load(str(path))
    nodes = [(n.op_type, n.domain, tuple(n.input), tuple(n.output),
              tuple(str(a) for a in n.attribute)) for n in m.graph.node]
    tensors = sorted((t.name, t.data_type, tuple(t.dims)) for t in m.graph.initializer)
    return nodes, tensors


def _run_patch(model: Path, folder: Path, n: int, out: Path) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "patcher", "patch", str(model), "--pairs",
                           str(folder / f"pairs_n{n}.npz"), "--eval", str(folder / "eval.npz"),
                           "-o", str(out), "--device", "cpu", "--provider", "cpu"],
                          capture_output=True, text=True, env={**os.environ,
                                                               "PYTHONWARNINGS": "ignore"})
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    tail = [l for l in proc.stdout.splitlines() + proc.stderr.splitlines() if l.strip()][-3:]
    return {"exit": proc.returncode, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
            "tail": tail}


def _figures(path: Path, folder: Path) -> dict:
    return quantized.measure(path, folder)


def _figures_batch1(path: Path, folder: Path) -> dict:
    """OA on test.npz and ASR on attack.npz (images already of the target class left out, as
    metrics.attack_success_rate does), one image per onnxruntime run (default optimisation)."""
    from patcher.model.runtime import open_session

    session = open_session(str(path), "cpu")
    test, attack = np.load(folder / "test.npz"), np.load(folder / "attack.npz")
    predict = lambda x: np.array([int(session.run(x[i:i + 1])[0].argmax())  # noqa: E731
                                  for i in range(len(x))])
    keep = attack["y"] != int(attack["target"])
    return {"clean_accuracy": float(np.mean(predict(test["x"]) == test["y"])),
            "attack_success_rate": float(np.mean(predict(attack["x"][keep])
                                                 == int(attack["target"])))}


def _requantize(patched: Path, out: Path, calibration: np.ndarray, form: str) -> Path:
    """The patched fp32 model quantized again as the sample's ``form`` file was."""
    if form == "dynamic":
        return quantized.quantize_dynamic_int8(patched, out)
    return quantized.quantize_int8(patched, out, calibration, form)


def _int8_row(name: str, source: Path, folder: Path, n: int, out: Path, form: str) -> dict:
    """Patch the int8 file ``source`` in place with the CLI and measure it (the ``int8 <form>``
    row)."""
    run = _run_patch(source, folder, n, out)
    row = {"sample": name, "row": f"int8 {form}", **run, "base": _figures(source, folder),
           "patched": _figures(out, folder) if out.exists() else None}
    if out.exists():
        row["same_nodes_and_dtypes"] = _signature(source) == _signature(out)
        row["int8_tensors_changed"] = _changed_int_tensors(source, out)
        row["writeback"] = _writeback_summary(out)
    if form == "dynamic":
        row["batch1"] = {"base": _figures_batch1(source, folder),
                         "patched": _figures_batch1(out, folder) if out.exists() else None}
    return row


def _judge(rows: list[dict]) -> list[dict]:
    for row in rows:
        p, b = row.get("patched"), row["base"]
        if p is not None:
            row["oa_drop"] = b["clean_accuracy"] - p["clean_accuracy"]
            row["meets_target"] = (p["attack_success_rate"] <= MAX_ASR
                                   and row["oa_drop"] <= MAX_DROP)
    return rows


def _case_ready(folder: Path) -> bool:
    names = ("model.onnx", "eval.npz", "test.npz", "attack.npz", "pairs_n1.npz", "pairs_n5.npz")
    return all((folder / f).exists() for f in names)


def bench_generalisation(case_name: str, n: int, work: Path, cache: Path,
                         forms=("qdq", "qoperator"), fp32_row: bool = False,
                         twin: bool = False) -> list[dict]:
    """The ``int8 <form>`` rows for one unseen trojaned model of benchmarks/generalisation.py,
    built (or reused) under ``cache``/<case> and quantized there."""
    import torch

    import generalisation

    case = next(c for c in generalisation.CASES if c.name == case_name)
    folder = cache / case_name
    build = None
    if not _case_ready(folder):
        folder.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(1)
        build = generalisation.build_case(case, folder, quick=False)
    calibration = np.load(folder / "eval.npz")["x"][:quantized.CALIBRATION_IMAGES]
    fp32 = _figures(folder / "model.onnx", folder)
    print(f"== {case_name}: fp32 OA {fp32['clean_accuracy']:.2%} "
          f"ASR {fp32['attack_success_rate']:.2%}", flush=True)
    rows = []
    if fp32_row:
        out = work / f"{case_name}_fp32_patched.onnx"
        rows.append({"sample": case_name, "row": "fp32", **_run_patch(folder / "model.onnx",
                                                                        folder, n, out),
                     "base": fp32, "patched": _figures(out, folder) if out.exists() else None})
    for form in forms:
        source = folder / quantized.VARIANTS[form]
        if not source.exists():
            _requantize(folder / "model.onnx", source, calibration, form)
        row = _int8_row(case_name, source, folder, n, work / f"{case_name}_{form}_patched.onnx",
                        form)
        row["fp32_base"] = fp32
        row["build_seconds"] = build["build_seconds"] if build else None
        row["trojaned"] = (row["base"]["clean_accuracy"] >= generalisation.MIN_OA
                           and row["base"]["attack_success_rate"] >= generalisation.MIN_ASR)
        rows.append(row)
    if twin:
        rows.append(_twin_row(case, folder, calibration, forms or ("qdq", "qoperator")))
    return _judge(rows)


def _twin_row(case, folder: Path, calibration: np.ndarray, forms) -> dict:
    """The case's clean twin (same architecture, data, seed and epochs, no poisoned image),
    built (or reused) in ``folder``/clean_twin and quantized like the case: OA on test.npz and
    the share of the case's triggered images it sends to the target, fp32 and per form."""
    import dataclasses

    import torch

    import generalisation

    out = folder / "clean_twin"
    if not (out / "model.onnx").exists():
        out.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(1)
        generalisation.build_case(dataclasses.replace(case, poison_rate=0.0), out, quick=False)
    figures = {"fp32": _figures(out / "model.onnx", folder)}
    for form in forms:
        path = out / quantized.VARIANTS[form]
        if not path.exists():
            _requantize(out / "model.onnx", path, calibration, form)
        figures[form] = _figures(path, folder)
    return {"sample": case.name, "row": "clean twin", "base": figures["fp32"],
            "twin": figures}


def bench_sample(name: str, n: int, work: Path, forms=("qdq", "qoperator"),
                 fp16_row: bool = True) -> list[dict]:
    folder = ROOT / "samples" / name
    calibration = np.load(folder / "eval.npz")["x"][:quantized.CALIBRATION_IMAGES]
    rows = []
    fp32_out = work / f"{name}_fp32_patched.onnx"
    fp32 = _run_patch(folder / "model.onnx", folder, n, fp32_out)
    base = _figures(folder / "model.onnx", folder)
    rows.append({"sample": name, "row": "fp32", **fp32, "base": base,
                 "patched": _figures(fp32_out, folder) if fp32_out.exists() else None})
    for form in forms:
        source = folder / quantized.VARIANTS[form]
        row = _int8_row(name, source, folder, n, work / f"{name}_{form}_patched.onnx", form)
        rows.append(row)
        if fp32_out.exists():
            requant = _requantize(fp32_out, work / f"{name}_fp32_{form}.onnx", calibration,
                                  form)
            rows.append({"sample": name, "row": f"fp32 -> int8 {form}",
                         "base": row["base"], "patched": _figures(requant, folder)})
            if form == "dynamic":
                rows[-1]["batch1"] = {"base": row["batch1"]["base"],
                                      "patched": _figures_batch1(requant, folder)}
    fp16 = folder / quantized.VARIANTS["fp16"]
    if fp16_row and fp16.exists():
        out = work / f"{name}_fp16_patched.onnx"
        run = _run_patch(fp16, folder, n, out)
        rows.append({"sample": name, "row": "fp16 keep-io", **run, "base": _figures(fp16, folder),
                     "patched": _figures(out, folder) if out.exists() else None})
    return _judge(rows)


def _writeback_summary(path: Path) -> list[dict]:
    """The written file's int8 write-back records (provenance), per weight: values changed,
    channels given a new scale, the scale option, relative error of the written delta and
    the share of its energy in the first singular value."""
    from patcher.model.writeback import read_provenance

    edits = (read_provenance(onnx.load(str(path))) or {}).get("edits", [])
    keys = ("layer", "weight", "steps_changed", "max_steps", "option", "clamped",
            "relative_error", "first_singular_value_share")
    return [{k: e.get(k) for k in keys} | {"rescaled": len(e.get("rescaled_channels", []))}
            for e in edits if e.get("kind") == "quantized-writeback" and e.get("role") == "weight"]


def _changed_int_tensors(a: Path, b: Path) -> dict[str, int]:
    ta = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(a)).graph.initializer}
    tb = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(b)).graph.initializer}
    return {k: int(np.count_nonzero(ta[k] != tb[k])) for k in ta
            if ta[k].dtype.kind in "iu" and not np.array_equal(ta[k], tb[k])}


def _yes_no(flag: bool | None) -> str:
    return "-" if flag is None else ("yes" if flag else "no")


def markdown(rows: list[dict], n: int) -> str:
    lines = ["| sample | row | exit | OA before | OA after | ASR before | ASR after | "
             "target met | same nodes/dtypes | wall s | CPU s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}"  # noqa: E731
    for r in rows:
        p, b = r.get("patched") or {}, r["base"]
        lines.append(f"| {r['sample']} | {r['row']} | {r.get('exit', '-')} | "
                     f"{pct(b['clean_accuracy'])} | {pct(p.get('clean_accuracy'))} | "
                     f"{pct(b['attack_success_rate'])} | {pct(p.get('attack_success_rate'))} | "
                     f"{_yes_no(r.get('meets_target'))} | "
                     f"{_yes_no(r.get('same_nodes_and_dtypes'))} | {r.get('wall_s', '-')} | "
                     f"{r.get('cpu_s', '-')} |")
    one = [f"{r['sample']} {r['row']}: OA {pct(r['batch1']['base']['clean_accuracy'])} -> "
           f"{pct((r['batch1']['patched'] or {}).get('clean_accuracy'))}, ASR "
           f"{pct(r['batch1']['base']['attack_success_rate'])} -> "
           f"{pct((r['batch1']['patched'] or {}).get('attack_success_rate'))}"
           for r in rows if r.get("batch1")]
    batch1 = ("\nOne image per run (dynamic rows): " + "; ".join(one) + ".\n") if one else ""
    return "\n".join(lines) + f"\n\n(n = {n} pair; OA on test.npz, ASR on attack.npz, " \
        "onnxruntime CPU at its default optimisation level.)\n" + batch1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", default="backdoor_cnn,backdoor_resnet")
    parser.add_argument("--pairs", type=int, default=1, choices=(1, 5, 20))
    parser.add_argument("--forms", default="qdq,qoperator")
    parser.add_argument("--no-fp16", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--merge", action="store_true",
                        help="replace the rows of the same sample and row in --json, keep the rest")
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--generalisation", metavar="CASES",
                        help="benchmarks/generalisation.py case names (comma-separated, or "
                             "'all') instead of --samples: int8 rows only")
    parser.add_argument("--cache", type=Path,
                        default=Path(tempfile.gettempdir()) / "onnx-rectify-quantized-cases",
                        help="where --generalisation builds (or finds) each case's folder")
    parser.add_argument("--fp32", action="store_true",
                        help="with --generalisation: also the fp32 row (model.onnx patched)")
    parser.add_argument("--twin", action="store_true",
                        help="with --generalisation: also the clean twin's figures, fp32 and "
                             "quantized per --forms (not patched)")
    args = parser.parse_args(argv)
    rows = []
    cases: list[str] = []
    if args.generalisation:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import generalisation

        known = [c.name for c in generalisation.CASES]
        cases = known if args.generalisation == "all" else args.generalisation.split(",")
        unknown = sorted(set(cases) - set(known))
        if unknown:
            parser.error(f"unknown cases: {', '.join(unknown)}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in cases:
            rows += bench_generalisation(name, args.pairs, Path(tmp), args.cache,
                                         tuple(f for f in args.forms.split(",") if f), args.fp32,
                                         args.twin)
            print(markdown(rows, args.pairs), flush=True)
        for name in ([] if cases else args.samples.split(",")):
            rows += bench_sample(name, args.pairs, Path(tmp), tuple(args.forms.split(",")),
                                 not args.no_fp16)
            print(markdown(rows, args.pairs), flush=True)
    if args.json and args.merge and args.json.exists():
        fresh = {(r["sample"], r["row"]) for r in rows}
        old = json.loads(args.json.read_text())
        rows = [r for r in old if (r["sample"], r["row"]) not in fresh] + rows
        order = {name: i for i, name in enumerate(cases or args.samples.split(","))}
        rank = ["fp32", "int8 qdq", "fp32 -> int8 qdq", "int8 qoperator",
                "fp32 -> int8 qoperator", "int8 dynamic", "fp32 -> int8 dynamic",
                "fp16 keep-io", "clean twin"]
        rows.sort(key=lambda r: (order.get(r["sample"], -1), r["sample"], rank.index(r["row"])))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(markdown(rows, args.pairs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
