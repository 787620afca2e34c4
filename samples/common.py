"""Shared pieces of the scenario build scripts: seeding, splits, triggers, training,
artifacts, figures, and the command line (``--out``, ``--seed``, ``--tiny``, ``--check``).

Every build is deterministic for a seed: numpy and torch are seeded, torch runs
single-threaded deterministic kernels on the CPU (:func:`build_single_threaded`), and
data order comes from a seeded generator.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Callable

import numpy as np
import torch
from torch import nn

import onnxruntime

from onnx_rectify_exporters import export_pytorch
from patcher.gate import metrics

SAMPLES = Path(__file__).resolve().parent
#: pairs_n{n}.npz written by every scenario; nested draws (n=1 among n=5 among n=20).
PAIR_COUNTS = (1, 5, 20)
#: A build: ``build(out, seed=0, tiny=False) -> figures``.
Build = Callable[..., dict]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def build_single_threaded(build: Callable[..., dict], out: Path, seed: int, tiny: bool,
                          *args) -> dict:
    """Make ``out``, seed everything and run ``build(out, seed, tiny, *args)`` on one torch
    thread (restored afterwards); return its figures."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same float sums on every machine
    try:
        seed_everything(seed)
        return build(out, seed, tiny, *args)
    finally:
        torch.set_num_threads(threads)


