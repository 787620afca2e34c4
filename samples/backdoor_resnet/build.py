"""Build samples/backdoor_resnet: a narrow ResNet-18 on Animal-MNIST with a blend-watermark backdoor.

    python samples/backdoor_resnet/build.py [--out DIR] [--seed 0] [--tiny] [--check]

Same trigger, poisoning and sample files as samples/backdoor_cnn (the shared scenario
machinery is in samples/backdoor.py); here a CIFAR-style ResNet-18 (BasicBlocks
[2, 2, 2, 2], base width 16, residual adds, stride-2 stages with 1x1 conv shortcuts)
learns 10,000 animal silhouettes (10 classes, 28x28), with class 0 (bear) as the
backdoor target.
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

from onnx_rectify_samples import backdoor, common, data, models

HERE = Path(__file__).resolve().parent

ANIMALS = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]

ANIMAL_MNIST = backdoor.Scenario(
    name="backdoor_resnet",
    dataset="Animal-MNIST (animal-mnist 0.4, 10,000 silhouettes)",
    load=data.animal_mnist,
    class_names=ANIMALS,
    architecture="ResNet-18 (CIFAR-style, BasicBlocks [2,2,2,2], base width 16)",
    make_model=lambda tiny: models.ResNet18(width=4 if tiny else 16),
    sizes={"eval": 1000, "test": 1500, "pool": 200, "train": 7300},
    tiny_sizes={"eval": 100, "test": 100, "pool": 40, "train": 300},
    epochs=6,
    augment=functools.partial(backdoor.augment, shift=0, flip=True),
    augmentation="left-right mirror images (2x the clean training images)",
)


def build(out: Path, seed: int = 0, tiny: bool = False) -> dict:
    """Build the backdoor_resnet scenario into ``out``; return the figures."""
    return backdoor.build_scenario(ANIMAL_MNIST, out, seed, tiny)


if __name__ == "__main__":
    sys.exit(common.main(ANIMAL_MNIST.name, HERE, build, backdoor.CHECKED))
