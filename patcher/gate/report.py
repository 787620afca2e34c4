"""The HTML patch report: one self-contained page (inline CSS, no scripts, no external
URLs) with PNG images beside it.

The page shows a summary (model, output, strategy, accuracy and gap before and after,
the verify verdict), the per-round table, a bar chart of the editability scores per layer
(edited layers highlighted), the input attribution heatmaps of the pairs before and after
the patch, the verify results and the timings.

Heatmaps: input-level Integrated Gradients (``patcher.analysis.input_attribution``, zero
baseline) of the class each model predicts, on the corrupted input, run in the shadow
graphs of the base and the patched files; |IG| summed over channels, each map scaled to
its own 99th percentile. "On trigger" is the share of |IG| on the pixels where the pair's
corrupted input differs from its clean one.

matplotlib and Pillow are an optional extra (``pip install 'onnx-rectify[report]'``),
imported only here and only when a report is written.
"""
from __future__ import annotations

from pathlib import Path


from patcher.errors import OutputError, RectifyError

from patcher.gate.report_format import _require_libraries, _resolve
from patcher.gate.report_html import _page
from patcher.gate.report_images import _heatmaps, _score_chart


def writes_name(name: str) -> bool:
    """Whether the HTML report may write a file of this name into its folder."""
    return name == "index.html" or name.endswith(".png")


def require_libraries() -> None:
    """Refuse (exit 2) now, before any work, when the HTML report's libraries are missing."""
    _require_libraries()


def referenced_files(patch_report: dict, base_dir: Path | None = None) -> dict[str, Path]:
    """The files a patch report names that the HTML report reads (model, output, pairs,
    eval), as found on disk (see :func:`write_report`)."""
    if not isinstance(patch_report, dict):
        return {}
    found = {k: _resolve(patch_report.get(k), base_dir) for k in ("model", "output", "pairs",
                                                                   "eval")}
    return {f"the report's {k}": p for k, p in found.items() if p is not None}


def write_report(patch_report: dict, out_dir: Path, verify_report: dict | None = None,
                 attack_path: Path | None = None, max_pairs: int = 5, *,
                 base_dir: Path | None = None, run_verify: bool = True, device: str = "cpu",
                 provider: str = "auto", steps: int = 32,
                 read_from: dict[str, Path] | None = None) -> Path:
    """Write ``index.html`` and its PNG images into ``out_dir`` (created if needed) from a
    patch report (``PatchReport.as_dict()`` or the JSON of ``patch --report``); returns the
    path of ``index.html``.

    ``verify_report`` is a ``VerifyReport.as_dict()`` (or ``verify --json``); when it is None
    and ``run_verify`` is set, ``patcher.gate.verify.verify`` is run on the base and written
    models (with ``attack_path`` and the pairs). ``attack_path`` also adds heatmaps of up to
    ``max_pairs`` held-out triggered inputs. Paths in the report are taken as written, else
    relative to ``base_dir`` (e.g. the report file's folder). Heatmaps and the verify run
    are skipped, with a note on the page, when the files they need are gone. ``read_from``
    overrides where those files (keys model, output, pairs, eval) are read from."""
    _require_libraries()
    if not isinstance(patch_report, dict) or not isinstance(patch_report.get("result"), dict):
        raise RectifyError("not a patch report: expected the JSON written by "
                           "'onnx-rectify patch --report' (no 'result' object found)")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out_dir}: cannot create the folder ({exc.strerror})") from None
    from patcher.model.modelio import write_bytes_atomic, write_text_atomic

    def write(name: str, data: bytes) -> None:
        write_bytes_atomic(out_dir / name, data)

    res = patch_report["result"]
    files = {k: _resolve(patch_report.get(k), base_dir) for k in ("model", "output", "pairs", "eval")}
    files.update(read_from or {})  # e.g. the written model, still in its staging folder
    if attack_path is not None and not Path(attack_path).is_file():
        raise RectifyError(f"{attack_path}: no such file")
    notes: list[str] = []

    chart = None
    if res.get("scores"):
        edited = {e.get("layer") for e in res.get("edits") or []}
        tried = {r.get("layer") for r in res.get("rounds") or []}
        chart = "scores.png"
        write(chart, _score_chart(res["scores"], edited, tried))

    pair_rows, attack_rows = [], []
    missing = [f"{k} ({patch_report.get(k)})" for k in ("model", "output", "pairs") if files[k] is None]
    if missing:
        notes.append(f"no heatmaps: cannot find {', '.join(missing)}")
    elif max_pairs > 0:
        pair_rows, attack_rows, more = _heatmaps(files, out_dir, max_pairs, attack_path, steps,
                                                 device, write)
        notes += more

    verify_note = ""
    if verify_report is None and run_verify:
        if files["model"] and files["output"] and files["eval"]:
            from patcher.graph.support import load_supported_model as load_model
            from patcher.gate.verify import verify

            from patcher.progress import progress

            with progress(1, "report: release gate (verify)"):
                verify_report = verify(load_model(files["model"]), load_model(files["output"]),
                                       files["eval"], attack_path, files["pairs"],
                                       provider=provider).as_dict()
        else:
            verify_note = ": the base model, the written model or the eval set is gone"

    write_text_atomic(out_dir / "index.html",
                      _page(patch_report, verify_report, chart, pair_rows, attack_rows, notes,
                            verify_note, stored_precision(files["output"])))
    return out_dir / "index.html"


def stored_precision(path: Path | None) -> list[dict]:
    """The written model's records of edits written in a stored precision (int8 weights:
    provenance entries of kind ``quantized-writeback``); [] when there is no written model,
    it cannot be read, or it has none."""
    if path is None:
        return []
    from patcher.model.modelio import load_model
    from patcher.model.writeback import read_provenance

    try:
        prov = read_provenance(load_model(path, warn=False).proto) or {}
    except RectifyError:
        return []
    return [e for e in prov.get("edits") or []
            if isinstance(e, dict) and e.get("kind") == "quantized-writeback"]
