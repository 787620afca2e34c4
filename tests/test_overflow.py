"""A model that overflows (finite inputs, Inf scores) is described as such: parity compares where
both sides are finite and says how many outputs overflowed; verify counts the images whose scores are
not finite, fails a patch that makes them overflow, keeps its statistics numbers, and lets no numpy
warning reach stderr."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from patcher.cli import main
from patcher.graph.parity import compare, random_inputs
from patcher.graph.shadow import ShadowGraph

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "backdoor_cnn"


@pytest.fixture(scope="module")
def overflowing(tmp_path_factory) -> str:
    """backdoor_cnn with its last Gemm scaled by 3e38: every score is +-Inf in float32."""
    model = onnx.load(str(SAMPLE / "model.onnx"))
    last = [t for t in model.graph.initializer if numpy_helper.to_array(t).shape[:1] == (10,)
            and numpy_helper.to_array(t).ndim == 2]
    assert len(last) == 1
    weight = numpy_helper.to_array(last[0])
    last[0].CopyFrom(numpy_helper.from_array((weight * np.float32(3e38)).astype(np.float32),
                                             last[0].name))
    path = tmp_path_factory.mktemp("overflow") / "over.onnx"
    onnx.save(model, str(path))
    return str(path)


def test_parity_of_an_overflowing_model_counts_its_infinities(overflowing):
    model = onnx.load(overflowing)
    inputs = random_inputs(model)
    result = compare(ShadowGraph.from_onnx(model), overflowing, inputs)
    assert result.nonfinite > 0
    assert result.passed, result  # compared where both sides are finite
    assert np.isfinite(result.max_abs_diff)
    finite = compare(ShadowGraph.from_onnx(str(SAMPLE / "model.onnx")), str(SAMPLE / "model.onnx"),
                     inputs)
    assert finite.nonfinite == 0 and finite.passed


def test_inspect_says_the_model_overflows(overflowing):
    outcome = CliRunner().invoke(main, ["inspect", overflowing])
    parity = [l for l in outcome.stdout.splitlines() if l.startswith("parity")]
    assert len(parity) == 1 and "PASS" in parity[0] and "overflows" in parity[0], outcome.output


def test_verify_fails_a_patch_that_overflows_and_keeps_numbers(overflowing, tmp_path):
    report = tmp_path / "verify.json"
    outcome = CliRunner().invoke(main, ["verify", overflowing, "--base", str(SAMPLE / "model.onnx"),
                                        "--eval", str(SAMPLE / "eval.npz"),
                                        "--pairs", str(SAMPLE / "pairs_n1.npz"),
                                        "--json", str(report)])
    assert outcome.exit_code == 1, outcome.output
    assert "Warning" not in outcome.stderr and "RuntimeWarning" not in outcome.output
    checks = {c["name"]: c for c in json.loads(report.read_text())["checks"]}
    accuracy = checks["accuracy"]
    assert not accuracy["passed"]
    assert "Inf or NaN on 1000 eval image(s)" in accuracy["message"]
    figures = accuracy["figures"]
    assert figures["patched_nonfinite_images"] == 1000 and figures["base_nonfinite_images"] == 0
    assert all(np.isfinite(figures[k]) for k in ("output_diff_max", "output_diff_mean",
                                                 "output_diff_p99"))
    assert np.isfinite(checks["pair_gap"]["figures"]["patched_gap"])
