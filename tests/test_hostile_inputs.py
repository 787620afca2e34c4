"""Hostile input, round two (issue 19, classes 3, 5, 6 and 7), through every verb that can
reach each case: exit code 2, one line on stderr, no traceback, nothing written, the inputs
byte-identical afterwards.

- class 3: tensors outside initializers (attribute tensors, in subgraphs, sparse
  initializers) with external data go through the same confined loader and checks;
- class 5: external data is read by offset and length, npz memory is bounded from the
  headers (converted copies included) before anything is decompressed;
- class 6: sample values are checked after the conversion to the model's input type, and
  numpy warnings do not reach stderr;
- class 7: cases that ended in exit 3 ("internal error").

Files are generated in the test's folder from the tiny model of tests/hostile_cases.py."""
from __future__ import annotations

import io
import os
import resource
import struct
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from patcher.errors import RectifyError
from patcher.graph.parity import random_inputs
from tests.hostile_cases import (FAST, VERBS, assert_refused, command, npz_bytes, run, samples,
                                 save, save_external, set_external, snapshot, tiny_model)

CLASSIFIER_VERBS = ("locate", "patch", "verify")  # the verbs that feed samples to the model
SECRET = b"\x01" * 4242  # a file outside the model's folder: its size must never show


def _node(model, name):
    return next(n for n in model.graph.node if n.name == name)


def _make_external(tensor: TensorProto, location: str, offset: int = 0,
                   length: int | None = None) -> None:
    """Point ``tensor`` at external data (its inline data dropped)."""
    raw = numpy_helper.from_array(numpy_helper.to_array(tensor)).raw_data
    for f in ("raw_data", "float_data", "int32_data", "int64_data", "double_data"):
        tensor.ClearField(f)
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)),
                       ("length", str(len(raw) if length is None else length))):
        tensor.external_data.add(key=key, value=value)


def _with_tail(model, op_nodes, initializers=()):
    """fc2 writes y0; ``op_nodes`` turn y0 into the output y."""
    _node(model, "fc2").output[0] = "y0"
    model.graph.initializer.extend(initializers)
    model.graph.node.extend(op_nodes)
    return model


def _constant_of_shape(value: TensorProto):
    """y = fc2(...) + ConstantOfShape([3], value)."""
    return _with_tail(tiny_model(), [
        helper.make_node("ConstantOfShape", ["shp"], ["c"], name="cos", value=value),
        helper.make_node("Add", ["y0", "c"], ["y"], name="add")],
        [numpy_helper.from_array(np.array([3], np.int64), "shp")])


def _value(v: float = 0.25) -> TensorProto:
    return numpy_helper.from_array(np.array([v], np.float32), "val")


# ---------------------------------------------------------------- class 3: model builders
def _attr_outside(folder: Path) -> Path:
    """ConstantOfShape's value in external data one folder up."""
    (folder.parent / "secret.bin").write_bytes(SECRET)
    value = _value()
    _make_external(value, "../secret.bin")
    return save(_constant_of_shape(value), folder / "m.onnx")


def _attr_in_cwd(folder: Path) -> Path:
    """ConstantOfShape's value names 'secret.bin', which exists only in the current folder
    (the test runs there): onnx's own loader would read it."""
    value = _value()
    _make_external(value, "secret.bin")
    return save(_constant_of_shape(value), folder / "m.onnx")


def _attr_absolute(folder: Path) -> Path:
    value = _value()
    _make_external(value, str(folder.parent / "secret.bin"))
    (folder.parent / "secret.bin").write_bytes(SECRET)
    return save(_constant_of_shape(value), folder / "m.onnx")


def _attr_nan_external(folder: Path) -> Path:
    """The value's external bytes, inside the model's folder, hold a NaN."""
    value = _value()
    _make_external(value, "m.data")
    (folder / "m.data").write_bytes(np.array([np.nan], np.float32).tobytes())
    return save(_constant_of_shape(value), folder / "m.onnx")


def _attr_wrong_length(folder: Path) -> Path:
    value = _value()
    _make_external(value, "m.data", length=8)
    (folder / "m.data").write_bytes(b"\0" * 8)
    return save(_constant_of_shape(value), folder / "m.onnx")


