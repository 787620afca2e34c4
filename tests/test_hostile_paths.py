"""Issue 19, round two of hostile input: where the tool writes (classes 1, 2, 4, 8, 9).

1. every written path against every read path (and every other written path) by identity:
   the same spelling, ``..``, a symlink, a hard link;
2. output locations and input files validated before any work, everything committed in one
   step at the end;
4. SIGTERM/SIGHUP, a second run on the same output, a failing final rename, special files;
8. numeric options in documented ranges; a long chain of trivial nodes;
9. demo --out and export --external-data without --force, dangling symlinks at -o,
   external-data offsets onnxruntime refuses.

Each refusal: exit 2, one line on stderr naming what is wrong (click's own usage errors: one
``Error:`` line), no traceback, nothing written or left behind, inputs byte-identical (every
file under the test's folder is hashed before and after)."""
from __future__ import annotations

import errno
import os
import shutil
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import patcher.model.paths
import patcher.patch
from patcher.model.paths import lock_output
from tests.hostile_cases import (FAST, Outcome, assert_refused, run, samples, save_external,
                                 set_external, snapshot, tiny_model)

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- the world
class World:
    """A tiny model (w1 in external data), a second model to compare with, and samples."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "in").mkdir()
        self.model = save_external(tiny_model(), root / "in" / "m.onnx")  # + in/m.data
        self.data = root / "in" / "m.data"
        other = tiny_model()
        other.graph.initializer[2].raw_data = (np.ones((3, 8), np.float32)).tobytes()
        self.other = save_external(other, root / "in" / "p.onnx", location="p.data")
        self.other_data = root / "in" / "p.data"
        files = samples(root / "s")
        self.pairs, self.eval, self.attack = files["pairs"], files["eval"], files["attack"]
        self.calib = root / "s" / "calib.npz"
        shutil.copyfile(self.eval, self.calib)
        (root / "out").mkdir()
        self.out = root / "out" / "o.onnx"

    def reads(self, verb: str) -> dict[str, Path]:
        """The files ``verb`` reads, by the flag that names them."""
        return {
            "inspect": {"MODEL": self.model, "MODEL's data file": self.data},
            "locate": {"MODEL": self.model, "--pairs": self.pairs, "--eval": self.eval,
                       "--calib": self.calib, "MODEL's data file": self.data},
            "patch": {"MODEL": self.model, "--pairs": self.pairs, "--eval": self.eval,
                      "--calib": self.calib, "--attack": self.attack,
                      "MODEL's data file": self.data},
            "verify": {"PATCHED": self.other, "--base": self.model, "--eval": self.eval,
                       "--attack": self.attack, "--pairs": self.pairs,
                       "--base's data file": self.data, "PATCHED's data file": self.other_data},
            "diff": {"A": self.model, "B": self.other, "A's data file": self.data,
                     "B's data file": self.other_data},
        }[verb]

    def args(self, verb: str, *flags: str, **writes: Path) -> list[str]:
        """The command line of ``verb`` reading every file it can, writing ``writes`` (flag
        names with ``_`` for ``-``; ``o`` is ``-o``), then ``flags``."""
        base = {
            "inspect": ["inspect", str(self.model), "--provider", "cpu", "--no-parity"],
            "locate": ["locate", str(self.model), "--pairs", str(self.pairs), "--eval",
                       str(self.eval), "--calib", str(self.calib), *FAST],
            "patch": ["patch", str(self.model), "--pairs", str(self.pairs), "--eval",
                      str(self.eval), "--calib", str(self.calib), "--attack", str(self.attack),
                      "--max-rounds", "1", "--provider", "cpu", *FAST],
            "verify": ["verify", str(self.other), "--base", str(self.model), "--eval",
                       str(self.eval), "--attack", str(self.attack), "--pairs", str(self.pairs),
                       "--provider", "cpu"],
            "diff": ["diff", str(self.model), str(self.other)],
        }[verb]
        if verb == "patch" and "o" not in writes:
            writes["o"] = self.out
        extra = []
        for flag, path in writes.items():
            extra += ["-o" if flag == "o" else "--" + flag.replace("_", "-"), str(path)]
        return base + extra + list(flags)


@pytest.fixture
def world(tmp_path) -> World:
    return World(tmp_path)


def refused(world_root: Path, args: list[str], *words: str, usage: bool = False,
            also: tuple[Path, ...] = ()) -> str:
    """Run ``args``: exit 2, one line, nothing printed on stdout (no work was done), every
    file under the folders as it was."""
    before = snapshot(world_root, *also)
    outcome = run(args)
    if usage:  # click's usage error, as one line like every refusal
        text = outcome.stdout + outcome.stderr
        assert outcome.exit_code == 2 and "Traceback" not in text, text
        errors = outcome.stderr.splitlines()
        assert len(errors) == 1 and errors[0].startswith("onnx-rectify: error: "), outcome.stderr
        assert errors[0].endswith("--help')"), errors[0]
        line = errors[0]
        for word in words:
            assert word in line, (word, line)
    else:
        line = assert_refused(outcome, *words)
    assert outcome.stdout == "", outcome.stdout
    assert snapshot(world_root, *also) == before
    return line


# ------------------------------------------------------ class 1: outputs aimed at inputs
#: The files each verb reads (keys of World.reads) and the flags it writes.
READS = {"inspect": ["MODEL", "MODEL's data file"],
         "locate": ["MODEL", "--pairs", "--eval", "--calib", "MODEL's data file"],
         "patch": ["MODEL", "--pairs", "--eval", "--calib", "--attack", "MODEL's data file"],
         "verify": ["PATCHED", "--base", "--eval", "--attack", "--pairs", "--base's data file",
                    "PATCHED's data file"],
         "diff": ["A", "B", "A's data file", "B's data file"]}
WRITES = {"inspect": ["json"], "locate": ["json"], "patch": ["report", "o"],
          "verify": ["json", "junit"], "diff": ["json"]}
#: (verb, write flag, read flag, spelling) for every write flag of every verb, every file it
#: reads and every way to name it (a hard-linked data file is refused by the loader itself)
CLASH = [(verb, flag, read, spelling) for verb in READS for flag in WRITES[verb]
         for read in READS[verb] for spelling in ("same", "dotdot", "symlink", "hardlink")
         if not (spelling == "hardlink" and "data file" in read)]


def _spelled(world: World, target: Path, spelling: str) -> Path:
    if spelling == "same":
        return target
    if spelling == "dotdot":
        return target.parent / ".." / target.parent.name / target.name
    links = world.root / "links"
    links.mkdir(exist_ok=True)
    alias = links / target.name
    if spelling == "symlink":
        os.symlink(target, alias)
    else:
        os.link(target, alias)
    return alias


@pytest.mark.parametrize("verb,flag,read,spelling", CLASH)
def test_an_output_aimed_at_an_input_is_refused_before_any_work(world, verb, flag, read,
                                                                spelling):
    target = world.reads(verb)[read]
    path = _spelled(world, target, spelling)
    line = refused(world.root, world.args(verb, **{flag: path}), "same file",
                   "overwrite an input file")
    assert ("-o" if flag == "o" else f"--{flag}") in line and read.split("'")[0] in line


def _bind_mount(source: Path, target: Path) -> bool:
    """Bind-mount ``source`` at ``target`` (root, a mount namespace that allows it)."""
    target.mkdir()
    try:
        done = subprocess.run(["mount", "--bind", str(source), str(target)],
                              capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


@pytest.mark.parametrize("verb,flag", [(verb, WRITES[verb][0]) for verb in READS])
def test_an_output_aimed_at_an_input_through_a_bind_mount_is_refused(world, verb, flag):
    """A bind mount names the same file by another path (same device and inode); only an
    identity check sees it. Needs root and a mount namespace that allows bind mounts."""
    read = READS[verb][0]
    target = world.reads(verb)[read]
    bound = world.root / "bound"
    if not _bind_mount(target.parent, bound):
        pytest.skip("bind mounts need root and a mount namespace that allows them")
    try:
        path = bound / target.name
        line = refused(world.root, world.args(verb, **{flag: path}), "same file",
                       "overwrite an input file")
        assert ("-o" if flag == "o" else f"--{flag}") in line
    finally:
        subprocess.run(["umount", str(bound)], capture_output=True, timeout=30)


@pytest.mark.parametrize("case", ["report=o", "report=o-data", "json=junit", "report-dir"])
def test_two_outputs_on_one_path_are_refused(world, case):
    if case == "json=junit":
        args = world.args("verify", json=world.root / "out" / "v.txt",
                          junit=world.root / "out" / ".." / "out" / "v.txt")
        words = ("--json", "--junit", "two outputs cannot share a path")
    elif case == "report-dir":  # --report would be the page the HTML report writes
        pytest.importorskip("matplotlib")
        args = world.args("patch", report=world.root / "out" / "index.html",
                          report_dir=world.root / "out")
        words = ("--report-dir", "--report", "index.html")
    else:
        target = world.out if case == "report=o" else world.out.with_name("o.onnx.data")
        args = world.args("patch", report=target)
        words = ("--report", "two outputs cannot share a path")
    refused(world.root, args, *words)


def test_report_verb_refuses_a_folder_that_holds_what_it_reads(world):
    pytest.importorskip("matplotlib")
    page = world.root / "out" / "index.html"
    page.write_text("{}")
    (world.root / "r.json").write_text('{"result": {}}')
    refused(world.root, ["report", str(world.root / "r.json"), "-o", str(world.root / "out"),
                         "--verify-json", str(page)], "-o", "--verify-json", "index.html")


def test_export_output_on_its_weights_is_refused(world):
    weights = world.root / "w.pt"
    weights.write_bytes(b"not really weights")
    refused(world.root, ["export", "nope:make", "--weights", str(weights), "--input-shape",
                         "1,1,4,4", "-o", str(weights), "--force"], "-o", "--weights",
            "same file")


def test_demo_out_on_the_bundled_sample_folder_is_refused(tmp_path):
    from patcher.demo import sample_folder

    source = sample_folder()
    line = refused(tmp_path, ["demo", "--out", str(source), "--force"], "--out",
                   "bundled sample", also=(source,))
    assert "model.onnx" in line


# --------------------------------------------- class 2: output locations checked first
def _bad_location(world: World, kind: str) -> Path:
    if kind == "missing-folder":
        return world.root / "nope" / "x.json"
    if kind == "under-a-file":
        (world.root / "a-file").write_text("x")
        return world.root / "a-file" / "x.json"
    if kind == "a-folder":
        (world.root / "a-folder").mkdir()
        return world.root / "a-folder"
    if kind == "long-folder":  # a folder name longer than the file system allows
        return world.root / ("d" * 300) / "x.json"
    if kind == "long-name":
        return world.root / ("n" * 300 + ".json")
    raise ValueError(kind)


WRITE_FLAGS = [("inspect", "json"), ("locate", "json"), ("patch", "report"), ("patch", "o"),
               ("verify", "json"), ("verify", "junit"), ("diff", "json")]


@pytest.mark.parametrize("kind", ["missing-folder", "under-a-file", "a-folder", "long-folder",
                                  "long-name"])
@pytest.mark.parametrize("verb,flag", WRITE_FLAGS)
def test_an_unusable_output_location_is_refused_before_any_work(world, verb, flag, kind):
    path = _bad_location(world, kind)
    words = {"missing-folder": ("does not exist",), "under-a-file": ("is a file",),
             "a-folder": ("is a directory",),  # click's dir_okay=False
             "long-folder": ("cannot write there",), "long-name": ("cannot write there",)}[kind]
    refused(world.root, world.args(verb, **{flag: path}), *words, usage=kind == "a-folder")


@pytest.mark.parametrize("verb,flag", WRITE_FLAGS)
def test_an_unwritable_output_folder_is_refused_before_any_work(world, verb, flag):
    folder = _unwritable(world.root)
    refused(world.root, world.args(verb, **{flag: folder / "x.out"}), "cannot write in")


def _unwritable(root: Path) -> Path:
    if os.geteuid() != 0:
        locked = root / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        return locked
    try:  # root writes through chmod 0o500: use a folder no one can write
        os.rmdir(__import__("tempfile").mkdtemp(dir="/sys"))
    except OSError:
        return Path("/sys")
    pytest.skip("no unwritable folder available to root here")


@pytest.mark.parametrize("where", ["report-dir", "report", "cache-dir"])
def test_patch_checks_every_output_folder_before_writing_the_model(world, where):
    if where == "report-dir":
        pytest.importorskip("matplotlib")
    (world.root / "a-file").write_text("x")
    bad = world.root / "a-file" / "sub"
    args = world.args("patch", **{where.replace("-", "_"): bad})
    refused(world.root, args, "a-file")
    assert not world.out.exists()


@pytest.mark.parametrize("args", [["demo", "--out", "{long}/work"],
                                  ["patch", "--report-dir", "{long}/html"],
                                  ["patch", "--cache-dir", "{long}"],
                                  ["report", "{root}/r.json", "-o", "{long}/html"]])
def test_an_output_folder_name_too_long_is_refused_before_any_work(world, args):
    if "--report-dir" in args or "report" in args:
        pytest.importorskip("matplotlib")
    (world.root / "r.json").write_text('{"result": {}}')
    fill = {"long": str(world.root / ("d" * 300)), "root": str(world.root)}
    args = [a.format(**fill) for a in args]
    if args[0] == "patch":
        args = world.args("patch", *args[1:])
    refused(world.root, args, "cannot write there")


def test_report_verb_refuses_an_output_folder_under_a_file(world):
    pytest.importorskip("matplotlib")
    (world.root / "a-file").write_text("x")
    (world.root / "r.json").write_text('{"result": {}}')
    refused(world.root, ["report", str(world.root / "r.json"), "-o",
                         str(world.root / "a-file" / "html")], "a-file", "not a folder")


def test_demo_out_under_a_file_is_refused(tmp_path):
    (tmp_path / "a-file").write_text("x")
    refused(tmp_path, ["demo", "--out", str(tmp_path / "a-file" / "work")], "a-file")


@pytest.mark.parametrize("content", [b"not an npz", "wrong-shape"])
def test_a_bad_attack_file_is_refused_before_the_model_is_written(world, content):
    if content == "wrong-shape":
        np.savez(world.attack, x=np.zeros((2, 1, 5, 5), np.float32), y=np.zeros(2, np.int64),
                 target=np.int64(0))
    else:
        world.attack.write_bytes(content)
    refused(world.root, world.args("patch"), "attack.npz")
    assert not world.out.exists()


def test_a_report_that_cannot_be_committed_leaves_no_model(world, monkeypatch):
    """The model, its data file and the report are renamed into place together: when the
    report's rename fails, the model already renamed is taken back."""
    real = patcher.model.paths.Outputs._place

    def place(self, item):
        if item.final.name == "r.json":
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(self, item)
    monkeypatch.setattr(patcher.model.paths.Outputs, "_place", place)
    before = snapshot(world.root)
    outcome = run(world.args("patch", report=world.root / "out" / "r.json"))
    assert_refused(outcome, "r.json", "cannot move the written file into place", progress=True)
    assert snapshot(world.root) == before


