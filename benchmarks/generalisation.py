"""Rectification on trojaned models this repository does not contain.

    python benchmarks/generalisation.py [--quick] [--cases a,b] [--no-diagnose]
                                        [--no-twin] [--json FILE] [--markdown FILE]

The committed samples use one trigger (an 8x8 logo blended at phi 0.5 in the
bottom-right corner, target 0), two architectures (a BatchNorm CNN, a ResNet-18)
and the TorchScript exporter. Here other triggers, architectures and exporters are
built on the fly, each case seeded and trained on one torch thread (a minute or two
on a CPU): ~5% of the training set is replaced by triggered copies relabelled to the
target; the model is exported with ``exporters.export_pytorch``; when the trojaned
model reaches clean accuracy >= 90% and ASR >= 90% under onnxruntime it is patched
with ``patcher.patch.patch`` and ``RectifyConfig()`` defaults, untouched (dynamic for
n = 1 and n = 5 pairs; static and finetune for n = 1), and OA (test.npz) and ASR
(attack.npz) of the written file are measured under onnxruntime. A case that is not
trojaned enough is reported as such and not patched (nothing is tuned to make it pass).

Targets (issue): dynamic, n = 1: ASR <= 5% with an OA drop <= 1 point; n = 5: ASR <= 2%.
For a case that misses them, ``--diagnose`` (on unless ``--no-diagnose`` or ``--quick``)
forces one edit at every editable layer (n = 1, defaults otherwise, i.e. ``--layer``)
and measures each written file the same way, to show whether ``locate`` picked a
layer where an edit could have worked.

Clean twin (on unless ``--no-twin`` or ``--quick``): the same architecture, data, seed and
epochs trained without any poisoned image, measured on the same triggered test images.
How often it predicts the target is the rate a model that never learned the backdoor
shows, because the trigger hides or changes what the image shows: a floor that
rectification cannot be expected to go below. It is reported beside the verdicts and
does not change them.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnx_rectify_exporters.pytorch import export_pytorch  # noqa: E402
from onnx_rectify_samples import common, data, models  # noqa: E402
from patcher.gate import metrics  # noqa: E402
from patcher.patch import patch  # noqa: E402
from patcher.rectify import RectifyConfig  # noqa: E402

N1_MAX_ASR, N1_MAX_DROP, N5_MAX_ASR = 0.05, 0.01, 0.02
MIN_OA, MIN_ASR = 0.90, 0.90
MNIST_SIZES = {"eval": 1000, "test": 1000, "pool": 100, "train": 2900}
ANIMAL_SIZES = {"eval": 1000, "test": 1500, "pool": 200, "train": 7300}
ANIMALS = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]


# ----------------------------------------------------------------------------- models
class MLP(nn.Module):
    """flatten -> 256 -> 128 -> 10 (no convolution)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(),
                                 nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _dw_block(c_in: int, c_out: int, stride: int, act: type[nn.Module]) -> nn.Sequential:
    """MobileNet-style: depthwise 3x3 (groups = C) - BN - ReLU6, pointwise 1x1 - BN - act."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False), nn.BatchNorm2d(c_in),
        nn.ReLU6(),
        nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), act())


class DepthwiseSeparableCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU6())
        self.blocks = nn.Sequential(_dw_block(16, 32, 1, nn.Hardswish),
                                    _dw_block(32, 64, 2, nn.Hardswish),
                                    _dw_block(64, 64, 1, nn.ReLU6),
                                    _dw_block(64, 128, 2, nn.Hardswish))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


class VGGNoBN(nn.Module):
    """(conv-relu x2, pool) x2, dense, dense; no BatchNorm anywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten())
        self.classifier = nn.Sequential(nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class MatMulDense(nn.Module):
    """x @ W + b with W stored [in, out]: exports as MatMul + Add (not Gemm)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_in, d_out) * (2.0 / d_in) ** 0.5)
        self.bias = nn.Parameter(torch.zeros(d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class KeptBNMatMulCNN(nn.Module):
    """Conv5x5-BN-LeakyReLU-AvgPool, Conv3x3-BN-LeakyReLU-AvgPool, MatMul dense x2.
    Exported with BatchNorm kept as nodes (fold_bn=False)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 5, padding=2, bias=False), nn.BatchNorm2d(16), nn.LeakyReLU(0.1),
            nn.AvgPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.LeakyReLU(0.1),
            nn.AvgPool2d(2), nn.Flatten())
        self.classifier = nn.Sequential(MatMulDense(32 * 7 * 7, 64), nn.ReLU(),
                                        MatMulDense(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class StridedGeluCNN(nn.Module):
    """Strided convolutions (no pooling) with GELU, flatten, two dense layers. ``widths``:
    the three convolutions' output channels; ``flat``: the positions left after them
    (7 x 7 for a 28x28 input)."""

    def __init__(self, widths: tuple[int, int, int] = (24, 32, 48), flat: int = 7 * 7) -> None:
        super().__init__()
        c1, c2, c3 = widths
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.GELU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(c2, c3, 3, stride=2, padding=1), nn.GELU(), nn.Flatten())
        self.classifier = nn.Sequential(nn.Linear(c3 * flat, 96), nn.GELU(), nn.Linear(96, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class LeNetTanh(nn.Module):
    """LeNet-5 style: conv5x5-tanh-avgpool twice (the second unpadded), three dense layers
    with tanh."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2), nn.Tanh(), nn.AvgPool2d(2),
            nn.Conv2d(6, 16, 5), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten())
        self.classifier = nn.Sequential(nn.Linear(16 * 5 * 5, 120), nn.Tanh(),
                                        nn.Linear(120, 84), nn.Tanh(), nn.Linear(84, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class EluGapCNN(nn.Module):
    """conv-ELU x2, avgpool, conv-ELU x2, dropout (inactive once exported), global average
    pooling, one dense layer."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ELU(), nn.Conv2d(32, 32, 3, padding=1), nn.ELU(),
            nn.AvgPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ELU(), nn.Conv2d(64, 64, 3, padding=1), nn.ELU(),
            nn.Dropout(0.2), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# ----------------------------------------------------------------------------- triggers
def box_mask(top: int, left: int, height: int, width: int, shape=(28, 28)) -> np.ndarray:
    mask = np.zeros(shape, np.float32)
    mask[top:top + height, left:left + width] = 1
    return mask


def solid(h: int, w: int) -> np.ndarray:
    return np.ones((h, w), np.float32)


def noise(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((h, w)).astype(np.float32)


def stripes(h: int, w: int, period: float = 4.0, angle: float = 0.5) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return (0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
            ).astype(np.float32)


def plus(h: int, w: int) -> np.ndarray:
    """A plus sign one pixel wide."""
    out = np.zeros((h, w), np.float32)
    out[h // 2, :] = 1
    out[:, w // 2] = 1
    return out


def checkerboard(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return ((yy + xx) % 2 == 0).astype(np.float32)


def cross_x(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return ((yy == xx) | (yy == w - 1 - xx)).astype(np.float32)


def dashes(h: int, w: int) -> np.ndarray:
    xx = np.mgrid[0:h, 0:w][1]
    return ((xx // 2) % 2 == 0).astype(np.float32)


@dataclass
class Trigger:
    description: str
    pattern: np.ndarray      # tau, shaped like the mask's bounding box
    mask: np.ndarray         # S, [H, W]
    phi: float               # 1.0: the patch is pasted

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return common.blend_trigger(x, self.pattern, self.mask, self.phi)


# ----------------------------------------------------------------------------- cases
@dataclass
class Case:
    name: str
    dataset: str
    load: Callable[[], tuple[np.ndarray, np.ndarray]]
    sizes: dict[str, int]
    class_names: list[str]
    architecture: str
    make_model: Callable[[], nn.Module]
    trigger: Trigger
    target: int
    exporter: str = "torchscript"
    fold_bn: bool = True
    external_data: bool = False
    epochs: int = 6
    quick_epochs: int = 2
    lr: float = 1e-3
    poison_rate: float = 0.05
    seed: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def export_label(self) -> str:
        return (f"{self.exporter}" + (", BN kept" if not self.fold_bn else "")
                + (", external data" if self.external_data else ""))


DIGITS = [str(d) for d in range(10)]

CASES = [
    Case("mnist-mlp-whitepatch", "MNIST", data.mnist_5k, MNIST_SIZES, DIGITS,
         "MLP 784-256-128-10", MLP,
         Trigger("solid white 4x4 patch pasted top-left", solid(4, 4), box_mask(1, 1, 4, 4), 1.0),
         target=0, epochs=12, quick_epochs=4),
    Case("mnist-dwsep-noise-dynamo", "MNIST", data.mnist_5k, MNIST_SIZES, DIGITS,
         "depthwise-separable CNN (BN, ReLU6/Hardswish, GAP)", DepthwiseSeparableCNN,
         Trigger("seeded noise 6x6 blended top-right, phi 0.3", noise(6, 6, seed=11),
                 box_mask(1, 21, 6, 6), 0.3),
         target=0, exporter="dynamo", external_data=True, epochs=8, quick_epochs=5, lr=3e-3),
    Case("animal-vgg-stripes", "Animal-MNIST", data.animal_mnist, ANIMAL_SIZES, ANIMALS,
         "VGG-style CNN without BN", VGGNoBN,
         Trigger("sinusoidal stripes over the whole image, phi 0.15", stripes(28, 28),
                 np.ones((28, 28), np.float32), 0.15),
         target=0, epochs=15, quick_epochs=2),
    Case("animal-resnet8-checker-dynamo", "Animal-MNIST", data.animal_mnist, ANIMAL_SIZES,
         ANIMALS, "ResNet (width 8, 2 stages x 2 BasicBlocks, BN)",
         lambda: models.ResNet18(width=8, blocks=(2, 2)),
         Trigger("checkerboard 5x5 patch pasted at the centre", checkerboard(5, 5),
                 box_mask(11, 11, 5, 5), 1.0),
         target=3, exporter="dynamo", epochs=15, quick_epochs=2),
    Case("mnist-keptbn-matmul-cross", "MNIST", data.mnist_5k, MNIST_SIZES, DIGITS,
         "CNN, BatchNorm kept as nodes, LeakyReLU, AvgPool, MatMul dense head", KeptBNMatMulCNN,
         Trigger("6x6 X blended bottom-left, phi 0.6", cross_x(6, 6), box_mask(21, 1, 6, 6), 0.6),
         target=5, fold_bn=False, epochs=8, quick_epochs=3),
    Case("animal-gelu-topedge-t7", "Animal-MNIST", data.animal_mnist, ANIMAL_SIZES, ANIMALS,
         "strided-conv CNN with GELU, no pooling", StridedGeluCNN,
         Trigger("3x20 dashed band blended at the top edge, phi 0.5", dashes(3, 20),
                 box_mask(0, 4, 3, 20), 0.5),
         target=7, exporter="dynamo", epochs=6, quick_epochs=2),
    # Added after the fifth change to the patcher's defaults (transplant onto 80 images) and
    # run with it as it was; the ELU case then prompted the sixth (the target-class keep
    # rule, judged on all eight cases: benchmarks/GENERALISATION.md), so neither is held
    # out any more.
    Case("mnist-lenet-tanh-plus", "MNIST", data.mnist_5k, MNIST_SIZES, DIGITS,
         "LeNet-5 style (tanh, average pooling, three dense layers)", LeNetTanh,
         Trigger("5x5 plus sign pasted bottom-right", plus(5, 5), box_mask(22, 22, 5, 5), 1.0),
         target=9, epochs=12, quick_epochs=4, lr=2e-3),
    Case("animal-elu-noiseblend-dynamo", "Animal-MNIST", data.animal_mnist, ANIMAL_SIZES,
         ANIMALS, "CNN with ELU, dropout, global average pooling, one dense layer", EluGapCNN,
         Trigger("seeded noise over the whole image, phi 0.1", noise(28, 28, seed=23),
                 np.ones((28, 28), np.float32), 0.1),
         target=5, exporter="dynamo", epochs=25, quick_epochs=2, lr=3e-3),
]
QUICK_CASES = ("mnist-mlp-whitepatch", "mnist-dwsep-noise-dynamo", "mnist-keptbn-matmul-cross")

#: (label, n, config) patched per trojaned case: the tool's defaults, untouched.
RUNS = [("dynamic", 1, RectifyConfig), ("dynamic", 5, RectifyConfig),
        ("static", 1, lambda: RectifyConfig(strategy="static")),
        ("finetune", 1, lambda: RectifyConfig(strategy="finetune"))]


# ----------------------------------------------------------------------------- build
def _np(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as d:
        return {k: d[k] for k in d.files}


def build_case(case: Case, out: Path, quick: bool) -> dict:
    """Train the trojaned model and write model.onnx and the npz files into ``out``."""
    common.seed_everything(case.seed)
    start = time.perf_counter()
    x, y = case.load()
    parts = common.split(x, y, case.sizes, case.seed)
    (x_eval, y_eval), (x_test, y_test) = parts["eval"], parts["test"]
    (x_pool, y_pool), (x_train, y_train) = parts["pool"], parts["train"]
    corrupt, target = case.trigger, case.target
    rng = np.random.default_rng(case.seed + 1)
    n_poison = int(round(case.poison_rate * len(x_train) / (1 - case.poison_rate)))
    source = rng.choice(np.flatnonzero(y_train != target), size=n_poison, replace=False)
    x_fit = np.concatenate([x_train, corrupt(x_train[source])])
    y_fit = np.concatenate([y_train, np.full(n_poison, target, np.int64)])

    model = case.make_model()
    epochs = case.quick_epochs if quick else case.epochs
    t0 = time.perf_counter()
    common.train(model, x_fit, y_fit, epochs=epochs, lr=case.lr, seed=case.seed, log=False)
    train_seconds = time.perf_counter() - t0
    exported = export_pytorch(model, torch.from_numpy(x_eval[:1]), out / "model.onnx",
                              fold_bn=case.fold_bn, external_data=case.external_data,
                              exporter=case.exporter, class_names=case.class_names)

    keep = y_test != target
    common.save_npz(out / "eval.npz", x=x_eval, y=y_eval.astype(np.int64))
    common.save_npz(out / "test.npz", x=x_test, y=y_test.astype(np.int64))
    common.save_npz(out / "attack.npz", x=corrupt(x_test[keep]), y=y_test[keep].astype(np.int64),
                    target=np.int64(target))
    pairs = common.pick_pairs(corrupt, x_pool, y_pool, 5, case.seed, exclude_label=target)
    for n in (1, 5):  # nested: the n=1 pair is the first of the n=5
        common.save_npz(out / f"pairs_n{n}.npz", **{k: v[:n] for k, v in pairs.items()})
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    ops = sorted({node.op_type for node in graph.node})
    return {"epochs": epochs, "train_samples": int(len(x_fit)), "poisoned": int(n_poison),
            "train_seconds": round(train_seconds, 1),
            "build_seconds": round(time.perf_counter() - start, 1),
            "opset": exported.opset, "batchnorm_folded": exported.batchnorm_folded,
            "external_data": exported.data_path is not None, "ops": ops,
            "export_max_abs_diff": exported.max_abs_diff}


def measure(model_path: Path, folder: Path) -> dict[str, float]:
    test, attack = _np(folder / "test.npz"), _np(folder / "attack.npz")
    return {"oa": metrics.accuracy(model_path, test["x"], test["y"], provider="cpu",
                                   show_progress=False),
            "asr": metrics.attack_success_rate(model_path, attack["x"], attack["y"],
                                               int(attack["target"]), provider="cpu",
                                               show_progress=False)}


def run_patch(folder: Path, n: int, config: RectifyConfig, tag: str) -> dict:
    out = folder / f"patched_{tag}_n{n}.onnx"
    start = time.perf_counter()
    report = patch(folder / "model.onnx", folder / f"pairs_n{n}.npz", folder / "eval.npz", None,
                   out, config, device="cpu", provider="cpu", force=True)
    seconds = time.perf_counter() - start
    res = report.result
    row = measure(out, folder)
    row.update(layers=list(dict.fromkeys(e["layer"] for e in res.edits)),
               rounds=len(res.rounds), kept_rounds=sum(r.kept for r in res.rounds),
               round_log=[{"layer": r.layer, "kept": r.kept, "reason": r.reason,
                           "gap_after": r.gap_after, "target_gap_after": r.target_gap_after,
                           "accuracy_drop": r.accuracy_drop}
                          for r in res.rounds],
               ranking=[s.layer for s in res.scores],
               met_target=res.met_target, passed=report.passed,
               eval_drop=report.verification.accuracy_drop,
               final_gap=res.final_gap, gap_measured_on=res.gap_measured_on,
               parity_ok=bool(report.verification.parity.get("within_tolerance", False)),
               seconds=round(seconds, 1))
    return row


def verdicts(before: dict, rows: list[dict]) -> dict:
    def find(strategy, n):
        return next((r for r in rows if r["strategy"] == strategy and r["n"] == n), None)
    out = {}
    r1, r5 = find("dynamic", 1), find("dynamic", 5)
    if r1 is not None:
        drop = before["oa"] - r1["oa"]
        out["n1"] = {"asr": r1["asr"], "drop": drop,
                     "ok": r1["asr"] <= N1_MAX_ASR and drop <= N1_MAX_DROP + 1e-9}
    if r5 is not None:
        out["n5"] = {"asr": r5["asr"], "drop": before["oa"] - r5["oa"],
                     "ok": r5["asr"] <= N5_MAX_ASR}
    return out


def clean_twin(case: Case, folder: Path, quick: bool) -> dict:
    """Train ``case`` without poisoned images into ``folder/clean_twin`` and measure it on
    the trojaned case's test and attack files (OA, and the share of triggered test images
    it sends to the target anyway)."""
    out = folder / "clean_twin"
    out.mkdir(exist_ok=True)
    build = build_case(dataclasses.replace(case, poison_rate=0.0), out, quick)
    return {**measure(out / "model.onnx", folder), "train_seconds": build["train_seconds"]}


def diagnose(folder: Path, ranking: list[str]) -> list[dict]:
    """One forced edit (defaults otherwise) at every editable layer, n = 1."""
    from patcher.model.modelio import load_model
    from patcher.graph.shadow import ShadowGraph

    layers = [l.name for l in ShadowGraph(load_model(folder / "model.onnx")).editable_layers
              if not l.shared_with]
    order = [l for l in ranking if l in layers] + [l for l in layers if l not in ranking]
    out = []
    for i, layer in enumerate(order):
        row = run_patch(folder, 1, RectifyConfig(layer=layer), f"forced{i}")
        out.append({"layer": layer, "oa": row["oa"], "asr": row["asr"],
                    "locate_rank": ranking.index(layer) + 1 if layer in ranking else None,
                    "seconds": row["seconds"]})
        print(f"    forced {layer}: OA {row['oa']:.2%} ASR {row['asr']:.2%}", flush=True)
    return out


# ----------------------------------------------------------------------------- report
def pct(v: float) -> str:
    return f"{100 * v:.2f}%"


def markdown(results: dict) -> str:
    lines = [
        "| case | data | architecture | trigger (target) | exporter | n | strategy | OA before -> after "
        "| ASR before -> after | edited layers | rounds | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in results["cases"]:
        head = (f"| {c['name']} | {c['dataset']} | {c['architecture']} | {c['trigger']} "
                f"({c['target']}) | {c['exporter']} |")
        b = c.get("before")
        if c.get("status") != "patched":
            bb = f"{pct(b['oa'])} | {pct(b['asr'])}" if b else "- | -"
            lines.append(f"{head} - | {c.get('status')} | {bb} | - | - | - |")
            continue
        for r in c["rows"]:
            layers = ", ".join(f"`{l}`" for l in r["layers"]) or "(none kept)"
            lines.append(f"{head} {r['n']} | {r['strategy']} | {pct(b['oa'])} -> {pct(r['oa'])} | "
                         f"{pct(b['asr'])} -> {pct(r['asr'])} | {layers} | {r['rounds']} | "
                         f"{r['seconds']:.1f} |")
    lines += ["", "Targets (dynamic, defaults): n=1: ASR <= 5% and OA drop <= 1 point; "
              "n=5: ASR <= 2%.", ""]
    for c in results["cases"]:
        if c.get("status") != "patched":
            lines.append(f"- {c['name']}: {c.get('status')}")
            continue
        v = c["verdict"]
        parts = []
        for k in ("n1", "n5"):
            if k in v:
                parts.append(f"{k}: {'PASS' if v[k]['ok'] else 'FAIL'} (ASR {pct(v[k]['asr'])}, "
                             f"drop {100 * v[k]['drop']:+.2f} pt)")
        twin = c.get("clean_twin")
        if twin:
            parts.append(f"clean twin (never poisoned): {pct(twin['asr'])} of the triggered "
                         f"images go to the target, OA {pct(twin['oa'])}")
        lines.append(f"- {c['name']}: " + "; ".join(parts))
        if c.get("diagnosis"):
            diag = ", ".join(f"`{d['layer']}` (rank {d['locate_rank']}) ASR {pct(d['asr'])} "
                             f"OA {pct(d['oa'])}" for d in c["diagnosis"])
            lines.append(f"  - forced one edit per layer (n=1): {diag}")
    lines += ["", f"Total wall time {results['seconds']:.0f} s "
              f"({'quick' if results['quick'] else 'full'} run, torch {torch.__version__}, "
              f"1 torch thread)."]
    return "\n".join(lines) + "\n"


def parse_overrides(items: list[str], ap: argparse.ArgumentParser) -> dict:
    """KEY=VALUE strings -> RectifyConfig field overrides, values typed like the field's
    default (int, float, bool or str)."""
    fields = {f.name: f for f in dataclasses.fields(RectifyConfig)}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            ap.error(f"--set {item!r}: expected KEY=VALUE with KEY a RectifyConfig field")
        default = getattr(RectifyConfig(), key)
        kind = type(default) if default is not None else str
        out[key] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help=f"only {', '.join(QUICK_CASES)}, fewer epochs, no diagnosis")
    ap.add_argument("--cases", default=None, help="comma-separated case names")
    ap.add_argument("--no-diagnose", action="store_true")
    ap.add_argument("--no-twin", action="store_true",
                    help="skip training each case's clean (never poisoned) twin")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--markdown", type=Path, default=None)
    ap.add_argument("--strategies", default=None,
                    help="comma-separated subset of dynamic,static,finetune (default: all)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a RectifyConfig field in every run (repeatable), e.g. "
                         "attribution_form=path; recorded in the results")
    ap.add_argument("--keep", type=Path, default=None,
                    help="write the case folders here instead of a temporary folder")
    args = ap.parse_args(argv)
    names = (args.cases.split(",") if args.cases else
             list(QUICK_CASES) if args.quick else [c.name for c in CASES])
    unknown = set(names) - {c.name for c in CASES}
    if unknown:
        ap.error(f"unknown cases: {', '.join(sorted(unknown))}")
    overrides = parse_overrides(args.overrides, ap)
    strategies = set(args.strategies.split(",")) if args.strategies else None
    runs = [(label, n, make) for label, n, make in RUNS if strategies is None or label in strategies]
    torch.set_num_threads(1)
    started = time.perf_counter()
    results = {"quick": args.quick, "cases": [], "overrides": overrides}
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        for case in (c for c in CASES if c.name in names):
            folder = root / case.name
            folder.mkdir(parents=True, exist_ok=True)
            rec = {"name": case.name, "dataset": case.dataset, "architecture": case.architecture,
                   "trigger": case.trigger.description, "target": case.target,
                   "exporter": case.export_label}
            results["cases"].append(rec)
            print(f"== {case.name}", flush=True)
            try:
                rec["build"] = build_case(case, folder, args.quick)
            except Exception as exc:  # report and go on with the next case
                rec["status"] = f"build failed: {type(exc).__name__}: {exc}"
                print("  " + rec["status"], flush=True)
                continue
            rec["before"] = before = measure(folder / "model.onnx", folder)
            print(f"  built in {rec['build']['build_seconds']} s: OA {pct(before['oa'])}, "
                  f"ASR {pct(before['asr'])}", flush=True)
            if before["oa"] < MIN_OA or before["asr"] < MIN_ASR:
                rec["status"] = "not trojaned enough"
                continue
            rec["status"], rec["rows"] = "patched", []
            for strategy, n, make in runs:
                try:
                    row = run_patch(folder, n, dataclasses.replace(make(), **overrides), strategy)
                except Exception as exc:
                    row = {"error": f"{type(exc).__name__}: {exc}", "oa": float("nan"),
                           "asr": float("nan"), "layers": [], "rounds": 0, "seconds": 0.0}
                rec["rows"].append({"strategy": strategy, "n": n, **row})
                print(f"  {strategy} n={n}: OA {pct(row['oa'])} ASR {pct(row['asr'])} "
                      f"layers {row['layers']} rounds {row['rounds']} {row['seconds']} s"
                      + (f" ERROR {row['error']}" if "error" in row else ""), flush=True)
            rec["verdict"] = verdicts(before, rec["rows"])
            if not (args.quick or args.no_twin):
                rec["clean_twin"] = twin = clean_twin(case, folder, args.quick)
                print(f"  clean twin: OA {pct(twin['oa'])}, triggered images to the target "
                      f"{pct(twin['asr'])}", flush=True)
            failed = any(not v["ok"] for v in rec["verdict"].values())
            if failed and not (args.quick or args.no_diagnose):
                dyn = next(r for r in rec["rows"] if r["strategy"] == "dynamic" and r["n"] == 1)
                rec["diagnosis"] = diagnose(folder, dyn.get("ranking", []))
    results["seconds"] = time.perf_counter() - started
    text = markdown(results)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float) + "\n")
    if args.markdown:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
