"""The library API: ``patch``, ``locate``, ``verify`` and ``inspect`` from Python.

Each function does what the CLI verb of the same name does, with the same checks and the
same defaults (:mod:`patcher.gate.defaults` and :class:`~patcher.rectify.RectifyConfig`;
where the CLI's default differs from the config's, e.g. ``budget``, the CLI's), and
returns an object carrying the figures instead of printing them::

    import patcher
    result = patcher.patch("model.onnx", "pairs.npz", "eval.npz", out="fixed.onnx")
    print(result.accuracy_before, result.accuracy_after, result.layers)

A **model** is a file path or an ``onnx.ModelProto`` (external data needs the file). A
**sample set** is an npz path (the contract of :mod:`patcher.samples`) or arrays:

- pairs: ``(corrupted, clean, label)`` or a mapping with those keys;
- eval and calib: ``(x, y)`` or a mapping with ``x``, ``y``;
- attack: ``(x, y, target)`` or a mapping with ``x``, ``y``, ``target`` (one integer).

Arrays get the checks a file gets (float images laid out as the model's input and finite
after conversion to its input type, integer labels in range, matching lengths); a
refusal is a :class:`~patcher.errors.RectifyError` with a one-line message naming the
keyword argument and the key (``pairs: 'label': labels must lie in 0..9 ...``). Inputs
are never modified; files are written atomically. Options are keyword-only and carry the
CLI's names (``--transplant-count`` is ``transplant_count``) or, where the two differ,
RectifyConfig's (``--attribution`` is ``attribution_form``), the names library warnings
use; their ranges are the CLI's.
"""
from __future__ import annotations

import functools
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard, Union

import numpy as np
import onnx

from patcher.analysis.moments import STATISTICS_MODES
from patcher.errors import BadModelError, BadSamplesError, RectifyError
from patcher.gate.defaults import MAX_ACCURACY_DROP, MAX_ASR, MAX_GAP, PATCH_GAP
from patcher.gate.metrics import attack_success_rate
from patcher.gate.summary import ModelSummary, summarize
from patcher.gate.verify import VerifyReport, verify_sets
from patcher.graph.support import load_supported_model
from patcher.model.modelio import LoadedModel, load_model
from patcher.patch import (Inputs, PatchReport, default_output, gather_inputs, locate_causal,
                           patch_loaded, warn_completeness)
from patcher.patch import locate as locate_layers
from patcher.rectify import LayerScore, RectifyConfig
from patcher.rectify.budget import parse_memory
from patcher.rectify.config import (CARE_OBJECTIVES, CARE_RANKINGS, OBJECTIVES, SCORE_MODES,
                                    STRATEGIES, TRANSPLANT_MODES)
from patcher.samples import (InputSpec, LabelledSet, Pairs, check_labelled, check_pairs,
                             classifier_contract, load_labelled, load_pairs, num_classes_of)

__all__ = ["LocateResult", "PatchResult", "inspect", "locate", "patch", "verify"]

#: A model: the path of an ONNX file, or the model itself.
ModelSource = Union[str, "os.PathLike[str]", onnx.ModelProto]
#: Pairs: an npz path, ``(corrupted, clean, label)``, or a mapping with those keys.
PairsSource = Union[str, "os.PathLike[str]", Pairs, Sequence[Any], Mapping[str, Any]]
#: Eval or calibration data: an npz path, ``(x, y)``, or a mapping with ``x``, ``y``.
LabelledSource = Union[str, "os.PathLike[str]", LabelledSet, Sequence[Any], Mapping[str, Any]]
#: An attack set: an npz path, ``(x, y, target)``, or a mapping with ``x``, ``y``, ``target``.
AttackSource = LabelledSource

_CONFIG = RectifyConfig()
_DEVICES = ("auto", "cpu", "cuda")

