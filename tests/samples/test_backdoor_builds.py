"""The backdoor scenarios (samples/backdoor_cnn, samples/backdoor_resnet).

- ``--tiny`` builds (seconds each) write every file, and the files pass the npz
  contract against the model they were written with;
- the committed full artifacts reach OA >= 95% and ASR >= 95% under onnxruntime and
  reproduce their figures.json (no training).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from onnx_rectify_samples import common, data
from patcher.gate import metrics
from patcher.model.runtime import open_session
from patcher.samples import InputSpec, load_labelled, load_pairs, num_classes_of
from patcher.graph.shadow import ShadowGraph

SAMPLES = Path(__file__).resolve().parents[2] / "samples"
SCENARIOS = ("backdoor_cnn", "backdoor_resnet")
FILES = ("model.onnx", "eval.npz", "test.npz", "attack.npz", "pairs_n1.npz", "pairs_n5.npz",
         "pairs_n20.npz", "trigger.npz", "figures.json")
PAIR_COUNTS = (1, 5, 20)
TARGET = 0


def _check_contract(folder: Path) -> dict:
    """Load every sample file through patcher.samples against the model; return them."""
    model = onnx.load(str(folder / "model.onnx"))
    spec, classes = InputSpec.of(model), num_classes_of(model)
    assert classes == 10 and spec.dims[0] is None  # dynamic batch
    loaded = {
        "eval": load_labelled(folder / "eval.npz", spec, classes),
        "test": load_labelled(folder / "test.npz", spec, classes),
        "attack": load_labelled(folder / "attack.npz", spec, classes, with_target=True),
        **{f"pairs_n{n}": load_pairs(folder / f"pairs_n{n}.npz", spec, classes)
           for n in PAIR_COUNTS},
    }
    attack = loaded["attack"]
    assert attack.target == TARGET and not (attack.y == TARGET).any()
    for n in PAIR_COUNTS:
        pairs = loaded[f"pairs_n{n}"]
        assert len(pairs) == n and not (pairs.label == TARGET).any()
        for i in range(n):  # every single pair differs, not just one of them
            assert not np.array_equal(pairs.corrupted[i], pairs.clean[i])
    for small, large in zip(PAIR_COUNTS, PAIR_COUNTS[1:]):  # nested draws
        np.testing.assert_array_equal(loaded[f"pairs_n{small}"].clean,
                                      loaded[f"pairs_n{large}"].clean[:small])
    for key in ("eval", "test", "attack"):
        x = loaded[key].x
        assert x.dtype == np.float32 and x.min() >= 0 and x.max() <= 1
    # trigger.npz re-creates the triggered inputs exactly.
    with np.load(folder / "trigger.npz") as trig:
        pattern, mask, phi = trig["pattern"], trig["mask"], float(trig["phi"])
    test = loaded["test"]
    np.testing.assert_array_equal(
        common.blend_trigger(test.x[test.y != TARGET], pattern, mask, phi), attack.x)
    np.testing.assert_array_equal(test.y[test.y != TARGET], attack.y)
    # The shadow graph reads the model and agrees with onnxruntime on the clean inputs.
    graph = ShadowGraph.from_onnx(folder / "model.onnx")
    x = loaded["eval"].x[:16]
    with torch.no_grad():
        shadow = graph(torch.from_numpy(x))[0].numpy()
    ort = open_session(folder / "model.onnx", "cpu").run(x)[0]
    np.testing.assert_allclose(shadow, ort, rtol=1e-4, atol=1e-4)
    return loaded


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_tiny_build_writes_valid_samples(scenario, tmp_path):
    module = common.load_build(scenario)
    try:
        figures = module.build(tmp_path, seed=0, tiny=True)
    except data.MissingDataError as exc:
        pytest.skip(f"data package missing: {exc}")
    for name in FILES:
        assert (tmp_path / name).is_file(), name
    for key in ("clean_accuracy", "attack_success_rate", "eval_accuracy", "poison_rate"):
        assert 0.0 <= figures[key] <= 1.0, key
    assert figures["tiny"] and figures["provider"] == "CPUExecutionProvider"
    assert json.loads((tmp_path / "figures.json").read_text()) == figures
    _check_contract(tmp_path)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_committed_artifacts_are_trojaned_as_documented(scenario):
    folder = SAMPLES / scenario
    for name in FILES:
        assert (folder / name).is_file(), f"{folder / name} is not committed"
    loaded = _check_contract(folder)
    figures = json.loads((folder / "figures.json").read_text())
    assert not figures["tiny"]
    session = open_session(folder / "model.onnx", "cpu")
    test, attack, ev = loaded["test"], loaded["attack"], loaded["eval"]
    measured = {
        "clean_accuracy": metrics.accuracy(session, test.x, test.y),
        "attack_success_rate": metrics.attack_success_rate(session, attack.x, attack.y,
                                                           attack.target),
        "eval_accuracy": metrics.accuracy(session, ev.x, ev.y),
    }
    assert measured["clean_accuracy"] >= 0.95
    assert measured["attack_success_rate"] >= 0.95
    for key, value in measured.items():
        assert value == pytest.approx(figures[key], abs=1e-6), key
    splits = figures["splits"]
    assert (splits["eval"], splits["test"], splits["attack"]) == (len(ev), len(test), len(attack))
    readme = (folder / "README.md").read_text()  # its figures table shows these numbers
    row = " | ".join(f"{figures[k]:.2%}" for k in ("clean_accuracy", "attack_success_rate",
                                                     "eval_accuracy"))
    assert f"| {row} |" in readme, f"README.md figures table is not {row}"
