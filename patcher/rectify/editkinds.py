"""Edit kinds: what the loop may change at a layer, as candidate deltas in stored layout.

An edit kind turns the mathematics of :mod:`patcher.edits` into candidates for the loop:
``propose(ws, layer)`` yields groups of :class:`Candidate`, each with its deltas (by ONNX
tensor name, in the stored layout) and the provenance records the result declares. Within
a group the candidates grow (``growing``: the loop stops at the first that costs too
much) or shrink (the loop goes on to the next when one costs too much).

- :class:`RankOneEditKind`: the paper's closed-form (or iterative) rank-one edit mapping
  corrupted keys to clean values (:mod:`patcher.edits.rankone`).
- :class:`SilencingEditKind`: silencing edits of growing beta along each k* direction
  (:mod:`patcher.edits.silence`; the attribution objective).
- :class:`CareEditKind`: CARE's repair, signed multipliers on the units a layer reads,
  found by a particle swarm and written as scales of its weight slices
  (:mod:`patcher.edits.care`).
- :class:`FinetuneEditKind`: Adam on the pairs at one layer (the paper's baseline).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Protocol

import numpy as np
import torch

from patcher.analysis.causal import SiteRunner, unit_effects, unit_site
from patcher.edits.care import (CENTRED, FIDELITY, GROWTH, HELD_OUT, MIN_RATE_REMOVED,
                                centre_bias, centre_bias_delta, clean_centres, grown_repair,
                                misbehaviour_rate, removes_enough, scaled_logits, shrunk,
                                unit_scale_delta)
from patcher.edits.finetune import finetune_in_place
from patcher.edits.lowrank import MAX_RANK, LowRankEdit, solve_edits
from patcher.edits.rankone import RankOneEdit, UnfoldedKeys, solve_rank_one_iterative
from patcher.edits.silence import (SILENCE_SCALES, corruption_key_sums, output_signs,
                                   silencing_direction, silencing_edit)
from patcher.errors import NumericalError
from patcher.graph.keys import LayerTap, layer_keys, layer_values
from patcher.graph.shadow import EditableLayer
from patcher.rectify.config import CARE_SHRINK
from patcher.rectify.results import format_accuracy
from patcher.rectify.transplant import transplant
from patcher.rectify.workspace import Workspace


class SkipLayer(Exception):
    """The edit kind has nothing to propose at this layer (the reason is logged)."""


@dataclass
class Candidate:
    """One proposed edit: deltas by tensor name (stored layout), and how to declare it."""

    layer: EditableLayer
    deltas: dict[str, torch.Tensor]
    #: (tensor name, delta as recorded, provenance entry) per changed tensor
    records: list[tuple[str, torch.Tensor, dict]]
    norm: float
    fit_ratio: float | None = None
    #: the silencing scale beta
    scale: float | None = None
    #: which variant of the kind, for messages (e.g. the k* source)
    label: str = ""
    #: the round's reason when the candidate is kept without judging (or kept by CARE)
    reason: str = ""
    #: already in the graph (a fine-tune trains the weight in place)
    applied: bool = False


@dataclass
class CandidateGroup:
    candidates: Iterator[Candidate]
    growing: bool = False
    label: str = ""
    extra: dict = field(default_factory=dict)


class EditKind(Protocol):
    def propose(self, ws: Workspace, layer: EditableLayer) -> Iterator[CandidateGroup]: ...
    def kept(self, ws: Workspace, candidate: Candidate) -> None: ...


def _rank_entry(layer: EditableLayer, delta: torch.Tensor, kind: str, rank: int | None) -> tuple:
    """A provenance record for ``delta`` at ``layer``'s weight (rank computed when None)."""
    if rank is None:
        rank = int(torch.linalg.matrix_rank(delta.reshape(delta.shape[0], -1)
                                            .to(torch.float64)))
    entry = {"layer": layer.name, "weight": layer.weight, "kind": kind,
             "delta_norm": float(delta.norm()), "rank": rank}
    return (layer.weight, delta.to(torch.float64).cpu(), entry)


class _Captured(Exception):
    """Ends a forward pass once the tapped layer has run (nothing downstream is needed)."""


