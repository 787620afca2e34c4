"""`onnx-rectify demo` on the bundled backdoor sample, end to end."""
from __future__ import annotations

import hashlib
import re
import tempfile
from pathlib import Path

import pytest
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


def test_demo_cli_prints_the_table_and_removes_its_temporary_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the demo's folder goes
    out = CliRunner().invoke(main, ["demo", "--provider", "cpu", "--device", "cpu"])
    assert out.exit_code == 0, out.output
    assert "attack success rate (ASR)" in out.output and "patched" in out.output
    assert "verify       PASSED" in out.output
    work = re.search(r"work folder  (\S+) \(removed; --out DIR keeps the files\)", out.output)
    assert work and Path(work.group(1)).parent == tmp_path
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_the_demo_patches_with_the_patch_verbs_defaults(tmp_path, monkeypatch):
    """The demo runs `patch` as a user would: with the CLI's default budget and gap (the
    release gate's defaults), which the first test shows pass `verify`'s defaults."""
    import patcher.demo as demo

    class Stop(Exception):
        pass

    seen = []

    def fake_patch(model, pairs, eval_path, calib, out, config, *args, **kwargs):
        seen.append(config)
        raise Stop

    monkeypatch.setattr(demo, "patch", fake_patch)
    with pytest.raises(Stop):
        demo.run_demo(tmp_path / "work", provider="cpu", device="cpu")
    defaults = {p.name: p.default for p in main.commands["patch"].params}
    assert seen[0].budget == defaults["budget"] and seen[0].gap == defaults["gap_target"]
