"""Rectification quality on the sample scenarios, measured under onnxruntime on written files.

    python benchmarks/rectify_eval.py [--scenarios backdoor_cnn,...] [--n 1,5] [--quick]
                                      [--json FILE] [--markdown FILE]

For each scenario and pair count n it runs the strategies side by side (dynamic with
corruption transplant, dynamic without, static, finetune, CARE), writes each patched model
to a temporary folder, and measures it with onnxruntime on the held-out sets:
backdoor: OA on test.npz and ASR on attack.npz; spurious: accuracy and the gap between
the class's patterned and clean test sets; leakage: accuracy and the input-IG share on
the null block. It also ranks layers by brute force (one forced edit per layer, n=1)
and reports top-1 / top-3 recall of ``locate`` and of the causal rankings (CARE).
``--merge FILE`` adds a run's rows to stored results; ``--render FILE --markdown F``
and ``--render FILE --readmes`` write RECTIFY_RESULTS.md and the samples' tables.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from patcher.errors import RectifyError  # noqa: E402
from patcher.gate import metrics  # noqa: E402
from patcher.model.modelio import load_model  # noqa: E402
from patcher.rectify import RectifyConfig, rectify  # noqa: E402
from patcher.rectify.locators import AttributionLocator, CausalLocator  # noqa: E402
from patcher.rectify.workspace import Workspace  # noqa: E402
from patcher.samples import InputSpec, load_labelled, load_pairs, num_classes_of  # noqa: E402
from patcher.graph.shadow import ShadowGraph  # noqa: E402
from patcher.model.writeback import apply_deltas, save_model  # noqa: E402

SAMPLES = ROOT / "samples"
STRATEGIES = {
    "dynamic": dict(strategy="dynamic", transplant="paste"),
    "dynamic-plain": dict(strategy="dynamic", transplant="none"),
    "static": dict(strategy="static", transplant="paste"),
    "static-plain": dict(strategy="static", transplant="none"),
    "finetune": dict(strategy="finetune", transplant="none"),
    "care": dict(strategy="care", transplant="paste"),
    # the attribution objective (silencing edits): for feature leakage
    "dynamic-attribution": dict(strategy="dynamic", objective="attribution"),
}


def _np(path):
    with np.load(path) as d:
        return {k: d[k] for k in d.files}


class Scenario:
    def __init__(self, name: str):
        self.name, self.folder = name, SAMPLES / name
        self.loaded = load_model(self.folder / "model.onnx")
        self.spec = InputSpec.of(self.loaded.proto)
        self.classes = num_classes_of(self.loaded.proto)
        self.eval = load_labelled(self.folder / "eval.npz", self.spec, self.classes)
        self.test = _np(self.folder / "test.npz")
        self.kind = ("backdoor" if name.startswith("backdoor") else name)

    def pairs(self, n):
        return load_pairs(self.folder / f"pairs_n{n}.npz", self.spec, self.classes)

    def measure(self, model_path, quick=False) -> dict:
        out = {"accuracy": metrics.accuracy(model_path, self.test["x"], self.test["y"],
                                            provider="cpu", show_progress=False)}
        if self.kind == "backdoor":
            a = _np(self.folder / "attack.npz")
            out["asr"] = metrics.attack_success_rate(model_path, a["x"], a["y"], int(a["target"]),
                                                     provider="cpu", show_progress=False)
        elif self.kind == "spurious":
            c, p = _np(self.folder / "spurious_clean.npz"), _np(self.folder / "spurious_pattern.npz")
            gap = metrics.spurious_gap(model_path, c["x"], c["y"], p["x"], p["y"], provider="cpu",
                                       show_progress=False)
            out.update(clean=gap.clean_accuracy, spurious=gap.spurious_accuracy, gap=gap.gap)
        elif self.kind == "leakage":
            t = _np(self.folder / "leakage_test.npz")
            k = 50 if quick else 300
            out["leakage"] = metrics.leakage(model_path, t["x"][:k], t["y"][:k],
                                             t["null_mask"][:k], steps=8 if quick else 32)
        return out


def run_one(sc: Scenario, n: int, config: RectifyConfig, tmp: Path, quick: bool) -> dict:
    graph = ShadowGraph(sc.loaded)
    start, cpu = time.perf_counter(), time.process_time()
    result = rectify(graph, sc.pairs(n), sc.eval, None, config)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    proto, _ = apply_deltas(sc.loaded, result.deltas)
    out = tmp / f"{sc.name}_{n}_{config.strategy}_{config.transplant}_{config.layer or ''}.onnx".replace("/", "_")
    save_model(proto, sc.loaded, out)
    row = sc.measure(out, quick)
    row.update(seconds=seconds, cpu_seconds=cpu, tensors=len(result.deltas),
               layers=[r.layer for r in result.rounds if r.kept],
               rounds=len(result.rounds), met_target=result.met_target)
    return row


def localisation(sc: Scenario, tmp: Path, quick: bool) -> dict:
    """Brute force: one forced edit per layer (n=1, transplant as by default); compare
    with locate's rankings (whitened and inverse scores, IG and path attribution)."""
    key = {"backdoor": "asr", "spurious": "gap", "leakage": "leakage"}[sc.kind]
    rankings = {}
    for score in ("whitened", "inverse"):
        for form in ("ig", "path"):
            graph = ShadowGraph(sc.loaded)
            ws = Workspace(graph, sc.pairs(1), sc.eval, None,
                           RectifyConfig(score=score, attribution_form=form), "cpu")
            rankings[f"{score}/{form}"] = [s.layer for s in AttributionLocator().rank(ws)]
    brute = {}
    for layer in rankings["whitened/ig"]:
        row = run_one(sc, 1, RectifyConfig(strategy="static", layer=layer), tmp, quick)
        brute[layer] = row[key] if key != "gap" else abs(row[key])
        print(f"  brute force {layer}: {key} {brute[layer]:.4f}", flush=True)
    best = sorted(brute, key=lambda k: brute[k])
    rankings.update(causal_rankings(sc))
    return {"metric": key, "brute_force": brute, "brute_order": best,
            "rankings": _hits(rankings, best)}


