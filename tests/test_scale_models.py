"""benchmarks/scale_models.py: the parts its real backdoors rely on, at small sizes (the
224-pixel builds themselves take minutes and are measured by benchmarks/scale.py)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sm():
    spec = importlib.util.spec_from_file_location("scale_models",
                                                  ROOT / "benchmarks" / "scale_models.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("scale_models", module)  # its dataclasses look themselves up there
    spec.loader.exec_module(sys.modules["scale_models"])
    return sys.modules["scale_models"]


def _small(sm, name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "mobilenet_v2":
        return sm.MobileNetV2().eval()
    return sm.ViT(image=32, depth=sm.ViT.FRONT + 2, attention=sm.MHAAttention).eval()


@pytest.mark.parametrize("name", ["mobilenet_v2", "vit"])
def test_front_then_tail_is_the_forward_and_they_share_no_parameter(sm, name):
    net = _small(sm, name)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net.tail(net.front(x)), net(x), rtol=0, atol=0)
    tail = {id(p) for m in net.tail_modules() for p in m.parameters()}
    front = [p for p in net.parameters() if id(p) not in tail]
    assert tail and front  # both parts hold weights
    assert len(tail) + len(front) == len(list(net.parameters()))


@pytest.mark.parametrize("name", ["mobilenet_v2", "vit"])
def test_train_tail_changes_only_the_tail(sm, name):
    net = _small(sm, name)
    x = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    labels = np.arange(8) % sm.NUM_CLASSES
    tail = {id(p) for m in net.tail_modules() for p in m.parameters()}
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    fit = sm._train_tail(net, x, labels, epochs=1, seed=0, batch=4)
    changed = {n for n, p in net.named_parameters() if not torch.equal(p, before[n])}
    tail_names = {n for n, p in net.named_parameters() if id(p) in tail}
    assert changed and changed <= tail_names
    assert 0.0 <= fit["train_accuracy"] <= 1.0 and np.isfinite(fit["train_loss"])
    assert not net.training


def test_torchvision_style_vit_exports_with_the_default_exporter(sm, tmp_path):
    """nn.MultiheadAttention, as scale.py builds it: the exporter's own op-set check passes."""
    from onnx_rectify_exporters.pytorch import export_pytorch

    torch.manual_seed(0)
    net = sm.ViT(image=32, depth=2, attention=sm.MHAAttention).eval()
    result = export_pytorch(net, torch.zeros(1, 3, 32, 32), tmp_path / "vit.onnx",
                            check_batch=2)
    assert (tmp_path / "vit.onnx").exists() and result.top1_agreement == 1.0
