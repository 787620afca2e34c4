"""A model whose external weights do not fit in the memory still available is refused with one
line before they are read (rather than the process being killed by the kernel)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

import patcher.model.external as external
from patcher.cli import main


def _model_with_external_weight(folder: Path, rows: int = 64) -> Path:
    weight = np.random.default_rng(0).standard_normal((rows, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", rows])],
        [onnx.numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = folder / "m.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="m.data",
              size_threshold=0)
    return path


def test_available_memory_is_a_positive_byte_count():
    free = external.available_memory()
    assert free is None or free > 0


@pytest.mark.parametrize("budget,refused", [(100, True), (10 ** 9, False)])
def test_external_weights_beyond_available_memory_are_refused(tmp_path, monkeypatch, budget,
                                                               refused):
    path = _model_with_external_weight(tmp_path)  # 64 x 4 float32 = 1024 bytes of data
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.setattr(external, "available_memory", lambda: budget)
    outcome = CliRunner().invoke(main, ["inspect", str(path), "--no-parity"])
    if refused:
        assert outcome.exit_code == 2, outcome.output
        lines = outcome.stderr.splitlines()
        assert len(lines) == 1 and "needs at least 1.0 KiB of memory and 100 B is available" in lines[0], lines
        assert "available" in lines[0]
    else:
        assert outcome.exit_code == 0, outcome.output
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