def _attr_bad_dtype(folder: Path) -> Path:
    value = _value()
    _make_external(value, "m.data")
    value.data_type = 77
    (folder / "m.data").write_bytes(b"\0" * 4)
    return save(_constant_of_shape(value), folder / "m.onnx")


def _tensors_attr_outside(folder: Path) -> Path:
    """A TENSORS attribute (on a custom attribute of Identity) in external data outside:
    the loader refuses it before the op-support check would."""
    (folder.parent / "secret.bin").write_bytes(SECRET)
    model = _with_tail(tiny_model(), [helper.make_node("Identity", ["y0"], ["y"], name="idn")])
    attr = _node(model, "idn").attribute.add()
    attr.name, attr.type = "extra", onnx.AttributeProto.TENSORS
    t = attr.tensors.add()
    t.CopyFrom(_value())
    _make_external(t, "../secret.bin")
    return save(model, folder / "m.onnx")


def _subgraph_outside(folder: Path) -> Path:
    """A Constant inside an If branch reads external data outside the model's folder."""
    (folder.parent / "secret.bin").write_bytes(SECRET)
    value = _value()
    _make_external(value, "../secret.bin")
    then = helper.make_graph([helper.make_node("Constant", [], ["t"], name="k", value=value)],
                             "then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT,
                                                                       None)])
    other = helper.make_graph([helper.make_node("Identity", ["y0"], ["e"], name="e_id")], "else",
                              [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    model = _with_tail(tiny_model(), [helper.make_node("If", ["cond"], ["y"], name="branch",
                                                       then_branch=then, else_branch=other)],
                       [numpy_helper.from_array(np.array(True), "cond")])
    return save(model, folder / "m.onnx")


def _sparse_outside(folder: Path) -> Path:
    (folder.parent / "secret.bin").write_bytes(SECRET)
    model = tiny_model()
    values = numpy_helper.from_array(np.array([1.0], np.float32), "sp")
    _make_external(values, "../secret.bin")
    sparse = helper.make_sparse_tensor(values, numpy_helper.from_array(np.array([0], np.int64),
                                                                       "sp_idx"), [3])
    model.graph.sparse_initializer.append(sparse)
    return save(model, folder / "m.onnx")


def _attr_nan_inline(folder: Path) -> Path:
    return save(_constant_of_shape(_value(np.nan)), folder / "m.onnx")


# ---------------------------------------------------------------- class 7: model builders
def _external(**fields):
    def build(folder: Path) -> Path:
        path = save_external(tiny_model(), folder / "m.onnx")
        set_external(path, **fields)
        return path
    return build


def _through_file(folder: Path) -> Path:
    path = save_external(tiny_model(), folder / "m.onnx")
    set_external(path, location="m.data/inner")
    return path


def _zero_size_weight(folder: Path) -> Path:
    model = tiny_model()
    for t in model.graph.initializer:
        if t.name in ("w1", "b1"):
            t.dims[0] = 0
            t.raw_data = b""
    return save(model, folder / "m.onnx")


def _non_utf8_attribute(folder: Path) -> Path:
    model = _with_tail(tiny_model(), [helper.make_node("Pad", ["y0", "pads"], ["y"], name="pad")],
                       [numpy_helper.from_array(np.zeros(4, np.int64), "pads")])
    attr = _node(model, "pad").attribute.add()
    attr.name, attr.type, attr.s = "mode", onnx.AttributeProto.STRING, b"\xffconstant"
    return save(model, folder / "m.onnx")


def _second_input(folder: Path) -> Path:
    model = _with_tail(tiny_model(), [helper.make_node("Add", ["y0", "x2"], ["y"], name="add")])
    model.graph.input.append(helper.make_tensor_value_info("x2", TensorProto.FLOAT, ["batch", 3]))
    return save(model, folder / "m.onnx")


def _sequence_input(folder: Path) -> Path:
    model = tiny_model()
    model.graph.input[0].CopyFrom(helper.make_tensor_sequence_value_info(
        "x", TensorProto.FLOAT, ["batch", 1, 4, 4]))
    return save(model, folder / "m.onnx")


def _cast_output(to: int):
    def build(folder: Path) -> Path:
        model = _with_tail(tiny_model(), [helper.make_node("Cast", ["y0"], ["y"], name="cast",
                                                           to=to)])
        model.graph.output[0].type.tensor_type.elem_type = to
        return save(model, folder / "m.onnx")
    return build


def _rank1_output(stated: bool):
    def build(folder: Path) -> Path:
        model = _with_tail(tiny_model(), [helper.make_node("Reshape", ["y0", "flat_shape"], ["y"],
                                                           name="rs")],
                           [numpy_helper.from_array(np.array([-1], np.int64), "flat_shape")])
        if stated:
            del model.graph.output[0].type.tensor_type.shape.dim[1:]
        else:
            model.graph.output[0].type.tensor_type.ClearField("shape")
        return save(model, folder / "m.onnx")
    return build


def _output_is_input(folder: Path) -> Path:
    model = tiny_model()
    model.graph.output.insert(0, helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                               ["batch", 1, 4, 4]))
    return save(model, folder / "m.onnx")


def _wrong_class_count(folder: Path) -> Path:
    model = tiny_model()
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 10
    return save(model, folder / "m.onnx")


# name -> (builder, verbs that reach it, words the one-line error must contain)
MODEL_CASES = {
    # class 3
    "attribute-tensor-outside": (_attr_outside, VERBS, ["attribute 'value' of node 'cos'",
                                                       "leaves the model folder"]),
    "attribute-tensor-in-cwd": (_attr_in_cwd, VERBS, ["attribute 'value' of node 'cos'",
                                                     "not found next to the model"]),
    "attribute-tensor-absolute": (_attr_absolute, VERBS, ["node 'cos'", "absolute"]),
    "attribute-tensor-nan": (_attr_nan_external, VERBS, ["node 'cos'", "NaN"]),
    "attribute-tensor-length": (_attr_wrong_length, VERBS, ["node 'cos'", "(4 bytes)"]),
    "attribute-tensor-dtype": (_attr_bad_dtype, VERBS, ["node 'cos'", "element type"]),
    "attribute-tensor-inline-nan": (_attr_nan_inline, VERBS, ["node 'cos'", "NaN"]),
    "tensors-attribute-outside": (_tensors_attr_outside, VERBS, ["attribute 'extra' of node "
                                                                "'idn'", "leaves the model"]),
    "subgraph-tensor-outside": (_subgraph_outside, VERBS, ["subgraph 'then'", "node 'k'",
                                                          "leaves the model folder"]),
    "sparse-initializer-outside": (_sparse_outside, VERBS, ["sparse initializer 'sp'",
                                                           "leaves the model folder"]),
    # class 7: the loader
    "ext-location-nul": (_external(location="m\0.data"), VERBS, ["'w1'", "NUL"]),
    "ext-location-long": (_external(location="a" * 5000), VERBS, ["'w1'", "too long"]),
    "ext-name-long": (_external(location="d/" + "b" * 300), VERBS, ["'w1'", "too long"]),
    "ext-through-file": (_through_file, VERBS, ["'w1'", "'m.data'", "not a folder"]),
    "zero-size-weight": (_zero_size_weight, VERBS, ["'w1'", "fc1", "no elements"]),
    "non-utf8-attribute": (_non_utf8_attribute, VERBS, ["node 'pad'", "'mode'", "UTF-8"]),
    # class 7: the classifier contract (verbs that feed samples)
    "second-graph-input": (_second_input, CLASSIFIER_VERBS, ["2 graph inputs", "'x2'"]),
    "sequence-input": (_sequence_input, CLASSIFIER_VERBS, ["'x'", "not a tensor"]),
    "int64-output": (_cast_output(TensorProto.INT64), CLASSIFIER_VERBS, ["'y'", "INT64"]),
    "bool-output": (_cast_output(TensorProto.BOOL), CLASSIFIER_VERBS, ["'y'", "BOOL"]),
    "rank1-output": (_rank1_output(stated=True), CLASSIFIER_VERBS, ["'y'", "rank 1"]),
    "rank1-output-unstated": (_rank1_output(stated=False), CLASSIFIER_VERBS, ["'y'", "rank 1"]),
    "output-is-input": (_output_is_input, CLASSIFIER_VERBS, ["'x'", "input"]),
    "class-count-wrong": (_wrong_class_count, CLASSIFIER_VERBS, ["states 10 classes",
                                                                "computes 3"]),
}
MODEL_MATRIX = [(case, verb) for case, (_, verbs, _) in MODEL_CASES.items() for verb in verbs]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Valid sample files and a valid model, shared by all cases (read-only)."""
    root = tmp_path_factory.mktemp("world")
    files = samples(root / "samples")
    (root / "good").mkdir()
    good = save(tiny_model(), root / "good" / "good.onnx")
    return root, files, good


@pytest.mark.parametrize("case,verb", MODEL_MATRIX, ids=[f"{c}-{v}" for c, v in MODEL_MATRIX])
def test_hostile_model_is_refused(tmp_path, world, monkeypatch, case, verb):
    root, files, good = world
    build, _, words = MODEL_CASES[case]
    folder = tmp_path / "in"
    folder.mkdir()
    (tmp_path / "out").mkdir()
    cwd = tmp_path / "cwd"  # the current folder holds a file the model names
    cwd.mkdir()
    (cwd / "secret.bin").write_bytes(SECRET)
    monkeypatch.chdir(cwd)
    model = build(folder)
    before = snapshot(tmp_path, root)
    line = assert_refused(run(command(verb, model, good, files, tmp_path / "out")), *words)
    assert str(len(SECRET)) not in line  # the size of a file outside never shows
    assert snapshot(tmp_path, root) == before


def test_attribute_tensor_in_external_data_inside_the_folder_loads(tmp_path, world):
    """The same loader reads a valid attribute tensor: inspect runs and parity passes."""
    root, files, good = world
    value = _value(0.5)
    _make_external(value, "m.data")
    (tmp_path / "m.data").write_bytes(np.array([0.5], np.float32).tobytes())
    model = save(_constant_of_shape(value), tmp_path / "m.onnx")
    before = snapshot(tmp_path)
    outcome = run(["inspect", str(model), "--provider", "cpu"])
    assert outcome.exit_code == 0, outcome.stdout + outcome.stderr
    assert "parity     PASS" in outcome.stdout
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- class 7: huge layers
def _wide_layer_case(tmp_path, kind: str, width: int) -> tuple[Path, Path, Path]:
    """A one-layer classifier whose layer has ``width`` inputs per output: a Gemm on a flat
    input, or a Conv with a 4x4 kernel over a 4x4 input (then Flatten); pairs and eval."""
    rng = np.random.default_rng(0)
    if kind == "dense":
        shape = [width]
        w = (rng.standard_normal((3, width)) * 0.01).astype(np.float32)
        nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)]
    else:
        channels = width // 16
        shape = [channels, 4, 4]
        w = (rng.standard_normal((3, channels, 4, 4)) * 0.01).astype(np.float32)
        nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="fc"),
                 helper.make_node("Flatten", ["c"], ["y"], name="flat")]
    graph = helper.make_graph(
        nodes, "wide", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *shape])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(3, np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    path = save(model, tmp_path / "m.onnx")
    clean = rng.random((2, *shape), dtype=np.float32)
    corrupted = clean.copy()
    corrupted.reshape(2, -1)[:, :8] = 1.0
    np.savez(tmp_path / "pairs.npz", corrupted=corrupted, clean=clean, label=np.array([0, 1]))
    np.savez(tmp_path / "eval.npz", x=rng.random((4, *shape), dtype=np.float32),
             y=np.array([0, 1, 2, 0]))
    return path, tmp_path / "pairs.npz", tmp_path / "eval.npz"


def test_conv_too_wide_for_its_exact_statistics_is_refused(tmp_path):
    """A Conv is ranked from factored (Kronecker) statistics, but its edit needs the exact
    float64 d x d matrix: past MAX_KEY_DIM, locate ranks it and patch refuses before that
    matrix is allocated, naming the layer and its width; nothing is written."""
    from patcher.analysis.moments import MAX_KEY_DIM

    width = MAX_KEY_DIM + 16
    path, pairs, eval_set = _wide_layer_case(tmp_path, "conv", width)
    before = snapshot(tmp_path)
    located = run(["locate", str(path), "--pairs", str(pairs), *FAST])
    assert located.exit_code == 0 and "fc" in located.stdout, located.stderr
    # transplanted pairs (the default): on these random weights the pairs' own gap is < 0
    patched = run(["patch", str(path), "--pairs", str(pairs), "--eval", str(eval_set),
                   "-o", str(tmp_path / "out.onnx"), "--steps", "4", "--device", "cpu"])
    assert_refused(patched, "layer 'fc'", str(width), str(MAX_KEY_DIM), progress=True)
    assert snapshot(tmp_path) == before


def test_dense_layer_wider_than_exact_statistics_is_ranked_from_its_key_rows(tmp_path):
    """A dense layer that wide keeps its key rows instead of a d x d matrix (low-rank
    statistics): locate ranks it, and nothing is written beside the inputs."""
    from patcher.analysis.moments import MAX_KEY_DIM

    path, pairs, eval_set = _wide_layer_case(tmp_path, "dense", MAX_KEY_DIM + 8)
    before = snapshot(tmp_path)
    outcome = run(["locate", str(path), "--pairs", str(pairs), "--eval", str(eval_set), *FAST])
    assert outcome.exit_code == 0, outcome.stderr
    assert "fc" in outcome.stdout and "Traceback" not in outcome.stderr
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- class 5: memory
def _sparse_data_model(folder: Path, size: int, offset: int, length: int) -> Path:
    """w1 at ``offset`` of a sparse data file of ``size`` bytes (no disk, no memory used)."""
    path = save_external(tiny_model(), folder / "m.onnx")
    real = (folder / "m.data").read_bytes()
    with open(folder / "m.data", "wb") as fh:
        fh.truncate(size)
        fh.seek(offset)
        fh.write(real)
    set_external(path, offset=offset, length=length)
    return path


@pytest.mark.parametrize("verb", VERBS)
def test_external_data_is_read_by_range_not_whole(tmp_path, world, verb):
    """512 bytes at the end of a 6 GiB sparse file: only those are read (reading the file
    whole would raise peak memory by 6 GiB)."""
    root, files, good = world
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    size = 6 << 30
    model = _sparse_data_model(tmp_path / "in", size, size - 512, 512)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    outcome = run(command(verb, model, good, files, tmp_path / "out"))
    assert outcome.exit_code in (0, 1), outcome.stdout + outcome.stderr
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - peak
    assert grown < 1 << 30, f"peak memory grew by {grown / 2**30:.1f} GiB"


@pytest.mark.parametrize("verb", VERBS)
def test_external_length_beyond_the_tensor_is_refused_before_reading(tmp_path, world, verb):
    root, files, good = world
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    model = _sparse_data_model(tmp_path / "in", 8 << 30, 0, 8 << 30)
    before = snapshot(tmp_path, root)
    assert_refused(run(command(verb, model, good, files, tmp_path / "out")), "'w1'",
                   str(8 << 30), "(512 bytes)")
    assert snapshot(tmp_path, root) == before


def _headers_only(arrays: dict[str, tuple[str, tuple[int, ...]]]) -> bytes:
    """An npz whose members are .npy headers declaring (dtype, shape), with no data."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for key, (descr, shape) in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array_header_1_0(member, {"descr": descr, "fortran_order": False,
                                                          "shape": shape})
            zf.writestr(f"{key}.npy", member.getvalue())
    return buf.getvalue()


