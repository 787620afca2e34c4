"""Hostile model files x every command (inspect, locate, patch, verify, diff): exit code 2,
one line naming the file, tensor or node, no traceback, nothing written, inputs unchanged.

Each case builds its files in the test's folder from a tiny valid model (no fixtures)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.hostile_cases import (VERBS, assert_refused, command, run, samples, save,
                                 save_external, set_external, snapshot, tiny_model)


def _with(mutate):
    def build(folder: Path) -> Path:
        model = tiny_model()
        mutate(model)
        return save(model, folder / "m.onnx")
    return build


def _external(**fields):
    def build(folder: Path) -> Path:
        path = save_external(tiny_model(), folder / "m.onnx")
        set_external(path, **fields)
        return path
    return build


def _raw(content: bytes):
    def build(folder: Path) -> Path:
        path = folder / "m.onnx"
        path.write_bytes(content)
        return path
    return build


def _truncated(folder: Path) -> Path:
    data = tiny_model().SerializeToString()
    return _raw(data[: len(data) // 2])(folder)


def _symlink_final(folder: Path) -> Path:
    path = save_external(tiny_model(), folder / "m.onnx")
    secret = folder.parent / "secret.bin"
    shutil.move(folder / "m.data", secret)
    os.symlink(secret, folder / "m.data")
    return path


def _symlink_parent(folder: Path) -> Path:
    real = folder.parent / "elsewhere"
    real.mkdir()
    path = save_external(tiny_model(), folder / "m.onnx", location="sub/m.data")
    shutil.move(folder / "sub" / "m.data", real / "m.data")
    (folder / "sub").rmdir()
    os.symlink(real, folder / "sub")
    return path


def _hardlink(folder: Path) -> Path:
    path = save_external(tiny_model(), folder / "m.onnx")
    os.link(folder / "m.data", folder.parent / "other-name.bin")
    return path


def _fifo(folder: Path) -> Path:
    path = save_external(tiny_model(), folder / "m.onnx")
    (folder / "m.data").unlink()
    os.mkfifo(folder / "m.data")
    return path


def _directory(folder: Path) -> Path:
    path = save_external(tiny_model(), folder / "m.onnx")
    (folder / "m.data").unlink()
    (folder / "m.data").mkdir()
    return path


def _missing_data(folder: Path) -> Path:
    path = save_external(tiny_model(), folder / "m.onnx")
    (folder / "m.data").unlink()
    return path


def _w1(model):
    return next(t for t in model.graph.initializer if t.name == "w1")


def _node(model, name):
    return next(n for n in model.graph.node if n.name == name)


def _dup_node(m):
    _node(m, "relu").name = "fc1"


def _dup_initializer(m):
    m.graph.initializer.append(numpy_helper.from_array(np.zeros(3, np.float32), "b2"))


def _dup_output(m):
    _node(m, "relu").output[0] = "h"  # 'h' is fc1's output
    _node(m, "fc2").input[0] = "h"


def _dup_graph_output(m):
    m.graph.output.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3]))


def _out_of_order(m):
    nodes = list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend([nodes[0], nodes[2], nodes[1], nodes[3]])


def _cycle(m):
    _node(m, "fc1").input[0] = "r"  # fc1 <- relu <- fc1


def _dangling(m):
    _node(m, "fc2").input[0] = "nowhere"


def _dangling_output(m):
    m.graph.output[0].name = "never_made"


def _control_flow(m):
    then = helper.make_graph([helper.make_node("Identity", ["y0"], ["t"], name="then_id")], "then",
                             [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Identity", ["y0"], ["e"], name="else_id")],
                              "else", [], [helper.make_tensor_value_info("e", TensorProto.FLOAT,
                                                                          None)])
    _node(m, "fc2").output[0] = "y0"
    m.graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    m.graph.node.append(helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then,
                                         else_branch=other))


def _unsupported(m):
    _node(m, "relu").op_type = "Shrink"  # a real op the shadow graph does not have
    _node(m, "fc2").output[0] = "y0"
    m.graph.node.append(helper.make_node("Frobnicate", ["y0"], ["y"], name="custom",
                                         domain="com.acme"))
    m.opset_import.append(helper.make_opsetid("com.acme", 1))


def _set_w1(values):
    def mutate(m):
        w = _w1(m)
        w.raw_data = np.asarray(values, np.float32).tobytes()
    return mutate


def _nan_w1():
    w = np.ones((8, 16), np.float32)
    w[2, 3] = np.nan
    return w


def _inf_w1():
    w = np.ones((8, 16), np.float32)
    w[5, 1] = np.inf
    return w


LFS = (b"version https://git-lfs.github.com/spec/v1\n"
       b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
       b"size 12345\n")

# name -> (builder, words the one-line error must contain)
CASES = {
    "zero-byte": (_raw(b""), ["m.onnx", "empty"]),
    "text-garbage": (_raw(b"hello, this is not a model\n" * 20), ["m.onnx"]),
    "binary-garbage": (_raw(bytes(np.random.default_rng(1).integers(0, 256, 777, np.uint8))),
                       ["m.onnx"]),
    "truncated": (_truncated, ["m.onnx"]),
    "lfs-pointer": (_raw(LFS), ["m.onnx", "Git LFS pointer"]),
    "ext-absolute": (_external(location="/etc/passwd"), ["'w1'", "absolute"]),
    "ext-dotdot": (_external(location="../m.data"), ["'w1'", "leaves the model folder"]),
    "ext-nested-dotdot": (_external(location="a/../../m.data"), ["'w1'", "leaves the model"]),
    "ext-empty": (_external(location=""), ["'w1'", "empty"]),
    "ext-symlink": (_symlink_final, ["'w1'", "symlink"]),
    "ext-symlink-parent": (_symlink_parent, ["'w1'", "symlink"]),
    "ext-hardlink": (_hardlink, ["'w1'", "hard link"]),
    "ext-fifo": (_fifo, ["'w1'", "not a regular file"]),
    "ext-directory": (_directory, ["'w1'", "not a regular file"]),
    "ext-missing": (_missing_data, ["'w1'", "not found"]),
    "ext-offset-negative": (_external(offset=-4), ["'w1'", "offset=-4"]),
    "ext-length-negative": (_external(length=-4), ["'w1'", "length=-4"]),
    "ext-past-end": (_external(offset=8), ["'w1'", "does not fit"]),
    "ext-length-not-tensor-size": (_external(length=256), ["'w1'", "512"]),
    "ext-not-integer": (_external(offset="zero"), ["'w1'", "integer"]),
    "ext-unknown-key": (_external(compression="zstd"), ["'w1'", "unknown external data keys"]),
    "raw-data-size": (_with(lambda m: setattr(_w1(m), "raw_data", b"\0" * 7)), ["'w1'", "7 bytes"]),
    "dims-overflow": (_with(lambda m: _w1(m).dims.extend([1 << 31, 1 << 31])), ["'w1'", "2^40"]),
    "dims-negative": (_with(lambda m: _w1(m).dims.__setitem__(0, -8)), ["'w1'", "negative"]),
    "duplicate-node": (_with(_dup_node), ["duplicate node name", "fc1"]),
    "duplicate-initializer": (_with(_dup_initializer), ["duplicate initializer", "b2"]),
    "duplicate-output": (_with(_dup_output), ["'h'", "relu", "fc1"]),
    "duplicate-graph-output": (_with(_dup_graph_output), ["graph output", "'y'"]),
    "out-of-order": (_with(_out_of_order), ["relu", "'h'", "topological"]),
    "cycle": (_with(_cycle), ["cycle"]),
    "dangling-input": (_with(_dangling), ["fc2", "'nowhere'"]),
    "dangling-output": (_with(_dangling_output), ["'never_made'"]),
    "control-flow": (_with(_control_flow), ["If", "branch"]),
    "unsupported-ops": (_with(_unsupported), ["Shrink", "'relu'", "Frobnicate", "com.acme",
                                              "'custom'"]),
    "opset-newer": (_with(lambda m: setattr(m.opset_import[0], "version", 99)), ["opset 99"]),
    "ir-newer": (_with(lambda m: setattr(m, "ir_version", 99)), ["IR version 99"]),
    "nan-weights": (_with(_set_w1(_nan_w1())), ["'w1'", "NaN"]),
    "inf-weights": (_with(_set_w1(_inf_w1())), ["'w1'", "Inf"]),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Valid sample files and a valid model, shared by all cases (read-only)."""
    root = tmp_path_factory.mktemp("world")
    files = samples(root / "samples")
    (root / "good").mkdir()
    good = save(tiny_model(), root / "good" / "good.onnx")
    return root, files, good


