"""What a rectification run returns: layer scores, the rounds, and the result."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

@dataclass
class LayerScore:
    layer: str
    score: float
    completeness_error: float
    statistics: str = "exact"  # the key statistics the score used: exact or kronecker


@dataclass
class Round:
    index: int
    layer: str
    score: float | None
    kept: bool
    reason: str
    gap_before: float
    gap_after: float
    accuracy: float | None
    accuracy_drop: float | None
    delta_norm: float
    fit_residual_ratio: float | None
    #: eval images seen when the round was decided early (None: all). Then ``accuracy`` is
    #: the upper bound reached (the drop a lower bound), or None when none were needed.
    evaluated: int | None = None
    #: tau before and after, when the corruption has a target class
    target_gap_before: float | None = None
    target_gap_after: float | None = None
    #: attribution objective: the silencing scale beta of this round's edit
    scale: float | None = None


@dataclass
class RectifyResult:
    strategy: str
    base_accuracy: float
    base_gap: float
    final_accuracy: float
    final_gap: float
    met_target: bool
    rounds: list[Round] = field(default_factory=list)
    scores: list[LayerScore] = field(default_factory=list)
    deltas: dict[str, np.ndarray] = field(default_factory=dict)   # stored layout, float64
    edits: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    conditioning: dict[str, dict] = field(default_factory=dict)
    gap_measured_on: str = "pairs"
    #: "prediction": the gaps are delta*; "attribution": they are attribution shares
    objective: str = "prediction"
    #: layers ranked with factored statistics whose exact C was computed for an edit
    exact_statistics_for_edits: list[str] = field(default_factory=list)
    #: the target-class gap tau (held-out pairs) before and after, when the loop steers by
    #: it: then ``met_target`` is judged on it (tau <= --gap, or the effect gone)
    base_target_gap: float | None = None
    final_target_gap: float | None = None
    #: why the loop stopped before its round limit ("" when it did not)
    stopped: str = ""
    #: images per forward the run used (``--batch``, or bounded by the activation size)
    batch: int | None = None


def format_accuracy(accuracy: float | None, evaluated: int | None) -> str:
    """A round's accuracy as text: "-" when not measured, "<=x%" when decided early."""
    if accuracy is None:
        return "-"
    return f"{'<=' if evaluated else ''}{accuracy:.2%}"
