"""Torch model definitions of the spurious and leakage scenarios.

- :class:`SmallCNN`: two Conv-BN-ReLU blocks, each followed by a 2x2 max pool, a third
  Conv-BN-ReLU, then flatten -> dense -> dense. Flattening (no global pooling) keeps
  the position of every feature, so the network can tie a class to *where* something
  appears (a corner pattern; which half of a BlockMNIST image holds the digit).

Every module is torch.fx traceable, so ``exporters.export_pytorch`` folds each
BatchNorm into the Conv before it.
"""
from __future__ import annotations

import torch
from torch import nn


def conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU())


class SmallCNN(nn.Module):
    """conv(w)-pool-conv(2w)-pool-conv(2w) -> flatten -> Linear(hidden) -> ReLU -> Linear.

    For an H x W input the map before the dense layers is 2w x H/4 x W/4."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16,
                 hidden: int = 64, image_size: tuple[int, int] = (28, 28)) -> None:
        super().__init__()
        h, w = image_size
        self.features = nn.Sequential(
            conv_bn_relu(in_channels, width), nn.MaxPool2d(2),
            conv_bn_relu(width, 2 * width), nn.MaxPool2d(2),
            conv_bn_relu(2 * width, 2 * width), nn.Flatten())
        self.classifier = nn.Sequential(
            nn.Linear(2 * width * (h // 4) * (w // 4), hidden), nn.ReLU(),
            nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
