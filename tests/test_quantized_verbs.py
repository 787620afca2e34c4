"""``inspect``, ``locate``, ``verify`` and ``diff`` on every shipped-precision form of
samples/backdoor_cnn (int8 QDQ, QOperator, dynamic; fp16 keep-io), kept cheap: 100 eval
images, and a one-layer static patch (the layer locate ranks first) to have a file to verify
and diff. The full dynamic-loop patch and its ASR target are in test_quantized_patch.py and
test_quantized_dynamic.py."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from patcher.cli import main

CNN = Path(__file__).resolve().parents[1] / "samples" / "backdoor_cnn"
FILES = {"qdq": "model_int8_qdq.onnx", "qoperator": "model_int8_qoperator.onnx",
         "dynamic": "model_int8_dynamic.onnx", "fp16": "model_fp16.onnx"}
FORMS = {"qdq": "QDQ", "qoperator": "QOperator", "dynamic": "dynamic", "fp16": None}


@pytest.fixture(scope="module")
def small_eval(tmp_path_factory) -> Path:
    data = np.load(CNN / "eval.npz")
    path = tmp_path_factory.mktemp("eval") / "eval100.npz"
    np.savez(path, x=data["x"][:100], y=data["y"][:100])
    return path


def _run(*args: str) -> "object":
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("fmt", sorted(FILES))
def test_inspect_locate_verify_diff_work_on_each_precision(fmt, small_eval, tmp_path):
    model = CNN / FILES[fmt]
    form = FORMS[fmt]
    # inspect: every layer editable, how each is stored, parity passes
    result = _run("inspect", model, "--json", tmp_path / "i.json", "--provider", "cpu")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "i.json").read_text())
    layers = summary["editable_layers"]
    assert len(layers) == 5 and summary["parity"]["passed"]
    if form:
        assert all(l["quantized"]["form"] == form and l["storage"].startswith("int8")
                   for l in layers)
    else:
        assert all("quantized" not in l and l["dtype"] == "float16" for l in layers)
    # locate: every editable layer ranked
    result = _run("locate", model, "--pairs", CNN / "pairs_n1.npz", "--eval", small_eval,
                  "--json", tmp_path / "l.json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    ranking = json.loads((tmp_path / "l.json").read_text())["ranking"]
    assert sorted(r["layer"] for r in ranking) == sorted(l["name"] for l in layers)
    top = ranking[0]["layer"]
    # a one-layer patch to verify and diff (exit 0 or 1: the gap target is not the point)
    out = tmp_path / "patched.onnx"
    result = _run("patch", model, "--pairs", CNN / "pairs_n1.npz", "--eval", small_eval,
                  "-o", out, "--strategy", "static", "--layer", top, "--device", "cpu",
                  "--provider", "cpu")
    assert result.exit_code in (0, 1) and out.exists(), result.output
    weight = next(l["weight"] for l in layers if l["name"] == top)
    # verify: the structure and provenance checks accept exactly the declared tensors
    result = _run("verify", out, "--base", model, "--eval", small_eval, "--pairs",
                  CNN / "pairs_n1.npz", "--json", tmp_path / "v.json", "--provider", "cpu")
    assert result.exit_code in (0, 1), result.output
    checks = {c["name"]: c for c in json.loads((tmp_path / "v.json").read_text())["checks"]}
    assert checks["structure"]["passed"], checks["structure"]
    assert checks["provenance"]["passed"], checks["provenance"]
    # diff: the edited weight (int8: in steps), nothing structural
    result = _run("diff", model, out, "--json", tmp_path / "d.json")
    assert result.exit_code == 1, result.output
    diff = json.loads((tmp_path / "d.json").read_text())
    assert diff["structural"] == []
    by_name = {t["name"]: t for t in diff["tensors"]}
    assert weight in by_name and top in by_name[weight]["feeds"]
    assert by_name[weight]["unit"] == ("steps" if form else "value")
    dtypes = {t.name: t.data_type for t in onnx.load(str(model)).graph.initializer}
    assert dtypes == {t.name: t.data_type for t in onnx.load(str(out)).graph.initializer}


def test_float16_rounding_of_a_rank_one_edit_is_not_counted_as_rank():
    """Storing W + u v^T in float16 adds a full-rank rounding error: verify's rank (which the
    provenance check compares with the declared rank-one edits) leaves out singular values
    below the bound of that error, and still sees a real second direction."""
    from patcher.gate.verify import numerical_rank, rounding_floor

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((64, 300)) * 0.05).astype(np.float16)
    u, v = rng.standard_normal(64), rng.standard_normal(300)
    edit = 0.002 * np.outer(u, v)
    stored = (w.astype(np.float64) + edit).astype(np.float16)
    delta = stored.astype(np.float64) - w.astype(np.float64)
    assert numerical_rank(delta) > 1  # fp16 rounding alone: full rank at rel_tol 1e-5
    assert numerical_rank(delta, floor=rounding_floor(stored)) == 1
    second = 0.002 * np.outer(rng.standard_normal(64), rng.standard_normal(300))
    stored2 = (w.astype(np.float64) + edit + second).astype(np.float16)
    delta2 = stored2.astype(np.float64) - w.astype(np.float64)
    assert numerical_rank(delta2, floor=rounding_floor(stored2)) == 2
    assert rounding_floor(np.arange(4, dtype=np.int8)) == 0.0