@pytest.mark.parametrize("verb", VERBS)
@pytest.mark.parametrize("case", list(CASES))
def test_hostile_model_is_refused(tmp_path, world, case, verb):
    root, files, good = world
    build, words = CASES[case]
    folder = tmp_path / "in"
    folder.mkdir()
    (tmp_path / "out").mkdir()
    model = build(folder)
    watched = (tmp_path, root)
    before = snapshot(*watched)
    outcome = run(command(verb, model, good, files, tmp_path / "out"))
    assert_refused(outcome, *words)
    assert snapshot(*watched) == before  # nothing written, nothing changed


@pytest.mark.parametrize("verb", VERBS)
def test_the_valid_model_passes(tmp_path, world, verb):
    """The harness itself: the same commands succeed (0) or report a check (1) when nothing
    is hostile, and only patch writes (its output)."""
    root, files, good = world
    model = save(tiny_model(), tmp_path / "m.onnx")
    (tmp_path / "out").mkdir()
    outcome = run(command(verb, model, good, files, tmp_path / "out"))
    assert outcome.exit_code in (0, 1), outcome.stdout + outcome.stderr
    assert "Traceback" not in outcome.stdout + outcome.stderr


ARGUMENT = {"verify": "PATCHED", "diff": "B"}


@pytest.mark.parametrize("verb", VERBS)
def test_a_folder_in_place_of_the_model_is_a_usage_error(tmp_path, world, verb):
    """click refuses it before the command runs: exit 2, one line naming the file and where
    help is, no traceback."""
    root, files, good = world
    (tmp_path / "m.onnx").mkdir()
    (tmp_path / "out").mkdir()
    before = snapshot(tmp_path, root)
    outcome = run(command(verb, tmp_path / "m.onnx", good, files, tmp_path / "out"))
    assert outcome.exit_code == 2
    assert "Traceback" not in outcome.stdout + outcome.stderr
    assert outcome.stderr.splitlines() == [
        f"onnx-rectify: error: Invalid value for '{ARGUMENT.get(verb, 'MODEL')}': "
        f"File '{tmp_path / 'm.onnx'}' is a directory. (see 'onnx-rectify {verb} --help')"]
    assert snapshot(tmp_path, root) == before
