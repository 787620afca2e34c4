"""Loading: external data resolved safely, relative to the model's folder; clear errors."""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

from patcher.errors import BadModelError, UnsafeModelError
from patcher.model.modelio import load_model, write_bytes_atomic
from patcher.graph.shadow import ShadowGraph
from tests.build import make_model, value_info

W = np.arange(12, dtype=np.float32).reshape(3, 4)


def _save_external(folder, location="weights.bin"):
    """A Gemm model saved with its weight in an external data file; returns its path."""
    model = make_model([helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=1)],
                       [value_info("x", [1, 4])], [value_info("y", [1, 3])], {"w": W})
    path = folder / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)
    return path


def _set_external(path, **fields):
    model = onnx.load(str(path), load_external_data=False)
    tensor = model.graph.initializer[0]
    for entry in tensor.external_data:
        if entry.key in fields:
            entry.value = str(fields.pop(entry.key))
    for key, value in fields.items():
        tensor.external_data.add(key=key, value=str(value))
    path.write_bytes(model.SerializeToString())


def test_external_weights_load_and_are_marked_external(tmp_path):
    path = _save_external(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    graph = ShadowGraph.from_onnx(path)
    layer = graph.editable_layers[0]
    assert layer.storage == "external" and layer.weight == "w"
    np.testing.assert_array_equal(graph.weight("w").detach().numpy(), W)
    y = graph(torch.ones(1, 4))[0]
    np.testing.assert_allclose(y.detach().numpy(), W.sum(1, keepdims=True).T)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # inputs untouched


def test_proto_with_external_data_needs_its_folder(tmp_path):
    path = _save_external(tmp_path)
    proto = onnx.load(str(path), load_external_data=False)
    with pytest.raises(BadModelError, match="external data"):
        ShadowGraph.from_onnx(proto)
    assert ShadowGraph.from_onnx(proto, base_dir=tmp_path).editable_layers[0].storage == "external"


@pytest.mark.parametrize("location,match", [
    ("/etc/passwd", "absolute"),
    ("../weights.bin", "leaves the model folder"),
    ("a/../../weights.bin", "leaves the model folder"),
    ("", "empty"),
])
def test_external_locations_outside_the_folder_are_refused(tmp_path, location, match):
    path = _save_external(tmp_path)
    _set_external(path, location=location)
    with pytest.raises(UnsafeModelError, match=match):
        load_model(path)


def test_external_symlink_and_bad_ranges_are_refused(tmp_path):
    path = _save_external(tmp_path)
    outside = tmp_path.parent / f"{tmp_path.name}_secret.bin"
    outside.write_bytes(W.tobytes())
    os.symlink(outside, tmp_path / "link.bin")
    _set_external(path, location="link.bin")
    with pytest.raises(UnsafeModelError, match="symlink"):
        load_model(path)
    _set_external(path, location="weights.bin", offset=40)
    with pytest.raises(BadModelError, match="does not fit"):
        load_model(path)
    _set_external(path, offset=0, unknown_key=1)
    with pytest.raises(BadModelError, match="unknown external data keys"):
        load_model(path)


@pytest.mark.parametrize("content,match", [
    (b"", "empty"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 10\n", "Git LFS pointer"),
    (b"\x08\x07\x12\xff\xff\xff\xff\x0f garbage", "not a readable ONNX model"),
])
def test_unusable_files_get_a_clear_error(tmp_path, content, match):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(BadModelError, match=match):
        load_model(path)


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    write_bytes_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def _gemm_model(weight):
    from onnx import numpy_helper

    model = make_model([helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=1)],
                       [value_info("x", [1, 4])], [value_info("y", [1, 3])], {"w": weight})
    return model


@pytest.mark.parametrize("mutate,match", [
    (lambda m: setattr(m.graph.initializer[0], "raw_data", b"\0" * 7), "holds 7 bytes"),
    (lambda m: m.graph.initializer[0].dims.__setitem__(0, -3), "negative dimension"),
    (lambda m: m.graph.initializer[0].dims.extend([1 << 30, 1 << 30]), "more than 2\\^40"),
    (lambda m: setattr(m, "ir_version", 99), "IR version 99 is newer"),
    (lambda m: setattr(m.opset_import[0], "version", 99), "opset 99 is newer"),
])
def test_inconsistent_tensors_and_versions_are_refused(tmp_path, mutate, match):
    model = _gemm_model(W)
    mutate(model)
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    before = path.read_bytes()
    with pytest.raises(BadModelError, match=match):
        load_model(path)
    assert path.read_bytes() == before


def test_nan_weights_are_refused(tmp_path):
    bad = W.copy()
    bad[1, 2] = np.nan
    path = tmp_path / "nan.onnx"
    path.write_bytes(_gemm_model(bad).SerializeToString())
    with pytest.raises(BadModelError, match="tensor 'w' contains NaN"):
        load_model(path)


def test_attributes_and_element_types_must_be_well_formed(tmp_path):
    from onnx import AttributeProto

    model = _gemm_model(W)
    model.graph.node[0].attribute[0].type = AttributeProto.STRING  # transB as a string
    path = tmp_path / "attr.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(BadModelError, match="attribute 'transB' has type STRING, its op expects INT"):
        load_model(path)
    model = _gemm_model(W)
    model.graph.initializer[0].data_type = 0
    path.write_bytes(model.SerializeToString())
    with pytest.raises(BadModelError, match="tensor 'w' has no valid element type"):
        load_model(path)
