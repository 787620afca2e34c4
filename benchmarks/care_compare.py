"""CARE beside our strategies on the generalisation benchmark's unseen trojaned models.

    python benchmarks/care_compare.py [--cases a,b] [--strategies care,static,finetune]
                                      [--n 1,5] [--json FILE] [--markdown FILE] [--cache DIR]

Each case of ``benchmarks/generalisation.py`` is built again (seeded: the same trojaned
model as the stored run, checked by its OA and ASR before patching), patched with
``patcher.patch.patch`` for each strategy and pair count (defaults of ``RectifyConfig``
otherwise) and the written file measured under onnxruntime (OA on test.npz, ASR on
attack.npz). Rows of the stored generalisation results (``dynamic`` n = 1 and 5,
``static`` and ``finetune`` n = 1) are reused, not re-run, when ``--strategies`` leaves
them out: their code did not change. Edited tensors are counted from the written file's
provenance (a centred CARE repair edits a Gemm's weight and bias). ``--json`` merges the fresh rows into that file
(by case, strategy and n); ``--markdown`` writes the side-by-side table. Wall and CPU
seconds of each patch are recorded; the machine is shared, so seconds are indicative.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import onnx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from generalisation import CASES, build_case, measure, pct, run_patch  # noqa: E402
from patcher.model.writeback import read_provenance  # noqa: E402
from patcher.rectify import RectifyConfig  # noqa: E402

STORED = ROOT / "benchmarks" / "generalisation_results.json"
RESULTS = ROOT / "benchmarks" / "care_compare_results.json"
ORDER = ("dynamic", "static", "care", "finetune")
CASE_FILES = ("model.onnx", "eval.npz", "test.npz", "attack.npz", "pairs_n1.npz", "pairs_n5.npz")


def run(names: list[str], strategies: list[str], ns: list[int],
        cache: Path | None = None) -> list[dict]:
    """Fresh rows for the cases ``names``; with ``cache``, each case is built into
    ``cache``/<case> unless its model.onnx and npz files are already there."""
    stored = {c["name"]: c for c in json.loads(STORED.read_text())["cases"]}
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in (c for c in CASES if c.name in names):
            folder = (cache or Path(tmp)) / case.name
            built = all((folder / f).exists() for f in CASE_FILES)
            if not built:
                folder.mkdir(parents=True, exist_ok=True)
                build_case(case, folder, quick=False)
            before = measure(folder / "model.onnx", folder)
            old = stored.get(case.name, {}).get("before")
            same = old is not None and abs(old["oa"] - before["oa"]) < 1e-9 \
                and abs(old["asr"] - before["asr"]) < 1e-9
            rec = {"name": case.name, "before": before, "same_model_as_stored": same,
                   "rows": []}
            print(f"== {case.name}: OA {pct(before['oa'])} ASR {pct(before['asr'])} "
                  f"(same as stored: {same})", flush=True)
            for strategy in strategies:
                for n in ns:
                    cpu = time.process_time()
                    try:
                        row = run_patch(folder, n, RectifyConfig(strategy=strategy), strategy)
                    except Exception as exc:  # a refusal is a row too
                        row = {"error": f"{type(exc).__name__}: {exc}", "layers": [],
                               "seconds": 0.0}
                    row["cpu_seconds"] = round(time.process_time() - cpu, 1)
                    if "error" not in row:
                        row["tensors"] = edited_tensors(folder / f"patched_{strategy}_n{n}.onnx")
                    keep = ("oa", "asr", "layers", "tensors", "seconds", "cpu_seconds", "error")
                    rec["rows"].append({"strategy": strategy, "n": n,
                                        **{k: row[k] for k in keep if k in row}})
                    print(f"  {strategy} n={n}: " + (row["error"] if "error" in row else
                          f"OA {pct(row['oa'])} ASR {pct(row['asr'])} layers {row['layers']} "
                          f"{row['seconds']} s"), flush=True)
            out.append(rec)
    return out


def edited_tensors(path: Path) -> list[str]:
    """The tensors the written file's provenance declares edited (a CARE repair at a Gemm
    with a bias edits its weight and its bias)."""
    edits = (read_provenance(onnx.load(str(path), load_external_data=False)) or {}).get(
        "edits", [])
    return list(dict.fromkeys(e["weight"] for e in edits))


def merged(fresh: list[dict], path: Path) -> dict:
    """Stored comparison rows (``path``) with ``fresh`` replacing the same case/strategy/n."""
    data = json.loads(path.read_text()) if path.exists() else {"cases": []}
    cases = {c["name"]: c for c in data["cases"]}
    for rec in fresh:
        old = cases.setdefault(rec["name"], {"name": rec["name"], "rows": []})
        old["before"], old["same_model_as_stored"] = rec["before"], rec["same_model_as_stored"]
        key = {(r["strategy"], r["n"]) for r in rec["rows"]}
        old["rows"] = [r for r in old["rows"] if (r["strategy"], r["n"]) not in key] + rec["rows"]
    data["cases"] = [cases[c.name] for c in CASES if c.name in cases]
    return data


def table(data: dict) -> str:
    """Side by side per case: dynamic, static, CARE, fine-tune at n = 1 and 5."""
    stored = {c["name"]: c for c in json.loads(STORED.read_text())["cases"]}
    lines = ["| case | before OA / ASR | n | " + " | ".join(ORDER) + " |",
             "|---|---|---|" + "---|" * len(ORDER)]
    for rec in data["cases"]:
        rows = {(r["strategy"], r["n"]): r for r in stored.get(rec["name"], {}).get("rows", [])}
        rows.update({(r["strategy"], r["n"]): r for r in rec["rows"]})
        b = rec["before"]
        for n in (1, 5):
            cells = []
            for s in ORDER:
                r = rows.get((s, n))
                if r is None:
                    cells.append("-")
                elif "error" in r:
                    cells.append("refused")
                else:
                    count = len(r.get("tensors", r["layers"]))
                    cells.append(f"{pct(r['asr'])} / {pct(r['oa'])} ({count} t, "
                                 f"{r['seconds']:.0f} s)")
            lines.append(f"| {rec['name']} | {pct(b['oa'])} / {pct(b['asr'])} | {n} | "
                         + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Cells: ASR / OA after (edited tensors, wall seconds), under onnxruntime on "
                 "the written file.")
    refusals = [(rec["name"], r) for rec in data["cases"] for r in rec["rows"] if "error" in r]
    for name, r in refusals:
        lines.append(f"- {name}, {r['strategy']} n = {r['n']}: {r['error']}")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=None)
    ap.add_argument("--strategies", default="care")
    ap.add_argument("--n", default="1,5")
    ap.add_argument("--json", type=Path, default=RESULTS)
    ap.add_argument("--markdown", type=Path, default=None)
    ap.add_argument("--render", action="store_true", help="only render --json")
    ap.add_argument("--cache", type=Path, default=None,
                    help="build the cases here, or reuse them when already built")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if not args.render:
        names = args.cases.split(",") if args.cases else [c.name for c in CASES]
        fresh = run(names, args.strategies.split(","), [int(v) for v in args.n.split(",")],
                    args.cache)
        data = merged(fresh, args.json)
        args.json.write_text(json.dumps(data, indent=2, default=float) + "\n")
    else:
        data = json.loads(args.json.read_text())
    text = table(data)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
