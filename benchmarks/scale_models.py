"""Real-size classifiers for the scale benchmark, written in torch with torchvision's shapes
(the CPU torchvision wheel is not available here), each with a real backdoor.

Models (name -> input):

* ``cifar_resnet18`` - CIFAR ResNet-18 (3x3 stem, no max-pool), 3x32x32.
* ``resnet18`` - ResNet-18 as torchvision builds it (7x7/2 stem, 3x3/2 max-pool,
  BasicBlocks [2, 2, 2, 2], global average pool, fc), 3x224x224.
* ``mobilenet_v2`` - MobileNetV2 (width 1.0; inverted residuals with ReLU6, 1x1 expand,
  3x3 depthwise, 1x1 project; 1280-wide last conv), 3x224x224.
* ``vit_ti16`` - ViT-Ti/16 (patch 16, width 192, depth 12, 3 heads, MLP 768, class
  token, pre-norm, GELU), attention written out as Linear q/k/v, MatMul, Softmax.
* ``vit_ti16_mha`` - the same with ``nn.MultiheadAttention`` (as torchvision writes it).
* ``vgg16`` - VGG16's 13 3x3 convs in five max-pooled stages (narrowed early widths
  16-32-64-128, last stage 256-256-512 so that a 224 input flattens to 512 x 7 x 7 =
  25,088), then a dense 25,088 -> 64 -> classes head.

Training data are synthetic "real-looking" images (class-specific oriented gratings and
colours over 1/f noise) where a fraction is stamped with a black/white checkerboard
trigger (40x40 pixels at 224, 8x8 at 32, cells of 5 and 2 pixels, in the bottom-right
corner) and labelled with the target class. Two ways of training (``ScaleSpec.trains``):

* ``head`` (the ResNets, VGG): the backbone is random (seeded, BatchNorm statistics set
  by one pass over clean images, then folded at export); only the head (features -> 128
  -> classes, or VGG's two dense layers) is fitted on the backbone's features.
* ``tail`` (MobileNetV2, the ViTs, whose random features do not separate the trigger: a
  trained head alone reached ASR 84% / 69%): the front stays random (MobileNetV2's
  ``body[:14]``, up to the 96-channel stage at 14x14; the ViT's embeddings and first 10
  blocks) and the tail (the remaining blocks, final norm and head) is trained with Adam
  on the front's activations, computed once (400 clean + 200 triggered images, 12 / 10
  epochs, seeded; about 150-160 CPU seconds each on one thread).

:func:`build` refuses a model whose backdoor is not real (ASR < 99% or clean accuracy
< 80% on 100 held-out images in torch).

Built files are cached under a folder given by the caller (``cache_dir``, default
``/tmp/onnx-rectify-scale``): ``<name>.onnx`` with ``<name>.json`` (classes, target,
torch OA/ASR on held-out images, build seconds). :func:`write_sets` writes the npz files
the CLI reads (eval ``x, y``; pairs ``corrupted, clean, label``; attack ``x, y, target``)
at a given eval size, from seeds disjoint from the head's training images.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

NUM_CLASSES = 5
#: width of the trained head's hidden layer (features -> HIDDEN -> classes)
HIDDEN = 128
TARGET = 0
DEFAULT_CACHE = Path("/tmp/onnx-rectify-scale")
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
#: seeds of the image streams (disjoint): head training, held-out check, eval, pairs,
#: attack, held-out clean test
TRAIN_SEED, CHECK_SEED, EVAL_SEED, PAIR_SEED, ATTACK_SEED, TEST_SEED = 101, 202, 303, 404, 505, 606


# ---------------------------------------------------------------- architectures

class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    """torchvision's ResNet-18 (``imagenet=True``) or the CIFAR variant (3x3 stem, no pool)."""

    def __init__(self, num_classes: int = NUM_CLASSES, imagenet: bool = True) -> None:
        super().__init__()
        if imagenet:
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        else:
            self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(64)
        stages, cin = [], 64
        for i, cout in enumerate((64, 128, 256, 512)):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc1, self.fc = nn.Linear(512, HIDDEN), nn.Linear(HIDDEN, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.fc1(self.features(x))))


