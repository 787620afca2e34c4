"""Models whose batch is fixed (at 1, as zoo and edge exports often are, with the batch merged
into a Reshape to [1, -1]): export makes them so when the module hard-codes its batch, and
every verb runs them one image at a time. Export refusals leave nothing behind."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from onnx_rectify_exporters import export_pytorch
from patcher.cli import main
from patcher.errors import (BadSamplesError, CheckFailedError, RectifyError,
                            UnsupportedOpError)
from patcher.gate import metrics
from patcher.graph.keys import LayerTap
from patcher.graph.shadow import ShadowExecutionError, ShadowGraph
from patcher.model.runtime import open_session
from tests.test_patch_end_to_end import _images, _trigger


class BatchOneNet(nn.Module):
    """A small CNN whose forward, once ``fixed``, flattens with reshape(1, -1): it runs one
    image at a time only, like a zoo model exported with batch 1."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 4)
        self.fixed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        h = h.reshape(1, -1) if self.fixed else h.flatten(1)
        return self.fc2(torch.relu(self.fc1(h)))


@pytest.fixture(scope="module")
def batch_one(tmp_path_factory):
    """The trojaned blob classifier of test_patch_end_to_end with its batch fixed at 1."""
    folder = tmp_path_factory.mktemp("batch1")
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    y = rng.integers(0, 4, 1200)
    x = _images(y, rng)
    poison = rng.choice(800, 80, replace=False)
    xt = torch.from_numpy(np.concatenate([x[:800], _trigger(x[poison])]))
    yt = torch.from_numpy(np.concatenate([y[:800], np.zeros(80, np.int64)]))
    net = BatchOneNet()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(25):
        for i in range(0, len(xt), 64):
            loss = nn.functional.cross_entropy(net(xt[i:i + 64]), yt[i:i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.fixed = True
    result = export_pytorch(net.eval(), torch.zeros(1, 1, 8, 8), folder / "model.onnx")
    assert result.fixed_batch == 1
    ev, te = slice(800, 1000), slice(1000, 1200)
    np.savez(folder / "eval.npz", x=x[ev], y=y[ev])
    keep = y[te] != 0
    np.savez(folder / "attack.npz", x=_trigger(x[te][keep]), y=y[te][keep], target=np.int64(0))
    pick = np.flatnonzero(y[ev] != 0)[:1]
    np.savez(folder / "pairs.npz", corrupted=_trigger(x[ev][pick]), clean=x[ev][pick],
             label=y[ev][pick])
    return folder


def _asr(path, folder):
    a = np.load(folder / "attack.npz")
    return metrics.attack_success_rate(path, a["x"], a["y"], 0, provider="cpu")


def test_the_export_is_really_fixed_at_batch_one(batch_one):
    """onnxruntime itself refuses two images at once; the project's sessions run them one at
    a time and agree with running them singly."""
    model = onnx.load(str(batch_one / "model.onnx"))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    session = open_session(batch_one / "model.onnx", "cpu")
    x = np.load(batch_one / "eval.npz")["x"][:5]
    with pytest.raises(Exception):
        session.session.run(None, {session.input_names[0]: x})
    singly = np.concatenate([session.run(x[i:i + 1])[0] for i in range(5)])
    np.testing.assert_array_equal(session.run(x)[0], singly)


def test_shadow_graph_runs_it_image_by_image(batch_one):
    """Five images through the shadow graph equal onnxruntime's; layer taps and gradients see
    the usual [n, ...] tensors."""
    graph = ShadowGraph.from_onnx(str(batch_one / "model.onnx"))
    assert graph.fixed_batch == 1
    x = np.load(batch_one / "eval.npz")["x"][:5]
    expected = open_session(batch_one / "model.onnx", "cpu").run(x)[0]
    layers = graph.editable_layers
    inputs = torch.from_numpy(x).requires_grad_(True)
    with LayerTap(graph, layers, detach=False) as tap:
        out = graph(inputs)[0]
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=1e-5, atol=1e-6)
    assert all(tap.outputs[l.name].shape[0] == 5 for l in layers)
    gemm = next(l for l in layers if l.op == "Gemm")
    assert tuple(tap.inputs[gemm.name].shape) == (5, 256)
    out[:, 0].sum().backward()
    assert inputs.grad is not None and bool((inputs.grad.abs().sum((1, 2, 3)) > 0).all())
    with torch.no_grad():
        env = graph.run_until(gemm.name, torch.from_numpy(x))
        out_name = graph.node_by_name[gemm.name].outputs[0]
        assert env[out_name].shape[0] == 5
        again = graph.run_after(gemm.name, env)[0]
    np.testing.assert_allclose(again.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_every_verb_runs_it(batch_one, tmp_path):
    """inspect (parity), locate, patch and verify on the batch-1 model: no refusal, and the
    patch removes the backdoor."""
    model = batch_one / "model.onnx"
    runner = CliRunner()
    result = runner.invoke(main, ["inspect", str(model)])
    assert result.exit_code == 0, result.output
    common = ["--pairs", str(batch_one / "pairs.npz"), "--eval", str(batch_one / "eval.npz")]
    rank = tmp_path / "rank.json"
    result = runner.invoke(main, ["locate", str(model), *common, "--json", str(rank)])
    assert result.exit_code == 0, result.output
    assert len(json.loads(rank.read_text())["ranking"]) == 4
    out = tmp_path / "patched.onnx"
    result = runner.invoke(main, ["patch", str(model), *common, "-o", str(out), "--gap", "0.05"])
    assert result.exit_code in (0, 1), result.output
    base_asr, asr = _asr(model, batch_one), _asr(out, batch_one)
    assert base_asr >= 0.9 and asr <= 0.5 * base_asr, (base_asr, asr)
    result = runner.invoke(main, ["verify", str(out), "--base", str(model), "--eval",
                                  str(batch_one / "eval.npz"), "--attack",
                                  str(batch_one / "attack.npz"), "--latency-runs", "2"])
    assert result.exit_code in (0, 1), result.output
    assert "attack" in result.output.lower()


def test_a_count_the_fixed_batch_does_not_divide_is_refused(batch_one, tmp_path):
    """A model fixed at batch 2 runs 4 images two at a time and refuses 3, in one line, in the
    shadow graph and under onnxruntime."""
    model = onnx.load(str(batch_one / "model.onnx"))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 2
    for node in model.graph.node:  # the Reshape to [1, -1] becomes [2, -1]
        if node.op_type == "Constant":
            value = onnx.numpy_helper.to_array(node.attribute[0].t)
            if value.tolist() == [1, -1]:
                node.attribute[0].t.CopyFrom(onnx.numpy_helper.from_array(
                    np.array([2, -1], np.int64)))
    for init in model.graph.initializer:
        if onnx.numpy_helper.to_array(init).tolist() == [1, -1]:
            init.CopyFrom(onnx.numpy_helper.from_array(np.array([2, -1], np.int64), init.name))
    path = tmp_path / "batch2.onnx"
    onnx.save(model, str(path))
    x = np.load(batch_one / "eval.npz")["x"][:4]
    graph = ShadowGraph.from_onnx(str(path))
    session = open_session(path, "cpu")
    with torch.no_grad():
        np.testing.assert_allclose(graph(torch.from_numpy(x))[0].numpy(), session.run(x)[0],
                                   rtol=1e-5, atol=1e-6)
    with pytest.raises(ShadowExecutionError, match="fixes its batch at 2"):
        graph(torch.from_numpy(x[:3]))
    with pytest.raises(BadSamplesError, match="fixes its batch at 2"):
        session.run(x[:3])


class ArcTangent(nn.Module):
    """Exports an Atan node, which the shadow graph cannot run."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 4)

    def forward(self, x):
        return self.fc(torch.atan(x.flatten(1)))


class Drifting(nn.Module):
    """Answers differently on every call: the export's onnxruntime check must fail."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.fc(x.flatten(1)) * float(self.calls)


class DataDependent(nn.Module):
    """Branches on a value: torch.export cannot trace it with a dynamic batch."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x.flatten(1))
        return -self.fc(x.flatten(1))


@pytest.mark.parametrize("external", [False, True])
@pytest.mark.parametrize("case", ["unsupported op", "check fails", "exporter fails"])
def test_export_failures_leave_nothing_behind(tmp_path, case, external):
    """A refused export writes nothing (no model, no data file, no staging folder), whether
    our op set refuses it (one line naming the op), onnxruntime disagrees with torch, or the
    exporter itself fails."""
    torch.manual_seed(0)
    module, exporter, error = {
        "unsupported op": (ArcTangent(), "torchscript", UnsupportedOpError),
        "check fails": (Drifting(), "torchscript", CheckFailedError),
        "exporter fails": (DataDependent(), "dynamo", RectifyError),
    }[case]
    target = tmp_path / "out" / "model.onnx"
    target.parent.mkdir()
    with pytest.raises(error) as raised:  # fx's BatchNorm folding would freeze the drift
        export_pytorch(module, torch.zeros(1, 1, 8, 8), target, exporter=exporter,
                       external_data=external, fold_bn=exporter == "dynamo")
    assert "\n" not in str(raised.value)
    if case == "unsupported op":
        assert "Atan" in str(raised.value) and "nothing written" in str(raised.value)
    assert list(target.parent.iterdir()) == []