# What these int8 labels and float16 images store is under the 4 GiB bound; with their
# int64 / float32 copies it is not: the bound counts what the conversion allocates.
_LABELS = 520_000_000  # int8: 0.5 GiB stored, + 3.9 GiB as int64
_IMAGES = 110_000_000  # x 16 float16 values = 3.3 GiB stored, + 6.6 GiB as float32
CONVERSION_BOMBS = {
    "pairs": _headers_only({"corrupted": ("<f4", (2, 1, 4, 4)), "clean": ("<f4", (2, 1, 4, 4)),
                            "label": ("|i1", (_LABELS,))}),
    "eval": _headers_only({"x": ("<f2", (_IMAGES, 1, 4, 4)), "y": ("<i8", (2,))}),
}


@pytest.mark.parametrize("slot", list(CONVERSION_BOMBS))
@pytest.mark.parametrize("verb", CLASSIFIER_VERBS)
def test_npz_bound_counts_the_converted_copies(tmp_path, slot, verb):
    files = samples(tmp_path / "samples")
    files[slot].write_bytes(CONVERSION_BOMBS[slot])
    model = save(tiny_model(), tmp_path / "m.onnx")
    before = snapshot(tmp_path)
    assert_refused(run(_sample_args(verb, model, files, tmp_path / "out.onnx")),
                   f"{slot}.npz", "GiB", "converted", "use fewer samples")
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- classes 6 and 7: samples
def _sample_args(verb: str, model: Path, files: dict[str, Path], out: Path,
                 attack: bool = False) -> list[str]:
    if verb == "locate":
        return ["locate", str(model), "--pairs", str(files["pairs"]), "--eval",
                str(files["eval"]), *FAST]
    if verb == "patch":
        return ["patch", str(model), "--pairs", str(files["pairs"]), "--eval", str(files["eval"]),
                "-o", str(out), "--max-rounds", "1", "--provider", "cpu", *FAST,
                *(["--attack", str(files["attack"])] if attack else [])]
    return ["verify", str(model), "--base", str(model), "--eval", str(files["eval"]),
            "--pairs", str(files["pairs"]), "--provider", "cpu",
            *(["--attack", str(files["attack"])] if attack else [])]