#: The ranges of the numeric options, as the CLI's option types state them:
#: (low, high, low excluded). tests/test_api.py compares them with the click options.
RANGES: dict[str, tuple[float, float, bool]] = {
    "budget": (0.0, 1.0, False), "gap": (0.0, 1.0, False), "max_rounds": (0, 100, False),
    "steps": (1, 1024, False), "transplant_count": (1, 10000, False),
    "heldout_count": (1, 10000, False), "seed": (0, 2**32 - 1, False),
    "stat_rows": (1, 1 << 24, False), "care_neurons": (1, 1 << 20, False),
    "top_fraction": (0.0, 1.0, True), "max_accuracy_drop": (0.0, 1.0, False),
    "max_asr": (0.0, 1.0, False), "max_gap": (0.0, 1.0, False), "batch": (1, 1024, False),
    "latency_runs": (1, 10000, False), "care_min_multiplier": (-1000.0, 1000.0, False),
    "care_max_multiplier": (-1000.0, 1000.0, False), "care_triggered": (0, 100000, False),
    "care_eval": (1, 100000, False), "care_alpha": (0.0, 1.0, False),
    "care_particles": (1, 1000, False), "care_iterations": (0, 10000, False),
    "care_patience": (1, 10000, False),
}
#: Where a verb's option of the same name has another range.
VERB_RANGES: dict[str, dict[str, tuple[float, float, bool]]] = {
    "verify": {"batch": (1, 4096, False)},
    "patch": {"batch": (1, 4096, False)},
    "locate": {"batch": (1, 4096, False)},
}
#: The values each option with a fixed set of them accepts (the CLI's choices).
CHOICES: dict[str, tuple[str, ...]] = {
    "device": _DEVICES, "provider": _DEVICES, "score": SCORE_MODES,
    "transplant": TRANSPLANT_MODES, "attribution_form": ("ig", "path"),
    "statistics": tuple(STATISTICS_MODES), "strategy": STRATEGIES, "objective": OBJECTIVES,
    "solver": ("closed", "iterative"), "method": ("attribution", "causal"),
    "care_objective": CARE_OBJECTIVES, "care_ranking": CARE_RANKINGS,
}
_INTEGERS = {"max_rounds", "steps", "transplant_count", "heldout_count", "seed", "stat_rows",
             "care_neurons", "batch", "latency_runs", "care_triggered", "care_eval",
             "care_particles", "care_iterations", "care_patience"}


#: CLI flags whose keyword differs from the flag spelled with underscores
_KEYWORD_OF_FLAG = {"attribution": "attribution_form", "exclude-layer": "exclude_layers",
                    "input-shape": "input_shapes", "no-parity": "parity=False"}
#: flags that are switches: their keyword is said with its value
_SWITCHES = {"force", "allow_shared"}
_FLAG = re.compile(r"--([a-z][a-z0-9-]*)")


def _keyword_text(message: str) -> str:
    """``message`` with the CLI's flags (``--allow-shared``) named as this API's keyword
    arguments (``allow_shared=True``)."""
    def keyword(match: re.Match) -> str:
        flag = match.group(1)
        name = _KEYWORD_OF_FLAG.get(flag, flag.replace("-", "_"))
        return f"{name}=True" if name in _SWITCHES else name

    return _FLAG.sub(keyword, message)