def _layer_io(ws: Workspace, layer: EditableLayer, x: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's data input and output for ``x``; the forward stops after the layer."""
    seen: list = []

    def grab(_layer, data, out):
        seen.extend((data, out))
        raise _Captured

    with LayerTap(ws.graph, [layer], on_capture=grab):
        try:
            ws.graph(x)
        except _Captured:
            pass
    return seen[0], seen[1]


class RankOneEditKind:
    """The closed-form edit mapping the fit pairs' corrupted keys to clean values, with the
    layer's exact C^-1: the paper's rank-one edit, followed by the low-rank edit of
    :mod:`patcher.edits.lowrank` when one direction does not hold the corrupted keys (a
    trigger over several tokens) and the rank-one edit is rolled back; or the paper's
    iterative solver. ``low_rank``: propose the low-rank edit at all (the dynamic loop; a
    fixed layer's one accepted edit stays the paper's rank-one edit).
    ``refresh`` recomputes downstream statistics after a kept edit
    (``--refresh-statistics``)."""

    def __init__(self, refresh: bool = False, low_rank: bool = False) -> None:
        self.refresh, self.low_rank = refresh, low_rank

    @torch.no_grad()
    def fit(self, ws: Workspace, layer: EditableLayer
            ) -> tuple[RankOneEdit, LowRankEdit | None]:
        """(the rank-one edit, the low-rank edit or None) at ``layer`` for the fit pairs."""
        cfg = ws.config
        statistics = ws.statistics.for_edit(layer) if cfg.solver == "closed" else None
        start = time.perf_counter()
        corrupted, clean, _ = ws.fit
        attrs = ws.graph.node_attributes(layer.name)
        keys, inputs, residuals = [], [], []
        step = max(1, ws.batch // 2)  # corrupted and clean inputs in one forward
        for i in range(0, len(clean), step):
            data, out = _layer_io(ws, layer, torch.cat([corrupted[i:i + step],
                                                        clean[i:i + step]]))
            n = len(clean[i:i + step])
            if cfg.solver == "iterative":
                keys.append(layer_keys(layer, data[:n], attrs))
            else:  # the layer's inputs; the closed form unfolds their keys by chunks
                inputs.append(data[:n])
            values = layer_values(layer, out, attrs)
            residuals.append(values[n:] - values[:n])
        if cfg.solver == "iterative":
            edits = (solve_rank_one_iterative(layer.name, layer.weight, torch.cat(keys),
                                              torch.cat(residuals), lr=cfg.solver_lr,
                                              epochs=cfg.solver_epochs, seed=cfg.seed), None)
        else:
            edits = solve_edits(layer.name, layer.weight, UnfoldedKeys(layer, inputs, attrs),
                                torch.cat(residuals), statistics.solver.to(ws.device),
                                max_rank=MAX_RANK if self.low_rank else 1)
        ws.timings.add("edit", start)
        return edits

    def propose(self, ws: Workspace, layer: EditableLayer) -> Iterator[CandidateGroup]:
        """One group: the rank-one candidate, then the low-rank candidate when there is
        one (tried only when the rank-one edit is rolled back: where the rank-one edit is
        kept, the loop edits as the paper does)."""
        single, low = self.fit(ws, layer)
        delta = ws.stored(layer, single.delta)
        candidates = [Candidate(layer, {layer.weight: delta},
                                [_rank_entry(layer, delta, "rank-one", 1)], single.norm,
                                single.fit_residual_after
                                / max(single.fit_residual_before, 1e-300),
                                label="rank 1")]
        if low is not None:
            delta = ws.stored(layer, low.delta)
            records = []
            for i, part in enumerate(low.components()):
                name, recorded, entry = _rank_entry(layer, ws.stored(layer, part),
                                                    "rank-one", 1)
                entry.update(component=i + 1, edit_rank=low.rank,
                             energy=round(low.energy, 4))
                records.append((name, recorded, entry))
            candidates.append(Candidate(
                layer, {layer.weight: delta}, records, low.norm,
                low.fit_residual_after / max(low.fit_residual_before, 1e-300),
                label=f"rank {low.rank}"))
        yield CandidateGroup(iter(candidates))

    def kept(self, ws: Workspace, candidate: Candidate) -> None:
        if self.refresh:  # keys downstream of the edit changed a little
            ws.statistics.refresh(candidate.layer.name)

    def round_line(self, index: int, score: float | None, candidate: Candidate, before,
                   after, accuracy: float | None, evaluated: int | None, reason: str
                   ) -> str | None:
        """The dynamic loop's line per round (a fixed layer's one edit has no score: none)."""
        if score is None:
            return None
        target = (f", target-class gap {before.tau:.4f} -> {after.tau:.4f}"
                  if before.tau is not None else "")
        return (f"round {index}: {candidate.layer.name} ({candidate.label}) score {score:.4g}: "
                f"gap {before.value:.4f} -> {after.value:.4f}{target}, accuracy "
                f"{format_accuracy(accuracy, evaluated)} ({reason})")


class SilencingEditKind:
    """Silencing edits dW = -beta sigma s d^T (:func:`patcher.edits.silence.silencing_edit`)
    for each k* direction d of :meth:`parts`, beta growing over SILENCE_SCALES."""

    def __init__(self, key_examples: tuple[np.ndarray, np.ndarray], pair_count: int) -> None:
        self.key_examples, self.pair_count = key_examples, pair_count

    @torch.no_grad()
    def parts(self, ws: Workspace, layer: EditableLayer
              ) -> tuple[list[tuple[str, torch.Tensor]], float, torch.Tensor]:
        """([(source, d)], sigma, signs) for silencing edits at ``layer``. Each d is
        C^-1 k* / (k*^T C^-1 k*) (:func:`patcher.edits.silence.silencing_direction`) for a
        k* (:func:`patcher.edits.silence.corruption_key`) of one source: the pairs alone,
        and the pairs with the set-aside eval images (when there are any and their
        direction differs; which one silences better depends on the model,
        benchmarks/LEAKAGE_GENERALISATION.md). sigma is the RMS over output units of their
        standard deviation on up to 256 calibration images, signs come from
        :func:`patcher.edits.silence.output_signs`. Raises NumericalError when the
        corruption leaves the layer's keys alone."""
        attrs = ws.graph.node_attributes(layer.name)
        corrupted, clean = self.key_examples
        n = self.pair_count  # key_examples: the pairs first, then the eval images
        pair_total, pair_weight = self._key_sums(ws, layer, attrs, corrupted[:n], clean[:n])
        eval_total, eval_weight = self._key_sums(ws, layer, attrs, corrupted[n:], clean[n:])
        if pair_weight + eval_weight == 0:
            raise NumericalError(f"layer '{layer.name}': the corrupted and clean keys are "
                                 "identical here")
        inverse = ws.statistics.for_edit(layer).solver.to(ws.device)
        directions = []
        if pair_weight > 0:
            directions.append(("the pairs", silencing_direction(
                layer.name, pair_total / pair_weight, inverse)))
        if eval_weight > 0:
            with_eval = silencing_direction(
                layer.name, (pair_total + eval_total) / (pair_weight + eval_weight), inverse)
            if not directions or float(torch.nn.functional.cosine_similarity(
                    with_eval, directions[0][1], dim=0)) < 0.999:
                directions.append(("the pairs and eval images", with_eval))
        with LayerTap(ws.graph, [layer], keep_inputs=False) as tap:
            ws.graph(torch.from_numpy(ws.calib_x[:256]).to(ws.device))
        values = layer_values(layer, tap.outputs[layer.name], attrs).to(torch.float64)
        values = values.reshape(-1, values.shape[-1])
        sigma = float(values.std(0).pow(2).mean().sqrt())
        return directions, sigma, output_signs(ws.graph, layer)

    @torch.no_grad()
    def _key_sums(self, ws: Workspace, layer: EditableLayer, attrs: dict,
                  corrupted: np.ndarray, clean: np.ndarray) -> tuple[torch.Tensor | float, float]:
        """:func:`patcher.edits.silence.corruption_key_sums` of ``layer``'s keys over the
        given inputs, in chunks of 16 (keys of wide convs are large); (0.0, 0.0) for none."""
        total, weight = 0.0, 0.0
        for i in range(0, len(clean), 16):
            chunk = np.concatenate([corrupted[i:i + 16], clean[i:i + 16]])
            with LayerTap(ws.graph, [layer]) as tap:
                ws.graph(ws.tensor(chunk))
            keys = layer_keys(layer, tap.inputs[layer.name], attrs)
            half = len(chunk) // 2
            part, part_weight = corruption_key_sums(keys[:half], keys[half:])
            total, weight = total + part, weight + part_weight
        return total, weight

    def propose(self, ws: Workspace, layer: EditableLayer) -> Iterator[CandidateGroup]:
        try:
            directions, sigma, signs = self.parts(ws, layer)
        except NumericalError as err:  # the corruption leaves this layer's keys alone
            raise SkipLayer(str(err)) from None
        for source, direction in directions:
            yield CandidateGroup(self._scaled(ws, layer, source, direction, sigma, signs),
                                 growing=True, label=source)

    def _scaled(self, ws, layer, source, direction, sigma, signs) -> Iterator[Candidate]:
        for beta in SILENCE_SCALES:
            edit = silencing_edit(layer.name, layer.weight, direction, layer.value_dim,
                                  beta * sigma, signs)
            delta = ws.stored(layer, edit.delta)
            yield Candidate(layer, {layer.weight: delta},
                            [_rank_entry(layer, delta, "rank-one", 1)], edit.norm,
                            scale=beta, label=source, reason=f"silenced (beta {beta:g})")

    def kept(self, ws: Workspace, candidate: Candidate) -> None:
        pass

    def group_line(self, index: int, layer: EditableLayer, source: str, last: Candidate,
                   note: str) -> str:
        """How far one k* direction's growing betas got, and why they stopped."""
        return f"round {index}: {layer.name} (k* of {source}): up to beta {last.scale:g}: {note}"

    def round_line(self, index: int, score, candidate: Candidate, before, after,
                   accuracy: float | None, evaluated, reason: str) -> str:
        return (f"round {index}: kept {candidate.layer.name} beta {candidate.scale:g} "
                f"(k* of {candidate.label}): share {before.value:.4f} -> {after.value:.4f}, "
                f"accuracy {accuracy:.2%}")


class HeldOutAccuracy:
    """Accuracy drops of CARE repairs on the eval images the search never saw (``held``
    indices; none: every drop is None)."""

    def __init__(self, ws: Workspace, site, held: np.ndarray,
                 centre: torch.Tensor | None = None) -> None:
        self.size, self.centre = len(held), centre
        if not self.size:
            return
        self.runner = SiteRunner(ws.graph, site, ws.tensor(ws.eval_x[held]))
        self.labels = ws.tensor(ws.eval_y[held].astype(np.int64))
        self.base = self.accuracy([], [])

    def accuracy(self, units: list[int], multipliers) -> float:
        predicted = scaled_logits(self.runner, units, multipliers, self.centre).argmax(1)
        return float((predicted == self.labels).to(torch.float64).mean())

    def drop(self, units: list[int], multipliers) -> float | None:
        return self.base - self.accuracy(units, multipliers) if self.size else None


class TriggeredRate:
    """The misbehaviour rate on the triggered set with some of a site's units scaled
    (:func:`patcher.edits.care.misbehaviour_rate`)."""

    def __init__(self, ws: Workspace, site, triggered: torch.Tensor, labels: torch.Tensor,
                 target: int | None, centre: torch.Tensor | None = None) -> None:
        self.runner = SiteRunner(ws.graph, site, triggered)
        self.labels, self.target = labels.to(self.runner.units.device), target
        self.centre = centre

    def rate(self, units: list[int], multipliers) -> float:
        return misbehaviour_rate(scaled_logits(self.runner, units, multipliers, self.centre),
                                 self.labels, self.target)


class CareEditKind:
    """CARE's repair at the units feeding a layer (:mod:`patcher.edits.care`): a triggered
    set transplanted from the pairs onto eval images, the units ranked by CARE's score and
    by ours (:func:`patcher.analysis.causal.unit_effects`, both recorded), the top ones'
    multipliers searched by the particle swarm, written as scales of the layer's weight
    slices; then the repair and its shares CARE_SHRINK of the way from the identity,
    largest first, each offered only when it removes MIN_RATE_REMOVED of the triggered
    set's rate and its held-out accuracy drop is within half the budget."""

    def triggered_set(self, ws: Workspace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The pairs' corrupted inputs plus up to ``care_triggered`` eval images outside the
        target class, each carrying one pair's corruption (round robin): (triggered, labels,
        clean twins)."""
        cfg = ws.config
        rng = np.random.default_rng(cfg.seed)
        pool = np.flatnonzero(~np.isin(ws.eval_y, list(ws.target_class)))
        pick = pool[rng.permutation(len(pool))[:cfg.care_triggered]]
        pairs = ws.pairs
        mode = cfg.transplant if cfg.transplant != "none" else "paste"
        moved = [transplant(pairs.corrupted[i % len(pairs)], pairs.clean[i % len(pairs)],
                            ws.eval_x[j:j + 1], mode)[0] for i, j in enumerate(pick)]
        x = np.concatenate([pairs.corrupted, np.stack(moved)]) if moved else pairs.corrupted
        y = np.concatenate([pairs.label, ws.eval_y[pick]])
        clean = np.concatenate([pairs.clean, ws.eval_x[pick]])
        return ws.tensor(x), ws.tensor(y.astype(np.int64)), ws.tensor(clean)

    def split_eval(self, ws: Workspace) -> tuple[np.ndarray, np.ndarray]:
        """Eval image indices (search, held out): a seeded HELD_OUT share of the eval set
        never enters the search and judges its accuracy (none when fewer than 3 images);
        the search uses at most ``care_eval`` of the rest."""
        rng = np.random.default_rng(ws.config.seed + 1)
        order = rng.permutation(len(ws.eval_x))
        held = int(len(order) * HELD_OUT) if len(order) >= 3 else 0
        return order[held:][:ws.config.care_eval], order[:held]

    def propose(self, ws: Workspace, layer: EditableLayer) -> Iterator[CandidateGroup]:
        cfg = ws.config
        start = time.perf_counter()
        site = unit_site(ws.graph, layer, ws.pair_clean[:1])
        target = next(iter(ws.target_class)) if ws.target_class else None
        triggered, labels, clean = self.triggered_set(ws)
        m = min(cfg.care_rank_images, len(triggered))
        effects = unit_effects(ws.graph, site, triggered[:m], clean[:m], labels[:m], target,
                               cfg.care_values, cfg.show_progress)
        ws.timings.add("care_localisation", start)
        schedule = (cfg.care_neurons,) if cfg.care_neurons else GROWTH
        order = effects.care_order if cfg.care_ranking == "care" else effects.swap_order
        start = time.perf_counter()
        search, held = self.split_eval(ws)
        bias = centre_bias(ws.graph, layer) if CENTRED else None
        # CARE's multipliers about 0, and where a bias can carry the shift, about the clean
        # median too: the search with the lower objective is kept (plain on a tie)
        centres = [None]
        if bias is not None and site.axis == 1:
            centres.append(clean_centres(ws.graph, site, ws.tensor(ws.eval_x[search])))
        searched = []
        for centre in centres:
            repair, steps = grown_repair(
                ws.graph, site, order, schedule, triggered, labels,
                ws.tensor(ws.eval_x[search]), ws.tensor(ws.eval_y[search]), target,
                bounds=tuple(cfg.care_range), objective=cfg.care_objective,
                alpha=cfg.care_alpha, max_drop=cfg.budget / 2, guard="agreement",
                fidelity=FIDELITY, particles=cfg.care_particles,
                iterations=cfg.care_iterations, patience=cfg.care_patience, seed=cfg.seed,
                show_progress=cfg.show_progress, centre=centre)
            searched.append((repair.objective_after, len(searched), repair, steps, centre))
        _, _, repair, steps, centre = min(searched, key=lambda s: s[:2])
        ws.timings.add("care_search", start)
        k = len(repair.units)
        localisation = {"site": site.tensor, "site_path": site.path, "site_units": site.units,
                        "ranking": cfg.care_ranking,
                        "care_top": effects.care_order[:k], "swap_top": effects.swap_order[:k],
                        "overlap": effects.overlap(k), "triggered": len(triggered),
                        "rate_before": repair.rate_before, "rate_after": repair.rate_after,
                        "growth": [vars(s) for s in steps],
                        "swarm_iterations": len(repair.swarm.history),
                        "search_images": len(search), "held_out_images": len(held),
                        "centred": centre is not None,
                        "objective_by_centre": {("median" if c is not None else "zero"): v
                                                for v, _, _, _, c in searched}}
        start = time.perf_counter()
        held_out = HeldOutAccuracy(ws, site, held, centre)
        rates = TriggeredRate(ws, site, triggered, labels, target, centre)
        ws.timings.add("care_held_out", start)
        yield CandidateGroup(self._shrunk(ws, layer, repair, localisation, held_out, rates,
                                          cfg.budget / 2, bias, centre),
                             extra={"neurons": repair.units, "localisation": localisation})

    def _shrunk(self, ws, layer, repair, localisation, held_out, rates, max_drop,
                bias: str | None = None, centre: torch.Tensor | None = None
                ) -> Iterator[Candidate]:
        """The repair and its CARE_SHRINK shares, largest first, each only when it removes
        MIN_RATE_REMOVED of the triggered set's rate (the keep rule's "real repair") and its
        accuracy drop on the held-out eval images is at most ``max_drop``."""
        weight = ws.graph.weight(layer.weight)
        refused: list[str] = []
        for t in CARE_SHRINK:
            multipliers = shrunk(repair.multipliers, t)
            rate = rates.rate(repair.units, multipliers)
            if not removes_enough(repair.rate_before, rate):
                refused.append(f"{t:.0%}: rate {rate:.2%}")
                continue
            drop = held_out.drop(repair.units, multipliers)
            if drop is not None and drop > max_drop + 1e-9:
                refused.append(f"{t:.0%}: -{drop:.2%}")
                continue
            delta64 = unit_scale_delta(layer, weight, repair.units, multipliers).cpu()
            delta = delta64.to(weight.dtype if weight.dtype == torch.float64 else torch.float32)
            entry = {"layer": layer.name, "weight": layer.weight, "kind": "care",
                     "units": [int(u) for u in repair.units],
                     "multipliers": [round(float(v), 6) for v in multipliers],
                     **localisation, "share": t, "triggered_rate": rate,
                     "held_out_drop": drop, "delta_norm": float(delta64.norm()),
                     "rank": int(torch.linalg.matrix_rank(delta64.reshape(delta64.shape[0], -1)))}
            reason = (f"CARE: {len(repair.units)} unit(s) of {localisation['site_units']}, "
                      f"triggered-set rate {repair.rate_before:.2%} -> {rate:.2%}"
                      + (f", held-out accuracy -{drop:.2%}" if drop is not None else "")
                      + (f", shrunk to {t:.0%}" if t < 1 else ""))
            deltas = {layer.weight: delta.to(weight.device)}
            records = [(layer.weight, delta64, entry)]
            if centre is not None:  # the shift c_u (1 - m_u) read through the bias
                shift64 = centre_bias_delta(ws.graph, layer, repair.units, multipliers,
                                            centre).cpu()
                deltas[bias] = shift64.to(torch.float32)
                records.append((bias, shift64, {
                    "layer": layer.name, "weight": bias, "kind": "care", "role": "bias shift",
                    "units": entry["units"], "multipliers": entry["multipliers"],
                    "delta_norm": float(shift64.norm()), "rank": 1}))
            norm = float(sum(float(d.norm()) ** 2 for _, d, _ in records) ** 0.5)
            yield Candidate(layer, deltas, records, norm,
                            label=f"units {repair.units} (CARE's top {localisation['care_top']}, "
                                  f"ours {localisation['swap_top']})", reason=reason)
        if len(refused) == len(CARE_SHRINK):
            raise SkipLayer(f"CARE's repair ({len(repair.units)} units, triggered-set rate "
                            f"{repair.rate_before:.2%} -> {repair.rate_after:.2%}) removes "
                            f"less than {MIN_RATE_REMOVED:.0%} of the rate or costs more than "
                            f"{max_drop:.2%} of the accuracy on the {held_out.size} held-out "
                            f"eval images at every share ({', '.join(refused)})")

    def kept(self, ws: Workspace, candidate: Candidate) -> None:
        pass

    def round_line(self, index: int, score, candidate: Candidate, before, after,
                   accuracy: float | None, evaluated, reason: str) -> str:
        return (f"CARE at the input of {candidate.layer.name}: {candidate.label}: gap "
                f"{before.value:.4f} -> {after.value:.4f}, accuracy {accuracy:.2%} ({reason})")


class FinetuneEditKind:
    """Adam on the cross-entropy of the pairs (corrupted and clean, correct label) at the
    layer's weight alone (:func:`patcher.edits.finetune.finetune_in_place`)."""

    def propose(self, ws: Workspace, layer: EditableLayer) -> Iterator[CandidateGroup]:
        x = torch.cat([ws.pair_corrupted, ws.pair_clean])
        y = torch.cat([ws.pair_label, ws.pair_label])
        delta = finetune_in_place(ws.graph, layer.weight, x, y, ws.config.finetune_steps,
                                  ws.config.finetune_lr)
        yield CandidateGroup(iter([Candidate(layer, {layer.weight: delta},
                                             [_rank_entry(layer, delta, "finetune", None)],
                                             float(delta.norm()), reason="fine-tuned",
                                             applied=True)]))

    def kept(self, ws: Workspace, candidate: Candidate) -> None:
        pass