def _member_bytes(npz: bytes, edit) -> bytes:
    """``edit(bytearray, local_header_offset, central_header_offset)`` on every member."""
    data = bytearray(npz)
    locals_ = [i for i in range(len(data)) if data.startswith(b"PK\x03\x04", i)]
    centrals = [i for i in range(len(data)) if data.startswith(b"PK\x01\x02", i)]
    for lo, ce in zip(locals_, centrals):
        edit(data, lo, ce)
    return bytes(data)


def _encrypted(npz: bytes) -> bytes:
    def flag(data, lo, ce):
        data[lo + 6] |= 1
        data[ce + 8] |= 1
    return _member_bytes(npz, flag)


def _method(npz: bytes, method: int) -> bytes:
    def set_method(data, lo, ce):
        data[lo + 8:lo + 10] = struct.pack("<H", method)
        data[ce + 10:ce + 12] = struct.pack("<H", method)
    return _member_bytes(npz, set_method)


def _damaged_deflate(arrays: dict) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    data = bytearray(buf.getvalue())
    name_len, extra_len = struct.unpack("<HH", data[26:30])
    start = 30 + name_len + extra_len
    for i in range(start + 2, start + 40):
        data[i] ^= 0x5A
    return bytes(data)


def _sample_arrays(slot: str, **override) -> dict:
    rng = np.random.default_rng(3)
    x = rng.random((6, 1, 4, 4), dtype=np.float32)
    if slot == "pairs":
        corrupted = x[:2].copy()
        corrupted[:, :, :2, :2] = 1.0
        arrays = {"corrupted": corrupted, "clean": x[:2], "label": np.array([0, 1])}
    elif slot == "attack":
        arrays = {"x": x, "y": np.array([0, 1, 2, 0, 1, 2]), "target": np.int64(0)}
    else:
        arrays = {"x": x, "y": np.array([0, 1, 2, 0, 1, 2])}
    arrays.update(override)
    return arrays