def _keyword_errors(fn: Callable) -> Callable:
    """Refusals raised under ``fn`` name keyword arguments, not CLI flags (the library's
    checks are shared with the CLI, which names its flags)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RectifyError as exc:
            text = str(exc)
            said = _keyword_text(text)
            if said == text:
                raise
            exc.args = (said, *exc.args[1:])
            raise

    return wrapper


def _check_options(options: dict[str, Any], verb: str = "") -> None:
    """Refuse an option outside its range or choices (a one-line RectifyError, exit 2)."""
    ranges = {**RANGES, **VERB_RANGES.get(verb, {})}
    for name, value in options.items():
        if name in CHOICES:
            if value not in CHOICES[name]:
                raise RectifyError(f"{name}={value!r}: expected one of "
                                   f"{', '.join(repr(c) for c in CHOICES[name])}")
        elif name in ranges and value is not None:
            low, high, open_low = ranges[name]
            whole = name in _INTEGERS
            kinds = (int, np.integer) if whole else (int, float, np.integer, np.floating)
            if isinstance(value, bool) or not isinstance(value, kinds) or \
                    (not whole and math.isnan(value)):
                raise RectifyError(f"{name}={value!r}: expected "
                                   f"{'an integer' if whole else 'a number'}")
            if value < low or value > high or (open_low and value == low):
                raise RectifyError(f"{name}={value!r}: expected a value in "
                                   f"{'(' if open_low else '['}{low}, {high}]")


def _is_path(value: object) -> TypeGuard[str | os.PathLike[str]]:
    return isinstance(value, (str, os.PathLike))


def _load(model: ModelSource, name: str) -> LoadedModel:
    """A model from its path or as a ModelProto, every tensor in memory, ops supported."""
    if not (_is_path(model) or isinstance(model, onnx.ModelProto)):
        raise BadModelError(f"{name}: expected a path or an onnx.ModelProto, got "
                            f"{type(model).__name__}")
    return load_supported_model(model)


def _arrays(value: object, keys: tuple[str, ...], name: str) -> dict[str, np.ndarray]:
    """The arrays of a sample set given in memory, by key (a sequence in ``keys`` order,
    a mapping, or a Pairs/LabelledSet)."""
    if isinstance(value, (Pairs, LabelledSet)):
        value = {k: getattr(value, k) for k in keys}
    if isinstance(value, Mapping):
        missing = [k for k in keys if k not in value]
        if missing:
            raise BadSamplesError(f"{name}: missing key(s) {', '.join(missing)} (has: "
                                  f"{', '.join(map(str, value)) or 'nothing'})")
        items = [value[k] for k in keys]
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if len(value) != len(keys):
            raise BadSamplesError(f"{name}: expected ({', '.join(keys)}), got a sequence of "
                                  f"{len(value)}")
        items = list(value)
    else:
        raise BadSamplesError(f"{name}: expected an npz path, ({', '.join(keys)}) arrays or a "
                              f"mapping with those keys, got {type(value).__name__}")
    out = {}
    for key, item in zip(keys, items):
        try:
            out[key] = np.asarray(item)
        except (ValueError, TypeError) as exc:  # ragged nesting, odd objects
            raise BadSamplesError(f"{name}: '{key}' is not an array "
                                  f"({' '.join(str(exc).split())[:200]})") from None
    return out


def _pairs(source: PairsSource, spec: InputSpec, classes: int | None, name: str) -> Pairs:
    if _is_path(source):
        return load_pairs(source, spec, classes)
    return check_pairs(_arrays(source, ("corrupted", "clean", "label"), name), name, spec,
                       classes)


def _labelled(source: LabelledSource, spec: InputSpec, classes: int | None, name: str,
              with_target: bool = False) -> LabelledSet:
    if _is_path(source):
        return load_labelled(source, spec, classes, with_target)
    keys = ("x", "y", "target") if with_target else ("x", "y")
    return check_labelled(_arrays(source, keys, name), name, spec, classes, with_target)


def _source_name(source: object, name: str) -> str:
    """What a refusal calls a set: its path, or the keyword argument it was given as."""
    return str(source) if _is_path(source) else name


def _inputs(model: ModelSource, pairs: PairsSource, eval: LabelledSource | None,  # noqa: A002
            calib: LabelledSource | None, attack: AttackSource | None
            ) -> tuple[Inputs, LabelledSet | None]:
    """The model and sample sets, each checked against the model before any work (as
    :func:`patcher.patch.load_inputs` checks files), and the attack set."""
    loaded = _load(model, "model")
    spec, classes = InputSpec.of(loaded.proto), num_classes_of(loaded.proto)
    given = {"model": model, "pairs": pairs, "eval": eval, "calib": calib, "attack": attack}
    reads = {k: Path(v) for k, v in given.items() if v is not None and _is_path(v)}
    p = _pairs(pairs, spec, classes, "pairs")
    ev = _labelled(eval, spec, classes, "eval") if eval is not None else None
    calib_x = _labelled(calib, spec, classes, "calib").x if calib is not None else None
    attack_set = (_labelled(attack, spec, classes, "attack", with_target=True)
                  if attack is not None else None)
    names = {"MODEL": _source_name(model, "model"), "pairs": _source_name(pairs, "pairs"),
             "eval": _source_name(eval, "eval"), "attack": _source_name(attack, "attack")}
    return gather_inputs(loaded, classes, p, ev, calib_x, attack_set, reads, names), attack_set


def _names(layers: Sequence[str]) -> tuple[str, ...]:
    """Layer names as a tuple (one name given as a string is one name)."""
    names = (layers,) if isinstance(layers, str) else tuple(layers)
    if not all(isinstance(n, str) for n in names):
        raise RectifyError(f"exclude_layers={layers!r}: expected layer (node) names")
    return names


def _memory(size: int | str | None) -> int | None:
    """``max_memory`` in bytes: an integer, or a size such as "4G" or "512M"."""
    if size is None:
        return None
    if isinstance(size, str):
        try:
            return parse_memory(size)
        except RectifyError:
            raise RectifyError(f"max_memory={size!r}: not a size (e.g. 4G, 512M, 2.5GB, or "
                               "bytes as an integer)") from None
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or \
            not 1 <= size < 2 ** 50:
        raise RectifyError(f"max_memory={size!r}: expected bytes (1 to 2^50) or a size such "
                           "as 4G")
    return int(size)


def _config(**options: Any) -> RectifyConfig:
    """The RectifyConfig of these options (the API's names, the config's fields)."""
    if "top_fraction" in options:
        options["causal_top_fraction"] = options.pop("top_fraction")
    if "care_min_multiplier" in options:
        options["care_range"] = (float(options.pop("care_min_multiplier")),
                                 float(options.pop("care_max_multiplier")))
    return RectifyConfig(**options)


@dataclass
class PatchResult:
    """What :func:`patch` did, measured under onnxruntime on the written file reloaded from
    disk: accuracy on ``eval``, mean pair gap p_y(clean) - p_y(corrupted) on ``pairs``,
    attack success rate on ``attack`` (None without one), before and after."""

    #: the pairs' gap met ``gap`` within ``budget`` (the CLI's exit status 0)
    passed: bool
    accuracy_before: float
    accuracy_after: float
    pair_gap_before: float
    pair_gap_after: float
    asr_before: float | None
    asr_after: float | None
    #: the layers edited, in the order the edits were kept (empty: no edit was kept)
    layers: list[str]
    #: each edit's provenance record (layer, weight, kind, norms), as written into the file
    edits: list[dict]
    #: the file written, or None when ``out`` was not given (then ``model`` holds it)
    output: Path | None
    #: the patched model, when ``out`` was not given
    model: onnx.ModelProto | None
    #: wall seconds: load, shadow_build, rectify, write, verify, total
    timings: dict[str, float]
    #: every figure of the run (rounds, layer scores, parity, hashes, the config used)
    report: PatchReport = field(repr=False)

    @property
    def accuracy_drop(self) -> float:
        """accuracy_before - accuracy_after (the figure ``budget`` bounds)."""
        return self.accuracy_before - self.accuracy_after


@_keyword_errors
def patch(model: ModelSource, pairs: PairsSource, eval: LabelledSource, *,  # noqa: A002
          out: str | os.PathLike[str] | None = None,
          calib: LabelledSource | None = None, attack: AttackSource | None = None,
          budget: float = MAX_ACCURACY_DROP, gap: float = PATCH_GAP,
          max_rounds: int = _CONFIG.max_rounds, strategy: str = _CONFIG.strategy,
          objective: str = _CONFIG.objective, layer: str | None = _CONFIG.layer,
          care_neurons: int | None = _CONFIG.care_neurons,
          care_min_multiplier: float = _CONFIG.care_range[0],
          care_max_multiplier: float = _CONFIG.care_range[1],
          care_triggered: int = _CONFIG.care_triggered, care_eval: int = _CONFIG.care_eval,
          care_objective: str = _CONFIG.care_objective, care_alpha: float = _CONFIG.care_alpha,
          care_ranking: str = _CONFIG.care_ranking,
          care_particles: int = _CONFIG.care_particles,
          care_iterations: int = _CONFIG.care_iterations,
          care_patience: int = _CONFIG.care_patience, solver: str = _CONFIG.solver,
          steps: int = _CONFIG.steps, score: str = _CONFIG.score,
          transplant: str = _CONFIG.transplant, transplant_count: int = _CONFIG.transplant_count,
          heldout_count: int = _CONFIG.heldout_count,
          attribution_form: str = _CONFIG.attribution_form,
          allow_shared: bool = _CONFIG.allow_shared, seed: int = _CONFIG.seed,
          statistics: str = _CONFIG.statistics, stat_rows: int | None = _CONFIG.stat_rows,
          cache_dir: str | os.PathLike[str] | None = _CONFIG.cache_dir,
          exclude_layers: Sequence[str] = _CONFIG.exclude_layers,
          max_memory: int | str | None = _CONFIG.max_memory,
          batch: int | None = _CONFIG.batch,
          device: str = "auto", provider: str = "auto", force: bool = False,
          show_progress: bool | None = _CONFIG.show_progress,
          log: Callable[[str], None] | None = None) -> PatchResult:
    """Patch ``model`` so that ``pairs``' corrupted inputs are classified as their clean
    ones, within ``budget`` of accuracy on ``eval``; verify the written file under
    onnxruntime (``onnx-rectify patch``).

    The loop aims for a pair gap ``gap`` (mean of p_y(clean) - p_y(corrupted)) at most
    ``budget`` accuracy drop (0.01 = 1 point, the release gate's default). With ``out`` the
    result is written there atomically (with ``force``, over an existing file); without it
    the file is written to a temporary folder, verified from there and returned as
    ``result.model``. ``attack`` adds the attack success rate before and after. ``log``
    receives the loop's lines (rounds, decisions). Options are the CLI's.
    """
    care = dict(care_min_multiplier=care_min_multiplier, care_max_multiplier=care_max_multiplier,
                care_triggered=care_triggered, care_eval=care_eval,
                care_objective=care_objective, care_alpha=care_alpha, care_ranking=care_ranking,
                care_particles=care_particles, care_iterations=care_iterations,
                care_patience=care_patience)
    _check_options(dict(budget=budget, gap=gap, max_rounds=max_rounds, strategy=strategy,
                        objective=objective, care_neurons=care_neurons, solver=solver,
                        steps=steps, score=score, transplant=transplant,
                        transplant_count=transplant_count, heldout_count=heldout_count,
                        attribution_form=attribution_form, seed=seed, statistics=statistics,
                        stat_rows=stat_rows, device=device, provider=provider, batch=batch,
                        **care), "patch")
    if not care_min_multiplier < care_max_multiplier:
        raise RectifyError(f"care_min_multiplier={care_min_multiplier!r}: must be below "
                           f"care_max_multiplier={care_max_multiplier!r}")
    excluded, memory = _names(exclude_layers), _memory(max_memory)
    start = time.perf_counter()
    inputs, attack_set = _inputs(model, pairs, eval, calib, attack)
    config = _config(strategy=strategy, objective=objective, budget=budget, gap=gap,
                     max_rounds=max_rounds, layer=layer, steps=steps, score=score,
                     transplant=transplant, transplant_count=transplant_count,
                     heldout_count=heldout_count, seed=seed, attribution_form=attribution_form,
                     allow_shared=allow_shared,
                     cache_dir=None if cache_dir is None else str(cache_dir), solver=solver,
                     stat_rows=stat_rows, statistics=statistics, care_neurons=care_neurons,
                     exclude_layers=excluded, max_memory=memory, batch=batch,
                     show_progress=show_progress, **care)
    rates: dict[str, float] = {}

    def measure_attack(report: PatchReport, outputs, staged_model: Path) -> None:
        """ASR of the input and of the written file (staged, before it is renamed)."""
        if attack_set is None or attack_set.target is None:
            return
        base = inputs.loaded.path or inputs.loaded.proto.SerializeToString()
        for key, source in (("before", base), ("after", staged_model)):
            rates[key] = attack_success_rate(source, attack_set.x, attack_set.y,
                                             attack_set.target, provider, label="attack")

    names = (_source_name(model, "model"), _source_name(pairs, "pairs"),
             _source_name(eval, "eval"))
    if out is not None:
        report = patch_loaded(inputs, Path(out), config, device, provider, force, log,
                              names=names, stage_reports=measure_attack, start=start,
                              out_label="out")
        return _patch_result(report, rates, Path(out), None)
    with tempfile.TemporaryDirectory(prefix="onnx-rectify-") as work:
        written = Path(work) / (default_output(Path(str(names[0]))).name
                                if _is_path(model) else "model.rectified.onnx")
        report = patch_loaded(inputs, written, config, device, provider, False, log,
                              names=names, stage_reports=measure_attack, start=start)
        patched = load_model(written, warn=False).proto  # external data read into memory
    report.output, report.written = "", []
    return _patch_result(report, rates, None, patched)


def _patch_result(report: PatchReport, rates: dict[str, float], output: Path | None,
                  model: onnx.ModelProto | None) -> PatchResult:
    v, r = report.verification, report.result
    return PatchResult(report.passed, v.base_accuracy, v.patched_accuracy, v.base_pair_gap,
                       v.patched_pair_gap, rates.get("before"), rates.get("after"),
                       [rd.layer for rd in r.rounds if rd.kept], list(r.edits), output, model,
                       dict(report.timings), report)


@dataclass
class LocateResult:
    """Editable layers ranked best first (``onnx-rectify locate``): by editability
    (``method="attribution"``: :class:`~patcher.rectify.LayerScore`, score and IG
    completeness error) or by the share of the pair gap restored when a layer's top
    neurons take their clean values (``"causal"``: ``LayerEffect``)."""

    method: str
    ranking: list
    #: the attribution ranking of the same run (the same list for ``"attribution"``)
    attribution_ranking: list[LayerScore]
    seconds: float

    @property
    def layers(self) -> list[str]:
        """The layer names, best first."""
        return [entry.layer for entry in self.ranking]


@_keyword_errors
def locate(model: ModelSource, pairs: PairsSource, *, eval: LabelledSource | None = None,  # noqa: A002
           calib: LabelledSource | None = None, method: str = "attribution",
           top_fraction: float = _CONFIG.causal_top_fraction,
           steps: int = _CONFIG.steps, score: str = _CONFIG.score,
           transplant: str = _CONFIG.transplant, transplant_count: int = _CONFIG.transplant_count,
           heldout_count: int = _CONFIG.heldout_count,
           attribution_form: str = _CONFIG.attribution_form,
           allow_shared: bool = _CONFIG.allow_shared, seed: int = _CONFIG.seed,
           statistics: str = _CONFIG.statistics, stat_rows: int | None = _CONFIG.stat_rows,
           cache_dir: str | os.PathLike[str] | None = _CONFIG.cache_dir,
           exclude_layers: Sequence[str] = _CONFIG.exclude_layers,
           max_memory: int | str | None = _CONFIG.max_memory,
           batch: int | None = _CONFIG.batch,
           device: str = "auto", show_progress: bool | None = _CONFIG.show_progress
           ) -> LocateResult:
    """Rank ``model``'s editable layers for ``pairs`` (``onnx-rectify locate``). The key
    statistics are computed on ``calib``, else ``eval``, else the pairs' clean inputs."""
    _check_options(dict(method=method, top_fraction=top_fraction, steps=steps, score=score,
                        transplant=transplant, transplant_count=transplant_count,
                        heldout_count=heldout_count, attribution_form=attribution_form, seed=seed,
                        statistics=statistics, stat_rows=stat_rows, device=device, batch=batch),
                   "locate")
    excluded, memory = _names(exclude_layers), _memory(max_memory)
    start = time.perf_counter()
    inputs, _ = _inputs(model, pairs, eval, calib, None)
    config = _config(steps=steps, score=score, transplant=transplant, seed=seed,
                     transplant_count=transplant_count, heldout_count=heldout_count,
                     attribution_form=attribution_form, allow_shared=allow_shared,
                     cache_dir=None if cache_dir is None else str(cache_dir),
                     top_fraction=top_fraction, stat_rows=stat_rows, statistics=statistics,
                     exclude_layers=excluded, max_memory=memory, batch=batch,
                     show_progress=show_progress)
    if method == "causal":
        effects, ranking = locate_causal(inputs, config, device)
        return LocateResult(method, effects, ranking, time.perf_counter() - start)
    ranking = locate_layers(inputs, config, device)
    warn_completeness(ranking, attribution_form)
    return LocateResult(method, ranking, ranking, time.perf_counter() - start)


@_keyword_errors
def verify(patched: ModelSource, *, base: ModelSource, eval: LabelledSource,  # noqa: A002
           attack: AttackSource | None = None, pairs: PairsSource | None = None,
           max_accuracy_drop: float = MAX_ACCURACY_DROP, max_asr: float = MAX_ASR,
           max_gap: float = MAX_GAP, provider: str = "auto", latency_runs: int | None = None,
           batch: int | None = None) -> VerifyReport:
    """The release gate (``onnx-rectify verify``): is ``patched`` safe to ship in place of
    ``base``? Only Conv/Gemm/MatMul weight values may differ, each change declared in the
    provenance; under onnxruntime the accuracy drop on ``eval`` is at most
    ``max_accuracy_drop``, the attack success rate on ``attack`` at most ``max_asr``, the
    pair gap on ``pairs`` at most ``max_gap``. ``latency_runs`` (timed runs of each model)
    and ``batch`` (images per onnxruntime call) default to what fits the model, as the CLI's.
    ``report.passed`` is the verdict; ``report.checks`` the figures; ``report.junit()`` and
    ``report.as_dict()`` the CI forms."""
    _check_options(dict(max_accuracy_drop=max_accuracy_drop, max_asr=max_asr, max_gap=max_gap,
                        provider=provider, latency_runs=latency_runs, batch=batch), "verify")
    base_model, candidate = _load(base, "base"), _load(patched, "patched")
    spec, classes = classifier_contract(base_model.proto, _source_name(base, "base"))
    classifier_contract(candidate.proto, _source_name(patched, "patched"))
    ev = _labelled(eval, spec, classes, "eval")
    attack_set = (_labelled(attack, spec, classes, "attack", with_target=True)
                  if attack is not None else None)
    pair_set = _pairs(pairs, spec, classes, "pairs") if pairs is not None else None
    names = (_source_name(eval, "eval"), _source_name(attack, "attack"),
             _source_name(pairs, "pairs"))
    return verify_sets(base_model, candidate, ev, attack_set, pair_set, max_accuracy_drop,
                       max_asr, max_gap, provider, latency_runs=latency_runs, names=names,
                       batch=batch)


@_keyword_errors
def inspect(model: ModelSource, *, parity: bool = True, seed: int = 0, batch: int = 2,
            provider: str = "auto",
            input_shapes: Mapping[str, Sequence[int]] | None = None) -> ModelSummary:
    """Describe ``model`` (``onnx-rectify inspect``): IR and opsets, inputs and outputs, ops,
    editable layers, nodes the shadow graph cannot run (``summary.unsupported``, listed
    rather than refused) and, with ``parity``, whether the shadow graph matches
    onnxruntime on seeded random input (``summary.parity.passed``). ``input_shapes`` gives
    inputs with symbolic dimensions a concrete shape."""
    _check_options(dict(seed=seed, batch=batch, provider=provider), "inspect")
    if not (_is_path(model) or isinstance(model, onnx.ModelProto)):
        raise BadModelError(f"model: expected a path or an onnx.ModelProto, got "
                            f"{type(model).__name__}")
    shapes = None
    if input_shapes is not None:
        shapes = {}
        for name, dims in input_shapes.items():
            shape = tuple(dims) if isinstance(dims, Sequence) else ()
            if not shape or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool)
                                    and 0 < d <= 1 << 16 for d in shape) or \
                    math.prod(shape) > 1 << 27:
                raise RectifyError(f"input_shapes['{name}']={dims!r}: expected positive "
                                   "integers (each at most 65536, 2^27 elements in all)")
            shapes[str(name)] = tuple(int(d) for d in shape)
    return summarize(load_model(model), parity=parity, seed=seed, batch=batch,
                     provider=provider, shapes=shapes)
