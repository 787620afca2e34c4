"""Hostile sample files and options, unsafe outputs, interruptions and numerics, through the
command line: exit code 2 and one line, nothing written, inputs byte-identical; and the
safe-output guarantees (staged writes, fresh data names, byte-identical reruns, no 2 GB
protobuf). Files are generated in the test's folder (no fixtures)."""
from __future__ import annotations

import errno
import io
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

import patcher.patch
import patcher.model.writeback
from patcher.model.modelio import load_model
from tests.hostile_cases import (FAST, assert_refused, npz_bytes, run, samples, save,
                                 save_external, snapshot, tiny_model)

RNG = np.random.default_rng(7)
IMG = RNG.random((2, 1, 4, 4), dtype=np.float32)
EVAL_X = RNG.random((6, 1, 4, 4), dtype=np.float32)


def _corrupt(x):
    out = x.copy()
    out[:, :, :2, :2] = 1.0
    return out


def _pairs(**override):
    arrays = {"corrupted": _corrupt(IMG), "clean": IMG, "label": np.array([0, 1])}
    arrays.update(override)
    return {k: v for k, v in arrays.items() if v is not None}


def _huge_npz(keys=("corrupted", "clean", "label", "x", "y")) -> bytes:
    """Headers that declare 128 GiB arrays, with no data behind them (a few hundred bytes)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for key in keys:
            images = key in ("corrupted", "clean", "x")
            member = io.BytesIO()  # write_array_header_1_0 writes the magic and the header
            np.lib.format.write_array_header_1_0(member, {
                "descr": "<f4" if images else "<i8", "fortran_order": False,
                "shape": (1 << 31, 1, 4, 4) if images else (1 << 31,)})
            zf.writestr(f"{key}.npy", member.getvalue())
    return buf.getvalue()


def _pickled() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, corrupted=np.array([object()], dtype=object), clean=IMG,
             label=np.array([0, 1]), x=np.array([object()], dtype=object), y=np.array([0]))
    return buf.getvalue()


VALID_PAIRS = npz_bytes(**_pairs())

# slot -> case -> (file content, words the error line must contain)
SAMPLE_CASES = {
    "pairs": {
        "missing-key": (npz_bytes(**_pairs(clean=None)), ["pairs.npz", "missing key(s) clean"]),
        "wrong-shape": (npz_bytes(**_pairs(corrupted=RNG.random((2, 1, 4, 5), np.float32),
                                           clean=RNG.random((2, 1, 4, 5), np.float32))),
                        ["'corrupted'", "does not fit", "axis 3"]),
        "wrong-rank": (npz_bytes(**_pairs(corrupted=IMG[:, 0], clean=IMG[:, 0])),
                       ["'corrupted'", "rank 3"]),
        "wrong-dtype": (npz_bytes(**_pairs(corrupted=(IMG * 9).astype(np.int32))),
                        ["'corrupted'", "int32"]),
        "shapes-differ": (npz_bytes(**_pairs(clean=RNG.random((3, 1, 4, 4), np.float32))),
                          ["differ in shape"]),
        "nan": (npz_bytes(**_pairs(corrupted=np.where(IMG > .5, np.nan, IMG))), ["NaN or Inf"]),
        "inf": (npz_bytes(**_pairs(clean=np.where(IMG > .5, np.inf, IMG))), ["'clean'", "Inf"]),
        "label-too-big": (npz_bytes(**_pairs(label=np.array([0, 3]))), ["'label'", "0..2"]),
        "label-negative": (npz_bytes(**_pairs(label=np.array([-1, 0]))), ["'label'", "0..2"]),
        "label-float": (npz_bytes(**_pairs(label=np.array([0.0, 1.0]))), ["'label'", "integer"]),
        "label-count": (npz_bytes(**_pairs(label=np.array([0]))), ["1 labels for 2 samples"]),
        "zero-pairs": (npz_bytes(corrupted=IMG[:0], clean=IMG[:0], label=np.zeros(0, int)),
                       ["no samples"]),
        "identical": (npz_bytes(**_pairs(corrupted=IMG)), ["nothing to fix"]),
        "pickle": (_pickled(), ["pickles"]),
        "garbage": (b"\x00\x01 this is no zip file" * 10, ["not a readable npz"]),
        "zero-byte": (b"", ["not a readable npz"]),
        "truncated": (VALID_PAIRS[: len(VALID_PAIRS) // 2], ["not a readable npz"]),
        "huge": (_huge_npz(), ["GiB", "use fewer samples"]),
    },
    "eval": {
        "missing-key": (npz_bytes(x=EVAL_X), ["eval.npz", "missing key(s) y"]),
        "wrong-shape": (npz_bytes(x=EVAL_X[:, :, :3], y=np.zeros(6, int)), ["'x'", "axis 2"]),
        "nan": (npz_bytes(x=np.where(EVAL_X > .5, np.nan, EVAL_X), y=np.zeros(6, int)),
                ["'x'", "NaN"]),
        "label-too-big": (npz_bytes(x=EVAL_X, y=np.full(6, 7)), ["'y'", "0..2"]),
        "zero": (npz_bytes(x=EVAL_X[:0], y=np.zeros(0, int)), ["no samples"]),
        "huge": (_huge_npz(), ["GiB"]),
    },
    "attack": {
        "target-out-of-range": (npz_bytes(x=EVAL_X, y=np.zeros(6, int), target=np.int64(5)),
                                ["'target' 5"]),
        "target-not-integer": (npz_bytes(x=EVAL_X, y=np.zeros(6, int), target=np.float32(1)),
                               ["'target'", "one integer class"]),
        "missing-target": (npz_bytes(x=EVAL_X, y=np.zeros(6, int)), ["missing key(s) target"]),
    },
    "calib": {
        "wrong-shape": (npz_bytes(x=EVAL_X[:, :, :, :2], y=np.zeros(6, int)), ["'x'", "axis 3"]),
        "inf": (npz_bytes(x=np.where(EVAL_X > .5, -np.inf, EVAL_X), y=np.zeros(6, int)),
                ["'x'", "Inf"]),
    },
}

# which verbs read a file in each slot, and with which option
SLOT_VERBS = {"pairs": ("locate", "patch", "verify"), "eval": ("locate", "patch", "verify"),
              "attack": ("verify",), "calib": ("locate", "patch")}


def _sample_command(verb: str, model: Path, files: dict[str, Path], out: Path) -> list[str]:
    if verb == "locate":
        args = ["locate", str(model), "--pairs", str(files["pairs"]), *FAST]
        if "eval" in files:
            args += ["--eval", str(files["eval"])]
    elif verb == "patch":
        args = ["patch", str(model), "--pairs", str(files["pairs"]), "--eval",
                str(files["eval"]), "-o", str(out), "--max-rounds", "1", "--provider", "cpu",
                *FAST]
    else:
        args = ["verify", str(model), "--base", str(model), "--eval", str(files["eval"]),
                "--provider", "cpu", "--pairs", str(files["pairs"])]
        if "attack" in files:
            args += ["--attack", str(files["attack"])]
    if "calib" in files:
        args += ["--calib", str(files["calib"])]
    return args


SAMPLE_MATRIX = [(slot, case, verb) for slot, cases in SAMPLE_CASES.items() for case in cases
                 for verb in SLOT_VERBS[slot]]


@pytest.mark.parametrize("slot,case,verb", SAMPLE_MATRIX,
                         ids=[f"{s}-{c}-{v}" for s, c, v in SAMPLE_MATRIX])
def test_hostile_sample_file_is_refused(tmp_path, slot, case, verb):
    content, words = SAMPLE_CASES[slot][case]
    files = samples(tmp_path / "samples")
    bad = tmp_path / "samples" / f"{slot}.npz"
    bad.write_bytes(content)
    files[slot] = bad
    model = save(tiny_model(), tmp_path / "m.onnx")
    before = snapshot(tmp_path)
    outcome = run(_sample_command(verb, model, files, tmp_path / "out.onnx"))
    assert_refused(outcome, f"{slot}.npz", *words)
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------ outputs of patch
@pytest.fixture
def job(tmp_path):
    """A model with its w1 in external data, sample files, and the patch command for it."""
    (tmp_path / "in").mkdir()
    model = save_external(tiny_model(), tmp_path / "in" / "m.onnx")
    files = samples(tmp_path / "samples")

    def args(out, *extra):
        return ["patch", str(model), "--pairs", str(files["pairs"]), "--eval", str(files["eval"]),
                "-o", str(out), "--max-rounds", "1", "--provider", "cpu", *FAST, *extra]
    return tmp_path, model, args


def _refused_without_trace(tmp_path, args, *words):
    before = snapshot(tmp_path)
    line = assert_refused(run(args), *words, progress=True)
    assert snapshot(tmp_path) == before
    return line


@pytest.mark.parametrize("target", ["in/m.onnx", "in/m.data", "samples/pairs.npz",
                                    "samples/eval.npz"])
def test_output_onto_an_input_is_refused(job, target):
    tmp_path, model, args = job
    _refused_without_trace(tmp_path, args(tmp_path / target), "overwrite an input file")


def test_output_whose_data_file_is_an_input_is_refused(tmp_path):
    (tmp_path / "in").mkdir()
    model = save_external(tiny_model(), tmp_path / "in" / "m.onnx", location="x.onnx.data")
    files = samples(tmp_path / "samples")
    args = ["patch", str(model), "--pairs", str(files["pairs"]), "--eval", str(files["eval"]),
            "-o", str(tmp_path / "in" / "x.onnx"), "--max-rounds", "1", *FAST]
    _refused_without_trace(tmp_path, args, "data file would overwrite an input file")


def test_existing_output_or_data_file_needs_force(job):
    tmp_path, model, args = job
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "p.onnx"
    out.write_bytes(b"an earlier result")
    _refused_without_trace(tmp_path, args(out), "exists; pass --force")
    out.unlink()
    (tmp_path / "out" / "p.onnx.data").write_bytes(b"someone's data")
    _refused_without_trace(tmp_path, args(out), "p.onnx.data exists; pass --force")
    (tmp_path / "out" / "p.onnx.data").unlink()
    out.write_bytes(b"an earlier result")
    result = run(args(out, "--force"))
    assert result.exit_code in (0, 1), result.stderr
    assert sorted(p.name for p in out.parent.iterdir()) == ["p.onnx", "p.onnx.data"]
    assert load_model(out).external["w1"].location == "p.onnx.data"  # a fresh data file


def test_missing_or_unwritable_output_folder(job):
    tmp_path, model, args = job
    _refused_without_trace(tmp_path, args(tmp_path / "nope" / "p.onnx"), "does not exist")
    (tmp_path / "a-file").write_text("x")
    _refused_without_trace(tmp_path, args(tmp_path / "a-file" / "p.onnx"))
    if os.geteuid() == 0:  # root writes through chmod 0o500: use a folder no one can write
        if not os.path.isdir("/sys") or os.access("/sys", os.W_OK) and _can_write("/sys"):
            pytest.skip("no unwritable folder available to root here")
        _refused_without_trace(tmp_path, args(Path("/sys/p.onnx")), "cannot write in '/sys'")
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            _refused_without_trace(tmp_path, args(locked / "p.onnx"), "cannot write in")
        finally:
            locked.chmod(0o700)


def _can_write(folder: str) -> bool:
    import tempfile

    try:
        os.rmdir(tempfile.mkdtemp(dir=folder))
        return True
    except OSError:
        return False


def test_full_disk_leaves_nothing(job, monkeypatch):
    tmp_path, model, args = job
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", full)
    (tmp_path / "out").mkdir()
    line = _refused_without_trace(tmp_path, args(tmp_path / "out" / "p.onnx"),
                                  "p.onnx", "No space left on device")
    assert "write failed" in line
    monkeypatch.setattr(os, "fsync", real_fsync)


@pytest.mark.parametrize("where", ["rectify", "stage", "verify"])
def test_ctrl_c_leaves_nothing_and_keeps_an_earlier_output(job, monkeypatch, where):
    tmp_path, model, args = job
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "p.onnx"
    out.write_bytes(b"an earlier result")  # --force: still there, unchanged, after Ctrl-C

    def interrupt(*a, **k):
        raise KeyboardInterrupt
    if where == "rectify":
        monkeypatch.setattr(patcher.patch, "rectify", interrupt)
    elif where == "verify":
        monkeypatch.setattr(patcher.patch, "verify_written", interrupt)
    else:  # after the data file is written, while the model is being written
        real = patcher.model.writeback._write_synced

        def write_then_interrupt(path, data):
            real(path, data)
            if path.name == "p.onnx":
                raise KeyboardInterrupt
        monkeypatch.setattr(patcher.model.writeback, "_write_synced", write_then_interrupt)
    _refused_without_trace(tmp_path, args(out, "--force"), "interrupted")


def test_non_finite_edit_is_refused(job, monkeypatch):
    tmp_path, model, args = job
    real = patcher.patch.rectify

    def poisoned(*a, **k):
        result = real(*a, **k)
        result.deltas = {"w1": np.full((8, 16), np.inf)}
        return result
    monkeypatch.setattr(patcher.patch, "rectify", poisoned)
    (tmp_path / "out").mkdir()
    _refused_without_trace(tmp_path, args(tmp_path / "out" / "p.onnx"), "'w1'", "non-finite")


def test_same_inputs_and_seed_give_identical_bytes(job):
    tmp_path, model, args = job
    outs = []
    for k in (1, 2):
        (tmp_path / f"run{k}").mkdir()
        out = tmp_path / f"run{k}" / "p.onnx"
        result = run(args(out, "--seed", "3"))
        assert result.exit_code in (0, 1), result.stderr
        outs.append(out)
    for name in ("p.onnx", "p.onnx.data"):
        assert (tmp_path / "run1" / name).read_bytes() == (tmp_path / "run2" / name).read_bytes()


def test_over_the_protobuf_limit_weights_go_to_external_data(tmp_path, monkeypatch):
    """Stands in for a model over 2 GB: protobuf's limit is lowered to a few hundred bytes
    instead of allocating 2 GB. The written model stays under it, its weights in a fresh
    data file beside it, and reloads and verifies from disk."""
    model = save(tiny_model(), tmp_path / "m.onnx")  # all inline, ~1 kB
    files = samples(tmp_path / "samples")
    monkeypatch.setattr(patcher.model.writeback, "PROTOBUF_LIMIT", 600)
    monkeypatch.setattr(patcher.model.writeback, "EXTERNAL_MIN_BYTES", 64)
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "p.onnx"
    result = run(["patch", str(model), "--pairs", str(files["pairs"]), "--eval",
                  str(files["eval"]), "-o", str(out), "--max-rounds", "1", "--provider", "cpu",
                  *FAST])
    assert result.exit_code in (0, 1), result.stderr
    assert out.stat().st_size <= 600
    assert sorted(p.name for p in out.parent.iterdir()) == ["p.onnx", "p.onnx.data"]
    assert "w1" in load_model(out).external
    assert "reloaded from disk" in result.stdout
    # the graph alone over the limit: refused, nothing left
    monkeypatch.setattr(patcher.model.writeback, "PROTOBUF_LIMIT", 100)
    out.unlink()
    (out.parent / "p.onnx.data").unlink()
    before = snapshot(tmp_path)
    assert_refused(run(["patch", str(model), "--pairs", str(files["pairs"]), "--eval",
                        str(files["eval"]), "-o", str(out), "--max-rounds", "1", *FAST]),
                   "2 GB limit", progress=True)
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------ warnings that do not refuse
OVERRIDABLE_VERBS = ("inspect", "locate", "patch", "verify", "diff")


@pytest.mark.parametrize("verb", OVERRIDABLE_VERBS)
def test_initializer_that_is_a_graph_input_is_said_in_every_command(tmp_path, verb):
    """Allowed (IR 3 models must list initializers as inputs), but every command says that a
    runtime feed could override the weight, and the edit with it, in one warning line."""
    from onnx import helper

    m = tiny_model()
    m.graph.input.append(helper.make_tensor_value_info("w1", TensorProto.FLOAT, [8, 16]))
    model = save(m, tmp_path / "m.onnx")
    good = save(tiny_model(), tmp_path / "good.onnx")
    files = samples(tmp_path / "samples")
    from tests.hostile_cases import command

    result = run(command(verb, model, good, files, tmp_path))
    assert result.exit_code in (0, 1), result.stderr
    warnings = [line for line in result.stderr.splitlines() if "graph inputs" in line]
    assert len(warnings) == 1, result.stderr
    assert warnings[0].startswith("onnx-rectify: warning: ") and "m.onnx" in warnings[0]
    assert "(w1)" in warnings[0] and "override" in warnings[0]


def test_singular_key_covariance_is_regularised_and_said(tmp_path):
    model = save(tiny_model(), tmp_path / "m.onnx")
    files = samples(tmp_path / "samples")
    np.savez(tmp_path / "calib.npz", x=np.repeat(EVAL_X[:1], 6, axis=0), y=np.zeros(6, int))
    for verb in ("locate", "patch"):
        args = {"locate": ["locate", str(model), "--pairs", str(files["pairs"])],
                "patch": ["patch", str(model), "--pairs", str(files["pairs"]), "--eval",
                          str(files["eval"]), "-o", str(tmp_path / "p.onnx"), "--max-rounds",
                          "1", "--provider", "cpu"]}[verb]
        result = run([*args, "--calib", str(tmp_path / "calib.npz"), *FAST])
        assert result.exit_code in (0, 1), result.stderr
        line = [l for l in result.stderr.splitlines() if "covariance" in l]
        assert len(line) == 1 and line[0].startswith("onnx-rectify: warning: ")
        assert "singular or ill-conditioned" in line[0] and "regularised" in line[0]


def test_integrated_gradients_completeness_above_its_limit_is_said(tmp_path, monkeypatch):
    """The paper's IG form: the error at an internal layer is the form's, nothing to act on,
    so a --verbose note; the path form: too few steps, a warning naming --steps."""
    model = save(tiny_model(), tmp_path / "m.onnx")
    files = samples(tmp_path / "samples")
    monkeypatch.setattr(patcher.patch, "COMPLETENESS_LIMIT", -1.0)  # every error is above it
    locate = ["locate", str(model), "--pairs", str(files["pairs"]), *FAST]
    patch = ["patch", str(model), "--pairs", str(files["pairs"]), "--eval", str(files["eval"]),
             "-o", str(tmp_path / "p.onnx"), "--max-rounds", "1", "--provider", "cpu", "--force",
             *FAST]
    for args in (locate, patch):
        quiet_default = run(args)
        assert quiet_default.exit_code in (0, 1), quiet_default.stderr
        assert "completeness error" not in quiet_default.stderr
        verbose = run(args + ["--verbose"])
        line = [l for l in verbose.stderr.splitlines() if "completeness error" in l]
        assert len(line) == 1 and line[0].startswith("onnx-rectify: note: "), verbose.stderr
        assert "expected of the Integrated-Gradients form" in line[0]
        path = run(args + ["--attribution", "path"])
        assert path.exit_code in (0, 1), path.stderr
        line = [l for l in path.stderr.splitlines() if "completeness error" in l]
        assert len(line) == 1 and line[0].startswith("onnx-rectify: warning: ")
        assert line[0].endswith("; raise --steps")


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT16, TensorProto.BFLOAT16])
def test_half_precision_weights_keep_their_dtype_and_report_rounding(dtype):
    from patcher.model.writeback import apply_deltas

    loaded = load_model(tiny_model(dtype=TensorProto.FLOAT), None)
    w1 = next(t for t in loaded.proto.graph.initializer if t.name == "w1")
    values = numpy_helper.to_array(w1)
    w1.CopyFrom(numpy_helper.from_array(values.astype(
        onnx.helper.tensor_dtype_to_np_dtype(dtype)), "w1"))
    delta = np.full(values.shape, 1e-3 / 3)
    proto, written = apply_deltas(loaded, {"w1": delta})
    new = next(t for t in proto.graph.initializer if t.name == "w1")
    assert new.data_type == dtype
    assert 0 < written[0].rounding_error < 0.05


def test_inspect_never_serialises_a_loaded_model_again(tmp_path, monkeypatch):
    """A model over 2 GB (external data) could not be serialised in one protobuf: inspect's
    parity check hands onnxruntime the file, whose external data was checked on loading."""
    import patcher.gate.summary

    seen = []
    real = patcher.gate.summary.compare
    monkeypatch.setattr(patcher.gate.summary, "compare",
                        lambda shadow, source, *a, **k: seen.append(source) or
                        real(shadow, source, *a, **k))
    model = save_external(tiny_model(), tmp_path / "m.onnx")
    result = run(["inspect", str(model), "--provider", "cpu"])
    assert result.exit_code == 0, result.stderr
    assert seen == [model]


def test_report_records_input_hashes_and_the_input_folder_stays_as_it_was(job):
    import json

    tmp_path, model, args = job
    (tmp_path / "out").mkdir()
    before = snapshot(tmp_path / "in", tmp_path / "samples")
    report = tmp_path / "out" / "r.json"
    result = run(args(tmp_path / "out" / "p.onnx", "--report", str(report)))
    assert result.exit_code in (0, 1), result.stderr
    assert snapshot(tmp_path / "in", tmp_path / "samples") == before  # nothing written there
    data = json.loads(report.read_text())
    hashes = data["inputs_sha256_before"]
    assert hashes == data["inputs_sha256_after"]
    assert {Path(p).name for p in hashes} == {"m.onnx", "m.data", "pairs.npz", "eval.npz"}
    assert hashes[str(model)] == before[str(model)]


def test_an_input_that_changes_during_the_run_fails_and_nothing_is_written(job, monkeypatch):
    tmp_path, model, args = job
    real = patcher.patch.verify_written

    def tamper(*a, **k):
        out = real(*a, **k)
        (tmp_path / "samples" / "pairs.npz").write_bytes(b"changed behind our back")
        return out
    monkeypatch.setattr(patcher.patch, "verify_written", tamper)
    (tmp_path / "out").mkdir()
    line = assert_refused(run(args(tmp_path / "out" / "p.onnx")), "input file changed",
                          code=1, progress=True)
    assert "nothing was written" in line
    assert list((tmp_path / "out").iterdir()) == []


def test_verification_reads_the_written_file_from_disk(job, monkeypatch):
    tmp_path, model, args = job
    loaded = []
    real = patcher.patch.load_model

    def spy(source, *a, **k):
        loaded.append((Path(source), Path(source).read_bytes()))
        return real(source, *a, **k)
    monkeypatch.setattr(patcher.patch, "load_model", spy)
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "p.onnx"
    result = run(args(out))
    assert result.exit_code in (0, 1), result.stderr
    staged = [(p, b) for p, b in loaded if p.name == "p.onnx"]
    assert len(staged) == 1 and staged[0][0].parent.parent == out.parent  # the staging folder
    assert staged[0][1] == out.read_bytes()  # the very bytes then renamed into place
