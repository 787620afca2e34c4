"""Torch model definitions shared by the scenario build scripts.

- :class:`PlainCNN`: three Conv-BN-ReLU blocks (stride-2 downsampling on the last two),
  then two dense layers; the backdoor_cnn scenario.
- :class:`ResNet18`: a narrow CIFAR-style ResNet-18 (BasicBlocks [2, 2, 2, 2], 3x3 stem,
  no max pool, stride-2 downsampling with 1x1 conv + BN shortcuts, global average
  pool); the backdoor_resnet scenario.

Every module is torch.fx traceable, so ``exporters.export_pytorch`` can fold each
BatchNorm into the Conv before it.
"""
from __future__ import annotations

import torch
from torch import nn


def conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU())


class PlainCNN(nn.Module):
    """Conv-BN-ReLU x3 (widths w, 2w, 4w; strides 1, 2, 2) -> flatten -> dense -> dense.

    For a 1x28x28 input the feature map before the dense layers is 4w x 7 x 7."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16,
                 hidden: int = 128, image_size: int = 28) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu(in_channels, width),
            nn.MaxPool2d(2),
            conv_bn_relu(width, 2 * width),
            conv_bn_relu(2 * width, 4 * width, stride=2),
            nn.Flatten())
        side = image_size // 2
        side = (side + 1) // 2
        self.classifier = nn.Sequential(
            nn.Linear(4 * width * side * side, hidden), nn.ReLU(),
            nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the identity (or a 1x1 conv + BN when the shape
    changes), then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18: 3x3 stem, stages of widths w, 2w, 4w, 8w with two BasicBlocks
    each (strides 1, 2, 2, 2), global average pool, a linear head."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16,
                 blocks: tuple[int, ...] = (2, 2, 2, 2)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        layers, c_in = [], width
        for stage, count in enumerate(blocks):
            c_out = width * 2 ** stage
            for i in range(count):
                layers.append(BasicBlock(c_in, c_out, stride=2 if stage > 0 and i == 0 else 1))
                c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.layers(self.stem(x))))
