"""Verbs of the release gate: verify, report."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from patcher.errors import RectifyError
from patcher.gate.defaults import MAX_ACCURACY_DROP, MAX_ASR, MAX_GAP, PATCH_GAP
from patcher.cli.common import (FRACTION, check_paths, commit_texts, data_reads, json_text,
                                main, reports_errors)


@main.command()
@click.argument("patched", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--base", "base_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The model before patching.")
@click.option("--eval", "eval_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="npz with x, y: clean data for the accuracy gate.")
@click.option("--attack", "attack_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="npz with x, y, target: gate the attack success rate.")
@click.option("--pairs", "pairs_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="npz with corrupted, clean, label: gate the pair gap.")
@click.option("--max-accuracy-drop", type=FRACTION, default=MAX_ACCURACY_DROP,
              show_default=True,
              help="Largest accuracy drop on --eval (0.01 = 1 point); patch --budget "
              "defaults to it.")
@click.option("--max-asr", type=FRACTION, default=MAX_ASR, show_default=True,
              help="Largest attack success rate on --attack.")
@click.option("--max-gap", type=FRACTION, default=MAX_GAP, show_default=True,
              help="Largest mean pair gap p_y(clean) - p_y(corrupted) on --pairs. patch "
              f"aims lower (--gap, default {PATCH_GAP}: steered by on held-out transplanted "
              "pairs, checked on its given pairs).")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True)
@click.option("--latency-runs", type=click.IntRange(1, 10000), default=None,
              help="Interleaved timed runs of each model for the latency check (default: "
              "as many as fit in about 10 s from one timed forward, 5 to 50).")
@click.option("--batch", type=click.IntRange(1, 4096), default=None,
              help="Images per onnxruntime call (default: from the model's activation size, "
              "so that a call's activations stay under 1 GB; at most 256).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Every figure, with a top-level \"passed\".")
@click.option("--junit", "junit_path", type=click.Path(dir_okay=False), default=None,
              help="JUnit XML, one test case per check.")
@reports_errors
def verify(patched: Path, base_path: Path, eval_path: Path, attack_path: Path | None,
           pairs_path: Path | None, max_accuracy_drop: float, max_asr: float, max_gap: float,
           provider: str, latency_runs: int | None, batch: int | None,
           json_path: str | None, junit_path: str | None) -> None:
    """The release gate: is PATCHED safe to ship in place of --base? Checks that both files
    load and pass onnx.checker, that only Conv/Gemm/MatMul weight values changed and each
    change is declared in the provenance, and (under onnxruntime) accuracy, flip rate,
    output differences, ASR, pair gap and latency. Exit 0 when every gate passes, 1 when
    one fails, 2 when an input is unusable."""
    from patcher.gate.verify import verify as run_verify
    from patcher.graph.support import load_supported_model as load_model

    reads = {"PATCHED": patched, "--base": base_path, "--eval": eval_path,
             "--attack": attack_path, "--pairs": pairs_path}
    writes = {"--json": json_path, "--junit": junit_path}
    check_paths(reads, writes)
    base, candidate = load_model(base_path), load_model(patched)
    check_paths({**reads, **data_reads("--base", base), **data_reads("PATCHED", candidate)},
                 writes)
    report = run_verify(base, candidate, eval_path, attack_path,
                        pairs_path, max_accuracy_drop, max_asr, max_gap, provider,
                        latency_runs=latency_runs, batch=batch)
    for check in report.checks:
        figures = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in check.figures.items()
                            if not isinstance(v, (dict, list)))
        click.echo(f"{'PASS' if check.passed else 'FAIL':<5} {check.name:<20} {figures}")
        if not check.passed:
            click.echo(f"      {check.message}")
    for name, reason in report.skipped.items():
        click.echo(f"{'SKIP':<5} {name:<20} {reason}")
    click.echo(f"verify: {'PASSED' if report.passed else 'FAILED'} "
               f"(onnxruntime provider: {report.provider or '-'})")
    texts = {}  # both written in one step (or neither)
    if json_path:
        texts[Path(json_path)] = json_text(report.as_dict())
    if junit_path:
        texts[Path(junit_path)] = report.junit() + "\n"
    commit_texts(texts)
    if not report.passed:
        sys.exit(1)


_NUMBER = "number"
_ROWS = [{"layer": str, "score": _NUMBER, "index": _NUMBER, "gap_before": _NUMBER,
          "gap_after": _NUMBER, "target_gap_after": _NUMBER, "accuracy": _NUMBER,
          "accuracy_drop": _NUMBER, "delta_norm": _NUMBER, "fit_residual_ratio": _NUMBER,
          "completeness_error": _NUMBER}]
_PATCH_REPORT_SHAPE = {
    "model": str, "output": str, "pairs": str, "eval": str, "device": str, "written": [str],
    "timings": {}, "verification": {"parity": {}, "rounding_errors": {}},
    "result": {"rounds": _ROWS, "edits": _ROWS, "scores": _ROWS, "conditioning": {},
               "timings": {}, "strategy": str, "objective": str, "base_accuracy": _NUMBER,
               "base_gap": _NUMBER, "final_accuracy": _NUMBER, "final_gap": _NUMBER},
}
_VERIFY_REPORT_SHAPE = {"checks": [{"name": str, "message": str, "figures": {}}],
                        "provider": str}


def _json_shape_error(value, shape, where: str = "") -> str | None:
    """Where ``value`` departs from ``shape`` (see :data:`_PATCH_REPORT_SHAPE`), or None;
    ``where`` is the path of ``value`` in the document ('' at the top)."""
    if not where:
        problem = _json_shape_error(value, shape, "$")
        return problem.replace("$ is", "the top level is", 1).replace("$.", "", 1) \
            if problem else None
    if shape is _NUMBER:
        ok = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
        return None if ok else f"{where} is {type(value).__name__}, expected a number"
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            return f"{where} is {type(value).__name__}, expected an object"
        for key, inner in shape.items():
            if key in value and value[key] is not None:
                if problem := _json_shape_error(value[key], inner, f"{where}.{key}"):
                    return problem
        return None
    if isinstance(shape, list):
        if not isinstance(value, list):
            return f"{where} is {type(value).__name__}, expected an array"
        for i, item in enumerate(value):
            if problem := _json_shape_error(item, shape[0], f"{where}[{i}]"):
                return problem
        return None
    if not isinstance(value, shape):
        return f"{where} is {type(value).__name__}, expected {shape.__name__}"
    return None


def _read_json(path: Path, shape: dict, what: str):
    """A JSON file whose structure fits ``shape``, or a one-line RectifyError."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        text = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise RectifyError(f"{path}: not JSON ({' '.join(text.split())[:200]})") from None
    except OSError as exc:
        raise RectifyError(f"{path}: cannot read ({exc.strerror})") from None
    if problem := _json_shape_error(data, shape):
        raise RectifyError(f"{path}: not {what}: {problem}")
    return data


