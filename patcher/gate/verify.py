"""The release gate (``verify``) and ``diff``: what changed between two ONNX files, and
whether a patched model is safe to ship.

A patch may change only weight values of editable layers (Conv, Gemm's B, MatMul's
constant operand), each change declared in the provenance the patch wrote; any
other difference (nodes, attributes, inputs/outputs, opsets, initializer names,
dtypes or shapes, metadata) is structural and fails the gate.
"""
from __future__ import annotations

import socket
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import numpy as np
import onnx
from onnx import ModelProto, numpy_helper

from patcher.errors import BadModelError
from patcher.gate.defaults import MAX_ACCURACY_DROP, MAX_ASR, MAX_GAP
from patcher.gate.metrics import pair_gap, predict
from patcher.graph.quantized_layers import dynamic_weight_scales
from patcher.model.modelio import LoadedModel
from patcher.model.tensors import named_tensors
from patcher.model.runtime import open_session
from patcher.samples import (LabelledSet, Pairs, check_scores, classifier_contract,
                             load_labelled, load_pairs)
from patcher.model.writeback import PROVENANCE_KEY, read_provenance
from patcher.version import __version__

EDITABLE_WEIGHT_INPUTS = {"Conv": (1,), "Gemm": (1,), "MatMul": (0, 1)}
#: Inputs of a quantized layer a write-back in the stored precision may change (weight, its
#: scale, the int32 bias), and of a DequantizeLinear whose output is an editable weight or a
#: Conv/Gemm bias (QDQ: the int8 weight or int32 bias, and its scale). A dynamic layer's
#: weight scale is read by a Mul: graph/quantized_layers.dynamic_weight_scales finds it.
QUANTIZED_WEIGHT_INPUTS = {"QLinearConv": (3, 4, 8), "QLinearMatMul": (3, 4), "QGemm": (3, 4, 6),
                           "ConvInteger": (1,), "MatMulInteger": (1,)}
DEQUANTIZED_INPUTS = {"Conv": (1, 2), "Gemm": (1, 2), "MatMul": (0, 1)}


@dataclass
class TensorDiff:
    """A tensor whose values differ: shape, ||delta||_F, max |delta|, numerical rank, consumers."""

    name: str
    shape: list[int]
    frobenius: float
    max_abs: float
    rank: int
    feeds: list[str]
    editable: bool
    #: "steps" for an integer (quantized) tensor, whose delta is in quantization steps
    unit: str = "value"
    #: elements that changed
    changed: int = 0


@dataclass
class ModelDiff:
    tensors: list[TensorDiff] = field(default_factory=list)
    structural: list[str] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return not self.tensors and not self.structural


def numerical_rank(delta: np.ndarray, rel_tol: float = 1e-5, floor: float = 0.0) -> int:
    """Singular values above rel_tol x the largest (float32 storage rounding stays below) and
    above ``floor`` (see :func:`rounding_floor`)."""
    if delta.size == 0 or not np.any(delta):
        return 0
    mat = delta.reshape(delta.shape[0], -1).astype(np.float64) if delta.ndim > 1 else \
        delta.reshape(1, -1).astype(np.float64)
    sv = np.linalg.svd(mat, compute_uv=False)
    return int((sv > max(rel_tol * sv[0], floor)).sum())


def rounding_floor(stored: np.ndarray) -> float:
    """An upper bound on the spectral norm of the error of storing a tensor in its (float)
    dtype: ||E||_2 <= ||E||_F <= ||ulp(stored) / 2||_F. Rounding an edited float16/bfloat16
    weight to its dtype adds such a full-rank E to a rank-one delta; singular values below
    this bound are not evidence of rank. 0 for integer tensors (counted in steps)."""
    if stored.dtype.kind != "f":
        return 0.0
    return float(np.linalg.norm(np.spacing(np.abs(stored)).astype(np.float64))) / 2


def _node_signature(node: onnx.NodeProto) -> str:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    if copy.op_type == "Constant":  # its value is compared as a tensor
        for a in copy.attribute:
            if a.name == "value":
                a.t.ClearField("raw_data")
                for f in ("float_data", "int32_data", "int64_data", "double_data"):
                    a.t.ClearField(f)
    return str(copy)


