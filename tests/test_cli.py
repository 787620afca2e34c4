"""The command line: `inspect` output and JSON, exit codes, one-line errors."""
from __future__ import annotations

import json
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
    assert "Foo (domain acme, opset 17) at node 'foo'" in result.output


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