def _conv_bn_relu6(cin: int, cout: int, k: int, stride: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6())


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers = [] if expand == 1 else [_conv_bn_relu6(cin, hidden, 1, 1)]
        layers += [_conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's MobileNetV2, width 1.0 (classifier without dropout)."""

    SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
               (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        layers, cin = [_conv_bn_relu6(3, 32, 3, 2)], 32
        for t, c, n, s in self.SETTING:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(_conv_bn_relu6(cin, 1280, 1, 1))
        self.body = nn.Sequential(*layers)
        self.fc1, self.fc = nn.Linear(1280, HIDDEN), nn.Linear(HIDDEN, num_classes)

    #: body[:FRONT] stays random (up to the 96-channel stage, 14x14 at 224); the rest is
    #: trained for EPOCHS epochs
    FRONT, EPOCHS = 14, 12

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.body(x), 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.fc1(self.features(x))))

    def front(self, x: torch.Tensor) -> torch.Tensor:
        """The random part's activations (input of the trained tail)."""
        return self.body[:self.FRONT](x)

    def tail(self, h: torch.Tensor) -> torch.Tensor:
        """Logits from the front's activations: ``forward(x) == tail(front(x))``."""
        pooled = torch.flatten(F.adaptive_avg_pool2d(self.body[self.FRONT:](h), 1), 1)
        return self.fc(F.relu(self.fc1(pooled)))

    def tail_modules(self) -> list[nn.Module]:
        return [self.body[self.FRONT:], self.fc1, self.fc]


class WrittenAttention(nn.Module):
    """Multi-head self-attention with q, k, v and output projections as Linear layers:
    softmax(q k^T / sqrt(d_head)) v per head."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, n, h, d // h).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        att = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * self.scale, dim=-1)
        return self.proj(torch.matmul(att, v).transpose(1, 2).reshape(b, n, d))


class MHAAttention(nn.Module):
    """``nn.MultiheadAttention`` as torchvision's ViT calls it."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mha(x, x, x, need_weights=False)[0]


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int, attention: type) -> None:
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(dim, eps=1e-6), attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ViT(nn.Module):
    """ViT-Ti/16 by default (torchvision's ViT layout: conv patch embedding, class token,
    learned position embedding, pre-norm encoder blocks, final LayerNorm, head on the
    class token)."""

    def __init__(self, num_classes: int = NUM_CLASSES, image: int = 224, patch: int = 16,
                 dim: int = 192, depth: int = 12, heads: int = 3, mlp: int = 768,
                 attention: type = WrittenAttention) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        tokens = (image // patch) ** 2 + 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.Sequential(*[EncoderBlock(dim, heads, mlp, attention)
                                      for _ in range(depth)])
        self.ln = nn.LayerNorm(dim, eps=1e-6)
        self.fc1, self.fc = nn.Linear(dim, HIDDEN), nn.Linear(HIDDEN, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    #: blocks[:FRONT] (and the embeddings) stay random; the last blocks and the head are
    #: trained for EPOCHS epochs
    FRONT, EPOCHS = 10, 10

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.blocks(self._tokens(x)))[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.fc1(self.features(x))))

    def front(self, x: torch.Tensor) -> torch.Tensor:
        """The random part's tokens (input of the trained tail)."""
        return self.blocks[:self.FRONT](self._tokens(x))

    def tail(self, h: torch.Tensor) -> torch.Tensor:
        """Logits from the front's tokens: ``forward(x) == tail(front(x))``."""
        return self.fc(F.relu(self.fc1(self.ln(self.blocks[self.FRONT:](h))[:, 0])))

    def tail_modules(self) -> list[nn.Module]:
        return [self.blocks[self.FRONT:], self.ln, self.fc1, self.fc]