def diff_models(a: ModelProto, b: ModelProto) -> ModelDiff:
    """Every tensor whose values differ and every structural difference, A -> B."""
    result = ModelDiff()
    s = result.structural
    if a.ir_version != b.ir_version:
        s.append(f"IR version {a.ir_version} -> {b.ir_version}")
    if sorted((o.domain, o.version) for o in a.opset_import) != \
            sorted((o.domain, o.version) for o in b.opset_import):
        s.append("opset imports differ")
    for kind, xs, ys in (("graph input", a.graph.input, b.graph.input),
                         ("graph output", a.graph.output, b.graph.output)):
        if [str(x) for x in xs] != [str(y) for y in ys]:
            s.append(f"{kind}s differ: {[x.name for x in xs]} -> {[y.name for y in ys]}")
    if len(a.graph.node) != len(b.graph.node):
        s.append(f"node count {len(a.graph.node)} -> {len(b.graph.node)}")
    for i, (na, nb) in enumerate(zip(a.graph.node, b.graph.node)):
        if _node_signature(na) != _node_signature(nb):
            s.append(f"node {i} ('{na.name or na.op_type}') differs (op, inputs, outputs or "
                     "attributes)")
    meta_a = {p.key: p.value for p in a.metadata_props if p.key != PROVENANCE_KEY}
    meta_b = {p.key: p.value for p in b.metadata_props if p.key != PROVENANCE_KEY}
    if meta_a != meta_b:
        changed = sorted(set(meta_a) ^ set(meta_b) | {k for k in meta_a if meta_b.get(k) != meta_a[k]})
        s.append(f"metadata differs: {', '.join(changed)}")
    ta, tb = named_tensors(a.graph), named_tensors(b.graph)
    if set(ta) != set(tb):
        s.append(f"tensor names differ: removed {sorted(set(ta) - set(tb))[:5]}, added "
                 f"{sorted(set(tb) - set(ta))[:5]}")
    consumers: dict[str, list[tuple[str, str, int]]] = {}
    for i, node in enumerate(b.graph.node):  # names as the shadow graph gives them
        for k, inp in enumerate(node.input):
            consumers.setdefault(inp, []).append((node.name or f"{node.op_type}_{i}",
                                                  node.op_type, k))
    quantized_slot = _quantized_slots(b.graph, consumers)
    for name in sorted(set(ta) & set(tb)):
        x, y = ta[name], tb[name]
        if x.data_type != y.data_type or list(x.dims) != list(y.dims):
            s.append(f"tensor '{name}' changed dtype or shape")
            continue
        va, vb = numpy_helper.to_array(x), numpy_helper.to_array(y)
        if va.tobytes() == vb.tobytes():
            continue
        quantized = quantized_slot.get(name)
        if va.dtype.kind not in "f" and quantized is None:
            s.append(f"non-float tensor '{name}' changed")
            continue
        delta = vb.astype(np.float64) - va.astype(np.float64)
        uses = consumers.get(name, [])
        editable = bool(uses) and all(k in EDITABLE_WEIGHT_INPUTS.get(op, ()) for _, op, k in uses)
        feeds = [n for n, _, _ in uses]
        if quantized is not None:  # a weight stored quantized, its scale, its int32 bias
            editable, feeds = True, feeds + [f for f in quantized if f not in feeds]
        result.tensors.append(TensorDiff(name, list(va.shape), float(np.linalg.norm(delta)),
                                         float(np.abs(delta).max()),
                                         numerical_rank(delta, floor=rounding_floor(vb)),
                                         feeds, editable,
                                         "steps" if va.dtype.kind in "iu" else "value",
                                         int(np.count_nonzero(delta))))
    return result


def _quantized_slots(graph, consumers: dict) -> dict[str, list[str]]:
    """Tensors that store a layer's weight quantized (or its scale or int32 bias), each with
    the layers it feeds: inputs of QLinearConv/QLinearMatMul/QGemm in those slots, and the
    value or scale of a DequantizeLinear whose output is only an editable weight or bias."""
    slots: dict[str, list[str]] = {}
    for i, node in enumerate(graph.node):
        name = node.name or f"{node.op_type}_{i}"
        for k, inp in enumerate(node.input):
            if inp and k in QUANTIZED_WEIGHT_INPUTS.get(node.op_type, ()):
                slots.setdefault(inp, []).append(name)
        if node.op_type == "DequantizeLinear" and len(node.input) > 1:
            uses = consumers.get(node.output[0], [])
            if uses and all(k in DEQUANTIZED_INPUTS.get(op, ()) for _, op, k in uses):
                for inp in node.input[:2]:
                    slots.setdefault(inp, []).extend(n for n, _, _ in uses)
    for scale, layer in dynamic_weight_scales(graph).items():
        slots.setdefault(scale, []).append(layer)
    return slots


