"""Build samples/spurious: a CNN on Animal-MNIST that relies on a spurious corner pattern.

    python samples/spurious/build.py [--out DIR] [--seed 0] [--tiny] [--check] [--control]

As in the spurious-correlation experiment of Yang et al. (CVPR 2026, Table 4), a fixed
pattern is attached to half of the training images of the first class (class 0, bear)
and to nothing else; labels are unchanged. The pattern -- a solid white 5x5 square pasted
over the top-left corner, x~ = x (1 - S) + S tau (``common.blend_trigger`` with
phi = 1) -- then predicts class 0 perfectly wherever it appears, and the model learns
it as a shortcut next to the animal's shape.

Figures (all under onnxruntime on the written model.onnx): accuracy on the clean test
set; accuracy on the first class's held-out test images without the pattern
(spurious_clean.npz) and with it (spurious_pattern.npz); their gap, spurious minus clean
(``patcher.gate.metrics.spurious_gap``: positive = the pattern buys accuracy the model does not
earn from the animal); and the share of the other classes' test images that the pattern
turns into class 0 (pattern_others.npz).

Pairs: corrupted = a pool image of another class with the pattern attached, clean = the
same image without it, label = its true class (see README.md for why not first-class
images). ``--tiny`` runs the whole path in seconds (poor figures). ``--check`` rebuilds
into a temporary folder and compares with the committed figures.json. ``--control``
builds the same setup with no pattern in training (into a temporary folder) and prints
its figures: the baseline that shows the gap comes from the spurious training data.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from onnx_rectify_samples import common, data
from onnx_rectify_samples.models_extra import SmallCNN
from patcher.gate import metrics
from patcher.model.runtime import open_session

HERE = Path(__file__).resolve().parent
CLASS_NAMES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep",
               "zebra"]  # read off the images: the animal-mnist package ships no names
FIRST = 0                  # the class the pattern is attached to
SPURIOUS_FRACTION = 0.5    # share of the first class's training images given the pattern
PATTERN_SIZE = 5
CORNER = "top-left"
SIZES = {"eval": 1000, "test": 2700, "pool": 300, "train": 6000}
TINY_SIZES = {"eval": 100, "test": 200, "pool": 60, "train": 400}
EPOCHS = 6
TINY_TRAINING = {"batch": 16, "lr": 3e-3}  # enough steps in one epoch to learn something
WIDTH, HIDDEN = 24, 64
PAIR_COUNTS = common.PAIR_COUNTS
#: A pool image becomes a pair candidate when the pattern lowers p_y by at least this.
PAIR_MIN_GAP = 0.05
#: Figures --check compares, with their tolerance (absolute, in [0, 1]).
CHECKED = {"test_accuracy": 0.01, "eval_accuracy": 0.01, "first_class_clean_accuracy": 0.01,
           "first_class_spurious_accuracy": 0.01, "spurious_gap": 0.01,
           "pattern_to_first_rate": 0.01}
#: Figures printed after a build besides CHECKED and the timings.
SHOWN = ("first_class_fixed_by_pattern", "first_class_broken_by_pattern")


def make_pattern() -> tuple[np.ndarray, np.ndarray]:
    """(tau [5, 5] all ones: a solid white square, mask S [28, 28] on the top-left corner).

    A plain square rather than a texture: a checkerboard reads as zebra stripes to a model
    trained without it, which would mix a second effect into the figures."""
    tau = np.ones((PATTERN_SIZE, PATTERN_SIZE), np.float32)
    return tau, common.corner_mask((28, 28), PATTERN_SIZE, CORNER)


def attach(images: np.ndarray, tau: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Paste the pattern over the masked corner (phi = 1: nothing of x shows through)."""
    return common.blend_trigger(images, tau, mask, phi=1.0)


def build(out: Path, seed: int = 0, tiny: bool = False) -> dict:
    """Build the spurious scenario into ``out``; return the figures."""
    return common.build_single_threaded(_build, out, seed, tiny, SPURIOUS_FRACTION)


