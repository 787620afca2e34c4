"""`onnx-rectify verify` (the release gate) and `diff`."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

from patcher.cli import main
from patcher.demo import sample_folder
from patcher.patch import patch
from patcher.rectify import RectifyConfig

SAMPLE = sample_folder()


@pytest.fixture(scope="module")
def patched(tmp_path_factory):
    out = tmp_path_factory.mktemp("verify") / "patched.onnx"
    patch(SAMPLE / "model.onnx", SAMPLE / "pairs_n1.npz", SAMPLE / "eval.npz", None, out,
          RectifyConfig(), "cpu", "cpu")
    return out


def _verify(model, *extra):
    return CliRunner().invoke(main, ["verify", str(model), "--base", str(SAMPLE / "model.onnx"),
                                     "--eval", str(SAMPLE / "eval.npz"), "--attack",
                                     str(SAMPLE / "attack.npz"), "--provider", "cpu", *extra])


def test_a_good_patch_passes_with_json_and_junit(patched, tmp_path):
    result = _verify(patched, "--pairs", str(SAMPLE / "pairs_n1.npz"), "--json",
                     str(tmp_path / "v.json"), "--junit", str(tmp_path / "v.xml"))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "v.json").read_text())
    assert report["passed"] is True and report["provider"] == "CPUExecutionProvider"
    names = [c["name"] for c in report["checks"]]
    assert names == ["load", "structure", "provenance", "accuracy", "attack_success_rate",
                     "pair_gap", "latency"]
    figures = {c["name"]: c["figures"] for c in report["checks"]}
    assert figures["attack_success_rate"]["patched_asr"] <= 0.05
    assert {"top1_flip_rate", "output_diff_p99", "accuracy_drop"} <= set(figures["accuracy"])
    assert figures["latency"]["latency_ratio"] > 0
    suite = ET.parse(tmp_path / "v.xml").getroot()
    assert suite.tag == "testsuite" and suite.get("failures") == "0"
    assert [c.get("name") for c in suite.iter("testcase")] == names


def test_a_model_that_still_misbehaves_fails(tmp_path):
    result = _verify(SAMPLE / "model.onnx", "--junit", str(tmp_path / "v.xml"))
    assert result.exit_code == 1
    assert "FAIL  attack_success_rate" in result.output
    failed = [c.get("name") for c in ET.parse(tmp_path / "v.xml").getroot().iter("testcase")
              if c.find("failure") is not None]
    assert failed == ["attack_success_rate"]


def test_structural_changes_and_undeclared_edits_fail(patched, tmp_path):
    model = onnx.load(str(patched))
    out = model.graph.output[0].name
    model.graph.node.append(helper.make_node("Identity", [out], ["extra"], name="added"))
    model.graph.output[0].name = "extra"
    altered = tmp_path / "altered.onnx"
    onnx.save(model, str(altered))
    result = _verify(altered)
    assert result.exit_code == 1 and "FAIL  structure" in result.output

    sneaky = onnx.load(str(SAMPLE / "model.onnx"))
    w = sneaky.graph.initializer[0]
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 1.01, w.name))
    path = tmp_path / "sneaky.onnx"
    onnx.save(sneaky, str(path))
    result = _verify(path)
    assert result.exit_code == 1 and "changed without provenance" in result.output


def test_truncated_file_exits_2(patched, tmp_path):
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(patched.read_bytes()[:1000])
    result = _verify(cut)
    assert result.exit_code == 2


def test_diff_lists_the_edited_tensor(patched, tmp_path):
    runner = CliRunner()
    same = runner.invoke(main, ["diff", str(SAMPLE / "model.onnx"), str(SAMPLE / "model.onnx")])
    assert same.exit_code == 0 and "identical" in same.output
    changed = runner.invoke(main, ["diff", str(SAMPLE / "model.onnx"), str(patched), "--json",
                                   str(tmp_path / "d.json")])
    assert changed.exit_code == 1
    report = json.loads((tmp_path / "d.json").read_text())
    assert report["identical"] is False and report["structural"] == []
    assert report["tensors"] and all(t["rank"] >= 1 and t["editable"] for t in report["tensors"])
