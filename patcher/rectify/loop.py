"""The one rectification loop: locate, propose, apply, measure, keep or roll back.

Every strategy is a :class:`Plan`: a locator (which layers), an edit kind (which
candidates), an objective (what is removed and how it is measured) and a keep rule.

- ``dynamic`` (default, paper Algorithm 1): while the objective's target is not reached,
  locate the most editable layer, apply a rank-one edit there, re-measure, keep it or
  roll it back (a rolled-back layer is excluded; a round limit holds).
- ``static`` / ``--layer``: one rank-one edit at the last (or the named) layer, one round.
- ``finetune``: Adam on the pairs at the last editable layer (the paper's baseline).
- ``--objective attribution`` (beyond the paper, feature leakage): every hidden layer and
  every silencing edit is tried per round and the one that removes the most attribution
  share affordably is kept (:mod:`patcher.edits.silence`).
- ``care``: CARE's repair (Sun et al., ICSE 2022): signed multipliers on the top units
  feeding the first dense layer (or ``--layer``), found by a particle swarm and written as
  scales of that layer's weight slices (:mod:`patcher.edits.care`).

The keep rule (``full``): a candidate must shrink the objective by MIN_GAP_GAIN of it,
stay within ``--budget`` of the base accuracy, and cost at most the objective's rate times
what it removed. ``budget`` (CARE) checks the budget only; ``accept`` (a fixed layer's one
edit, the paper's static and fine-tune baselines) keeps what it is asked to make.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from patcher.errors import BadSamplesError, RectifyError
from patcher.graph.shadow import ShadowGraph
from patcher.rectify.config import RectifyConfig
from patcher.rectify.editkinds import (Candidate, CareEditKind, EditKind, FinetuneEditKind,
                                       RankOneEditKind, SilencingEditKind, SkipLayer)
from patcher.rectify.locators import (AttributionLocator, FixedLocator, LayerListLocator,
                                      Locator, Log, UnitSiteLocator)
from patcher.rectify.objectives import GapObjective, Measure, Objective, ShareObjective
from patcher.rectify.results import RectifyResult, Round
from patcher.rectify.workspace import Workspace

KEEP_RULES = ("full", "budget", "accept")


@dataclass
class Plan:
    """A strategy as the loop runs it."""

    locator: Locator
    edit_kind: EditKind
    objective: Objective
    keep: str = "full"                 # KEEP_RULES
    rounds: int = 1
    #: ``first``: a round ends at the first kept candidate (and records the last one tried
    #: when none is kept); ``best``: every candidate of every ranked layer is tried and the
    #: one that removes the most is kept (nothing is recorded when none qualifies)
    selection: str = "first"
    layers_per_round: int | None = 1   # None: every layer the locator ranks
    #: which layers later rounds leave out: those ``rejected`` or those ``edited``
    exclude: str = "rejected"
    #: what the log says when no layer is left, and when nothing qualified (``best``)
    nothing_left: str = "no layer left to try"
    nothing_qualified: str = ""


@dataclass
class Verdict:
    kept: bool
    reason: str
    accuracy: float | None
    drop: float | None
    evaluated: int | None
    #: ``small`` (shrank too little), ``costly`` (budget or rate), or "" (kept)
    failure: str = ""


@dataclass
class Outcome:
    accuracy: float
    measure: Measure
    rounds: list[Round] = field(default_factory=list)
    scores: list = field(default_factory=list)
    kept: list[Candidate] = field(default_factory=list)
    #: why the loop stopped before its round limit ("" when it did not say)
    stopped: str = ""


#: Accuracies are counts over the eval set: a drop equal to the budget (0.99 - 0.98 vs 0.01)
#: must not fail on the float rounding of the subtraction.
ACCURACY_EPS = 1e-9


def judge(ws: Workspace, plan: Plan, candidate: Candidate, before: Measure, after: Measure,
          accuracy: float, base_accuracy: float, note: str) -> Verdict:
    """The keep rule for a candidate already applied and measured (``after``)."""
    budget = ws.config.budget
    objective = plan.objective
    if plan.keep == "accept":
        new_acc = ws.accuracy()
        return Verdict(True, candidate.reason or note, new_acc, base_accuracy - new_acc, None)
    if plan.keep == "budget":
        new_acc = ws.accuracy()
        drop = base_accuracy - new_acc
        if drop <= budget + ACCURACY_EPS:
            return Verdict(True, candidate.reason, new_acc, drop, None)
        return Verdict(False, f"accuracy drop {drop:.2%} over budget {budget:.2%}; rolled back",
                       new_acc, drop, None, "costly")
    if not objective.shrank_enough(before, after):
        return Verdict(False, objective.note_small(before, after), None, None, 0, "small")
    affordable = objective.affordable(before, after)
    new_acc = ws.accuracy(at_least=max(base_accuracy - budget, accuracy - affordable))
    drop = base_accuracy - new_acc
    evaluated = ws.last_evaluated if ws.last_evaluated < len(ws.eval_x) else None
    bound = "at least " if evaluated is not None else ""
    if drop > budget + ACCURACY_EPS or accuracy - new_acc > affordable + ACCURACY_EPS:
        reason = objective.note_costly(before, after, accuracy - new_acc, drop, affordable,
                                       budget, bound)
        kept, failure = False, "costly"
    else:
        reason, kept, failure = objective.note_kept(after), True, ""
    if evaluated is not None and plan.selection == "first":
        reason += f" (decided after {evaluated} of {len(ws.eval_x)} eval images)"
    return Verdict(kept, reason, new_acc, drop, evaluated, failure)


def apply(ws: Workspace, candidate: Candidate, sign: float = 1.0) -> None:
    for name, delta in candidate.deltas.items():
        ws.add(name, delta, sign)


def run(ws: Workspace, plan: Plan, base_accuracy: float, base: Measure, log: Log) -> Outcome:
    """The loop: per round, the locator's layers (up to ``layers_per_round``), each edit
    kind's candidates, each applied, measured by the objective and judged by the keep rule;
    a kept candidate stays (under ``best``, the best one is applied at the end of the
    round), the others are rolled back."""
    out = Outcome(base_accuracy, base)
    excluded: set[str] = set()
    ranking = None  # the last ranking, valid while the weights have not changed since
    for index in range(1, plan.rounds + 1):
        if plan.objective.reached(out.measure):
            out.stopped = plan.objective.note_reached(out.measure)
            if out.stopped:
                log(out.stopped)
            break
        if ranking is None:
            ranking = plan.locator.rank(ws, excluded, log)
            ranked = ranking
        else:  # the last round kept nothing: same weights, same scores, nothing recomputed
            ranked = [entry for entry in ranking if entry.layer not in excluded]
        if index == 1 and plan.locator.reports_scores:
            out.scores = ranked
        if not ranked:
            log(plan.nothing_left)
            break
        chosen = last = None  # (candidate, after, verdict, ranked entry)
        for entry in ranked[:plan.layers_per_round] if plan.layers_per_round else ranked:
            layer = ws.layer(entry.layer)
            try:
                for group in plan.edit_kind.propose(ws, layer):
                    tried = None
                    for candidate in group.candidates:
                        if not candidate.applied:
                            apply(ws, candidate)
                        after = plan.objective.measure()
                        try:
                            verdict = judge(ws, plan, candidate, out.measure, after,
                                            out.accuracy, base_accuracy,
                                            getattr(entry, "note", ""))
                        finally:
                            if plan.selection == "best":
                                apply(ws, candidate, -1.0)
                        tried = (candidate, verdict)
                        last = (candidate, after, verdict, entry)
                        if plan.selection == "first":
                            if verdict.kept:
                                chosen = last
                                break
                            apply(ws, candidate, -1.0)
                            continue
                        if verdict.failure == "costly" and group.growing:
                            break
                        if verdict.kept and (chosen is None or plan.objective.gain(
                                out.measure, after) > plan.objective.gain(out.measure,
                                                                          chosen[1])):
                            chosen = last
                    if tried is not None:
                        _say(log, plan.edit_kind, "group_line", index, layer, group.label,
                             tried[0], tried[1].reason)
                    if chosen is not None and plan.selection == "first":
                        break
            except SkipLayer as why:
                log(f"round {index}: {layer.name}: skipped ({why})")
                continue
            if chosen is not None and plan.selection == "first":
                break
        if plan.selection == "best":
            if chosen is None:
                log(plan.nothing_qualified)
                break
            candidate, after, verdict, entry = chosen
            apply(ws, candidate)
        elif last is None:
            break
        candidate, after, verdict, entry = chosen or last
        before = out.measure
        # a "best" round judged many candidates: its reason is what the kept one is
        reason = candidate.reason if plan.selection == "best" else verdict.reason
        out.rounds.append(Round(index, candidate.layer.name, entry.score, verdict.kept,
                                reason, before.value, after.value, verdict.accuracy,
                                verdict.drop, candidate.norm, candidate.fit_ratio,
                                verdict.evaluated, before.tau, after.tau,
                                scale=candidate.scale))
        if callable(getattr(log, "on_round", None)):  # the caller prints rounds itself
            log.on_round(out.rounds[-1])
        else:
            _say(log, plan.edit_kind, "round_line", index, entry.score, candidate, before,
                 after, verdict.accuracy, verdict.evaluated, verdict.reason)
        if verdict.kept:
            out.kept.append(candidate)
            out.accuracy, out.measure = verdict.accuracy, after
            plan.edit_kind.kept(ws, candidate)
            ranking = None  # new weights: the next round ranks again
            if plan.exclude == "edited":
                excluded.add(candidate.layer.name)
        elif plan.exclude == "rejected":
            excluded.add(candidate.layer.name)
    return out


def _say(log: Log, kind: EditKind, what: str, *args) -> None:
    """Log the edit kind's line ``what`` (``group_line``, ``round_line``) if it has one."""
    describe = getattr(kind, what, None)
    line = describe(*args) if describe is not None else None
    if line:
        log(line)