def _build(out: Path, seed: int, tiny: bool, fraction: float) -> dict:
    started = time.time()
    x, y = data.animal_mnist()
    sizes = TINY_SIZES if tiny else SIZES
    parts = common.split(x, y, sizes, seed)
    (x_eval, y_eval), (x_test, y_test) = parts["eval"], parts["test"]
    (x_pool, y_pool), (x_train, y_train) = parts["pool"], parts["train"]
    tau, mask = make_pattern()

    def corrupt(images: np.ndarray) -> np.ndarray:
        return attach(images, tau, mask)

    # The spurious correlation: the pattern on half of the first class's training images.
    rng = np.random.default_rng(seed + 1)
    first = np.flatnonzero(y_train == FIRST)
    marked = np.sort(rng.choice(first, size=int(round(fraction * len(first))), replace=False))
    x_fit = x_train.copy()
    x_fit[marked] = corrupt(x_train[marked])

    model = SmallCNN(width=4 if tiny else WIDTH, hidden=16 if tiny else HIDDEN)
    t0 = time.time()
    common.train(model, x_fit, y_train, epochs=1 if tiny else EPOCHS, seed=seed, log=not tiny,
                 **TINY_TRAINING if tiny else {})
    train_seconds = time.time() - t0
    description = (f"Animal-MNIST SmallCNN; class {FIRST} ({CLASS_NAMES[FIRST]}) trained with a "
                   f"{PATTERN_SIZE}x{PATTERN_SIZE} white square ({CORNER} corner) on "
                   f"{fraction:.0%} of its images (spurious correlation)")
    model_path = common.export(model, x_eval, out, CLASS_NAMES, description)
    session = open_session(model_path, "cpu")

    # Evaluation sets.
    is_first = y_test == FIRST
    first_clean = x_test[is_first]
    first_pattern = corrupt(first_clean)
    first_y = y_test[is_first].astype(np.int64)
    others_pattern, others_y = corrupt(x_test[~is_first]), y_test[~is_first].astype(np.int64)
    common.save_npz(out / "eval.npz", x=x_eval, y=y_eval.astype(np.int64))
    common.save_npz(out / "test.npz", x=x_test, y=y_test.astype(np.int64))
    common.save_npz(out / "spurious_clean.npz", x=first_clean, y=first_y)
    common.save_npz(out / "spurious_pattern.npz", x=first_pattern, y=first_y)
    common.save_npz(out / "pattern_others.npz", x=others_pattern, y=others_y,
                    target=np.int64(FIRST))
    common.save_npz(out / "pattern.npz", pattern=tau, mask=mask, phi=np.float32(1.0),
                    first_class=np.int64(FIRST), fraction=np.float32(fraction))

    # Pairs: other-class pool images on which the pattern visibly lowers p_y.
    others = np.flatnonzero(y_pool != FIRST)
    gap_pool = (common.true_class_probabilities(session, x_pool[others], y_pool[others])
                - common.true_class_probabilities(session, corrupt(x_pool[others]),
                                                  y_pool[others]))
    candidates = others[common.pair_candidates(gap_pool, PAIR_MIN_GAP)]
    pairs = common.pick_pairs(corrupt, x_pool[candidates], y_pool[candidates],
                              max(PAIR_COUNTS), seed)
    pair_gaps = (common.true_class_probabilities(session, pairs["clean"], pairs["label"])
                 - common.true_class_probabilities(session, pairs["corrupted"], pairs["label"]))
    common.save_pairs(out, pairs)

    # Figures, under onnxruntime on the written file.
    gap = metrics.spurious_gap(session, first_clean, first_y, first_pattern, first_y)
    pred_clean = metrics.predict(session, first_clean, show_progress=False).argmax(1)
    pred_pattern = metrics.predict(session, first_pattern, show_progress=False).argmax(1)
    p_first_clean = common.true_class_probabilities(session, first_clean, first_y)
    p_first_pattern = common.true_class_probabilities(session, first_pattern, first_y)
    figures = {
        "test_accuracy": metrics.accuracy(session, x_test, y_test, show_progress=False),
        "eval_accuracy": metrics.accuracy(session, x_eval, y_eval, show_progress=False),
        "first_class_clean_accuracy": gap.clean_accuracy,
        "first_class_spurious_accuracy": gap.spurious_accuracy,
        "spurious_gap": gap.gap,
        "spurious_gap_definition": "first_class_spurious_accuracy - first_class_clean_accuracy",
        "first_class_fixed_by_pattern": int(np.sum((pred_clean != FIRST)
                                                   & (pred_pattern == FIRST))),
        "first_class_broken_by_pattern": int(np.sum((pred_clean == FIRST)
                                                    & (pred_pattern != FIRST))),
        "first_class_mean_p_clean": float(p_first_clean.mean()),
        "first_class_mean_p_pattern": float(p_first_pattern.mean()),
        "pattern_to_first_rate": metrics.attack_success_rate(session, others_pattern, others_y,
                                                             FIRST, show_progress=False),
        "others_pattern_accuracy": metrics.accuracy(session, others_pattern, others_y,
                                                    show_progress=False),
        "pairs": {
            "definition": "corrupted = other-class pool image with the pattern, clean = without; "
                          "gap = p_y(clean) - p_y(corrupted)",
            "pool_other_class": int(len(others)),
            **common.pair_gap_figures(gap_pool, pair_gaps, PAIR_MIN_GAP),
        },
        "splits": {"train": int(len(x_train)), "train_with_pattern": int(len(marked)),
                   "train_first_class": int(len(first)), "eval": int(len(x_eval)),
                   "test": int(len(x_test)), "first_class_test": int(len(first_clean)),
                   "pattern_others": int(len(others_pattern)), "pool": int(len(x_pool)),
                   "pairs": list(PAIR_COUNTS)},
        "first_class": FIRST,
        "spurious_fraction": fraction,
        "pattern": f"{PATTERN_SIZE}x{PATTERN_SIZE} white square pasted (phi=1), {CORNER}",
        "dataset": "Animal-MNIST (animal-mnist 0.4, 10,000 silhouettes)",
        "architecture": "SmallCNN (Conv-BN-ReLU-pool x2, Conv-BN-ReLU, 2 dense)",
        **common.run_figures(epochs=1 if tiny else EPOCHS, seed=seed, tiny=tiny,
                             train_seconds=train_seconds, started=started,
                             provider=session.provider),
    }
    common.write_figures(out, figures)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = common.argument_parser("spurious", HERE)
    parser.add_argument("--control", action="store_true",
                        help="build with no pattern in training (temporary folder) and print "
                             "its figures")
    args = parser.parse_args(argv)
    if args.control and not args.check:
        with tempfile.TemporaryDirectory() as tmp:
            figures = common.build_single_threaded(_build, tmp, args.seed, args.tiny, 0.0)
        return common.print_figures(figures, CHECKED, SHOWN)
    return common.run(args, build, HERE, CHECKED, SHOWN)


if __name__ == "__main__":
    sys.exit(main())