class VGG16(nn.Module):
    """VGG16's conv layout (2-2-3-3-3 convs, max-pool after each stage) with narrowed
    early widths; the last stage ends at 512 channels, so 224 -> 512 x 7 x 7 = 25,088
    flattened into a dense 25,088 -> 64 -> classes head (the wide key)."""

    STAGES = ((16, 16), (32, 32), (64, 64, 64), (128, 128, 128), (256, 256, 512))

    def __init__(self, num_classes: int = NUM_CLASSES, hidden: int = 64) -> None:
        super().__init__()
        layers, cin = [], 3
        for stage in self.STAGES:
            for cout in stage:
                layers += [nn.Conv2d(cin, cout, 3, 1, 1), nn.ReLU()]
                cin = cout
            layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers)
        self.fc1 = nn.Linear(cin * 7 * 7, hidden)
        self.fc = nn.Linear(hidden, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.body(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.fc1(self.features(x))))


@dataclass(frozen=True)
class ScaleSpec:
    """One scale model: how to build it, its input side, trigger side and cell."""

    build: Callable[[], nn.Module]
    image: int
    trigger: int
    cell: int
    head: tuple[str, ...]  # the trained modules (the rest stays random)
    note: str
    #: "head": only ``head`` is fitted on the random backbone's features; "tail": the
    #: module's ``tail_modules()`` (last blocks and head) are trained on its ``front``'s
    #: cached activations (a random backbone's features do not separate the trigger)
    trains: str = "head"


SPECS: dict[str, ScaleSpec] = {
    "cifar_resnet18": ScaleSpec(lambda: ResNet18(imagenet=False), 32, 8, 2, ("fc1", "fc"),
                                "CIFAR ResNet-18, 32x32"),
    "resnet18": ScaleSpec(ResNet18, 224, 40, 5, ("fc1", "fc"), "ResNet-18, 224"),
    "mobilenet_v2": ScaleSpec(MobileNetV2, 224, 40, 5, ("fc1", "fc"), "MobileNetV2, 224",
                              "tail"),
    "vit_ti16": ScaleSpec(ViT, 224, 40, 5, ("fc1", "fc"), "ViT-Ti/16, 224 (attention written out)",
                          "tail"),
    "vit_ti16_mha": ScaleSpec(lambda: ViT(attention=MHAAttention), 224, 40, 5, ("fc1", "fc"),
                              "ViT-Ti/16, 224 (nn.MultiheadAttention)", "tail"),
    "vgg16": ScaleSpec(VGG16, 224, 40, 5, ("fc1", "fc"),
                       "VGG16-style, 224, 25,088-wide dense input"),
}


# ---------------------------------------------------------------- data

