"""The backdoor scenarios' shared machinery (samples/backdoor_cnn, samples/backdoor_resnet).

A :class:`Scenario` holds everything that differs between them (data, model, sizes,
training, trigger placement); :func:`build_scenario` poisons a few percent of the
training set with triggered copies relabelled to the target
(x~ = x (1 - S) + S (phi tau + (1 - phi) x), a logo tau in one corner), trains, exports
model.onnx and writes the sample files patching needs plus figures.json (OA / ASR
measured under onnxruntime on the written model.onnx). Each scenario's build.py
defines its :class:`Scenario` and runs ``common.main`` with :data:`CHECKED`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from onnx_rectify_samples import common, quantized
from patcher.gate import metrics
from patcher.model.runtime import open_session

#: Figures --check compares, and how far they may drift (absolute, in [0, 1]).
CHECKED = dict.fromkeys(("clean_accuracy", "attack_success_rate", "eval_accuracy"), 0.01)


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
    return common.build_single_threaded(_build, out, seed, tiny, sc)


def _build(out: Path, seed: int, tiny: bool, sc: Scenario) -> dict:
    started = time.time()
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
    pairs = common.pick_pairs(corrupt, x_pool, y_pool, max(common.PAIR_COUNTS), seed,
                              exclude_label=sc.target)
    common.save_pairs(out, pairs)
    common.save_npz(out / "trigger.npz", pattern=pattern, mask=mask, phi=np.float32(sc.phi))

    measured = common.measure_backdoor(model_path, (x_test, y_test), attack, sc.target)
    figures = {
        **measured,
        "eval_accuracy": metrics.accuracy(model_path, x_eval, y_eval, provider="cpu"),
        "splits": {"train": int(len(x_train)), "train_augmented": int(len(x_clean)),
                   "train_poisoned": int(n_poison),
                   "eval": int(len(x_eval)), "test": int(len(x_test)),
                   "attack": int(len(attack[0])), "pool": int(len(x_pool)),
                   "pairs": list(common.PAIR_COUNTS)},
        "poison_rate": n_poison / len(x_fit),
        "target": sc.target,
        "phi": sc.phi,
        "trigger": f"{sc.trigger_size}x{sc.trigger_size} logo, {sc.corner}",
        "dataset": sc.dataset,
        "architecture": sc.architecture,
        "augmentation": "none" if tiny else sc.augmentation,
        **common.run_figures(epochs=1 if tiny else sc.epochs, seed=seed, tiny=tiny,
                             train_seconds=train_seconds, started=started,
                             provider=open_session(model_path, "cpu").provider),
        **sc.extra,
    }
    common.write_figures(out, figures)
    # the shipped-precision variants (int8 QDQ and QOperator; fp16 keep-io for the MNIST CNN)
    quantized.write_variants(out, fp16=sc.name == "backdoor_cnn")
    return figures