# ------------------------------------------------ class 4: signals, races, special files
RUNNER = """
import sys, time
import patcher.patch as p
real = p.verify_written
def slow(*a, **k):
    open(sys.argv[1], "w").close()  # the model is staged: tell the test, then wait
    time.sleep(60)
    return real(*a, **k)
p.verify_written = slow
from patcher.cli import main
main(sys.argv[2:], prog_name="onnx-rectify")
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_during_patch_leave_nothing_and_keep_an_earlier_output(
        world, signum):
    world.out.write_bytes(b"an earlier result")
    world.out.with_name("o.onnx.data").write_bytes(b"its data")
    (world.root / "runner.py").write_text(RUNNER)
    flag = world.root / "staged.flag"
    before = snapshot(world.root)
    proc = _slow_patch(world, flag, "--force")
    try:
        assert any(p.name.endswith(".partial") for p in world.out.parent.iterdir())
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    flag.unlink()
    assert_refused(Outcome(proc.returncode, stdout, stderr),
                   f"terminated ({signal.Signals(signum).name})", progress=True)
    assert snapshot(world.root) == before  # no .partial, no lock, the earlier files whole


COMMIT_SIGNAL_RUNNER = """
import os, signal, sys
import patcher.model.paths as paths
real = paths.Outputs._place
def place(self, item):
    os.kill(os.getpid(), signal.SIGTERM)  # held back until the commit ends
    return real(self, item)