def _hits(rankings: dict, best: list) -> dict:
    return {k: {"ranking": v, "top1_hit": v[0] == best[0], "top3_hit": best[0] in v[:3]}
            for k, v in rankings.items()}


def causal_rankings(sc: Scenario) -> dict:
    """Causal localisation (n=1, transplant as by default): all layers, and the hidden
    layers that CARE chooses from."""
    ws = Workspace(ShadowGraph(sc.loaded), sc.pairs(1), sc.eval, None,
                   RectifyConfig(strategy="care"), "cpu")
    hidden = CausalLocator(hidden_only=True).effects(ws)
    return {"causal": [e.layer for e in CausalLocator().effects(ws)],
            "causal/hidden (CARE)": [e.layer for e in hidden]}


def add_causal(results: dict, names: list[str]) -> None:
    """Add causal rankings to the stored localisation results (brute force reused)."""
    for name in names:
        loc = results["localisation"][name]
        rankings = {k: v["ranking"] for k, v in loc["rankings"].items()}
        rankings.update(causal_rankings(Scenario(name)))
        loc["rankings"] = _hits(rankings, loc["brute_order"])
        print(name, "causal", json.dumps(loc["rankings"]["causal"]), flush=True)


def markdown(results: dict) -> str:
    """The paper's table layout per scenario: method x n, with OA and the fault's measure."""
    names = {"trained": "trained model", "finetune": "fine-tune last layer",
             "care": "CARE (units feeding the first dense layer, particle swarm)",
             "static": "static (last layer, transplant)", "static-plain": "static (last layer, plain)",
             "dynamic": "dynamic (transplant, default)", "dynamic-plain": "dynamic (plain)",
             "dynamic-attribution": "dynamic, `--objective attribution` (silencing)"}
    out = []
    for scenario in dict.fromkeys(r["scenario"] for r in results["rows"]):
        rows = [r for r in results["rows"] if r["scenario"] == scenario]
        kind = "backdoor" if scenario.startswith("backdoor") else scenario
        cols = {"backdoor": [("OA", "accuracy"), ("ASR", "asr")],
                "spurious": [("OA", "accuracy"), ("class 0 clean", "clean"),
                             ("class 0 with pattern", "spurious"), ("gap", "gap")],
                "leakage": [("OA", "accuracy"), ("leakage share", "leakage")]}[kind]
        out.append(f"## {scenario}\n")
        out.append("| method | n | " + " | ".join(c for c, _ in cols) + " | edited layers | seconds |")
        out.append("|---|---|" + "---|" * len(cols) + "---|---|")
        for r in rows:
            if "refused" in r:
                out.append(f"| {names.get(r['strategy'], r['strategy'])} | {r['n'] or '-'} | "
                           f"refused: {r['refused']} |" + " |" * (len(cols) + 1))
                continue
            vals = " | ".join(f"{100 * r[k]:.2f}%" if k != "leakage" else f"{r[k]:.3f}"
                              for _, k in cols)
            layers = ", ".join(dict.fromkeys(r.get("layers", []))) or "-"
            secs = f"{r['seconds']:.1f}" if "seconds" in r else "-"
            if "cpu_seconds" in r:
                secs += f" ({r['cpu_seconds']:.0f} CPU)"
            out.append(f"| {names.get(r['strategy'], r['strategy'])} | {r['n'] or '-'} | {vals} | "
                       f"{layers} | {secs} |")
        loc = results.get("localisation", {}).get(scenario)
        if loc:
            best = loc["brute_order"]
            out.append(f"\nLocalisation (n = 1): brute-force best layer `{best[0]}` "
                       f"({loc['metric']} {loc['brute_force'][best[0]]:.4f}); ")
            out.append("; ".join(f"{k}: top-1 {'hit' if v['top1_hit'] else 'miss'}, top-3 "
                                 f"{'hit' if v['top3_hit'] else 'miss'}"
                                 for k, v in loc["rankings"].items()) + ".\n")
            picks = {k: v["ranking"][0] for k, v in loc["rankings"].items()}
            out.append("| ranking | picks | brute-force rank of the pick |\n|---|---|---|")
            out.append(f"| brute force ({loc['metric']}) | `{best[0]}` | 1 |")
            for k, layer in picks.items():
                label = {"whitened/ig": "attribution (default: whitened, IG)",
                         "causal": "causal (all layers)",
                         "causal/hidden (CARE)": "causal, hidden layers (CARE's choice)"}.get(k, k)
                out.append(f"| {label} | `{layer}` | {best.index(layer) + 1} of {len(best)} |")
            out.append("")
        out.append("")
    return "\n".join(out)