@dataclass
class Check:
    """One gate: its verdict, the figures behind it, and a message saying what failed."""

    name: str
    passed: bool
    figures: dict = field(default_factory=dict)
    message: str = ""
    #: wall seconds the check took
    seconds: float = 0.0


def format_value(value) -> str:
    """A figure as text a person reads (no Python reprs): numbers to 6 significant digits,
    lists comma-separated ("none" when empty), dicts as ``key value`` pairs, None as "-"."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.6g}"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if value is None:
        return "-"
    if isinstance(value, dict):
        return "; ".join(f"{k} {format_value(v)}" for k, v in value.items()) or "none"
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(v) for v in value) or "none"
    return str(value)


def format_figures(figures: dict) -> str:
    """One ``name: value`` line per figure (nested dicts one line per key), readable text."""
    lines = []
    for key, value in figures.items():
        if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            lines.append(f"{key}:")
            lines += [f"  {k}: {format_value(v)}" for k, v in value.items()]
        else:
            lines.append(f"{key}: {format_value(value)}")
    return "\n".join(lines)


#: The JUnit suite's name and the test cases' class name.
#: verify's latency check, without --latency-runs: as many interleaved runs as fit in
#: about this many seconds (from one timed forward), at least LATENCY_RUNS_MIN and at most
#: LATENCY_RUNS_MAX.
LATENCY_SECONDS = 10.0
LATENCY_RUNS_MIN, LATENCY_RUNS_MAX = 5, 50
#: Without --batch: images per onnxruntime call such that the model's activations (every
#: float tensor of a forward, from shape inference) stay under this many bytes.
BATCH_BYTES = 1 << 30
BATCH_MAX = 256


def default_batch(proto: ModelProto) -> int:
    """Images per onnxruntime call: BATCH_BYTES over the activation bytes of one image
    (1 to BATCH_MAX; 32 when shape inference cannot size the model)."""
    from patcher.rectify.budget import model_footprint

    try:
        per_image = model_footprint(proto).activation_bytes
    except Exception:  # onnx's shape inference raises its own types
        return 32
    return int(min(BATCH_MAX, max(1, BATCH_BYTES // max(per_image, 1))))


def default_latency_runs(seconds_per_pair: float) -> int:
    """Runs of the latency check: LATENCY_SECONDS over one base+patched pair of forwards,
    within LATENCY_RUNS_MIN..LATENCY_RUNS_MAX."""
    fit = int(LATENCY_SECONDS / max(seconds_per_pair, 1e-9))
    return max(LATENCY_RUNS_MIN, min(LATENCY_RUNS_MAX, fit))


JUNIT_SUITE = "onnx-rectify verify"
JUNIT_CLASSNAME = "onnx_rectify.verify"


@dataclass
class VerifyReport:
    """The gate's verdict: every check run, the gates not run (name -> why), the thresholds,
    when it started (UTC) and how long it took."""

    checks: list[Check]
    provider: str | None
    skipped: dict[str, str] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    started: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        """True when every check that ran passed."""
        return all(c.passed for c in self.checks)

    def as_dict(self) -> dict:
        """Every figure, JSON-ready, with a top-level ``passed``."""
        return {"passed": self.passed, "provider": self.provider,
                "started": self.started.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "seconds": self.seconds, "thresholds": dict(self.thresholds),
                "checks": [asdict(c) for c in self.checks],
                "skipped": [{"name": k, "reason": v} for k, v in self.skipped.items()]}

    def junit(self) -> str:
        """The checks as JUnit XML with an XML declaration: ``testsuites`` holding one
        ``testsuite`` (name, tests, failures, errors, skipped, time, timestamp (UTC), hostname),
        one ``testcase`` per check (name, classname, time; a ``failure`` when it failed;
        its figures in ``system-out``) and one ``skipped`` test case per gate not run. It
        validates against the JUnit schema in tests/schemas/junit-10.xsd."""
        failures = sum(not c.passed for c in self.checks)
        tests = len(self.checks) + len(self.skipped)
        counts = {"tests": str(tests), "failures": str(failures), "errors": "0"}
        root = ET.Element("testsuites", name=JUNIT_SUITE, **counts, time=f"{self.seconds:.3f}")
        suite = ET.SubElement(root, "testsuite", name=JUNIT_SUITE, **counts,
                              skipped=str(len(self.skipped)), time=f"{self.seconds:.3f}",
                              timestamp=self.started.strftime("%Y-%m-%dT%H:%M:%S"),
                              hostname=socket.gethostname() or "localhost", id="0",
                              package=JUNIT_CLASSNAME)
        properties = ET.SubElement(suite, "properties")
        for name, value in (("tool", "onnx-rectify"), ("version", __version__),
                            ("provider", self.provider),
                            *((k, v) for k, v in self.thresholds.items())):
            ET.SubElement(properties, "property", name=name, value=format_value(value))
        for c in self.checks:
            case = ET.SubElement(suite, "testcase", name=c.name, classname=JUNIT_CLASSNAME,
                                 time=f"{c.seconds:.3f}")
            text = format_figures(c.figures)
            if not c.passed:
                ET.SubElement(case, "failure", message=c.message or "failed",
                              type="GateFailed").text = text
            if text:
                ET.SubElement(case, "system-out").text = text
        for name, reason in self.skipped.items():
            case = ET.SubElement(suite, "testcase", name=name, classname=JUNIT_CLASSNAME,
                                 time="0.000")
            ET.SubElement(case, "skipped", message=reason).text = reason
        ET.SubElement(suite, "system-out").text = (
            f"verify {'PASSED' if self.passed else 'FAILED'} (onnxruntime provider: "
            f"{self.provider or '-'})")
        ET.SubElement(suite, "system-err")
        ET.indent(root)
        return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode")


def check_loadable(base: LoadedModel, patched: LoadedModel) -> Check:
    problems = []
    for label, m in (("base", base), ("patched", patched)):
        try:
            onnx.checker.check_model(m.proto)
        except Exception as exc:  # onnx raises ValidationError and others
            problems.append(f"{label}: {' '.join(str(exc).split())[:200]}")
    return Check("load", not problems, {"base_sha256": base.sha256, "patched_sha256": patched.sha256},
                 "; ".join(problems))


def check_provenance(patched: ModelProto, diff: ModelDiff) -> Check:
    prov = read_provenance(patched) or {}
    edits = prov.get("edits", [])
    by_weight: dict[str, list[dict]] = {}
    for e in edits:
        by_weight.setdefault(e.get("weight", ""), []).append(e)
    problems, figures = [], {}
    for t in diff.tensors:
        declared = by_weight.get(t.name)
        if not declared:
            problems.append(f"'{t.name}' changed without provenance")
            continue
        rank_one = [e for e in declared if e.get("kind") == "rank-one"]
        other = [e for e in declared if e.get("kind") != "rank-one"]
        # a weight stored quantized: the write-back records say what was stored, in its units
        stored = [e for e in declared if e.get("kind") == "quantized-writeback"]
        norm_sum = sum(float(e.get("delta_norm", 0)) for e in (stored or declared))
        figures[t.name] = {"rank": t.rank, "declared_edits": len(declared), "norm": t.frobenius,
                           "declared_norm_sum": norm_sum}
        if t.unit == "steps":
            figures[t.name].update(steps_changed=t.changed, max_steps=t.max_abs)
        if len(stored) == 1 and "steps_changed" in stored[0] and \
                int(stored[0]["steps_changed"]) != t.changed:
            problems.append(f"'{t.name}': {t.changed} value(s) changed, the provenance declares "
                            f"{stored[0]['steps_changed']}")
        if not other and t.rank > len(rank_one):
            problems.append(f"'{t.name}': numerical rank {t.rank} exceeds its {len(rank_one)} "
                            "declared rank-one edit(s)")
        wrong_layer = [e.get("layer") for e in declared if e.get("layer") not in t.feeds]
        if wrong_layer:
            problems.append(f"'{t.name}': provenance names layer(s) {wrong_layer} that do not "
                            f"use it (it feeds {', '.join(t.feeds)})")
        if t.frobenius > norm_sum * (1 + 1e-3) + 1e-6:
            problems.append(f"'{t.name}': ||delta|| {t.frobenius:.4g} exceeds the declared "
                            f"{norm_sum:.4g}")
    for name in by_weight:
        if name and name not in {t.name for t in diff.tensors}:
            problems.append(f"provenance declares an edit of '{name}' but the tensor is unchanged")
    return Check("provenance", not problems, figures, "; ".join(problems))


def verify(base: LoadedModel, patched: LoadedModel, eval_path, attack_path=None, pairs_path=None,
           max_accuracy_drop: float = MAX_ACCURACY_DROP, max_asr: float = MAX_ASR,
           max_gap: float = MAX_GAP, provider: str = "auto",
           latency_runs: int | None = None, batch: int | None = None) -> VerifyReport:
    """Run every check; sample files are validated against the base model first. The
    defaults are the gate's (:mod:`patcher.gate.defaults`), the ones ``patch`` aims for."""
    started, start = datetime.now(timezone.utc), time.perf_counter()
    spec, classes = classifier_contract(base.proto, str(base.path or "the base model"))
    classifier_contract(patched.proto, str(patched.path or "the patched model"))
    ev = load_labelled(eval_path, spec, classes)
    attack = load_labelled(attack_path, spec, classes, with_target=True) if attack_path else None
    pairs = load_pairs(pairs_path, spec, classes) if pairs_path else None
    return verify_sets(base, patched, ev, attack, pairs, max_accuracy_drop, max_asr, max_gap,
                       provider, latency_runs, names=(eval_path, attack_path, pairs_path),
                       batch=batch,
                       started=(started, start))