def make_plan(ws: Workspace, config: RectifyConfig) -> Plan:
    """The strategy and objective of ``config`` as a plan for :func:`run`."""
    layer = ws.layer(config.layer) if config.layer else None
    if config.objective == "attribution":
        share = ShareObjective(ws, ws.pairs)
        return Plan(LayerListLocator([layer] if layer else ws.hidden_layers()),
                    SilencingEditKind(share.key_examples, len(ws.pairs)), share,
                    rounds=config.max_rounds, selection="best", layers_per_round=None,
                    exclude="edited",
                    nothing_left="no silencing edit lowers the attribution share affordably; "
                                 "stopping",
                    nothing_qualified="no silencing edit lowers the attribution share "
                                      "affordably; stopping")
    fixed = layer or ws.layers[-1]
    if config.strategy == "care":
        locator = UnitSiteLocator(layer.name if layer else None)
        return Plan(locator, CareEditKind(), GapObjective(ws, config.gap, False), keep="budget")
    if config.strategy == "finetune":
        return Plan(FixedLocator(fixed.name), FinetuneEditKind(),
                    GapObjective(ws, config.gap, False), keep="accept")
    if config.strategy == "static" or layer:
        note = "forced layer" if layer else "static: last layer"
        return Plan(FixedLocator(fixed.name, note), RankOneEditKind(),
                    GapObjective(ws, config.gap, False), keep="accept")
    return Plan(AttributionLocator(), RankOneEditKind(refresh=config.refresh_statistics,
                                                      low_rank=True),
                GapObjective(ws, config.gap, True), rounds=config.max_rounds)