def _float64_overflow(slot: str) -> dict:
    key = "clean" if slot == "pairs" else "x"
    arrays = _sample_arrays(slot)
    big = arrays[key].astype(np.float64)
    big[0, 0, 0, 0] = 1e300  # finite as float64, Inf as the model's float32
    arrays[key] = big
    return arrays


# slot -> case -> (content, verbs, words)
SAMPLE_CASES = {
    "pairs": {
        "encrypted": (_encrypted(npz_bytes(**_sample_arrays("pairs"))), CLASSIFIER_VERBS,
                      ["encrypted"]),
        "compression-99": (_method(npz_bytes(**_sample_arrays("pairs")), 99), CLASSIFIER_VERBS,
                           ["compression method 99"]),
        "damaged-deflate": (_damaged_deflate(_sample_arrays("pairs")), CLASSIFIER_VERBS,
                            ["not a readable npz"]),
        "float64-overflow": (npz_bytes(**_float64_overflow("pairs")), CLASSIFIER_VERBS,
                             ["'clean'", "Inf", "float32"]),
        "label-above-classes": (npz_bytes(**_sample_arrays("pairs", label=np.array([0, 3]))),
                                CLASSIFIER_VERBS, ["'label'", "0..2"]),
    },
    "eval": {
        "encrypted": (_encrypted(npz_bytes(**_sample_arrays("eval"))), CLASSIFIER_VERBS,
                      ["encrypted"]),
        "compression-99": (_method(npz_bytes(**_sample_arrays("eval")), 99), CLASSIFIER_VERBS,
                           ["compression method 99"]),
        "damaged-deflate": (_damaged_deflate(_sample_arrays("eval")), CLASSIFIER_VERBS,
                            ["not a readable npz"]),
        "float64-overflow": (npz_bytes(**_float64_overflow("eval")), CLASSIFIER_VERBS,
                             ["'x'", "Inf", "float32"]),
    },
    "attack": {
        "every-label-is-target": (npz_bytes(**_sample_arrays("attack", y=np.zeros(6, np.int64))),
                                  ("patch", "verify"), ["every label", "'target' 0"]),
        "float64-overflow": (npz_bytes(**_float64_overflow("attack")), ("patch", "verify"),
                             ["'x'", "Inf"]),
    },
}
SAMPLE_MATRIX = [(slot, case, verb) for slot, cases in SAMPLE_CASES.items()
                 for case, (_, verbs, _) in cases.items() for verb in verbs]