@main.command()
@click.argument("report_json", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", "out_dir", required=True,
              type=click.Path(file_okay=False, path_type=Path), help="Folder for the HTML page.")
@click.option("--attack", "attack_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="npz with x, y, target: adds ASR and held-out heatmaps.")
@click.option("--verify-json", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Use the results of `verify --json` instead of re-running it.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="Where the heatmaps' attributions are computed.")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True)
@reports_errors
def report(report_json: Path, out_dir: Path, attack_path: Path | None,
           verify_json: Path | None, device: str, provider: str) -> None:
    """Write the HTML report of an existing run from the JSON of `patch --report`."""
    from patcher.gate.report import write_report

    data = _read_json(report_json, _PATCH_REPORT_SHAPE, "the JSON of 'onnx-rectify patch "
                      "--report'")
    verify_data = _read_json(verify_json, _VERIFY_REPORT_SHAPE, "the JSON of 'onnx-rectify "
                             "verify --json'") if verify_json else None
    from patcher.gate.report import referenced_files, require_libraries, writes_name
    from patcher.model.paths import Outputs, check_folder_outputs, check_output_folder
    from patcher.patch import resolve_device

    require_libraries()
    reads = {"REPORT_JSON": report_json, "--verify-json": verify_json, "--attack": attack_path,
             **referenced_files(data, report_json.parent)}
    check_output_folder("-o", out_dir)
    check_folder_outputs("-o", out_dir, reads, writes_name)
    with Outputs() as outputs:  # the page and its images appear together, or not at all
        write_report(data, outputs.tree(out_dir), verify_report=verify_data,
                     attack_path=attack_path, base_dir=report_json.parent,
                     device=str(resolve_device(device)), provider=provider)
        outputs.commit()
    click.echo(f"report: {out_dir / 'index.html'}")
