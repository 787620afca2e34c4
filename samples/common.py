"""Shared pieces of the scenario build scripts: seeding, splits, triggers, training, artifacts.

Every build is deterministic for a seed: numpy and torch are seeded, torch runs
single-threaded deterministic kernels on the CPU, and data order comes from a
seeded generator.
"""
from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from exporters import export_pytorch
from patcher import metrics


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


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


def write_figures(folder: Path, figures: dict) -> None:
    (folder / "figures.json").write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