@pytest.mark.parametrize("slot,case,verb", SAMPLE_MATRIX,
                         ids=[f"{s}-{c}-{v}" for s, c, v in SAMPLE_MATRIX])
def test_hostile_sample_file_is_refused(tmp_path, slot, case, verb):
    content, _, words = SAMPLE_CASES[slot][case]
    files = samples(tmp_path / "samples")
    files[slot].write_bytes(content)
    model = save(tiny_model(), tmp_path / "m.onnx")
    before = snapshot(tmp_path)
    with warnings.catch_warnings():  # a numpy RuntimeWarning would be a second stderr line
        warnings.simplefilter("error", RuntimeWarning)
        outcome = run(_sample_args(verb, model, files, tmp_path / "out.onnx",
                                   attack=slot == "attack"))
    assert_refused(outcome, f"{slot}.npz", *words)
    assert snapshot(tmp_path) == before


def _runtime_classes():
    """y = Reshape(fc2(...), [Shape(.)[0], -1]), no stated shape: shape inference cannot
    tell the class count, only running the model can."""
    return _with_tail(tiny_model(), [
        helper.make_node("Shape", ["y0"], ["s"], name="sh"),
        helper.make_node("Gather", ["s", "i0"], ["b"], name="g", axis=0),
        helper.make_node("Concat", ["b", "m1"], ["ns"], name="cc", axis=0),
        helper.make_node("Reshape", ["y0", "ns"], ["y"], name="rs")],
        [numpy_helper.from_array(np.array([0], np.int64), "i0"),
         numpy_helper.from_array(np.array([-1], np.int64), "m1")])


