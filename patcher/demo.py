"""``onnx-rectify demo``: the main job on the bundled backdoor sample.

The trojaned MNIST CNN of ``samples/backdoor_cnn`` is copied into a work folder,
patched with one corrupted/clean pair (``patch``: dynamic rectification, verified
from disk under onnxruntime), and both files are measured under onnxruntime: clean
accuracy (OA) on the held-out test set and attack success rate (ASR) on the
triggered test set.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from patcher.errors import OutputError, RectifyError
from patcher.gate.defaults import MAX_ACCURACY_DROP, PATCH_GAP
from patcher.gate.metrics import accuracy, attack_success_rate
from patcher.graph.support import load_supported_model as load_model
from patcher.graph.parity import ParityResult
from patcher.patch import patch
from patcher.rectify import RectifyConfig
from patcher.model.runtime import open_session
from patcher.samples import InputSpec, load_labelled, load_pairs, num_classes_of
from patcher.gate.verify import verify
from patcher.gate.summary import summarize

SAMPLE = "backdoor_cnn"


@dataclass
class DemoResult:
    folder: Path
    model: Path
    pairs: int
    parity: ParityResult | None
    provider: str
    before: dict[str, float]
    after: dict[str, float] | None
    patched: Path | None = None
    rounds: list = None
    seconds: float = 0.0
    verification: object = None


def sample_folder(name: str = SAMPLE) -> Path:
    """The installed sample scenario folder (read only: never written to)."""
    try:
        root = resources.files("onnx_rectify_samples")
    except ModuleNotFoundError:
        raise RectifyError("the bundled samples are not installed (onnx_rectify_samples); "
                           "reinstall onnx-rectify") from None
    folder = Path(str(root)) / name
    if not (folder / "model.onnx").is_file():
        raise RectifyError(f"the bundled sample '{name}' has no model.onnx at {folder}")
    return folder


#: The sample files the demo copies into its work folder.
COPIED = ("model.onnx", "pairs_n1.npz", "eval.npz", "test.npz", "attack.npz")
#: Every file the demo writes into its work folder.
WRITES = (*COPIED, "model.rectified.onnx", "model.rectified.onnx.data")


def check_work_folder(work: Path, force: bool = False) -> None:
    """Refuse (exit 2), before any work, a work folder that is a file, lies under a file,
    cannot be written, is the installed sample folder itself, or (without ``force``)
    already holds a file the demo writes."""
    from patcher.model.paths import check_folder_outputs, check_output_folder

    check_output_folder("--out", work)
    source = sample_folder()
    check_folder_outputs("--out", work, {f"the bundled sample's {n}": source / n
                                        for n in COPIED}, lambda name: name in WRITES)
    existing = [name for name in WRITES if os.path.lexists(work / name)]
    if existing and not force:
        raise OutputError(f"--out {work} already holds {', '.join(existing)}; pass --force to "
                          "overwrite the demo's files there, or choose another folder")


def run_demo(work: Path, provider: str = "auto", device: str = "auto", log=None,
             force: bool = True) -> DemoResult:
    """Copy the sample into ``work``, patch it with one pair, and measure both files. Without
    ``force``, refuse (before any work) when ``work`` holds any file the demo writes."""
    source = sample_folder()
    check_work_folder(work, force)
    work.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        shutil.copyfile(source / name, work / name)
    model_path = work / "model.onnx"
    loaded = load_model(model_path)
    spec, classes = InputSpec.of(loaded.proto), num_classes_of(loaded.proto)
    pairs = load_pairs(work / "pairs_n1.npz", spec, classes)
    test = load_labelled(work / "test.npz", spec, classes)
    attack = load_labelled(work / "attack.npz", spec, classes, with_target=True)
    summary = summarize(loaded, parity=True, provider=provider)

    def measure(path: Path) -> tuple[dict[str, float], str]:
        session = open_session(path, provider)
        return ({"clean_accuracy": accuracy(session, test.x, test.y),
                 "attack_success_rate": attack_success_rate(session, attack.x, attack.y,
                                                            attack.target)}, session.provider)

    before, used = measure(model_path)
    start = time.perf_counter()
    report = patch(model_path, work / "pairs_n1.npz", work / "eval.npz", None,
                   work / "model.rectified.onnx",
                   RectifyConfig(budget=MAX_ACCURACY_DROP, gap=PATCH_GAP),  # patch's defaults
                   device, provider, force=True, log=log)
    seconds = time.perf_counter() - start
    after, _ = measure(Path(report.output))
    gate = verify(loaded, load_model(Path(report.output)), work / "eval.npz", work / "attack.npz",
                  work / "pairs_n1.npz", provider=provider)
    return DemoResult(work, model_path, len(pairs), summary.parity, used, before, after,
                      Path(report.output), report.result.rounds, seconds, gate)


def format_demo(result: DemoResult, kept: bool = True) -> str:
    """The demo's table; ``kept=False`` says that the work folder was removed."""
    lines = [f"onnx-rectify demo: a trojaned MNIST CNN (samples/{SAMPLE}), "
             f"{result.pairs} corrupted/clean pair",
             f"work folder  {result.folder}" + ("" if kept else
                                                " (removed; --out DIR keeps the files)")]
    if result.parity is not None:
        p = result.parity
        lines.append(f"parity       {'PASS' if p.passed else 'FAIL'} (shadow graph vs onnxruntime, "
                     f"max abs diff {p.max_abs_diff:.2g})")
    after = result.after or {}
    lines += ["", f"{'':<28}{'before':>10}{'after':>10}"]
    for key, label in (("clean_accuracy", "clean accuracy (OA)"),
                       ("attack_success_rate", "attack success rate (ASR)")):
        value = after.get(key)
        lines.append(f"{label:<28}{result.before[key]:>10.2%}"
                     f"{(f'{value:.2%}' if value is not None else '-'):>10}")
    lines.append("")
    kept = [r.layer for r in (result.rounds or []) if r.kept]
    if result.patched is not None:
        lines.append(f"patched      {result.patched.name} in {result.seconds:.1f} s: "
                     f"{len(kept)} rank-one edit(s) at {', '.join(dict.fromkeys(kept)) or '-'}")
    lines.append(f"measured under onnxruntime ({result.provider}) on {result.model.name} and "
                 f"{result.patched.name if result.patched else '-'}, held-out test data")
    if result.verification is not None:
        gate = result.verification
        verdicts = ", ".join(f"{c.name} {'ok' if c.passed else 'FAILED'}" for c in gate.checks)
        lines.append(f"verify       {'PASSED' if gate.passed else 'FAILED'}: {verdicts}")
    return "\n".join(lines)