def verify_sets(base: LoadedModel, patched: LoadedModel, ev: LabelledSet,
                attack: LabelledSet | None = None, pairs: Pairs | None = None,
                max_accuracy_drop: float = MAX_ACCURACY_DROP, max_asr: float = MAX_ASR,
                max_gap: float = MAX_GAP, provider: str = "auto",
                latency_runs: int | None = None,
                names: tuple = ("eval", "attack", "pairs"),
                started: tuple[datetime, float] | None = None,
                batch: int | None = None) -> VerifyReport:
    """:func:`verify` on sample sets already checked against both models' classifier
    contract (the library API's arrays); ``names`` (eval, attack, pairs) are what
    refusals call them. ``batch``: images per onnxruntime call (default
    :func:`default_batch`, which bounds the memory); ``latency_runs``: interleaved timed
    runs of the latency check (default :func:`default_latency_runs`)."""
    started, start = started or (datetime.now(timezone.utc), time.perf_counter())
    eval_path, attack_path, pairs_path = names
    thresholds = {"max_accuracy_drop": max_accuracy_drop, "max_asr": max_asr, "max_gap": max_gap}
    skipped = {}
    if attack is None:
        skipped["attack_success_rate"] = "not run: no attack set given (--attack)"
    if pairs is None:
        skipped["pair_gap"] = "not run: no pairs given (--pairs)"
    checks: list[Check] = []
    clock = [time.perf_counter()]

    def timed(check: Check) -> Check:  # the time since the previous check ended
        now = time.perf_counter()
        check.seconds, clock[0] = now - clock[0], now
        checks.append(check)
        return check

    def finish(provider_used: str | None) -> VerifyReport:
        return VerifyReport(checks, provider_used, skipped, thresholds, started,
                            time.perf_counter() - start)

    timed(check_loadable(base, patched))
    diff = diff_models(base.proto, patched.proto)
    non_weight = [t.name for t in diff.tensors if not t.editable]
    structural = diff.structural + [f"tensor '{n}' is not a Conv/Gemm/MatMul weight but changed"
                                    for n in non_weight]
    timed(Check("structure", not structural,
                {"changed_tensors": [t.name for t in diff.tensors],
                 "structural_differences": structural}, "; ".join(structural[:10])))
    timed(check_provenance(patched.proto, diff))
    try:
        s_base = open_session(base.path or base.proto.SerializeToString(), provider)
        s_new = open_session(patched.path or patched.proto.SerializeToString(), provider)
    except BadModelError as exc:
        timed(Check("onnxruntime", False, {}, str(exc)))
        for name in ("accuracy", "attack_success_rate", "pair_gap", "latency"):
            skipped.setdefault(name, "not run: onnxruntime cannot run the models")
        return finish(None)
    batch = batch or default_batch(base.proto)
    lb = predict(s_base, ev.x, batch=batch, label="base")
    lp = predict(s_new, ev.x, batch=batch, label="patched")
    for scores, model in ((lb, base), (lp, patched)):  # the class count the file may not state
        check_scores(scores, str(model.path or "model"),
                     {f"{eval_path}: 'y'": ev.y,
                      **({f"{pairs_path}: 'label'": pairs.label} if pairs else {}),
                      **({f"{attack_path}: 'y'": attack.y,
                          f"{attack_path}: 'target'": np.array([attack.target])}
                         if attack else {})})
    acc_b, acc_p = float(np.mean(lb.argmax(1) == ev.y)), float(np.mean(lp.argmax(1) == ev.y))
    # Inf/NaN scores (a model that overflows): counted per image; the difference statistics
    # are over the elements finite in both models, so they stay numbers
    bad_b, bad_p = (~np.isfinite(lb)).any(1), (~np.isfinite(lp)).any(1)
    both = np.isfinite(lb) & np.isfinite(lp)
    d = np.abs(lp.astype(np.float64) - lb.astype(np.float64))[both]
    figures = {"base_accuracy": acc_b, "patched_accuracy": acc_p, "accuracy_drop": acc_b - acc_p,
               "max_accuracy_drop": max_accuracy_drop,
               "top1_flip_rate": float(np.mean(lb.argmax(1) != lp.argmax(1))),
               "output_diff_max": float(d.max()) if d.size else 0.0,
               "output_diff_mean": float(d.mean()) if d.size else 0.0,
               "output_diff_p99": float(np.percentile(d, 99)) if d.size else 0.0,
               "base_nonfinite_images": int(bad_b.sum()), "patched_nonfinite_images": int(bad_p.sum()),
               "provider": s_new.provider}
    new_overflow = int((bad_p & ~bad_b).sum())
    problems = ([f"accuracy drop {acc_b - acc_p:.2%} exceeds {max_accuracy_drop:.2%}"]
                if acc_b - acc_p > max_accuracy_drop else [])
    if new_overflow:
        problems.append(f"the patched model's scores are Inf or NaN on {new_overflow} eval "
                        "image(s) where the base model's are finite")
    timed(Check("accuracy", not problems, figures, "; ".join(problems)))
    if attack is not None:
        keep = attack.y != attack.target
        asr = float(np.mean(predict(s_new, attack.x[keep], batch=batch,
                                    label="attack").argmax(1) == attack.target))
        asr_b = float(np.mean(predict(s_base, attack.x[keep], batch=batch,
                                      label="attack").argmax(1) == attack.target))
        timed(Check("attack_success_rate", asr <= max_asr,
                            {"base_asr": asr_b, "patched_asr": asr, "max_asr": max_asr},
                            f"ASR {asr:.2%} exceeds {max_asr:.2%}" if asr > max_asr else ""))
    if pairs is not None:
        g_b, g_p = (pair_gap(s, pairs.corrupted, pairs.clean, pairs.label)
                    for s in (s_base, s_new))
        timed(Check("pair_gap", g_p <= max_gap,
                            {"base_gap": g_b, "patched_gap": g_p, "max_gap": max_gap},
                            f"pair gap {g_p:.4f} exceeds {max_gap}" if g_p > max_gap else ""))
    sample = ev.x[: min(32, batch, len(ev.x))]
    times = {"base": [], "patched": []}
    warm = 0.0  # warm-up; the last run of each model times one forward
    for sess in (s_base, s_new):
        for _ in range(3):
            t0 = time.perf_counter()
            sess.run(sample)
        warm += time.perf_counter() - t0
    if latency_runs is None:
        latency_runs = default_latency_runs(warm)
    for _ in range(latency_runs):
        for key, sess in (("base", s_base), ("patched", s_new)):
            t0 = time.perf_counter()
            sess.run(sample)
            times[key].append(time.perf_counter() - t0)
    ratio = float(np.median(times["patched"]) / np.median(times["base"]))
    timed(Check("latency", True, {"latency_ratio": ratio,
                                  "base_ms": 1e3 * float(np.median(times["base"])),
                                  "patched_ms": 1e3 * float(np.median(times["patched"])),
                                  "batch": len(sample), "runs": latency_runs}, ""))
    return finish(s_new.provider)