def merge_rows(stored: list[dict], fresh: list[dict]) -> list[dict]:
    """Stored rows with fresh ones replacing those of the same scenario, n and strategy;
    ordered by scenario (as first seen), n, then strategy."""
    key = lambda r: (r["scenario"], r["n"], r["strategy"])  # noqa: E731
    rows = {key(r): r for r in stored}
    rows.update({key(r): r for r in fresh})
    scenarios = list(dict.fromkeys(r["scenario"] for r in stored + fresh))
    order = {name: i for i, name in enumerate(["trained", *STRATEGIES])}
    return sorted(rows.values(), key=lambda r: (scenarios.index(r["scenario"]), r["n"],
                                                order.get(r["strategy"], len(order))))


def write_markdown(path: Path, results: dict) -> None:
    """The tables into ``path``, keeping the text it has before its first table heading."""
    text = markdown(results)
    if path.exists():
        old = path.read_text()
        first = old.find("\n## ")
        if first >= 0:
            text = old[:first + 1] + text
    path.write_text(text)


def sync_readmes(results: dict) -> None:
    """Replace each sample README's tables under "## Rectification results" (everything
    from the first table to the next heading) with the rendered results."""
    for scenario in dict.fromkeys(r["scenario"] for r in results["rows"]):
        readme = SAMPLES / scenario / "README.md"
        text = readme.read_text()
        head = text.find("## Rectification results")
        if head < 0:
            continue
        start = text.find("\n|", head) + 1
        end = text.find("\n## ", start)
        end = len(text) if end < 0 else end + 1
        one = {"rows": [r for r in results["rows"] if r["scenario"] == scenario],
               "localisation": {k: v for k, v in results.get("localisation", {}).items()
                                if k == scenario}}
        block = markdown(one).split("\n", 2)[2].strip() + "\n\n"  # drop the "## name" line
        readme.write_text(text[:start] + block + text[end:])
        print(f"updated {readme}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenarios", default="backdoor_cnn,backdoor_resnet,spurious,leakage")
    ap.add_argument("--n", default="1,5")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--no-localisation", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None, help="Also write the tables as markdown.")
    ap.add_argument("--render", default=None, help="Only render --markdown from this JSON.")
    ap.add_argument("--readmes", action="store_true", help="With --render: write the tables "
                    "into the samples' READMEs.")
    ap.add_argument("--merge", default=None, help="Add this run's rows (and causal rankings "
                    "with --causal-only) to the results in this JSON, in place.")
    ap.add_argument("--causal-only", action="store_true", help="Localisation: only add the "
                    "causal rankings to the --merge file's (brute force reused).")
    args = ap.parse_args()
    if args.render:
        rendered = json.loads(Path(args.render).read_text())
        if args.readmes:
            sync_readmes(rendered)
        elif args.markdown:
            write_markdown(Path(args.markdown), rendered)
        else:
            print(markdown(rendered))
        return
    torch.manual_seed(0)
    if args.causal_only:
        merged = json.loads(Path(args.merge).read_text())
        add_causal(merged, args.scenarios.split(","))
        Path(args.merge).write_text(json.dumps(merged, indent=2) + "\n")
        return
    results = {"rows": [], "localisation": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.scenarios.split(","):
            sc = Scenario(name)
            base = sc.measure(sc.folder / "model.onnx", args.quick)
            results["rows"].append({"scenario": name, "n": 0, "strategy": "trained", **base})
            print(name, "trained", json.dumps(base), flush=True)
            for n in [int(v) for v in args.n.split(",")]:
                for strat in args.strategies.split(","):
                    try:
                        row = run_one(sc, n, RectifyConfig(**STRATEGIES[strat]), tmp,
                                      args.quick)
                    except RectifyError as err:  # a strategy that does not apply: say so
                        row = {"refused": str(err)}
                    results["rows"].append({"scenario": name, "n": n, "strategy": strat, **row})
                    print(name, n, strat, json.dumps(row), flush=True)
            if not args.no_localisation:
                loc = localisation(sc, tmp, args.quick)
                results["localisation"][name] = loc
                print(name, "localisation", json.dumps(loc), flush=True)
    if args.merge:
        merged = json.loads(Path(args.merge).read_text())
        merged["rows"] = merge_rows(merged["rows"], results["rows"])
        merged["localisation"].update(results["localisation"])
        Path(args.merge).write_text(json.dumps(merged, indent=2) + "\n")
        results = merged
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.markdown:
        write_markdown(Path(args.markdown), results)


if __name__ == "__main__":
    main()
