"""`onnx-rectify demo` on the bundled backdoor sample, end to end."""
from __future__ import annotations

import hashlib

from click.testing import CliRunner

from patcher.cli import main
from patcher.demo import run_demo, sample_folder


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()
            if p.is_file()}


def test_demo_patches_the_sample_without_touching_the_package(tmp_path):
    package = sample_folder()
    before = _digest(package)
    result = run_demo(tmp_path / "work", provider="cpu", device="cpu")
    assert _digest(package) == before
    assert result.before["attack_success_rate"] >= 0.95
    assert result.after["attack_success_rate"] <= 0.05
    assert result.before["clean_accuracy"] - result.after["clean_accuracy"] <= 0.01
    assert result.patched.parent == tmp_path / "work"
    assert result.verification.passed


def test_demo_cli_prints_the_table(tmp_path):
    out = CliRunner().invoke(main, ["demo", "--out", str(tmp_path), "--provider", "cpu"])
    assert out.exit_code == 0, out.output
    assert "attack success rate (ASR)" in out.output and "patched" in out.output
    assert "verify       PASSED" in out.output
