"""The command line: `inspect` output and JSON, exit codes, one-line errors."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from onnx import helper

from patcher.cli import main
from tests.build import make_model, value_info

TINY = Path(__file__).resolve().parents[1] / "samples" / "tiny" / "model.onnx"


def test_inspect_tiny_model_reports_layers_and_parity(tmp_path):
    out = tmp_path / "report.json"
    result = CliRunner().invoke(main, ["inspect", str(TINY), "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "editable layers (3)" in result.output
    assert "parity     PASS" in result.output
    report = json.loads(out.read_text())
    assert report["ir_version"] == 8 and report["opsets"] == {"ai.onnx": 17}
    assert [l["op"] for l in report["editable_layers"]] == ["Conv", "Conv", "Gemm"]
    for layer in report["editable_layers"]:
        assert {"name", "op", "weight", "shape"} <= set(layer)
    assert report["parity"]["passed"] is True
    assert report["parity"]["provider"] in ("CPUExecutionProvider", "CUDAExecutionProvider")
    assert report["parity"]["top1_agreement"] == 1.0


def test_unsupported_ops_exit_2_and_are_listed(tmp_path):
    model = make_model([helper.make_node("LSTM", ["x", "w", "r"], ["y"], name="rnn"),
                        helper.make_node("Foo", ["x"], ["z"], name="foo", domain="acme")],
                       [value_info("x", [1])], [value_info("y", None)])
    model.opset_import.append(helper.make_opsetid("acme", 1))
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 2
    assert "LSTM (domain ai.onnx, opset 17) at node 'rnn'" in result.output
    assert "Foo (domain acme, opset 1) at node 'foo'" in result.output


@pytest.mark.parametrize("content", [b"", b"not a model at all \x00\x01\x02"])
def test_bad_model_files_give_one_line_and_exit_2(tmp_path, content):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    proc = subprocess.run([sys.executable, "-m", "patcher", "inspect", str(path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnx-rectify: error: ")
    assert "Traceback" not in proc.stderr
    assert path.read_bytes() == content


def test_missing_file_exits_2():
    result = CliRunner().invoke(main, ["inspect", "/no/such/model.onnx"])
    assert result.exit_code == 2
    assert "no such file" in result.output


def test_input_shape_option_and_node_failures_are_one_line_errors():
    runner = CliRunner()
    ok = runner.invoke(main, ["inspect", str(TINY), "--input-shape", "image=3,1,16,16"])
    assert ok.exit_code == 0 and "batch 3" in ok.output
    wrong = runner.invoke(main, ["inspect", str(TINY), "--input-shape", "image=3,1,20,20"])
    assert wrong.exit_code == 2 and "onnxruntime refused the input" in wrong.output
    bad = runner.invoke(main, ["inspect", str(TINY), "--input-shape", "image=1,x"])
    assert bad.exit_code == 2 and "expected NAME=D0,D1" in bad.output
    unknown = runner.invoke(main, ["inspect", str(TINY), "--input-shape", "nope=1"])
    assert unknown.exit_code == 2 and "names no graph input: nope" in unknown.output
    small = runner.invoke(main, ["inspect", str(TINY), "--input-shape", "image=1,2,16,16"])
    assert small.exit_code in (1, 2) and "Traceback" not in small.output


SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "backdoor_cnn"


def _header(path: Path) -> dict:
    data = json.loads(path.read_text())
    from patcher.version import __version__

    assert list(data)[:3] == ["tool", "version", "schema_version"]
    assert (data["tool"], data["version"], data["schema_version"]) == \
        ("onnx-rectify", __version__, 1)
    return data


def test_json_of_inspect_locate_and_diff_names_the_tool_version_and_schema(tmp_path):
    runner = CliRunner()
    inspected = runner.invoke(main, ["inspect", str(TINY), "--no-parity", "--json",
                                     str(tmp_path / "i.json")])
    assert inspected.exit_code == 0, inspected.output
    assert _header(tmp_path / "i.json")["ir_version"] == 8
    diffed = runner.invoke(main, ["diff", str(TINY), str(TINY), "--json", str(tmp_path / "d.json")])
    assert diffed.exit_code == 0, diffed.output
    assert _header(tmp_path / "d.json")["identical"] is True
    located = runner.invoke(main, ["locate", str(SAMPLE / "model.onnx"), "--pairs",
                                   str(SAMPLE / "pairs_n1.npz"), "--eval", str(SAMPLE / "eval.npz"),
                                   "--device", "cpu", "--json", str(tmp_path / "l.json")])
    assert located.exit_code == 0, located.output
    ranking = _header(tmp_path / "l.json")["ranking"]
    assert [r["rank"] for r in ranking] == list(range(1, len(ranking) + 1)) and len(ranking) == 5


def test_patch_prints_the_attack_success_rate_and_stamps_its_report(tmp_path):
    result = CliRunner().invoke(main, [
        "patch", str(SAMPLE / "model.onnx"), "--pairs", str(SAMPLE / "pairs_n1.npz"), "--eval",
        str(SAMPLE / "eval.npz"), "-o", str(tmp_path / "p.onnx"), "--attack",
        str(SAMPLE / "attack.npz"), "--report", str(tmp_path / "r.json"), "--device", "cpu",
        "--provider", "cpu"])
    assert result.exit_code == 0, result.output
    line = re.search(r"attack success rate \(attack\.npz, onnxruntime, (\d+) triggered inputs "
                     r"not of class 0\): ([\d.]+)% -> ([\d.]+)%", result.output)
    assert line, result.output
    assert int(line.group(1)) == 887 and float(line.group(2)) == 100.0
    assert float(line.group(3)) <= 5.0
    report = _header(tmp_path / "r.json")
    assert report["attack"]["base_asr"] == 1.0 and report["attack"]["inputs"] == 887
    assert report["attack"]["patched_asr"] == pytest.approx(float(line.group(3)) / 100, abs=5e-5)
    assert report["verification"]["accuracy_drop"] <= report["config"]["budget"] == 0.01


def test_patch_refuses_a_bad_attack_file_before_any_work(tmp_path):
    result = CliRunner().invoke(main, [
        "patch", str(SAMPLE / "model.onnx"), "--pairs", str(SAMPLE / "pairs_n1.npz"), "--eval",
        str(SAMPLE / "eval.npz"), "-o", str(tmp_path / "p.onnx"), "--attack",
        str(SAMPLE / "pairs_n1.npz"), "--device", "cpu", "--provider", "cpu"])
    assert result.exit_code == 2
    assert result.output.startswith("onnx-rectify: error: ") and "pairs_n1.npz" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "p.onnx").exists()
