"""exporters.export_pytorch and `onnx-rectify export`."""
from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from onnx_rectify_exporters import export_pytorch
from patcher.cli import main
from patcher.errors import RectifyError
from patcher.graph.shadow import ShadowGraph


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
    net[1].running_var.uniform_(0.5, 2.0)  # so that folding changes the weights
    net[1].running_mean.uniform_(-0.5, 0.5)
    return net.eval()


@pytest.mark.parametrize("fold_bn", [True, False])
def test_torchscript_export_keeps_state_dict_names_and_metadata(tmp_path, fold_bn):
    result = export_pytorch(small_cnn(), torch.zeros(1, 1, 8, 8), tmp_path / "m.onnx",
                            fold_bn=fold_bn, class_names=["a", "b", "c"])
    model = onnx.load(str(result.path))
    ops = [n.op_type for n in model.graph.node]
    assert ("BatchNormalization" in ops) is (not fold_bn)
    assert result.batchnorm_folded is fold_bn
    graph = ShadowGraph.from_onnx(result.path)
    assert [l.weight for l in graph.editable_layers] == ["0.weight", "4.weight"]
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["onnx_rectify.class_names"]) == ["a", "b", "c"]
    assert meta["onnx_rectify.input_layout"] == "NCHW"
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert result.max_abs_diff < 1e-4 and result.top1_agreement == 1.0


def test_external_data_goes_beside_the_model(tmp_path):
    result = export_pytorch(small_cnn(), torch.zeros(1, 1, 8, 8), tmp_path / "m.onnx",
                            external_data=True)
    assert result.data_path == tmp_path / "m.onnx.data" and result.data_path.stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    graph = ShadowGraph.from_onnx(result.path)
    storage = {l.weight: l.storage for l in graph.editable_layers}
    assert storage == {"0.weight": "initializer", "4.weight": "external"}  # < 1 KiB stays inline


def test_dynamo_export_runs_and_refuses_to_keep_batchnorm(tmp_path):
    result = export_pytorch(small_cnn(), torch.zeros(1, 1, 8, 8), tmp_path / "d.onnx",
                            exporter="dynamo")
    assert result.opset >= 18 and result.top1_agreement == 1.0
    with pytest.raises(RectifyError, match="dynamo exporter always folds BatchNorm"):
        export_pytorch(small_cnn(), torch.zeros(1, 1, 8, 8), tmp_path / "e.onnx",
                       exporter="dynamo", fold_bn=False)


def test_export_cli_with_state_dict(tmp_path, monkeypatch):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "zoo.py").write_text(
        "from torch import nn\n"
        "def make():\n"
        "    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2*6*6, 4))\n")
    monkeypatch.syspath_prepend(str(pkg))
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 4))
    torch.save(net.state_dict(), tmp_path / "w.pt")
    out = tmp_path / "out.onnx"
    runner = CliRunner()
    ok = runner.invoke(main, ["export", "zoo:make", "--weights", str(tmp_path / "w.pt"),
                              "--input-shape", "1,1,8,8", "-o", str(out)])
    assert ok.exit_code == 0, ok.output
    stored = onnx.numpy_helper.to_array(
        [t for t in onnx.load(str(out)).graph.initializer if t.name == "0.weight"][0])
    np.testing.assert_array_equal(stored, net[0].weight.detach().numpy())
    again = runner.invoke(main, ["export", "zoo:make", "--input-shape", "1,1,8,8", "-o", str(out)])
    assert again.exit_code == 2 and "--force" in again.output
    missing = runner.invoke(main, ["export", "zoo:nothing", "--input-shape", "1,1,8,8",
                                   "-o", str(tmp_path / "x.onnx")])
    assert missing.exit_code == 2 and "has no attribute 'nothing'" in missing.output


def test_export_cli_imports_the_factory_from_the_current_folder(tmp_path, monkeypatch):
    """`onnx-rectify export mymodel:build` from the folder that holds mymodel.py, as
    `python -m` would import it (no PYTHONPATH=.)."""
    name = "mymodel_in_cwd"
    (tmp_path / f"{name}.py").write_text(
        "from torch import nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(16, 3))\n")
    monkeypatch.chdir(tmp_path)
    # what a console script sees: neither the current folder nor '' on sys.path
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    try:
        result = CliRunner().invoke(main, ["export", f"{name}:build", "--input-shape", "1,1,4,4",
                                           "-o", "m.onnx"])
    finally:
        sys.modules.pop(name, None)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m.onnx").is_file() and "top-1 agreement 100%" in result.output
    missing = CliRunner().invoke(main, ["export", "no_such_module_here:build", "--input-shape",
                                        "1,1,4,4", "-o", "n.onnx"])
    assert missing.exit_code == 2 and "cannot import no_such_module_here" in missing.output
    assert not (tmp_path / "n.onnx").exists()