@pytest.mark.parametrize("how", ["symbolic", "unstated", "runtime"])
@pytest.mark.parametrize("slot", ["pairs", "eval"])
@pytest.mark.parametrize("verb", CLASSIFIER_VERBS)
def test_labels_above_the_real_class_count_of_a_symbolic_output(tmp_path, how, slot, verb):
    """The output states no class count: the graph's own (3, from shape inference, or from
    one run of the model when inference cannot tell) bounds the labels."""
    model = _runtime_classes() if how == "runtime" else tiny_model()
    out = model.graph.output[0].type.tensor_type
    if how == "symbolic":
        out.shape.dim[1].ClearField("dim_value")
        out.shape.dim[1].dim_param = "classes"
    else:
        out.ClearField("shape")
    path = save(model, tmp_path / "m.onnx")
    files = samples(tmp_path / "samples")
    key = "label" if slot == "pairs" else "y"
    files[slot].write_bytes(npz_bytes(**_sample_arrays(slot, **{key: np.array([5, 7] * (
        1 if slot == "pairs" else 3))})))
    before = snapshot(tmp_path)
    assert_refused(run(_sample_args(verb, path, files, tmp_path / "out.onnx")), f"'{key}'",
                   "0..2", "7")
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- class 7: library ranges
@pytest.mark.parametrize("kwargs", [{"seed": -1}, {"seed": 2 ** 32}, {"seed": 1.5},
                                    {"batch": 0}, {"batch": -3}, {"batch": 1 << 40}])
