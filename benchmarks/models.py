"""Reference networks written directly in torch, for the shadow-graph benchmarks.

* :class:`ResNet18` - the CIFAR-shape ResNet-18 (3x32x32 input, width 64,
  BasicBlocks [2, 2, 2, 2], BatchNorm, residual adds, 10 classes).
* :class:`PlainCNN` - 3 x (conv + BN + ReLU + max-pool), then 2 linear layers
  (1x28x28 input, 10 classes).

:func:`fold_bn` returns an eval-mode copy with every BatchNorm folded into the
convolution before it (``torch.nn.utils.fusion.fuse_conv_bn_eval``): the network
that a BN-folded ONNX export represents.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18: 3x3 stem (no max-pool), stages of width 64/128/256/512."""

    def __init__(self, num_classes: int = 10, width: int = 64,
                 blocks: tuple[int, ...] = (2, 2, 2, 2)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, in_planes = [], width
        for i, n in enumerate(blocks):
            planes = width * 2 ** i
            stride = 1 if i == 0 else 2
            stage = []
            for s in [stride] + [1] * (n - 1):
                stage.append(BasicBlock(in_planes, planes, s))
                in_planes = planes
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1)
        out = torch.flatten(out, 1)
        return self.linear(out)


class PlainCNN(nn.Module):
    """3 x (conv3x3 + BN + ReLU + max-pool 2) -> 1152 -> 256 -> 10."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(128)
        self.fc1 = nn.Linear(128 * 3 * 3, 256)
        self.fc2 = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)  # 28 -> 14
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)  # 14 -> 7
        x = F.max_pool2d(F.relu(self.bn3(self.conv3(x))), 2)  # 7 -> 3
        x = torch.flatten(x, 1)
        return self.fc2(F.relu(self.fc1(x)))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters (so that
    folding actually changes the weights, as in a trained network)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model


def fold_bn(model: nn.Module) -> nn.Module:
    """An eval-mode copy with each BatchNorm folded into the conv that feeds it.

    Handles the attribute pairs used above (``convN``/``bnN``) and the
    ``Sequential(conv, bn)`` shortcut; the folded BN becomes ``nn.Identity``.
    """
    model = copy.deepcopy(model).eval()
    for module in list(model.modules()):
        if isinstance(module, nn.Sequential) and len(module) == 2 \
                and isinstance(module[0], nn.Conv2d) and isinstance(module[1], nn.BatchNorm2d):
            module[0] = fuse_conv_bn_eval(module[0], module[1])
            module[1] = nn.Identity()
            continue
        for name, child in list(module.named_children()):
            if name.startswith("conv") and isinstance(child, nn.Conv2d):
                bn_name = "bn" + name[len("conv"):]
                bn = getattr(module, bn_name, None)
                if isinstance(bn, nn.BatchNorm2d):
                    setattr(module, name, fuse_conv_bn_eval(child, bn))
                    setattr(module, bn_name, nn.Identity())
    leftover = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    if leftover:
        raise RuntimeError(f"fold_bn left BatchNorm modules unfolded: {leftover}")
    return model


NETWORKS = {
    "resnet18": (ResNet18, (3, 32, 32)),
    "plain_cnn": (PlainCNN, (1, 28, 28)),
}