def split(x: np.ndarray, y: np.ndarray, sizes: dict[str, int], seed: int
          ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Disjoint random parts of (x, y) with the given sizes, in order of ``sizes``."""
    order = np.random.default_rng(seed).permutation(len(x))
    if sum(sizes.values()) > len(x):
        raise ValueError(f"asked for {sum(sizes.values())} samples, have {len(x)}")
    parts, start = {}, 0
    for name, size in sizes.items():
        idx = order[start:start + size]
        parts[name] = (x[idx], y[idx])
        start += size
    return parts


def logo_pattern(height: int, width: int) -> np.ndarray:
    """A small emblem in [0, 1]: a ring with a cross through it (the trigger tau)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    cy, cx = (height - 1) / 2, (width - 1) / 2
    r = np.hypot(yy - cy, xx - cx)
    ring = (np.abs(r - min(height, width) * 0.38) < 0.9).astype(np.float32)
    cross = ((np.abs(yy - cy) < 0.6) | (np.abs(xx - cx) < 0.6)).astype(np.float32)
    return np.clip(ring + cross, 0, 1)


def corner_mask(shape: tuple[int, int], size: int, corner: str = "bottom-right") -> np.ndarray:
    """A [H, W] mask S: 1 on a size x size square in one corner (1 pixel from the edge)."""
    h, w = shape
    mask = np.zeros((h, w), np.float32)
    top = h - size - 1 if "bottom" in corner else 1
    left = w - size - 1 if "right" in corner else 1
    mask[top:top + size, left:left + size] = 1
    return mask


def blend_trigger(x: np.ndarray, pattern: np.ndarray, mask: np.ndarray, phi: float = 0.5
                  ) -> np.ndarray:
    """x~ = x (1 - S) + S (phi tau + (1 - phi) x): the paper's blend watermark trigger.

    ``pattern`` tau and ``mask`` S are [H, W] (placed by the mask), x is [n, C, H, W]."""
    full = np.zeros_like(mask)
    ys, xs = np.nonzero(mask)
    full[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = pattern
    s = mask[None, None]
    return (x * (1 - s) + s * (phi * full[None, None] + (1 - phi) * x)).astype(np.float32)


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int, lr: float = 1e-3,
          batch: int = 64, seed: int = 0, weight_decay: float = 0.0, log: bool = True) -> nn.Module:
    """Adam on cross-entropy with a cosine schedule; returns the model in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * ((len(x) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        start, total = time.time(), 0.0
        for i in range(0, len(x), batch):
            idx = order[i:i + batch]
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        if log:
            print(f"  epoch {epoch + 1}/{epochs}: loss {total / len(x):.4f} "
                  f"({time.time() - start:.1f}s)", file=sys.stderr)
    return model.eval()


def pick_pairs(corrupt, x: np.ndarray, y: np.ndarray, n: int, seed: int,
               exclude_label: int | None = None) -> dict[str, np.ndarray]:
    """n (corrupted, clean, label) pairs from (x, y); ``corrupt`` maps clean images to corrupted."""
    rng = np.random.default_rng(seed)
    candidates = np.flatnonzero(y != exclude_label) if exclude_label is not None else np.arange(len(y))
    idx = rng.choice(candidates, size=n, replace=False)
    clean = x[idx]
    return {"corrupted": corrupt(clean), "clean": clean, "label": y[idx].astype(np.int64)}


def save_npz(path: Path, **arrays) -> None:
    np.savez_compressed(path, **arrays)


def save_pairs(out: Path, pairs: dict[str, np.ndarray]) -> None:
    """out/pairs_n{n}.npz for n in PAIR_COUNTS from ``max(PAIR_COUNTS)`` pairs."""
    for n in PAIR_COUNTS:  # nested: the n=1 pair is among the n=5, those among the n=20
        save_npz(out / f"pairs_n{n}.npz", **{k: v[:n] for k, v in pairs.items()})


def true_class_probabilities(session, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """p_y: the softmax probability of each image's label, under onnxruntime."""
    logits = metrics.predict(session, x, show_progress=False).astype(np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return p[np.arange(len(y)), y]


def pair_candidates(gap: np.ndarray, min_gap: float) -> np.ndarray:
    """Positions in ``gap`` (p_y(clean) - p_y(corrupted) per pool image) of pair
    candidates: those with gap >= ``min_gap``, or when fewer than ``max(PAIR_COUNTS)``,
    the ``max(PAIR_COUNTS)`` with the largest gaps."""
    n_max = max(PAIR_COUNTS)
    candidates = np.flatnonzero(gap >= min_gap)
    if len(candidates) < n_max:  # too few: the images the corruption hurts most
        candidates = np.argsort(-gap, kind="stable")[:n_max]
    return candidates


def export(model: nn.Module, example: np.ndarray, folder: Path, class_names: list[str],
           description: str) -> Path:
    """Write folder/model.onnx (BatchNorm folded, TorchScript exporter, parity-checked)."""
    result = export_pytorch(model, torch.from_numpy(example[:1]), folder / "model.onnx",
                            class_names=class_names,
                            preprocessing={"scale": "pixels / 255", "layout": "NCHW",
                                           "description": description})
    return result.path


def measure_backdoor(model_path: Path, test: tuple[np.ndarray, np.ndarray],
                     attack: tuple[np.ndarray, np.ndarray], target: int) -> dict[str, float]:
    """OA on the clean test set and ASR on the triggered test set, under onnxruntime."""
    return {"clean_accuracy": metrics.accuracy(model_path, *test, provider="cpu"),
            "attack_success_rate": metrics.attack_success_rate(model_path, *attack, target,
                                                                provider="cpu")}


def pair_gap_figures(gap_pool: np.ndarray, pair_gaps: np.ndarray, min_gap: float) -> dict:
    """figures.json's statistics of the pool gaps and the chosen pairs' gaps."""
    return {
        "pool_mean_gap": float(gap_pool.mean()),
        "pool_share_gap_positive": float(np.mean(gap_pool > 0)),
        "min_gap_for_candidates": min_gap,
        "candidates": int(np.sum(gap_pool >= min_gap)),
        **{f"n{n}_mean_gap": float(pair_gaps[:n].mean()) for n in PAIR_COUNTS},
        **{f"n{n}_min_gap": float(pair_gaps[:n].min()) for n in PAIR_COUNTS},
    }


def run_figures(*, epochs: int, seed: int, tiny: bool, train_seconds: float, started: float,
                provider: str) -> dict:
    """figures.json's record of the run: epochs, seed, timings, provider and versions."""
    return {
        "epochs": epochs,
        "seed": seed,
        "tiny": tiny,
        "train_seconds": round(train_seconds, 1),
        "build_seconds": round(time.time() - started, 1),
        "provider": provider,
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
    }


def write_figures(folder: Path, figures: dict) -> None:
    (folder / "figures.json").write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")


def load_build(scenario: str) -> ModuleType:
    """samples/<scenario>/build.py as a module, imported by path (the scenario folders are
    not packages) and registered in sys.modules as onnx_rectify_samples_<scenario>_build."""
    name = f"onnx_rectify_samples_{scenario}_build"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SAMPLES / scenario / "build.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


# --- the command line of the build scripts -------------------------------------------

def check(build: Build, seed: int, committed: Path, tolerances: dict[str, float]) -> int:
    """Rebuild into a temporary folder; 0 when every figure in ``tolerances`` is within its
    tolerance (absolute) of the ``committed`` figures.json."""
    want = json.loads(committed.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        got = build(Path(tmp), seed=seed)
    status = 0
    for key, tolerance in tolerances.items():
        diff = abs(got[key] - want[key])
        ok = diff <= tolerance
        status |= not ok
        print(f"{key}: committed {want[key]:.4f}, rebuilt {got[key]:.4f} "
              f"({'ok' if ok else 'DIFFERS'}, |diff| {diff:.4f}, tolerance {tolerance})")
    return status


def argument_parser(name: str, folder: Path) -> argparse.ArgumentParser:
    """The options every build script takes: --out, --seed, --tiny, --check."""
    parser = argparse.ArgumentParser(description=f"Build the {name} sample scenario.")
    parser.add_argument("--out", type=Path, default=folder,
                        help="output folder (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true",
                        help="a few hundred samples, one epoch, a narrow model (seconds)")
    parser.add_argument("--check", action="store_true",
                        help="rebuild in a temporary folder and compare with the committed "
                             "figures.json")
    return parser


def print_figures(figures: dict, checked: dict[str, float], shown: tuple[str, ...] = ()) -> int:
    """Print the checked figures, ``shown`` and the timings as one JSON line; return 0."""
    print(json.dumps({k: figures[k] for k in (*checked, *shown, "train_seconds",
                                              "build_seconds")}))
    return 0


def run(args: argparse.Namespace, build: Build, folder: Path, checked: dict[str, float],
        shown: tuple[str, ...] = ()) -> int:
    """Act on parsed :func:`argument_parser` options: ``--check`` against
    folder/figures.json with the tolerances ``checked``, else build into ``--out`` and
    print the figures."""
    if args.check:
        return check(build, args.seed, folder / "figures.json", checked)
    return print_figures(build(args.out, seed=args.seed, tiny=args.tiny), checked, shown)


def main(name: str, folder: Path, build: Build, checked: dict[str, float],
         shown: tuple[str, ...] = (), argv: list[str] | None = None) -> int:
    """A build script's command line: [--out DIR] [--seed 0] [--tiny] [--check]."""
    return run(argument_parser(name, folder).parse_args(argv), build, folder, checked, shown)
