"""`onnx-rectify verify` (the release gate) and `diff`."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

from patcher.cli import main
from patcher.demo import sample_folder
from patcher.gate import defaults
from patcher.gate.verify import Check, VerifyReport, format_figures, format_value
from patcher.version import JSON_SCHEMA_VERSION, __version__

SAMPLE = sample_folder()
SCHEMA = Path(__file__).resolve().parent / "schemas" / "junit-10.xsd"


@pytest.fixture(scope="module")
def patched(tmp_path_factory):
    """The sample patched by `patch` with its default options (the gate's defaults)."""
    out = tmp_path_factory.mktemp("verify") / "patched.onnx"
    result = CliRunner().invoke(main, ["patch", str(SAMPLE / "model.onnx"), "--pairs",
                                       str(SAMPLE / "pairs_n1.npz"), "--eval",
                                       str(SAMPLE / "eval.npz"), "-o", str(out),
                                       "--device", "cpu", "--provider", "cpu"])
    assert result.exit_code == 0, result.output
    return out


def _verify(model, *extra):
    return CliRunner().invoke(main, ["verify", str(model), "--base", str(SAMPLE / "model.onnx"),
                                     "--eval", str(SAMPLE / "eval.npz"), "--attack",
                                     str(SAMPLE / "attack.npz"), "--provider", "cpu", *extra])


@pytest.fixture(scope="module")
def gate_runs(patched, tmp_path_factory):
    """`verify` with default thresholds: the patched sample (passes, every gate) and the
    trojaned input (fails on ASR; no --pairs, so the pair gap is skipped), with JSON and JUnit."""
    folder = tmp_path_factory.mktemp("gate")
    good = _verify(patched, "--pairs", str(SAMPLE / "pairs_n1.npz"), "--json",
                   str(folder / "good.json"), "--junit", str(folder / "good.xml"))
    bad = _verify(SAMPLE / "model.onnx", "--json", str(folder / "bad.json"), "--junit",
                  str(folder / "bad.xml"))
    return {"good": good, "bad": bad, "folder": folder}


def test_patch_defaults_pass_verify_defaults(gate_runs):
    # `patched` ran `patch` with no threshold option, `good` ran `verify` with none
    assert gate_runs["good"].exit_code == 0, gate_runs["good"].output
    assert "verify: PASSED" in gate_runs["good"].output


def _default(command: str, option: str):
    return next(p.default for p in main.commands[command].params if p.name == option)


def test_patch_and_verify_share_the_gates_defaults():
    assert _default("patch", "budget") == _default("verify", "max_accuracy_drop") \
        == defaults.MAX_ACCURACY_DROP
    assert _default("verify", "max_gap") == defaults.MAX_GAP
    assert _default("verify", "max_asr") == defaults.MAX_ASR
    # patch aims at (or below) the gate's pair gap
    assert _default("patch", "gap_target") == defaults.PATCH_GAP <= defaults.MAX_GAP
    help_text = CliRunner().invoke(main, ["patch", "--help"], terminal_width=200).output
    assert "held-out transplanted pairs" in " ".join(help_text.split())
    assert "verify --max-gap" in " ".join(help_text.split())


def test_a_good_patch_passes_with_json_and_junit(gate_runs):
    result, folder = gate_runs["good"], gate_runs["folder"]
    assert result.exit_code == 0, result.output
    report = json.loads((folder / "good.json").read_text())
    assert report["passed"] is True and report["provider"] == "CPUExecutionProvider"
    assert (report["tool"], report["version"], report["schema_version"]) == \
        ("onnx-rectify", __version__, JSON_SCHEMA_VERSION) == ("onnx-rectify", __version__, 1)
    assert list(report)[:3] == ["tool", "version", "schema_version"]
    assert report["thresholds"] == {"max_accuracy_drop": defaults.MAX_ACCURACY_DROP,
                                    "max_asr": defaults.MAX_ASR, "max_gap": defaults.MAX_GAP}
    assert report["skipped"] == []
    names = [c["name"] for c in report["checks"]]
    assert names == ["load", "structure", "provenance", "accuracy", "attack_success_rate",
                     "pair_gap", "latency"]
    figures = {c["name"]: c["figures"] for c in report["checks"]}
    assert figures["attack_success_rate"]["patched_asr"] <= 0.05
    assert {"top1_flip_rate", "output_diff_p99", "accuracy_drop"} <= set(figures["accuracy"])
    assert figures["latency"]["latency_ratio"] > 0
    root = ET.parse(folder / "good.xml").getroot()
    assert root.tag == "testsuites"
    (suite,) = root.findall("testsuite")
    assert suite.get("failures") == "0" and suite.get("errors") == "0"
    assert suite.get("skipped") == "0" and suite.get("tests") == "7"
    assert [c.get("name") for c in suite.iter("testcase")] == names
    assert all(float(c.get("time")) >= 0 for c in suite.iter("testcase"))
    assert float(suite.get("time")) >= sum(float(c.get("time")) for c in suite.iter("testcase"))
    assert float(suite.get("time")) > 0


def test_a_model_that_still_misbehaves_fails(gate_runs):
    result, folder = gate_runs["bad"], gate_runs["folder"]
    assert result.exit_code == 1
    assert "FAIL  attack_success_rate" in result.output
    assert "SKIP  pair_gap" in result.output and "--pairs" in result.output
    suite = ET.parse(folder / "bad.xml").getroot().find("testsuite")
    failed = [c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None]
    assert failed == ["attack_success_rate"]
    skipped = [c.get("name") for c in suite.iter("testcase") if c.find("skipped") is not None]
    assert skipped == ["pair_gap"] and suite.get("skipped") == "1"
    assert suite.get("failures") == "1" and suite.get("tests") == "7"
    failure = suite.find("testcase[@name='attack_success_rate']/failure")
    assert failure.get("message").startswith("ASR ") and "patched_asr: 1" in failure.text
    report = json.loads((folder / "bad.json").read_text())
    assert report["passed"] is False and report["schema_version"] == 1
    assert report["skipped"] == [{"name": "pair_gap", "reason": "not run: no pairs given "
                                  "(--pairs)"}]


def _schema():
    etree = pytest.importorskip("lxml.etree", reason="lxml is not installed (pip install "
                                "'onnx-rectify[dev]')")
    return etree, etree.XMLSchema(etree.parse(str(SCHEMA)))


@pytest.mark.parametrize("run", ["good", "bad"])
def test_junit_validates_against_the_junit_schema_with_lxml(gate_runs, run):
    etree, schema = _schema()
    document = etree.parse(str(gate_runs["folder"] / f"{run}.xml"))
    assert schema.validate(document), schema.error_log


def test_the_schema_refuses_what_ci_servers_refuse():
    """The schema is not a rubber stamp: the old output (a bare testsuite without errors,
    skipped, time, timestamp, hostname; test cases without time) fails it."""
    etree, schema = _schema()
    old = etree.fromstring(b'<testsuite name="onnx-rectify verify" tests="1" failures="0">'
                           b'<testcase classname="onnx_rectify.verify" name="load"/>'
                           b'</testsuite>')
    assert not schema.validate(old)
    messages = " ".join(str(e.message) for e in schema.error_log)
    assert "errors" in messages and "timestamp" in messages
    report = VerifyReport([Check("load", True, {"x": 1.0}, "", 0.5)], "CPUExecutionProvider",
                          seconds=1.0)
    assert schema.validate(etree.fromstring(report.junit().encode()))
    broken = report.junit().replace('time="0.500"', 'time="soon"')
    assert not schema.validate(etree.fromstring(broken.encode()))


@pytest.mark.parametrize("run", ["good", "bad"])
def test_junit_validates_with_xmllint(gate_runs, run):
    xmllint = shutil.which("xmllint")
    if xmllint is None:
        pytest.skip("xmllint is not on PATH (Debian/Ubuntu: apt-get install libxml2-utils); "
                    "the lxml test validates the same file")
    proc = subprocess.run([xmllint, "--noout", "--schema", str(SCHEMA),
                           str(gate_runs["folder"] / f"{run}.xml")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "validates" in proc.stderr


def test_junit_text_is_readable(gate_runs):
    for run in ("good", "bad"):
        text = (gate_runs["folder"] / f"{run}.xml").read_text()
        assert text.startswith('<?xml version="1.0" encoding="UTF-8"?>\n<testsuites')
        suite = ET.fromstring(text.split("\n", 1)[1]).find("testsuite")
        stamp = datetime.strptime(suite.get("timestamp"), "%Y-%m-%dT%H:%M:%S")
        now = datetime.now(timezone.utc).replace(tzinfo=None)
        assert abs((now - stamp).total_seconds()) < 3600  # UTC, this run
        assert suite.get("hostname")
        properties = {p.get("name"): p.get("value") for p in suite.iter("property")}
        assert properties["tool"] == "onnx-rectify" and properties["version"] == __version__
        assert properties["max_accuracy_drop"] == "0.01"
        outputs = "\n".join(e.text or "" for e in suite.iter() if e.tag in ("system-out",
                                                                            "failure"))
        # no Python reprs: no brackets, braces, quotes, numpy scalars or 17-digit floats
        assert not re.search(r"[\[\]{}']|np\.|float64|\.\d{10,}", outputs), outputs
    good = ET.parse(gate_runs["folder"] / "good.xml").getroot()
    out = good.find(".//testcase[@name='structure']/system-out").text
    assert re.search(r"changed_tensors: \S+", out) and "structural_differences: none" in out


def test_figures_are_formatted_for_people():
    assert format_value(0.1234567891) == "0.123457" and format_value(True) == "true"
    assert format_value([]) == "none" and format_value(["a", "b"]) == "a, b"
    assert format_value(None) == "-" and format_value(3) == "3"
    assert format_figures({"w": {"rank": 1, "norm": 0.5}}) == "w: rank 1; norm 0.5"
    assert format_figures({"prov": {"w": {"rank": 1}}}) == "prov:\n  w: rank 1"


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
    assert report["tool"] == "onnx-rectify" and report["schema_version"] == 1
    assert report["version"] == __version__
    assert report["identical"] is False and report["structural"] == []
    assert report["tensors"] and all(t["rank"] >= 1 and t["editable"] for t in report["tensors"])
