"""Locators: which layers a round tries, best first.

- :class:`AttributionLocator`: the paper's editability, from Integrated Gradients at every
  editable layer and the key statistics (the dynamic loop).
- :class:`CausalLocator`: by intervention, swapping a layer's top neurons between the
  corrupted and clean inputs (:mod:`patcher.analysis.causal`; CARE).
- :class:`UnitSiteLocator`: CARE's site, the layer whose input units CARE repairs (the
  first dense layer reading a flattened feature map or an MLP's pixels, or ``--layer``).
- :class:`FixedLocator`: one named layer (``--layer``, ``static``, ``finetune``).
- :class:`LayerListLocator`: given layers in order (the attribution objective tries every
  hidden layer).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from patcher.analysis.attribution import layer_integrated_gradients
from patcher.analysis.causal import default_unit_site, layer_causal_effects
from patcher.graph.keys import LayerTap, layer_keys, layer_values
from patcher.graph.shadow import EditableLayer
from patcher.rectify.results import LayerScore
from patcher.rectify.workspace import Workspace

Log = Callable[[str], None]


@dataclass
class Ranked:
    """A layer a locator proposes, with its score (None: not scored) and a note."""

    layer: str
    score: float | None = None
    note: str = ""


class Locator(Protocol):
    #: whether the first round's ranking is the result's layer scores
    reports_scores: bool

    def rank(self, ws: Workspace, exclude: set[str], log: Log) -> list: ...


class AttributionLocator:
    """Editability G_l = mean over pairs of || sum_p m_p (Z k*_p)^T ||_F, Z = C^-1/2
    (``whitened``) or C^-1 (``inverse``, the paper's literal form), best first; m_p is the
    IG attribution of the layer's output at position p, k*_p its corrupted key."""

    reports_scores = True

    def rank(self, ws: Workspace, exclude: set[str] = frozenset(),
             log: Log | None = None) -> list[LayerScore]:
        ws.statistics.ensure_all()
        layers = [l for l in ws.layers if l.name not in exclude]
        if not layers:
            return []
        start = time.perf_counter()
        attr = layer_integrated_gradients(ws.graph, layers, ws.pair_corrupted,
                                          ws.pair_clean, ws.pair_label,
                                          steps=ws.config.steps, chunk=ws.ig_chunk,
                                          form=ws.config.attribution_form,
                                          show_progress=ws.config.show_progress)
        ws.timings.add("attribution", start)
        start = time.perf_counter()
        scores = []
        with torch.no_grad():
            with LayerTap(ws.graph, layers) as tap:  # corrupted keys of all layers, one pass
                ws.graph(ws.pair_corrupted)
            for layer in layers:
                attrs = ws.graph.node_attributes(layer.name)
                keys = layer_keys(layer, tap.inputs[layer.name], attrs).to(torch.float64)
                st = ws.statistics.stats[layer.name]
                m = layer_values(layer, attr.layers[layer.name].attribution,
                                 {k: v for k, v in attrs.items() if k != "alpha"})
                # B = sum_p m_p k*_p^T per pair and group; M* = B Z^T
                b = torch.einsum("npgv,npgk->ngvk", m.to(torch.float64), keys)
                if ws.config.score == "whitened":
                    m_star = st.whiten_rows(b)
                else:
                    m_star = st.solve_rows(b)
                per_pair = m_star.flatten(1).norm(dim=1)
                scores.append(LayerScore(layer.name, float(per_pair.mean()),
                                         float(attr.layers[layer.name].completeness_error.max()),
                                         st.kind))
        ws.timings.add("localization", start)
        return sorted(scores, key=lambda s: -s.score)


class CausalLocator:
    """Layers ranked by intervention (:func:`patcher.analysis.causal.layer_causal_effects`)
    on the fit pairs (the given pairs plus transplanted ones), best first; with
    ``hidden_only`` only layers whose neurons are hidden units (CARE's)."""

    reports_scores = False

    def __init__(self, hidden_only: bool = False) -> None:
        self.hidden_only = hidden_only

    def effects(self, ws: Workspace) -> list:
        """The causal effects themselves (layer, score, neurons swapped), best first."""
        start = time.perf_counter()
        corrupted, clean, labels = ws.fit
        layers = ws.hidden_layers() if self.hidden_only else ws.layers
        effects = layer_causal_effects(ws.graph, layers, corrupted, clean, labels,
                                       ws.config.causal_top_fraction, ws.config.show_progress)
        ws.timings.add("causal", start)
        return effects

    def rank(self, ws: Workspace, exclude: set[str], log: Log) -> list[Ranked]:
        effects = [e for e in self.effects(ws) if e.layer not in exclude]
        if effects:
            top = effects[0]
            log(f"causal localisation: {top.layer} (restores {top.score:.1%} of the gap "
                f"with {top.top} of {top.neurons} neurons swapped)")
        return [Ranked(e.layer, e.score) for e in effects]


class UnitSiteLocator:
    """CARE's one site (:func:`patcher.analysis.causal.default_unit_site`): the layer whose
    input units are repaired; ``name`` (``--layer``) overrides the default."""

    reports_scores = False

    def __init__(self, name: str | None = None) -> None:
        self.name = name

    def rank(self, ws: Workspace, exclude: set[str], log: Log) -> list[Ranked]:
        if self.name is not None:
            return [] if self.name in exclude else [Ranked(self.name, None, "forced layer")]
        site = default_unit_site(ws.graph, ws.layers, ws.pair_clean[:1])
        if site.consumer.name in exclude:
            return []
        log(f"CARE site: the {site.units} units feeding {site.consumer.name} ({site.path})")
        return [Ranked(site.consumer.name, None, "CARE's site")]


class FixedLocator:
    """Always the one layer ``name`` (until it is excluded); ``note`` says why."""

    reports_scores = False

    def __init__(self, name: str, note: str = "") -> None:
        self.name, self.note = name, note

    def rank(self, ws: Workspace, exclude: set[str], log: Log) -> list[Ranked]:
        return [] if self.name in exclude else [Ranked(self.name, None, self.note)]


class LayerListLocator:
    """The given layers, in order, less the excluded ones."""

    reports_scores = False

    def __init__(self, layers: list[EditableLayer]) -> None:
        self.layers = layers

    def rank(self, ws: Workspace, exclude: set[str], log: Log) -> list[Ranked]:
        return [Ranked(l.name) for l in self.layers if l.name not in exclude]