def test_random_inputs_refuse_out_of_range_seed_and_batch(kwargs):
    with pytest.raises(RectifyError) as info:
        random_inputs(tiny_model(), **kwargs)
    assert info.value.exit_code == 2 and "\n" not in str(info.value)


def test_random_inputs_accept_the_ends_of_the_seed_range():
    for seed in (0, 2 ** 32 - 1):
        assert random_inputs(tiny_model(), seed=seed)[0].shape == (2, 1, 4, 4)


# ---------------------------------------------------------------- class 7: standard output
def _cli(args: list[str], stdout) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "patcher", *args], stdout=stdout,
                          stderr=subprocess.PIPE, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


@pytest.mark.parametrize("verb", ["inspect", "diff"])
def test_closed_stdout_is_at_most_one_line(tmp_path, verb):
    """``onnx-rectify inspect m.onnx | true``: the reader is gone before anything is written."""
    model = save(tiny_model(), tmp_path / "m.onnx")
    before = snapshot(tmp_path)
    args = ["inspect", str(model), "--provider", "cpu"] if verb == "inspect" else \
        ["diff", str(model), str(model)]
    proc = subprocess.Popen([sys.executable, "-m", "patcher", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()
    _, err = proc.communicate(timeout=300)
    text = err.decode()
    assert proc.returncode in (0, 2), text
    assert "Traceback" not in text and "internal error" not in text, text
    assert len(text.strip().splitlines()) <= 1, text
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("verb", ["inspect", "verify"])
def test_full_stdout_is_one_line(tmp_path, verb):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    model = save(tiny_model(), tmp_path / "m.onnx")
    files = samples(tmp_path / "samples")
    before = snapshot(tmp_path)
    args = ["inspect", str(model), "--provider", "cpu"] if verb == "inspect" else \
        ["verify", str(model), "--base", str(model), "--eval", str(files["eval"]),
         "--provider", "cpu"]
    with open("/dev/full", "w") as full:
        proc = _cli(args, full)
    text = proc.stderr.decode()
    assert proc.returncode == 2, text
    assert text.strip().splitlines() == [
        "onnx-rectify: error: cannot write to standard output (No space left on device); its "
        "output is incomplete"], text
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- class 7: the report verb
REPORTS = {
    "truncated": (b'{"result": {"rounds": [', ["not JSON"]),
    "not-utf8": (b'\xff\xfe{}', ["not JSON"]),
    "nested-too-deeply": (b"[" * 100_000 + b"]" * 100_000, ["not JSON", "nested too deeply"]),
    "a-list": (b"[1, 2]", ["top level is list"]),
    "result-a-number": (b'{"result": 5}', ["result is int"]),
    "rounds-of-numbers": (b'{"result": {"rounds": [1]}}', ["result.rounds[0] is int"]),
    "score-a-string": (b'{"result": {"scores": [{"layer": "fc", "score": "high"}]}}',
                       ["result.scores[0].score is str", "number"]),
    "verification-a-number": (b'{"result": {}, "verification": 3}', ["verification is int"]),
}


@pytest.mark.parametrize("case", list(REPORTS))
def test_malformed_report_json_is_refused(tmp_path, case):
    content, words = REPORTS[case]
    (tmp_path / "r.json").write_bytes(content)
    before = snapshot(tmp_path)
    assert_refused(run(["report", str(tmp_path / "r.json"), "-o", str(tmp_path / "page")]),
                   "r.json", *words)
    assert snapshot(tmp_path) == before


def test_malformed_verify_json_is_named_as_itself(tmp_path):
    (tmp_path / "r.json").write_bytes(b'{"result": {}}')
    (tmp_path / "v.json").write_bytes(b'{"checks": {"name": 1}}')
    before = snapshot(tmp_path)
    assert_refused(run(["report", str(tmp_path / "r.json"), "-o", str(tmp_path / "page"),
                        "--verify-json", str(tmp_path / "v.json")]), "v.json",
                   "checks is dict")
    assert snapshot(tmp_path) == before
