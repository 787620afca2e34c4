"""The patch pipeline: validate -> rectify in the shadow graph -> write -> verify from disk.

Nothing is written next to the input unless the output is put there; the output
is reloaded from disk and checked under onnxruntime (never the in-memory copy);
the inputs' sha256 are taken before and after and must not change.
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from patcher.version import __version__
from patcher.errors import CheckFailedError, OutputError, RectifyError
from patcher.gate.metrics import pair_gap, predict
from patcher.graph.support import load_supported_model as load_model
from patcher.model.modelio import LoadedModel, sha256_file
from patcher.progress import Remedy, note, warn
from patcher.graph.parity import ParityResult, compare
from patcher.rectify import LayerScore, RectifyConfig, RectifyResult, rectify
from patcher.rectify.budget import preflight
from patcher.rectify.config import EVAL_BATCH
from patcher.rectify.locators import AttributionLocator, CausalLocator
from patcher.rectify.workspace import Workspace
from patcher.model.runtime import open_session
from patcher.samples import (InputSpec, LabelledSet, Pairs, check_scores, load_labelled,
                             load_pairs, num_classes_of)
from patcher.graph.quantized_layers import editable_copy
from patcher.graph.shadow import ShadowGraph
from patcher.model.paths import Outputs, check_output_file, check_outputs, lock_output
from patcher.model.quantized_writeback import apply_quantized_deltas
from patcher.model.writeback import apply_deltas, stage_model


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RectifyError("--device cuda: torch sees no CUDA device here; use --device cpu")
    return torch.device(device)


def pairs_digest(pairs: Pairs) -> str:
    h = hashlib.sha256()
    for a in (pairs.corrupted, pairs.clean, pairs.label):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


@dataclass
class Inputs:
    loaded: LoadedModel
    pairs: Pairs
    eval_set: LabelledSet
    calib_x: np.ndarray | None
    files: list[Path]
    #: the files read, by the flag that named them
    reads: dict[str, Path] = field(default_factory=dict)


def load_inputs(model: Path, pairs: Path, eval_path: Path | None, calib: Path | None,
                attack: Path | None = None) -> Inputs:
    """Load and validate the model and sample files against each other before any work
    (``attack``, an npz with x, y, target, is only checked: the HTML report reads it)."""
    loaded = load_model(model)
    spec, classes = InputSpec.of(loaded.proto), num_classes_of(loaded.proto)
    p = load_pairs(pairs, spec, classes)
    reads = {"MODEL": Path(model), "--pairs": Path(pairs)}
    ev = None
    if eval_path is not None:
        ev = load_labelled(eval_path, spec, classes)
        reads["--eval"] = Path(eval_path)
    calib_x = None
    if calib is not None:
        calib_x = load_labelled(calib, spec, classes).x
        reads["--calib"] = Path(calib)
    attack_set = None
    if attack is not None:
        attack_set = load_labelled(attack, spec, classes, with_target=True)
        reads["--attack"] = Path(attack)
    return gather_inputs(loaded, classes, p, ev, calib_x, attack_set, reads,
                         {"MODEL": str(model), "pairs": str(pairs), "eval": str(eval_path),
                          "attack": str(attack)})


def gather_inputs(loaded: LoadedModel, classes: int | None, pairs: Pairs,
                  eval_set: LabelledSet | None,
                  calib_x: np.ndarray | None, attack_set: LabelledSet | None,
                  reads: dict[str, Path], names: dict[str, str]) -> Inputs:
    """:class:`Inputs` from sets already checked against ``loaded``'s input (from files by
    :func:`load_inputs`, or arrays given to the library API); ``classes``: the model's
    class count as :func:`num_classes_of` states it. Without an eval set the
    pairs' clean inputs serve as calibration. A model whose class count neither its output
    nor shape inference states is run once on one pair so that the labels are bounded by
    the scores' width. ``reads``: the files read, by what named them (the model's data files
    are added); ``names``: how refusals call the model ("MODEL") and the pairs, eval and
    attack sets."""
    labels = {f"{names['pairs']}: 'label'": pairs.label}
    if eval_set is not None:
        labels[f"{names['eval']}: 'y'"] = eval_set.y
    else:  # locate without an eval set: the pairs' clean inputs serve as calibration
        eval_set = LabelledSet(pairs.clean, pairs.label)
    if attack_set is not None:
        labels.update({f"{names['attack']}: 'y'": attack_set.y,
                       f"{names['attack']}: 'target'": np.array([attack_set.target])})
    if classes is None:  # neither the output nor shape inference states the class count
        session = open_session(loaded.path or loaded.proto.SerializeToString(), "cpu")
        check_scores(np.asarray(session.run(pairs.clean[:1])[0]), names["MODEL"], labels)
    reads = dict(reads)
    for f in data_files(loaded):
        reads[f"MODEL's data file {f.name}"] = f
    return Inputs(loaded, pairs, eval_set, calib_x, sorted(set(reads.values())), reads)


def data_files(loaded: LoadedModel) -> list[Path]:
    """The external data files a loaded model was read from."""
    if loaded.path is None:
        return []
    return sorted({loaded.path.parent / ref.location for ref in loaded.external.values()})


def locate(inputs: Inputs, config: RectifyConfig, device: str = "auto") -> list[LayerScore]:
    """Editable layers ranked by editability, best first (a quantized model's layers in its
    float analysis copy, :mod:`patcher.graph.quantized_layers`)."""
    graph = ShadowGraph(editable_copy(inputs.loaded)[0])
    ws = Workspace(graph, inputs.pairs, inputs.eval_set, inputs.calib_x, config,
                   resolve_device(device), ranking_only=True)
    ranking = AttributionLocator().rank(ws)
    warn_conditioning({k: {"condition_number": s.condition_number, "ridge": s.ridge_value}
                       for k, s in ws.statistics.stats.items()}, len(ws.calib_x))
    return ranking


#: Largest IG completeness error (probability units) patch accepts without a warning.
COMPLETENESS_LIMIT = 0.1


def warn_completeness(scores: list[LayerScore], form: str = "ig") -> None:
    """Say when Integrated Gradients' completeness error of a scored layer exceeds
    :data:`COMPLETENESS_LIMIT`, as what it is for the attribution ``form``:

    - ``path``: the form is complete up to its quadrature error, so a large error means too
      few steps: a warning whose remedy is more ``steps``;
    - ``ig`` (the paper's, the default): at an internal layer the error is a property of
      the form, not of the run (more steps do not lower it: 0.234 at 16 steps and 0.238 at
      64 at backdoor_cnn's /classifier.2/Gemm; the path form gives 0.006). Nothing to act
      on, so a ``--verbose`` note: on the eight generalisation cases the path form gave the
      same edits on six, 0.07 points lower ASR on one, and on LeNet-tanh (n = 5) cost 0.8
      accuracy points that the default did not (benchmarks/GENERALISATION.md)."""
    if not scores:
        return
    worst = max(scores, key=lambda s: s.completeness_error)
    if worst.completeness_error <= COMPLETENESS_LIMIT:
        return
    text = (f"Integrated-Gradients completeness error {worst.completeness_error:.3g} at "
            f"{worst.layer} exceeds {COMPLETENESS_LIMIT}")
    if form == "path":
        warn(text + ": the path form's quadrature is too coarse for this model",
             Remedy("steps"))
    else:
        note(text + " (expected of the Integrated-Gradients form at an internal layer; the "
                    "path-derivative form, attribution 'path', is complete there)")


#: Key covariances with a condition number above this are called singular (ill-conditioned).
ILL_CONDITIONED = 1e6  # the statistics' float32 products resolve eigenvalue ratios to ~1e-6
#: ... and above this they are printed as such: the ratio only says an eigenvalue is ~0.
SINGULAR_ABOVE = 1e16


#: Fewer calibration images than this may leave key directions undetermined: the
#: conditioning warning then asks for more; with more, a singular C means directions that
#: never vary (units always zero), a fact of the model that is only noted.
FEW_CALIBRATION_IMAGES = 100


def warn_conditioning(conditioning: dict[str, dict],
                      calibration_images: int | None = None) -> None:
    """Say so (one line) when a layer's key covariance C is singular or ill-conditioned;
    the statistics always use C + lambda I, so the edit stays defined. A warning with what
    to change when there are fewer than :data:`FEW_CALIBRATION_IMAGES` calibration images
    (or their number is not given); with more, a note (INFO): nothing to act on."""
    bad = {k: v for k, v in conditioning.items()
           if not v["condition_number"] <= ILL_CONDITIONED}  # NaN and Inf count as bad
    if bad:
        worst = max(bad, key=lambda k: np.nan_to_num(bad[k]["condition_number"], nan=np.inf))
        cond = bad[worst]["condition_number"]
        # beyond float64's ~1e16 an eigenvalue ratio only says "an eigenvalue is zero"
        shown = ("undefined (NaN)" if cond != cond else f"up to {cond:.3g}"
                 if cond <= SINGULAR_ABOVE else f"above {SINGULAR_ABOVE:.0e}")
        few = calibration_images is None or calibration_images < FEW_CALIBRATION_IMAGES
        images = ("" if calibration_images is None else
                  f" {calibration_images} calibration image(s):")
        cause = (f"{images} some key directions never vary in the calibration inputs"
                 if few else f" some key directions never vary in the {calibration_images} "
                 "calibration images, e.g. units that are always zero")
        message = (f"the key covariance of {len(bad)} layer(s) ({', '.join(list(bad)[:5])}) is "
                   f"singular or ill-conditioned (condition number {shown} at {worst};"
                   f"{cause}); it is regularised as C + lambda I (lambda "
                   f"{bad[worst]['ridge']:.3g} there), so edits stay defined")
        if few:
            warn(message, Remedy("calib", action="give more varied calibration images with"),
                 Remedy("eval", action="give more images with"))
        else:
            note(message)


def locate_causal(inputs: Inputs, config: RectifyConfig, device: str = "auto"):
    """Layers ranked by intervention (see :mod:`patcher.analysis.causal`), best first, and the
    attribution ranking of the same run for comparison."""
    graph = ShadowGraph(editable_copy(inputs.loaded)[0])
    ws = Workspace(graph, inputs.pairs, inputs.eval_set, inputs.calib_x, config,
                   resolve_device(device))
    return CausalLocator().effects(ws), AttributionLocator().rank(ws)


@dataclass
class Verification:
    """The written file, reloaded from disk, under onnxruntime."""

    provider: str
    base_accuracy: float
    patched_accuracy: float
    base_pair_gap: float
    patched_pair_gap: float
    parity: dict
    rounding_errors: dict[str, float] = field(default_factory=dict)
    #: no edit was kept: the output's weights are the input's, so one onnxruntime pass
    #: (of the written file) gives both the base and the patched figures
    same_weights: bool = False

    @property
    def accuracy_drop(self) -> float:
        return self.base_accuracy - self.patched_accuracy


@dataclass
class PatchReport:
    model: str
    output: str
    pairs: str
    eval: str
    written: list[str]
    result: RectifyResult
    verification: Verification
    inputs_sha256_before: dict[str, str]
    inputs_sha256_after: dict[str, str]
    device: str
    timings: dict[str, float]
    passed: bool
    #: the RectifyConfig the run used (every option, defaults included)
    config: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        out = asdict(self)
        out["result"].pop("deltas", None)
        out["verification"]["accuracy_drop"] = self.verification.accuracy_drop
        return out


def default_output(model: Path) -> Path:
    name = model.name[:-5] if model.name.endswith(".onnx") else model.name
    return model.with_name(f"{name}.rectified.onnx")


def check_output_path(out: Path, inputs: Inputs, force: bool,
                      writes: dict[str, Path | None] | None = None, label: str = "-o") -> None:
    """Refuse (exit 2), before any work, an output that is an input file or another output
    (by device and inode), that exists without ``force``, that is a special file, or whose
    folder is missing or cannot be written. ``writes``: the run's other outputs by flag;
    ``label``: what refusals call the output (the CLI's ``-o``, the API's ``out``)."""
    data = out.with_name(f"{out.name}.data")
    reads = inputs.reads or {f"input {f.name}": f for f in inputs.files}
    check_outputs(reads, {label: out, f"{label}'s data file": data, **(writes or {})})
    check_output_file(label, out, force)
    if inputs.loaded.external and os.path.lexists(data) and not force:
        raise OutputError(f"{out}: its data file {out.name}.data exists; pass --force to "
                          "overwrite it")
    check_output_file(f"{label}'s data file", data)


#: Stages extra outputs (reports) of a patch run: (report, outputs, staged model path).
StageReports = Callable[["PatchReport", Outputs, Path], None]


def _gap(session, pairs: Pairs) -> float:
    return pair_gap(session, pairs.corrupted, pairs.clean, pairs.label)


#: Eval images on which the written file's shadow graph and onnxruntime are compared
#: (parity): a wrong op or weight shows on any image; each costs a shadow forward with the
#: rounding estimate's per-node statistics (16 images: 5.3 of ResNet-18's 67 CPU s at 224,
#: 7.6 of ViT-Ti/16's 120). The rounding estimate reads 4 of them.
PARITY_IMAGES = 4


def _figures(model, inputs: Inputs, provider: str, batch: int) -> tuple[float, float, str]:
    """(accuracy on the eval set, pair gap, provider) of ``model`` under onnxruntime, in
    batches of ``batch`` images; the session (and its memory arena) ends with the call."""
    session = open_session(model, provider)
    ev = inputs.eval_set
    scores = predict(session, ev.x, batch=batch, label="verifying")
    accuracy = float(np.mean(scores.argmax(1) == ev.y))
    return accuracy, _gap(session, inputs.pairs), session.provider


def verify_written(base: LoadedModel, out: Path, inputs: Inputs, provider: str,
                   rounding: dict[str, float], same_weights: bool = False,
                   batch: int = EVAL_BATCH) -> Verification:
    """The written file, reloaded from disk, under onnxruntime: accuracy and pair gap of it
    and of the input model, and parity with its shadow graph on :data:`PARITY_IMAGES` eval
    images. With ``same_weights`` (no edit kept) the written file's figures stand for the
    input's too (one pass, not two). ``batch``: images per onnxruntime run (the rectify
    run's, bounded by the activation size: a session's arena grows to its largest batch),
    one session open at a time."""
    reloaded = load_model(out, warn=False)  # the input's warnings were given already
    ev = inputs.eval_set
    sample = ev.x[: min(PARITY_IMAGES, len(ev.x))]
    parity: ParityResult = compare(ShadowGraph(reloaded), out, [sample], provider=provider)
    del reloaded
    patched_acc, patched_gap, used = _figures(out, inputs, provider, batch)
    if same_weights:
        return Verification(used, patched_acc, patched_acc, patched_gap, patched_gap,
                            parity.as_dict(), rounding, same_weights=True)
    base_acc, base_gap, _ = _figures(base.path if base.path else base.proto.SerializeToString(),
                                     inputs, provider, batch)
    return Verification(used, base_acc, patched_acc, base_gap, patched_gap, parity.as_dict(),
                        rounding)


def patch(model: Path, pairs: Path, eval_path: Path, calib: Path | None, out: Path | None,
          config: RectifyConfig, device: str = "auto", provider: str = "auto",
          force: bool = False, log=None, *, attack: Path | None = None,
          writes: dict[str, Path | None] | None = None,
          stage_reports: StageReports | None = None) -> PatchReport:
    """Run the whole patch job; see the module docstring. ``attack`` is validated with the
    other inputs; ``writes`` (other outputs by flag) are checked against the inputs and the
    output; ``stage_reports`` writes reports into the same commit as the model, which is
    renamed into place together with them, or not at all. While it runs, a lock beside the
    output refuses a second run writing the same file."""
    start = time.perf_counter()
    inputs = load_inputs(model, pairs, eval_path, calib, attack)
    out = Path(out) if out is not None else default_output(Path(model))
    return patch_loaded(inputs, out, config, device, provider, force, log,
                        names=(model, pairs, eval_path), writes=writes,
                        stage_reports=stage_reports, start=start)


def patch_loaded(inputs: Inputs, out: Path, config: RectifyConfig, device: str = "auto",
                 provider: str = "auto", force: bool = False, log=None, *,
                 names: tuple = ("model", "pairs", "eval"),
                 writes: dict[str, Path | None] | None = None,
                 stage_reports: StageReports | None = None,
                 start: float | None = None, out_label: str = "-o") -> PatchReport:
    """:func:`patch` on inputs already loaded and checked (by :func:`load_inputs`, or the
    library API's in-memory models and arrays); ``names`` (model, pairs, eval) stand for
    them in the report, ``start`` is when loading began (for the timings), ``out_label``
    names the output in refusals."""
    log = log or (lambda msg: None)
    start = time.perf_counter() if start is None else start
    out = Path(out)
    check_output_path(out, inputs, force, writes, out_label)
    calib = inputs.calib_x if inputs.calib_x is not None else inputs.eval_set.x
    model, pairs, eval_path = names
    with lock_output(out):  # a second run on -o is refused before the estimate is printed
        preflight(inputs.loaded.proto, "patch", len(inputs.eval_set.x), len(calib),
                  len(inputs.pairs), config, str(resolve_device(device)))
        return _patch_locked(inputs, model, pairs, eval_path, out, config, device, provider,
                             force, log, start, stage_reports)


def _patch_locked(inputs: Inputs, model: Path, pairs: Path, eval_path: Path, out: Path,
                  config: RectifyConfig, device: str, provider: str, force: bool, log,
                  start: float, stage_reports: StageReports | None) -> PatchReport:
    before = {str(f): sha256_file(f) for f in inputs.files}
    dev = resolve_device(device)
    t0 = time.perf_counter()
    # a quantized model is edited in its float analysis copy and written back in int8
    edited, quantized = editable_copy(inputs.loaded)
    graph = ShadowGraph(edited)  # initializers that are graph inputs: load_model warns
    timings = {"load": t0 - start, "shadow_build": time.perf_counter() - t0}
    result = rectify(graph, inputs.pairs, inputs.eval_set, inputs.calib_x, config, dev, log)
    timings["rectify"] = time.perf_counter() - t0
    warn_conditioning(result.conditioning, len(inputs.calib_x if inputs.calib_x is not None
                                               else inputs.eval_set.x))
    warn_completeness(result.scores, config.attribution_form)
    if not result.deltas:
        log("no edit was kept; the output equals the input's weights")
    provenance = {"tool": f"onnx-rectify {__version__}", "strategy": result.strategy,
                  "edits": [dict(e, pairs_sha256=pairs_digest(inputs.pairs)) for e in result.edits]}
    t1 = time.perf_counter()
    if quantized:
        proto, written_tensors, _ = apply_quantized_deltas(inputs.loaded, result.deltas,
                                                           quantized, provenance)
    else:
        proto, written_tensors = apply_deltas(inputs.loaded, result.deltas, provenance)
    # Written in full into a private folder beside the output, verified from there (from
    # disk), then renamed into place; on any failure or Ctrl-C nothing is left behind.
    staged = stage_model(proto, inputs.loaded, out, exclusive=not force)
    outputs = Outputs()
    try:
        timings["write"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        verification = verify_written(inputs.loaded, staged.model, inputs, provider,
                                      {w.name: w.rounding_error for w in written_tensors},
                                      same_weights=not result.deltas,
                                      batch=result.batch or EVAL_BATCH)
        timings["verify"] = time.perf_counter() - t2
        after = {str(f): sha256_file(f) for f in inputs.files}
        if after != before:
            raise CheckFailedError("an input file changed while patching; nothing was written "
                                   "(this is a bug, please report it)")
        written = staged.finals
        staged.into(outputs)
        timings["total"] = time.perf_counter() - start
        report = _report(model, out, pairs, eval_path, written, result, verification, before,
                         after, dev, timings, config)
        if stage_reports is not None:
            stage_reports(report, outputs, staged.model)
        outputs.commit()
    finally:
        outputs.discard()
        staged.discard()
    return report


def _report(model: Path, out: Path, pairs: Path, eval_path: Path, written: list[Path],
            result: RectifyResult, verification: Verification, before: dict, after: dict,
            dev: torch.device, timings: dict, config: RectifyConfig) -> PatchReport:
    # The delta*: the mean gap over the given pairs, measured under onnxruntime on the
    # written file. (The loop itself steers by held-out transplanted pairs; that figure is
    # in result.final_gap.)
    # With the attribution objective the target is a lower share (no gradients in
    # onnxruntime: measured on the shadow graph, whose parity with the file is checked).
    # When the loop steered by the target-class gap tau (a corruption with a target class),
    # success is judged on that measure, the one the loop removes and stops on (tau <= --gap
    # or the effect gone); the given pairs' own gap is reported beside it.
    target_met = (result.met_target if config.objective == "attribution"
                  or result.final_target_gap is not None
                  else verification.patched_pair_gap <= config.gap)
    passed = (target_met and verification.accuracy_drop <= config.budget
              and verification.parity.get("within_tolerance", False))
    return PatchReport(str(model), str(out), str(pairs), str(eval_path),
                       [str(w) for w in written], result, verification,
                       before, after, str(dev), timings, passed, asdict(config))