paths.Outputs._place = place
from patcher.cli import main
main(sys.argv[1:], prog_name="onnx-rectify")
"""


def test_sigterm_during_the_commit_arrives_after_it_and_says_the_outputs_are_whole(world):
    """The commit holds SIGTERM back; it arrives once every output is in place, and the
    one-line message says they were written in full (not 'no partial output')."""
    report = world.root / "out" / "r.json"
    runner = world.root / "runner.py"
    runner.write_text(COMMIT_SIGNAL_RUNNER)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(runner), *world.args("patch", report=report)],
                          capture_output=True, text=True, env=env, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[-1].startswith("onnx-rectify: error: terminated (SIGTERM) after its outputs "
                                "were written in full"), lines[-1]
    assert str(world.out) in lines[-1] and str(report) in lines[-1]
    import onnx
    onnx.checker.check_model(str(world.out))  # whole, with its data file beside it
    assert json.loads(report.read_text())
    leftovers = [p.name for p in world.out.parent.iterdir()
                 if p.name.endswith((".partial", ".before", ".lock"))]
    assert leftovers == []


def test_a_patch_writes_its_outputs_together_and_leaves_nothing_else(world):
    pytest.importorskip("matplotlib")
    report, html = world.root / "out" / "r.json", world.root / "out" / "html"
    before = snapshot(world.root)
    outcome = run(world.args("patch", report=report, report_dir=html))
    assert outcome.exit_code in (0, 1), outcome.stderr
    after = snapshot(world.root)
    new = sorted(Path(p).relative_to(world.root).as_posix() for p in set(after) - set(before))
    assert [p for p in new if not p.endswith(".png")] == [
        "out/html", "out/html/index.html", "out/o.onnx", "out/o.onnx.data", "out/r.json"]
    assert {p: after[p] for p in before} == before  # inputs byte-identical
    assert str(world.out) in report.read_text()


def _slow_patch(world: World, flag: Path, *extra: str) -> subprocess.Popen:
    """A patch process that stops (60 s) once its model is staged; ``flag`` says when."""
    runner = world.root / "runner.py"
    runner.write_text(RUNNER)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(runner), str(flag),
                             *world.args("patch", *extra)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not flag.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"the patch never reached verification: {proc.communicate()}")
        time.sleep(0.05)
    return proc


def test_two_patch_processes_on_one_output_the_second_refuses(world):
    before = snapshot(world.root)
    first = _slow_patch(world, world.root / "staged.flag")
    try:
        refused(world.root, world.args("patch"), "another onnx-rectify run is writing")
        refused(world.root, world.args("patch", "--force"), "another onnx-rectify run")
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 2
    (world.root / "staged.flag").unlink()
    (world.root / "runner.py").unlink()
    assert snapshot(world.root) == before


def test_a_second_run_on_the_same_output_is_refused(world):
    with lock_output(world.out):  # what a first run holds while it works
        refused(world.root, world.args("patch"), "another onnx-rectify run is writing")


def test_an_output_that_appears_during_the_run_is_not_replaced(world, monkeypatch):
    """Without --force the model is created exclusively: a file that appeared at -o while
    the run worked (another program) stays, and the run refuses."""
    real = patcher.patch.verify_written

    def meanwhile(*a, **k):
        world.out.write_bytes(b"written by someone else meanwhile")
        return real(*a, **k)
    monkeypatch.setattr(patcher.patch, "verify_written", meanwhile)
    outcome = run(world.args("patch"))
    assert_refused(outcome, "o.onnx exists", progress=True)
    assert world.out.read_bytes() == b"written by someone else meanwhile"
    assert sorted(p.name for p in world.out.parent.iterdir()) == ["o.onnx"]


def test_a_failed_final_rename_keeps_the_earlier_model_and_its_data(world, monkeypatch):
    world.out.write_bytes(b"an earlier model")
    world.out.with_name("o.onnx.data").write_bytes(b"an earlier data file")
    before = snapshot(world.root)
    real = os.replace

    def replace(src, dst, *a, **k):
        if Path(dst).name == "o.onnx" and ".partial" in str(src):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        return real(src, dst, *a, **k)
    monkeypatch.setattr(patcher.model.paths.os, "replace", replace)
    outcome = run(world.args("patch", "--force"))
    monkeypatch.undo()
    assert_refused(outcome, "o.onnx", "cannot move the written file into place", progress=True)
    assert snapshot(world.root) == before


@pytest.mark.parametrize("kind", ["fifo", "device", "symlink-to-fifo"])
@pytest.mark.parametrize("verb,flag", [("patch", "o"), ("inspect", "json"),
                                       ("verify", "junit")])
def test_a_special_file_as_output_is_refused_even_with_force(world, verb, flag, kind):
    if kind == "device":
        target = Path("/dev/null")
    else:
        target = world.root / "out" / "fifo"
        os.mkfifo(target)
        if kind == "symlink-to-fifo":
            os.symlink(target, world.root / "out" / "link")
            target = world.root / "out" / "link"
    args = world.args(verb, *(["--force"] if verb == "patch" else []), **{flag: target})
    refused(world.root, args, "not a regular file")
    if kind != "device":
        assert (world.root / "out" / "fifo").exists()


# --------------------------------------------------------------- class 8: option ranges
RANGES = [
    ("patch", "--steps", "0"), ("patch", "--steps", "1025"), ("patch", "--steps", "-1"),
    ("patch", "--steps", "1000000000"), ("locate", "--steps", "0"),
    ("patch", "--budget", "-0.1"), ("patch", "--budget", "1.5"), ("patch", "--budget", "nan"),
    ("patch", "--gap", "2"), ("patch", "--gap", "nan"),
    ("patch", "--seed", "-1"), ("patch", "--seed", str(2**32)), ("locate", "--seed", "-1"),
    ("inspect", "--seed", str(2**32)),
    ("patch", "--max-rounds", "-1"), ("patch", "--max-rounds", "101"),
    ("patch", "--transplant-count", "0"), ("patch", "--transplant-count", "10001"),
    ("patch", "--heldout-count", "0"), ("locate", "--heldout-count", "100000"),
    ("patch", "--stat-rows", "0"), ("patch", "--care-neurons", "0"),
    ("locate", "--top-fraction", "0"), ("locate", "--top-fraction", "nan"),
    ("inspect", "--batch", "0"), ("inspect", "--batch", "-3"), ("inspect", "--batch", "100000"),
    ("verify", "--max-accuracy-drop", "-1"), ("verify", "--max-asr", "1.5"),
    ("verify", "--max-gap", "nan"),
]


@pytest.mark.parametrize("verb,option,value", RANGES)
def test_a_numeric_option_outside_its_range_is_refused(world, verb, option, value):
    refused(world.root, world.args(verb) + [option, value], option, usage=True)


@pytest.mark.parametrize("value", ["x=1,1,70000,1", "x=64,64,64,64,64", "x=0,1,4,4"])
def test_inspect_input_shape_out_of_range_is_refused(world, value):
    refused(world.root, world.args("inspect") + ["--input-shape", value], "--input-shape")


def test_inspect_a_huge_fixed_input_shape_in_the_model_is_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    big = [1, 3, 100000, 100000]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"], name="i")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, big)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, big)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.save(model, tmp_path / "m.onnx")
    refused(tmp_path, ["inspect", str(tmp_path / "m.onnx"), "--provider", "cpu"], "'x'",
            "--input-shape", "--no-parity")
    described = run(["inspect", str(tmp_path / "m.onnx"), "--no-parity"])
    assert described.exit_code == 0, described.stderr


@pytest.mark.parametrize("extra", [["--opset", "99"], ["--input-shape", "1,1,100000,4"],
                                   ["--input-shape", "0,1,4,4"]])
def test_export_numbers_out_of_range_are_refused(tmp_path, extra):
    args = ["export", "nope:make", "--input-shape", "1,1,4,4", "-o", str(tmp_path / "m.onnx")]
    refused(tmp_path, args + extra, extra[0], usage=extra[0] == "--opset")


@pytest.mark.parametrize("verb,shown", [("patch", ["1<=x<=1024", "0<=x<=4294967295",
                                                   "0<=x<=100", "0<=x<=1"]),
                                        ("inspect", ["1<=x<=1024", "0<=x<=4294967295"]),
                                        ("verify", ["0<=x<=1"]), ("export", ["7<=x<=23"])])
def test_help_shows_the_ranges(verb, shown):
    text = " ".join(run([verb, "--help"]).stdout.split())
    for rng in shown:
        assert rng in text, (rng, text)


def test_a_long_chain_of_trivial_nodes_costs_no_signature_per_node(tmp_path, monkeypatch):
    """inspect.signature once per op function, not once per node (it was 3 per node)."""
    import inspect

    import onnx
    from onnx import TensorProto, helper

    from patcher.graph.shadow import ShadowGraph
    from patcher.graph.support import load_supported_model

    n = 2000
    nodes = [helper.make_node("Identity", [f"t{i}"], [f"t{i + 1}"], name=f"id{i}")
             for i in range(n)]
    nodes[0].input[0] = "x"
    nodes.append(helper.make_node("Flatten", [f"t{n}"], ["y"], name="flat"))
    graph = helper.make_graph(nodes, "chain",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.save(model, tmp_path / "chain.onnx")
    calls = []
    real = inspect.signature
    monkeypatch.setattr(inspect, "signature", lambda *a, **k: calls.append(1) or real(*a, **k))
    ShadowGraph(load_supported_model(tmp_path / "chain.onnx"))
    assert len(calls) < 20, len(calls)
    outcome = run(["inspect", str(tmp_path / "chain.onnx"), "--provider", "cpu"])
    assert outcome.exit_code == 0 and "Identity 2000" in outcome.stdout, outcome.stderr


# ------------------------------------------------------------------- class 9: smaller
def test_demo_out_with_existing_files_needs_force(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "model.onnx").write_bytes(b"my own model")
    (work / "notes.txt").write_text("mine")
    line = refused(tmp_path, ["demo", "--out", str(work)], "--out", "pass --force")
    assert "model.onnx" in line


def _factory(tmp_path: Path, monkeypatch) -> str:
    pkg = tmp_path / "factory"
    pkg.mkdir()
    (pkg / "tinynet_h19.py").write_text(
        "from torch import nn\n"
        "def make():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(16, 64))\n")
    monkeypatch.syspath_prepend(str(pkg))
    return "tinynet_h19:make"


@pytest.mark.parametrize("existing", ["data", "model", "dangling-symlink"])
def test_export_does_not_overwrite_without_force(tmp_path, monkeypatch, existing):
    factory = _factory(tmp_path, monkeypatch)
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    if existing == "data":
        out.with_name("m.onnx.data").write_bytes(b"someone's data")
    elif existing == "model":
        out.write_bytes(b"someone's model")
    else:
        os.symlink(tmp_path / "gone", out)
    args = ["export", factory, "--input-shape", "1,1,4,4", "-o", str(out), "--external-data"]
    refused(tmp_path, args, "pass --force")
    forced = run(args + ["--force"])
    assert forced.exit_code == 0, forced.stderr
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert not out.is_symlink()
    assert out.with_name("m.onnx.data").read_bytes() != b"someone's data"  # 16x64 weights


def test_patch_does_not_replace_a_dangling_symlink_without_force(world):
    os.symlink(world.root / "gone", world.out)
    refused(world.root, world.args("patch"), "symlink to a missing file", "--force")
    assert world.out.is_symlink()


@pytest.mark.parametrize("offset", ["0_0", "\u0660", "+0", " 0", "0x0"])
@pytest.mark.parametrize("verb", ["inspect", "locate", "patch", "verify", "diff"])
def test_external_offsets_onnxruntime_refuses_are_refused(world, verb, offset):
    set_external(world.model, offset=offset)
    refused(world.root, world.args(verb), "w1", "not integers")
