"""Verbs that rectify: locate, patch, demo."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from patcher.gate.defaults import MAX_ACCURACY_DROP, MAX_GAP, PATCH_GAP
from patcher.cli.common import (CARE_MULTIPLIER, FRACTION, SEED, STEPS, Range, check_paths,
                                json_text, write_json, main, reports_errors)


class MemorySize(click.ParamType):
    """A size in bytes written as 4G, 512M, 2.5GB or a plain number of bytes."""

    name = "size"

    def convert(self, value, param, ctx):
        from patcher.errors import RectifyError
        from patcher.rectify.budget import parse_memory

        if isinstance(value, int):
            return value
        try:
            return parse_memory(value)
        except RectifyError as exc:
            self.fail(str(exc).removeprefix("--max-memory "), param, ctx)


MEMORY = MemorySize()


@main.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Work folder, kept (default: a new temporary folder, removed at the end).")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="onnxruntime execution provider.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="Where the shadow graph runs.")
@click.option("--force", is_flag=True, help="Overwrite the demo's files in --out.")
@reports_errors
def demo(out_dir: Path | None, provider: str, device: str, force: bool) -> None:
    """Patch the bundled trojaned MNIST sample with one corrupted/clean pair and print OA and
    ASR before and after. Works in a temporary folder that is removed at the end (or in the
    --out folder, which is kept), never in the installed package."""
    import tempfile

    from patcher.demo import check_work_folder, format_demo, run_demo

    from patcher.progress import status as log

    if out_dir is not None:
        check_work_folder(out_dir, force)
        click.echo(format_demo(run_demo(out_dir, provider, device, log=log, force=force)))
        return
    with tempfile.TemporaryDirectory(prefix="onnx-rectify-demo-") as work:
        text = format_demo(run_demo(Path(work), provider, device, log=log, force=force),
                           kept=False)
    click.echo(text)


def _rectify_options(fn):
    """Options shared by locate and patch."""
    opts = [
        click.option("--pairs", "pairs_path", required=True,
                     type=click.Path(dir_okay=False, path_type=Path),
                     help="npz with corrupted, clean, label."),
        click.option("--calib", "calib_path", type=click.Path(dir_okay=False, path_type=Path),
                     default=None, help="npz with x (and y): calibration inputs for the key "
                     "statistics (default: the eval inputs)."),
        click.option("--steps", type=STEPS, default=16, show_default=True,
                     help="Integrated-Gradients steps."),
        click.option("--score", type=click.Choice(["whitened", "inverse"]), default="whitened",
                     show_default=True, help="Editability: keys whitened by C^-1/2, or the "
                     "paper's literal C^-1."),
        click.option("--transplant", type=click.Choice(["paste", "add", "none"]), default="paste",
                     show_default=True, help="Carry the pairs' corruption onto calibration "
                     "images (more keys from few pairs; a held-out gap for the loop)."),
        click.option("--transplant-count", type=click.IntRange(1, 10000), default=40,
                     show_default=True, help="Calibration images that receive the corruption "
                     "and join the fit."),
        click.option("--heldout-count", type=click.IntRange(1, 10000), default=200,
                     show_default=True, help="Further calibration images that receive it "
                     "only to measure the gaps the loop steers by (never fitted)."),
        click.option("--attribution", type=click.Choice(["ig", "path"]), default="ig",
                     show_default=True, help="Layer attribution: Integrated Gradients (paper "
                     "Eq. 3) or its path-derivative form (complete for internal layers)."),
        click.option("--allow-shared", is_flag=True, help="Also edit weights that several "
                     "nodes share (the edit then applies to all of them)."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                     show_default=True, help="Where the shadow graph runs."),
        click.option("--seed", type=SEED, default=0, show_default=True,
                     help="Seed of the transplant's choice of images (and of --stat-rows)."),
        click.option("--statistics", "statistics", type=click.Choice(["auto", "exact", "kronecker"]),
                     default="auto", show_default=True,
                     help="How the key statistics C are computed for ranking layers: exact, "
                     "Kronecker-factored (channel x kernel offset, eigenvalue-corrected) for "
                     "spatial convolutions, or auto: factored where the exact C would cost "
                     "more than the conv itself. Edits always use the exact C."),
        click.option("--stat-rows", type=click.IntRange(1, 1 << 24), default=None,
                     help="Cap the keys per layer used for the key statistics C (a seeded "
                     "uniform sample; default: all). Faster on wide conv layers, less exact."),
        click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
                     help="Cache key statistics here (keyed by model, layer and data hashes)."),
        click.option("--exclude-layer", "exclude_layers", multiple=True, metavar="NAME",
                     help="Leave this layer (node name) out: never ranked, no statistics, "
                     "never edited. Repeatable."),
        click.option("--max-memory", type=MEMORY, default=None,
                     help="Refuse (exit 2) before any work when the up-front estimate of peak "
                     "memory exceeds this size (e.g. 4G, 512M)."),
        click.option("--batch", type=click.IntRange(1, 4096), default=None,
                     help="Inputs per forward in the statistics, accuracy and gap passes "
                     "(bounds peak memory; default: from the model's largest activation, "
                     "at most 128)."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@_rectify_options
@click.option("--eval", "eval_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="npz with x, y (calibration when --calib is not given).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write the ranking as JSON (\"ranking\": a list, best first).")
@click.option("--method", type=click.Choice(["attribution", "causal"]), default="attribution",
              show_default=True, help="Editability from Integrated Gradients (the paper), or "
              "causal effect by intervention (CARE): swap the layer's top neurons' clean "
              "outputs into the corrupted run and measure the restored share of the gap.")
@click.option("--top-fraction", type=Range(0.0, 1.0, min_open=True), default=0.1,
              show_default=True,
              help="--method causal: share of a layer's neurons that are swapped.")
@reports_errors
def locate(model: Path, pairs_path: Path, calib_path: Path | None, steps: int, score: str,
           transplant: str, transplant_count: int, heldout_count: int, attribution: str,
           allow_shared: bool, device: str, seed: int,
           statistics: str, stat_rows: int | None, cache_dir: str | None,
           exclude_layers: tuple[str, ...], max_memory: int | None, batch: int | None,
           eval_path: Path | None, json_path: str | None,
           method: str, top_fraction: float) -> None:
    """Rank MODEL's editable layers by editability (or causal effect) for the given
    corrupted/clean pairs."""
    from patcher.patch import load_inputs, locate as run_locate, locate_causal, warn_completeness
    from patcher.rectify import RectifyConfig

    reads = {"MODEL": model, "--pairs": pairs_path, "--eval": eval_path, "--calib": calib_path}
    check_paths(reads, {"--json": json_path})
    if cache_dir is not None:
        from patcher.model.paths import check_output_folder

        check_output_folder("--cache-dir", Path(cache_dir))
    inputs = load_inputs(model, pairs_path, eval_path, calib_path)
    check_paths(inputs.reads, {"--json": json_path})
    config = RectifyConfig(steps=steps, score=score, transplant=transplant, seed=seed,
                           transplant_count=transplant_count, heldout_count=heldout_count,
                           attribution_form=attribution, allow_shared=allow_shared,
                           cache_dir=cache_dir, causal_top_fraction=top_fraction,
                           stat_rows=stat_rows, statistics=statistics,
                           exclude_layers=tuple(exclude_layers), max_memory=max_memory,
                           batch=batch)
    from patcher.patch import resolve_device
    from patcher.rectify.budget import preflight

    preflight(inputs.loaded.proto, "locate", len(inputs.eval_set.x),
              len(inputs.calib_x if inputs.calib_x is not None else inputs.eval_set.x),
              len(inputs.pairs), config, str(resolve_device(device)))
    if method == "causal":
        _locate_causal(*locate_causal(inputs, config, device), json_path)
        return
    ranking = run_locate(inputs, config, device)
    width = max(len(s.layer) for s in ranking)
    click.echo(f"{'rank':>4}  {'layer':<{width}}  {'score':>12}  {'IG completeness error':>21}"
               f"  key statistics")
    for i, s in enumerate(ranking, 1):
        click.echo(f"{i:>4}  {s.layer:<{width}}  {s.score:>12.5g}  {s.completeness_error:>21.3g}"
                   f"  {s.statistics}")
    warn_completeness(ranking, attribution)  # the same line as patch
    if json_path:
        write_json(json_path, {"method": "attribution", "ranking": [
            {"rank": i, "layer": s.layer, "score": s.score,
             "completeness_error": s.completeness_error, "statistics": s.statistics}
            for i, s in enumerate(ranking, 1)]})


def _locate_causal(effects, attribution_ranking, json_path: str | None) -> None:
    from patcher.analysis.causal import rank_agreement

    width = max(len(e.layer) for e in effects)
    click.echo(f"{'rank':>4}  {'layer':<{width}}  {'restored (top neurons)':>22}  "
               f"{'neurons swapped':>15}  {'restored (all)':>14}")
    for i, e in enumerate(effects, 1):
        click.echo(f"{i:>4}  {e.layer:<{width}}  {e.score:>22.1%}  "
                   f"{f'{e.top} of {e.neurons}':>15}  {e.restored:>14.1%}")
    agreement = rank_agreement([e.layer for e in effects], [s.layer for s in attribution_ranking])
    click.echo(f"attribution ranking: {', '.join(s.layer for s in attribution_ranking[:3])}"
               f"{', ...' if len(attribution_ranking) > 3 else ''}; same top-1: "
               f"{'yes' if agreement['top1_same'] else 'no'}, top-3 overlap "
               f"{agreement['top3_overlap']}, Spearman {agreement['spearman']:.2f}")
    if json_path:
        write_json(json_path, {"method": "causal", "ranking": [
            {"rank": i, "layer": e.layer, "score": e.score, "restored_all": e.restored,
             "neurons": e.neurons, "swapped": e.top_neurons}
            for i, e in enumerate(effects, 1)]})


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@_rectify_options
@click.option("--eval", "eval_path", required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="npz with x, y: clean data for the accuracy budget.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output file (default: MODEL.rectified.onnx beside the input).")
@click.option("--budget", type=FRACTION, default=MAX_ACCURACY_DROP, show_default=True,
              help="Largest accuracy drop allowed on the eval set (0.01 = 1 point); the "
              "default is verify's --max-accuracy-drop, so a patch within it passes the "
              "gate's accuracy check.")
@click.option("--gap", "gap_target", type=FRACTION, default=PATCH_GAP, show_default=True,
              help="Target pair gap: mean of p_y(clean) - p_y(corrupted). The loop steers by "
              "it on held-out transplanted pairs (calibration images given the pairs' "
              "corruption, never fitted; with --transplant none, on the pairs); the exit "
              "status checks it on the given pairs in the written file. verify --max-gap "
              f"(default {MAX_GAP}) gates the pairs given to verify; this target is "
              "stricter.")
@click.option("--max-rounds", type=click.IntRange(0, 100), default=10, show_default=True,
              help="Round limit of the loop.")
@click.option("--strategy", type=click.Choice(["dynamic", "static", "finetune", "care"]),
              default="dynamic", show_default=True, help="dynamic: the paper's loop; static: "
              "one edit at the last layer; finetune: fine-tune the last layer; care: CARE's "
              "repair (multipliers on the units feeding the first dense layer, particle "
              "swarm).")
@click.option("--objective", type=click.Choice(["prediction", "attribution"]),
              default="prediction", show_default=True, help="prediction: remove the "
              "corruption's effect on the output (backdoor, spurious pattern); attribution: "
              "lower the share of input attribution on the corrupted region (feature "
              "leakage) with silencing edits (--strategy dynamic; --gap is not used).")
@click.option("--care-neurons", type=click.IntRange(1, 1 << 20), default=None,
              help="--strategy care: units to repair (default: grown 5, 10, 20, 40, 80 "
              "while the triggered images' attack rate falls).")
@click.option("--care-min-multiplier", type=CARE_MULTIPLIER, default=-10.0, show_default=True,
              help="--strategy care: lowest multiplier the swarm may put on a unit (the "
              "original's -10; below 0 flips the unit's sign).")
@click.option("--care-max-multiplier", type=CARE_MULTIPLIER, default=10.0, show_default=True,
              help="--strategy care: highest multiplier (above --care-min-multiplier).")
@click.option("--care-triggered", type=click.IntRange(0, 100000), default=1000,
              show_default=True, help="--strategy care: eval images outside the target "
              "class that receive a pair's corruption and join the pairs in the triggered "
              "set (0: the pairs only).")
@click.option("--care-eval", type=click.IntRange(1, 100000), default=1000,
              show_default=True, help="--strategy care: clean eval images in the swarm's "
              "objective (at most).")
@click.option("--care-objective", type=click.Choice(["rate", "ce"]), default="rate",
              show_default=True, help="--strategy care: rate: CARE's (1 - alpha) x attack "
              "rate + alpha x (1 - accuracy); ce: cross-entropy on both sets.")
@click.option("--care-alpha", type=FRACTION, default=0.2, show_default=True,
              help="--strategy care: weight of the accuracy loss in the rate objective.")
@click.option("--care-ranking", type=click.Choice(["care", "swap"]), default="swap",
              show_default=True, help="--strategy care: which ranking picks the units: "
              "care (CARE's score) or swap (ours: the share removed by the clean twin's "
              "value).")
@click.option("--care-particles", type=click.IntRange(1, 1000), default=20, show_default=True,
              help="--strategy care: particles of the swarm.")
@click.option("--care-iterations", type=click.IntRange(0, 10000), default=100,
              show_default=True, help="--strategy care: most swarm iterations.")
@click.option("--care-patience", type=click.IntRange(1, 10000), default=20, show_default=True,
              help="--strategy care: stop after this many iterations without gain.")
@click.option("--layer", default=None, help="Force one edit at this layer (node name).")
@click.option("--solver", type=click.Choice(["closed", "iterative"]), default="closed",
              show_default=True, help="Rank-one solve: closed-form least squares, or the "
              "paper's iterative optimiser (Adam, rank-one projection every 10 steps).")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="onnxruntime provider for verification.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None,
              help="Write everything (rounds, scores, metrics, timings, hashes) as JSON.")
@click.option("--report-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write an HTML report (rounds, scores chart, attribution heatmaps before and "
                   "after, verify results) into this folder; needs onnx-rectify[report].")
@click.option("--attack", "attack_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="npz with x, y, target: prints the attack success rate of "
              "the input and the written file (onnxruntime) and adds it to --report and the "
              "HTML report.")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@reports_errors
def patch(model: Path, pairs_path: Path, calib_path: Path | None, steps: int, score: str,
          transplant: str, transplant_count: int, heldout_count: int, attribution: str,
          allow_shared: bool, device: str, seed: int,
          statistics: str, stat_rows: int | None, cache_dir: str | None,
          exclude_layers: tuple[str, ...], max_memory: int | None, batch: int | None,
          eval_path: Path, output: Path | None,
          budget: float, gap_target: float, max_rounds: int, strategy: str, objective: str,
          layer: str | None, care_neurons: int | None, care_min_multiplier: float,
          care_max_multiplier: float, care_triggered: int, care_eval: int,
          care_objective: str, care_alpha: float, care_ranking: str, care_particles: int,
          care_iterations: int, care_patience: int, solver: str, provider: str,
          report_path: str | None, report_dir: Path | None, attack_path: Path | None,
          force: bool) -> None:
    """Patch MODEL's weights (rank-one edits; CARE's neuron rows with --strategy care) and
    write the result (same graph, new weight values), verified under onnxruntime from
    disk. Exit 0 when the pairs' gap meets --gap within --budget on the written file
    (for a corruption with a target class, such as a backdoor: when the target-class gap
    the loop removes meets --gap or falls to 1% of its base, the pairs' gap printed beside
    it; with --objective attribution: when an edit lowered the attribution share within
    --budget), 1 when not (the best model found is still written), 2 for bad input."""
    from patcher.patch import patch as run_patch
    from patcher.rectify import RectifyConfig
    from patcher.rectify.config import check_config

    from patcher.patch import default_output

    out = output if output is not None else default_output(model)
    reads = {"MODEL": model, "--pairs": pairs_path, "--eval": eval_path, "--calib": calib_path,
             "--attack": attack_path}
    writes = {"-o": out, "-o's data file": out.with_name(f"{out.name}.data"),
              "--report": report_path}
    check_paths(reads, writes)  # -o's --force: once the model's data files are known
    _check_folders(report_dir, cache_dir, {**reads, **writes})
    attack = _load_attack(model, attack_path) if attack_path is not None else None
    config = RectifyConfig(strategy=strategy, objective=objective, budget=budget,
                           gap=gap_target, max_rounds=max_rounds, layer=layer, steps=steps,
                           score=score,
                           transplant=transplant, transplant_count=transplant_count,
                           heldout_count=heldout_count, seed=seed, attribution_form=attribution,
                           allow_shared=allow_shared, cache_dir=cache_dir, solver=solver,
                           stat_rows=stat_rows, statistics=statistics,
                           care_neurons=care_neurons, exclude_layers=tuple(exclude_layers),
                           max_memory=max_memory, batch=batch,
                           care_range=(care_min_multiplier, care_max_multiplier),
                           care_triggered=care_triggered, care_eval=care_eval,
                           care_objective=care_objective, care_alpha=care_alpha,
                           care_ranking=care_ranking, care_particles=care_particles,
                           care_iterations=care_iterations, care_patience=care_patience)
    check_config(config)  # e.g. an empty CARE multiplier range: refused before any work
    extras: dict = {}

    def stage_reports(rep, outputs, staged_model: Path) -> None:
        """The reports, staged beside their targets and committed with the model."""
        if attack is not None:  # measured on the written file, before it is renamed
            extras["attack"] = _attack_rates(model, staged_model, attack, provider)
        if report_path:
            payload = rep.as_dict()
            if "attack" in extras:
                payload["attack"] = {"path": str(attack_path), **extras["attack"]}
            outputs.add_text(Path(report_path), json_text(payload))
        if report_dir is not None:
            from patcher.gate.report import write_report

            write_report(rep.as_dict(), outputs.tree(report_dir), attack_path=attack_path,
                         device=rep.device, provider=provider,
                         read_from={"output": staged_model})

    rounds = _RoundTable("share" if objective == "attribution" else "gap")
    report = run_patch(model, pairs_path, eval_path, calib_path, out, config, device,
                       provider, force, log=rounds,
                       attack=attack_path, writes={"--report": report_path and Path(report_path)},
                       stage_reports=stage_reports)
    r, v = report.result, report.verification
    for rd in r.rounds[rounds.printed:]:  # a strategy whose rounds the loop did not hand over
        rounds.on_round(rd)
    if not rounds.printed:
        rounds.header()
    click.echo(f"wrote {', '.join(report.written)}")
    click.echo(f"onnxruntime ({v.provider}), reloaded from disk: accuracy {v.base_accuracy:.2%} -> "
               f"{v.patched_accuracy:.2%}, pair gap {v.base_pair_gap:.4f} -> "
               f"{v.patched_pair_gap:.4f}, shadow parity "
               f"{'ok' if v.parity.get('within_tolerance') else 'FAILED'}")
    attack_figures = extras.get("attack")
    if attack_figures is not None:
        click.echo(f"attack success rate ({attack_path.name}, onnxruntime, "
                   f"{attack_figures['inputs']} triggered inputs not of class "
                   f"{attack.target}): {attack_figures['base_asr']:.2%} -> "
                   f"{attack_figures['patched_asr']:.2%}")
    if report_dir is not None:
        click.echo(f"report: {report_dir / 'index.html'}")
    if r.objective == "attribution":
        click.echo(f"attribution share on the corrupted region (shadow graph, on "
                   f"{r.gap_measured_on}): {r.base_gap:.4f} -> {r.final_gap:.4f}")
    elif r.final_target_gap is not None:
        click.echo(f"target-class gap (shadow graph, on {r.gap_measured_on}; the exit status "
                   f"is judged on it): {r.base_target_gap:.4f} -> {r.final_target_gap:.4f}"
                   + (f" ({r.stopped.removeprefix('stopping: ')})" if r.stopped else ""))
    if not report.passed:
        if not v.parity.get("within_tolerance", False):  # not a gap failure: say what it is
            click.echo("onnx-rectify: warning: parity FAILED: the shadow graph and onnxruntime "
                       "disagree on the written file beyond tolerance ("
                       + _parity_figures(v.parity) + "); the edit's figures were computed in "
                       "the shadow graph and may not hold under onnxruntime; the model was "
                       "written", err=True)
            sys.exit(1)
        if r.objective == "attribution":
            click.echo("onnx-rectify: warning: no edit lowered the attribution share within "
                       "--budget on the written file; the best model found was written", err=True)
        elif r.final_target_gap is not None:
            click.echo("onnx-rectify: warning: the target-class gap did not meet --gap, nor "
                       "was the corruption's effect gone, within --budget; the best model "
                       "found was written", err=True)
        else:
            click.echo("onnx-rectify: warning: the pairs' gap did not meet --gap within --budget on "
                       "the written file; the best model found was written", err=True)
        sys.exit(1)


def _parity_figures(parity: dict) -> str:
    """The parity figures of a verification, as text: steps or relative difference, top-1."""
    if parity.get("max_steps") is not None:
        what = (f"max diff {parity['max_steps']:.3g} output quantization step(s), tolerance "
                f"{parity.get('step_tolerance')}")
    else:
        what = (f"max rel diff {parity.get('max_rel_diff', float('nan')):.3g}, rtol "
                f"{parity.get('rtol')}")
    top1 = parity.get("top1_agreement")
    return what + ("" if top1 is None else f", top-1 agreement {top1:.0%}")


class _RoundTable:
    """The patch verb's log: status lines on stderr (:func:`patcher.progress.status`), and
    each finished round as one row of the round table on stdout, printed as the loop
    hands it over (``on_round``), so that a round is printed once."""

    def __init__(self, what: str) -> None:
        self.what, self.printed = what, 0

    def __call__(self, message: str) -> None:
        from patcher.progress import status

        status(message)

    def header(self) -> None:
        what = self.what
        click.echo(f"{'round':>5}  {'layer':<28} {'score':>10} {what + ' before':>12} "
                   f"{what + ' after':>11} {'target gap':>10} {'accuracy':>9}  decision")

    def on_round(self, rd) -> None:
        from patcher.progress import clear
        from patcher.rectify.results import format_accuracy

        clear()
        if not self.printed:
            self.header()
        self.printed += 1
        score_text = f"{rd.score:.4g}" if rd.score is not None else "-"
        tau = f"{rd.target_gap_after:.4f}" if rd.target_gap_after is not None else "-"
        click.echo(f"{rd.index:>5}  {rd.layer:<28} {score_text:>10} {rd.gap_before:>12.4f} "
                   f"{rd.gap_after:>11.4f} {tau:>10} "
                   f"{format_accuracy(rd.accuracy, rd.evaluated):>9}  {rd.reason}")


def _check_folders(report_dir: Path | None, cache_dir: str | None,
                   reads: dict[str, Path | None]) -> None:
    """Before any work: the HTML report's libraries are there, --report-dir and --cache-dir
    are (or can be made) folders one can write in, and no file read or written elsewhere
    is one the report would write into its folder."""
    from patcher.model.paths import check_folder_outputs, check_output_folder

    if report_dir is not None:
        from patcher.gate.report import require_libraries, writes_name

        require_libraries()
        check_output_folder("--report-dir", report_dir)
        check_folder_outputs("--report-dir", report_dir, reads, writes_name)
    if cache_dir is not None:
        check_output_folder("--cache-dir", Path(cache_dir))


def _load_attack(model: Path, attack_path: Path):
    """The attack set of ``patch --attack``, checked against MODEL before the patch runs
    (bad input exits 2 before any work)."""
    from patcher.model.modelio import load_model
    from patcher.samples import InputSpec, load_labelled, num_classes_of

    proto = load_model(model, warn=False).proto
    return load_labelled(attack_path, InputSpec.of(proto), num_classes_of(proto),
                         with_target=True)


def _attack_rates(model: Path, written: Path, attack, provider: str) -> dict:
    """ASR of the input model and of the written file under onnxruntime."""
    from patcher.gate.metrics import attack_success_rate

    rates = {key: attack_success_rate(path, attack.x, attack.y, attack.target, provider,
                                      label="attack")
             for key, path in (("base_asr", model), ("patched_asr", written))}
    return {**rates, "inputs": int((attack.y != attack.target).sum()), "target": attack.target}