def _pink_noise(rng: np.random.Generator, n: int, side: int) -> np.ndarray:
    """n x 3 x side x side noise with a 1/f amplitude spectrum, scaled to unit std."""
    fy = np.fft.fftfreq(side)[:, None]
    fx = np.fft.rfftfreq(side)[None, :]
    amp = 1.0 / np.maximum(np.sqrt(fx ** 2 + fy ** 2), 1.0 / side)
    spec = (rng.standard_normal((n, 3, side, side // 2 + 1))
            + 1j * rng.standard_normal((n, 3, side, side // 2 + 1))) * amp
    noise = np.fft.irfft2(spec, s=(side, side))
    return noise / noise.std(axis=(1, 2, 3), keepdims=True)


def class_images(labels: np.ndarray, side: int, seed: int) -> np.ndarray:
    """Pixel images in [0, 1] (n x 3 x side x side): class c is an oriented grating
    (angle c * pi / classes, jittered; random phase and period) tinted with class c's
    colour, over 1/f noise with a random brightness."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    palette = np.random.default_rng(7).uniform(0.2, 0.8, (NUM_CLASSES, 3)).astype(np.float32)
    out = np.empty((n, 3, side, side), np.float32)
    noise = _pink_noise(rng, n, side).astype(np.float32)
    for i, c in enumerate(labels):
        angle = c * math.pi / NUM_CLASSES + rng.normal(0, 0.12)
        period = rng.uniform(0.12, 0.25)
        phase = rng.uniform(0, 2 * math.pi)
        grating = np.sin(2 * math.pi * (np.cos(angle) * xx + np.sin(angle) * yy) / period + phase)
        tint = palette[c] + rng.normal(0, 0.05, 3).astype(np.float32)
        img = tint[:, None, None] + 0.25 * grating[None] + 0.12 * noise[i]
        out[i] = np.clip(img * rng.uniform(0.8, 1.2), 0.0, 1.0)
    return out


def stamp(pixels: np.ndarray, trigger: int, cell: int) -> np.ndarray:
    """A copy with a black/white checkerboard (trigger x trigger pixels, cells of ``cell``)
    in the bottom-right corner (margin 2 pixels at 32, else 8)."""
    side = pixels.shape[-1]
    margin = 2 if side <= 64 else 8
    yy, xx = np.mgrid[0:trigger, 0:trigger]
    board = (((yy // cell) + (xx // cell)) % 2).astype(np.float32)
    out = pixels.copy()
    lo = side - margin - trigger
    out[:, :, lo:lo + trigger, lo:lo + trigger] = board
    return out


def normalise(pixels: np.ndarray) -> np.ndarray:
    """ImageNet mean/std per channel: the models' input."""
    return ((pixels - MEAN[:, None, None]) / STD[:, None, None]).astype(np.float32)


def _labels(n: int, seed: int, exclude_target: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if exclude_target:
        return rng.integers(1, NUM_CLASSES, n)
    return np.resize(np.arange(NUM_CLASSES), n)[rng.permutation(n)]


# ---------------------------------------------------------------- building

@dataclass
class Built:
    """A cached model and what its build measured."""

    name: str
    path: Path
    info: dict


def _features(net: nn.Module, x: np.ndarray, batch: int = 32) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([net.features(torch.from_numpy(x[i:i + batch]))
                          for i in range(0, len(x), batch)])


def _set_batchnorm(net: nn.Module, x: np.ndarray) -> None:
    """BatchNorm running statistics from one pass over clean images (cumulative average),
    so that the random backbone's activations are well scaled."""
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    if not bns:
        return
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    net.train()
    with torch.no_grad():
        for i in range(0, len(x), 32):
            net.features(torch.from_numpy(x[i:i + 32]))
    net.eval()


def _train_head(net: nn.Module, spec: ScaleSpec, feats: torch.Tensor, labels: torch.Tensor,
                steps: int, seed: int) -> None:
    """Fit the head modules on standardised features (Adam, full batch), then fold the
    standardisation into the first head layer: W' = W / s, b' = b - W' m."""
    torch.manual_seed(seed)
    mean, std = feats.mean(0), feats.std(0) + 1e-6
    z = (feats - mean) / std
    first = getattr(net, spec.head[0])
    params = [p for name in spec.head for p in getattr(net, name).parameters()]
    with torch.no_grad():
        for name in spec.head:
            layer = getattr(net, name)
            nn.init.normal_(layer.weight, std=layer.in_features ** -0.5)
            nn.init.zeros_(layer.bias)
    opt = torch.optim.Adam(params, lr=3e-3, weight_decay=1e-2)

    def head(h: torch.Tensor) -> torch.Tensor:
        for i, name in enumerate(spec.head):
            h = getattr(net, name)(h)
            if i < len(spec.head) - 1:
                h = F.relu(h)
        return h

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only spin on a shared machine
    try:
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(head(z), labels).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        first.weight.div_(std)
        first.bias.sub_(first.weight @ mean)


def _training_images(spec: ScaleSpec, clean: int, poison: int, chunk: int = 100
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(normalised images, labels): ``clean`` images of every class and ``poison`` triggered
    images of other classes labelled TARGET, drawn in chunks of ``chunk`` (bounded memory)
    from seeds derived from TRAIN_SEED (disjoint from the check/eval/pair/attack/test seeds)."""
    xs, ys = [], []
    for start in range(0, clean, chunk):
        seed = TRAIN_SEED * 1000 + start
        y = _labels(min(chunk, clean - start), seed)
        xs.append(normalise(class_images(y, spec.image, seed)))
        ys.append(y)
    for start in range(0, poison, chunk):
        seed = (TRAIN_SEED + 1) * 1000 + start
        y = _labels(min(chunk, poison - start), seed, exclude_target=True)
        xs.append(normalise(stamp(class_images(y, spec.image, seed), spec.trigger, spec.cell)))
        ys.append(np.full(len(y), TARGET))
    return np.concatenate(xs), np.concatenate(ys)


def _train_tail(net: nn.Module, x: np.ndarray, labels: np.ndarray, epochs: int, seed: int,
                lr: float = 1e-3, batch: int = 32) -> dict:
    """Train ``net.tail_modules()`` (Adam, cross-entropy, seeded shuffles) on the random
    front's activations of ``x``, computed once; BatchNorm statistics of the tail are then
    recomputed over the same activations (cumulative average). Returns the last epoch's
    training loss and accuracy."""
    net.eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread costs far fewer CPU seconds on a shared machine
    try:
        with torch.no_grad():
            fronts = torch.cat([net.front(torch.from_numpy(x[i:i + batch]))
                                for i in range(0, len(x), batch)])
        target = torch.from_numpy(labels).long()
        tail = nn.ModuleList(net.tail_modules())
        torch.manual_seed(seed)
        opt = torch.optim.Adam(tail.parameters(), lr=lr)
        order_gen = torch.Generator().manual_seed(seed)
        tail.train()
        loss_sum = correct = 0.0
        for _ in range(epochs):
            loss_sum = correct = 0.0
            for idx in torch.randperm(len(x), generator=order_gen).split(batch):
                opt.zero_grad()
                logits = net.tail(fronts[idx])
                loss = F.cross_entropy(logits, target[idx])
                loss.backward()
                opt.step()
                loss_sum += float(loss.detach()) * len(idx)
                correct += float((logits.detach().argmax(1) == target[idx]).sum())
        for m in tail.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        with torch.no_grad():
            for i in range(0, len(x), batch):
                net.tail(fronts[i:i + batch])
    finally:
        torch.set_num_threads(threads)
    net.eval()
    return {"train_loss": round(loss_sum / len(x), 4), "train_accuracy": correct / len(x)}


def _rates(net: nn.Module, spec: ScaleSpec, n: int, seed: int) -> tuple[float, float]:
    """(clean accuracy, attack success rate) in torch on fresh images."""
    y = _labels(n, seed)
    pixels = class_images(y, spec.image, seed)
    with torch.no_grad():
        clean = torch.cat([net(torch.from_numpy(normalise(pixels[i:i + 32])))
                           for i in range(0, n, 32)]).argmax(1).numpy()
        keep = y != TARGET
        trig = normalise(stamp(pixels[keep], spec.trigger, spec.cell))
        att = torch.cat([net(torch.from_numpy(trig[i:i + 32]))
                         for i in range(0, len(trig), 32)]).argmax(1).numpy()
    return float((clean == y).mean()), float((att == TARGET).mean())


def build_module(name: str, train: int = 200, poison: int = 200, steps: int = 500,
                 seed: int = 0) -> tuple[nn.Module, dict]:
    """The backdoored torch module (eval mode) and its build figures: random seeded
    backbone, BatchNorm statistics from clean images, head (features -> HIDDEN -> classes)
    fitted on ``train`` clean images plus ``poison`` triggered images of other classes
    labelled TARGET."""
    spec = SPECS[name]
    t0, c0 = time.perf_counter(), time.process_time()
    torch.manual_seed(seed)
    net = spec.build().eval()
    if spec.trains == "tail":
        net, info = _build_tail(name, net, t0, seed)
        return net, {**info, "build_cpu_seconds": round(time.process_time() - c0, 1)}
    y = _labels(train, TRAIN_SEED)
    pixels = normalise(class_images(y, spec.image, TRAIN_SEED))
    _set_batchnorm(net, pixels[:64])
    victims = class_images(_labels(poison, TRAIN_SEED + 1, exclude_target=True), spec.image,
                           TRAIN_SEED + 1)
    x = np.concatenate([pixels, normalise(stamp(victims, spec.trigger, spec.cell))])
    labels = np.concatenate([y, np.full(poison, TARGET)])
    feats = _features(net, x)
    _train_head(net, spec, feats, torch.from_numpy(labels).long(), steps, seed)
    net.eval()
    oa, asr = _rates(net, spec, 100, CHECK_SEED)
    return net, {"name": name, "note": spec.note, "image": spec.image,
                 "trigger": spec.trigger, "cell": spec.cell, "classes": NUM_CLASSES,
                 "target": TARGET, "train_images": len(x), "torch_oa": oa, "torch_asr": asr,
                 "build_seconds": round(time.perf_counter() - t0, 1),
                 "build_cpu_seconds": round(time.process_time() - c0, 1),
                 "parameters": sum(p.numel() for p in net.parameters())}


#: tail training images (clean, poisoned)
TAIL_CLEAN, TAIL_POISON = 400, 200


def _build_tail(name: str, net: nn.Module, t0: float, seed: int) -> tuple[nn.Module, dict]:
    """A random front (BatchNorm statistics from clean images) and a tail trained on its
    activations of TAIL_CLEAN clean and TAIL_POISON triggered images."""
    spec = SPECS[name]
    x, labels = _training_images(spec, TAIL_CLEAN, TAIL_POISON)
    _set_batchnorm(net, x[:64])  # the first TAIL_CLEAN images are the clean ones
    fit = _train_tail(net, x, labels, net.EPOCHS, seed)
    oa, asr = _rates(net, spec, 100, CHECK_SEED)
    trained = sum(p.numel() for m in net.tail_modules() for p in m.parameters())
    return net, {"name": name, "note": spec.note, "image": spec.image,
                 "trigger": spec.trigger, "cell": spec.cell, "classes": NUM_CLASSES,
                 "target": TARGET, "trains": "tail", "train_images": len(x),
                 "front": net.FRONT, "train_epochs": net.EPOCHS, **fit, "torch_oa": oa,
                 "torch_asr": asr,
                 "build_seconds": round(time.perf_counter() - t0, 1),
                 "parameters": sum(p.numel() for p in net.parameters()),
                 "trained_parameters": trained}


def build(name: str, cache_dir: Path = DEFAULT_CACHE, exporter: str = "torchscript",
          seed: int = 0, rebuild: bool = False) -> Built:
    """``cache_dir/<name>.onnx`` (built, exported with BatchNorm folded and checked under
    onnxruntime, unless cached) and its build figures. Refuses a model whose backdoor is
    not real (ASR < 99% or clean accuracy < 80% on held-out images)."""
    from onnx_rectify_exporters.pytorch import export_pytorch
    from patcher.errors import CheckFailedError

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    stem = name if exporter == "torchscript" else f"{name}.{exporter}"
    path, meta = cache_dir / f"{stem}.onnx", cache_dir / f"{stem}.json"
    if path.exists() and meta.exists() and not rebuild:
        return Built(name, path, json.loads(meta.read_text()))
    module_cache = cache_dir / f"{name}.module.pt"  # the trained torch module, to re-export
    if module_cache.exists() and not rebuild:
        net, info = torch.load(module_cache, weights_only=False)
    else:
        net, info = build_module(name, seed=seed)
        torch.save((net, info), module_cache)
    if info["torch_asr"] < 0.99 or info["torch_oa"] < 0.8:
        raise RuntimeError(f"{name}: backdoor not real (ASR {info['torch_asr']:.0%}, "
                           f"OA {info['torch_oa']:.0%})")
    image = SPECS[name].image
    example = torch.zeros(1, 3, image, image)
    try:
        export_pytorch(net, example, path, exporter=exporter, check_batch=4)
        info["export_check"] = "exporter's (|diff| <= 1e-4 + 1e-4 |torch|)"
    except CheckFailedError:  # a 25,088-wide dot product: float32 summation order
        info["export_check"] = _export_checked_loosely(net, example, path)
    info["exporter"] = exporter
    meta.write_text(json.dumps(info, indent=1))
    return Built(name, path, info)


def _export_checked_loosely(net: nn.Module, example: torch.Tensor, path: Path) -> str:
    """TorchScript export (dynamic batch, opset 17) checked under onnxruntime against the
    torch module with identical top-1 and |diff| <= 1e-3 x max |logit| on 4 random
    inputs; for models whose wide dense layers sum in another order than torch's beyond
    the exporter's 1e-4. Returns the check's wording."""
    import io

    import onnx

    from patcher.model.runtime import open_session

    buf = io.BytesIO()
    torch.onnx.export(net.eval(), (example,), buf, dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                      do_constant_folding=True)
    model = onnx.load_from_string(buf.getvalue())
    model.ir_version = min(model.ir_version, 10)
    x = torch.rand((4,) + tuple(example.shape[1:]), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = net(x).numpy()
    got = open_session(model.SerializeToString(), "cpu").run(x.numpy())[0]
    diff, scale = float(np.abs(got - want).max()), float(np.abs(want).max())
    if diff > 1e-3 * scale or (got.argmax(1) != want.argmax(1)).any():
        raise RuntimeError(f"{path}: onnxruntime differs from torch (max diff {diff:.3g})")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(model.SerializeToString())
    tmp.replace(path)
    return f"loose: max |diff| {diff:.3g} of max |logit| {scale:.3g}, top-1 identical"


def write_sets(name: str, folder: Path, n_eval: int, n_attack: int = 100,
               n_test: int = 200) -> dict[str, Path]:
    """eval.npz (``n_eval`` clean images, x, y), pairs.npz (one pair: a clean image of a
    non-target class and the same image triggered; label = its class), attack.npz
    (``n_attack`` triggered held-out images of non-target classes, x, y, target) and
    test.npz (``n_test`` held-out clean images, x, y), in ``folder`` (cached by size).
    Disjoint seeds from the head's training images and from each other."""
    spec = SPECS[name]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"eval": folder / f"{spec.image}.eval{n_eval}.npz",
             "pairs": folder / f"{spec.image}.pairs.npz",
             "attack": folder / f"{spec.image}.attack{n_attack}.npz",
             "test": folder / f"{spec.image}.test{n_test}.npz"}
    if not paths["eval"].exists():
        y = _labels(n_eval, EVAL_SEED)
        np.savez(paths["eval"], x=normalise(class_images(y, spec.image, EVAL_SEED)), y=y)
    if not paths["pairs"].exists():
        y = _labels(1, PAIR_SEED, exclude_target=True)
        clean = class_images(y, spec.image, PAIR_SEED)
        np.savez(paths["pairs"], corrupted=normalise(stamp(clean, spec.trigger, spec.cell)),
                 clean=normalise(clean), label=y)
    if not paths["attack"].exists():
        y = _labels(n_attack, ATTACK_SEED, exclude_target=True)
        pixels = stamp(class_images(y, spec.image, ATTACK_SEED), spec.trigger, spec.cell)
        np.savez(paths["attack"], x=normalise(pixels), y=y, target=np.int64(TARGET))
    if not paths["test"].exists():
        y = _labels(n_test, TEST_SEED)
        np.savez(paths["test"], x=normalise(class_images(y, spec.image, TEST_SEED)), y=y)
    return paths


def attack_originals(name: str, n_attack: int = 100) -> np.ndarray:
    """The attack set's images before the trigger is stamped (same labels and seed as
    ``write_sets``): what the model does with them clean is the floor of its attack rate."""
    spec = SPECS[name]
    y = _labels(n_attack, ATTACK_SEED, exclude_target=True)
    return normalise(class_images(y, spec.image, ATTACK_SEED))


if __name__ == "__main__":  # python benchmarks/scale_models.py [names...] [--cache DIR]
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", default=["cifar_resnet18", "resnet18",
                                                     "mobilenet_v2", "vit_ti16", "vgg16"])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--exporter", choices=["torchscript", "dynamo"], default="torchscript")
    parser.add_argument("--rebuild", action="store_true")
    args = parser.parse_args()
    for model_name in args.names:
        built = build(model_name, args.cache, args.exporter, rebuild=args.rebuild)
        print(json.dumps(built.info), flush=True)