def check_layer_option(ws: Workspace, graph: ShadowGraph, config: RectifyConfig) -> None:
    """``--layer`` must name an editable layer the run may change."""
    names = [l.name for l in ws.layers]
    if config.layer and config.layer not in names:
        shared = next((l for l in graph.editable_layers if l.name == config.layer), None)
        if shared is not None and shared.shared_with:
            raise RectifyError(
                f"--layer '{config.layer}': its weight '{shared.weight}' is shared with "
                f"{', '.join(shared.shared_with)}; pass --allow-shared to edit it for all")
        raise RectifyError(f"--layer '{config.layer}' is not an editable layer of this model "
                           f"(editable: {', '.join(names)})")


def rectify(graph: ShadowGraph, pairs, eval_set, calib_x: np.ndarray | None = None,
            config: RectifyConfig | None = None, device: str | torch.device = "cpu",
            log=None) -> RectifyResult:
    """Run the configured strategy; the shadow graph's weights hold the result afterwards."""
    cfg = config or RectifyConfig()
    log = log or (lambda msg: None)
    if len(pairs) == 0:
        raise BadSamplesError("no pairs to fit")
    start = time.perf_counter()
    ws = Workspace(graph, pairs, eval_set, calib_x, cfg, device)
    check_layer_option(ws, graph, cfg)
    plan = make_plan(ws, cfg)
    ws.timings.add("setup", start)
    base_accuracy = ws.base_accuracy()
    base = plan.objective.measure()
    log(plan.objective.describe_base(base_accuracy, base))
    out = run(ws, plan, base_accuracy, base, log)
    finish = time.perf_counter()
    deltas: dict[str, torch.Tensor] = {}
    edits: list[dict] = []
    for candidate in out.kept:
        for name, delta, entry in candidate.records:
            deltas[name] = deltas.get(name, 0) + delta
            edits.append(entry)
    within = (base_accuracy - out.accuracy) <= cfg.budget
    strategy = (cfg.strategy if not cfg.layer or cfg.strategy in ("finetune", "care")
                else "forced")
    result = RectifyResult(strategy, base_accuracy, base.value, out.accuracy, out.measure.value,
                           plan.objective.met(out.measure, bool(edits), within),
                           gap_measured_on=plan.objective.source)
    result.objective = cfg.objective
    result.base_target_gap, result.final_target_gap = base.tau, out.measure.tau
    result.stopped = out.stopped or getattr(plan.objective, "met_because", "")
    result.rounds, result.scores, result.edits = out.rounds, out.scores, edits
    result.deltas = {k: v.numpy() for k, v in deltas.items()}
    ws.timings.add("results", finish)
    # every second of the run in a named phase: what no phase timed is shown as such
    ws.timings["untimed"] = max(0.0, time.perf_counter() - start - sum(ws.timings.values()))
    result.timings = dict(ws.timings)
    result.exact_statistics_for_edits = sorted(ws.statistics.exact_stats)
    result.batch = ws.batch
    result.conditioning = {k: {"condition_number": s.condition_number, "ridge": s.ridge_value,
                               "kind": s.kind} for k, s in ws.statistics.stats.items()}
    return result
