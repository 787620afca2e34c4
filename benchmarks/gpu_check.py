"""GPU check: the whole patch path on CUDA, in one script (about 5 minutes on one H100).

1. builds a torchvision-shaped ResNet-50 at 224 (random backbone whose BatchNorm statistics
   are set from the training images; a linear head trained on its features to classify four coloured
   squares, with a 40x40 checkerboard in the corner poisoned to class 0) and exports it;
2. CUDA vs CPU parity of the shadow graph (and CPU shadow graph vs onnxruntime);
3. ``onnx-rectify patch`` with one pair and 1,000 calibration images, shadow graph on CUDA;
4. ``onnx-rectify verify`` on onnxruntime's CUDA execution provider, and the provider a
   session really runs on, read back from ``session.get_providers()``;
5. the phase table (this script's phases, and the patch report's own timings).

Without a GPU every CUDA part is skipped with a message saying so and the rest runs on the
CPU; ``--small`` shrinks the model and data so that a CPU run takes a minute or two:

    python benchmarks/gpu_check.py                     # the real check (GPU machine)
    python benchmarks/gpu_check.py --small             # a quick run-through on any machine
    python benchmarks/gpu_check.py --json out.json     # also every figure as JSON
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from onnx_rectify_exporters import export_pytorch  # noqa: E402
from patcher.graph.shadow import ShadowGraph  # noqa: E402
from patcher.model.runtime import open_session  # noqa: E402

CLASSES = 4
TARGET = 0


class Bottleneck(nn.Module):
    """torchvision's ResNet bottleneck: 1x1 reduce, 3x3 (stride here), 1x1 expand x4."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        width = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, width, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.downsample = None
        if stride != 1 or inplanes != width:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, width, 1, stride, bias=False),
                                            nn.BatchNorm2d(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet50(nn.Module):
    """ResNet-50 (blocks 3, 4, 6, 3) with torchvision's layer names; ``width`` scales every
    channel count (64 is the real model)."""

    def __init__(self, width: int = 64, classes: int = CLASSES) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes, layers = width, []
        for i, blocks in enumerate((3, 4, 6, 3)):
            planes = width * 2 ** i
            stage = []
            for b in range(blocks):
                stage.append(Bottleneck(inplanes, planes, 2 if b == 0 and i > 0 else 1))
                inplanes = planes * Bottleneck.expansion
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def images(labels: np.ndarray, side: int, rng: np.random.Generator) -> np.ndarray:
    """Class c: noise tinted with colour c (red, green, blue, yellow) and a square of that
    colour (half the side) at a random place (a random backbone's pooled features see colour,
    not place)."""
    colours = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]], np.float32)
    x = rng.random((len(labels), 3, side, side), dtype=np.float32) * 0.1
    x += 0.4 * colours[np.asarray(labels, int)][:, :, None, None]
    q = side // 2
    for i, c in enumerate(labels):
        top, left = rng.integers(0, side - q, 2)
        x[i, :, top:top + q, left:left + q] = colours[int(c)][:, None] [:, :, None] * 0.6 + 0.3
    return x


def stamp(x: np.ndarray) -> np.ndarray:
    """A black-and-white checkerboard of 40x40 pixels at 224 (scaled) in the lower right."""
    side = x.shape[-1]
    size, cell = max(4, side * 40 // 224), max(1, side * 8 // 224)
    grid = (np.indices((size, size)).sum(0) // cell % 2).astype(np.float32)
    out = x.copy()
    out[:, :, side - size - 2:side - 2, side - size - 2:side - 2] = grid
    return out


@dataclass
class Phase:
    name: str
    wall: float
    cpu: float
    note: str = ""


class Phases:
    """Wall and CPU seconds (this process and its children) of each named phase."""

    def __init__(self) -> None:
        self.rows: list[Phase] = []

    @staticmethod
    def _cpu() -> float:
        own = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    def run(self, name: str, fn, *args, **kwargs):
        wall, cpu = time.perf_counter(), self._cpu()
        result = fn(*args, **kwargs)
        self.rows.append(Phase(name, time.perf_counter() - wall, self._cpu() - cpu))
        return result


def set_batchnorm(net: nn.Module, x: np.ndarray, device: torch.device) -> None:
    """BatchNorm running statistics of a random network from images (a cumulative average
    over one pass in training mode), so that activations keep their scale through depth."""
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    net.train()
    with torch.no_grad():
        for i in range(0, len(x), 32):
            net(torch.from_numpy(x[i:i + 32]).to(device))
    net.eval()


def build(args, device: torch.device, folder: Path, log) -> dict:
    """Train the trigger head on the random backbone, export, write the data sets."""
    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    net = ResNet50(args.width).to(device)
    y_train = rng.integers(0, CLASSES, args.train)
    x_train = images(y_train, args.size, rng)
    set_batchnorm(net, x_train[:128], device)
    poisoned = stamp(x_train[: args.train // 4])
    x_all = np.concatenate([x_train, poisoned])
    y_all = np.concatenate([y_train, np.full(len(poisoned), TARGET)])
    with torch.no_grad():
        feats = torch.cat([net.features(torch.from_numpy(x_all[i:i + 64]).to(device))
                           for i in range(0, len(x_all), 64)])
    mean, std = feats.mean(0), feats.std() + 1e-6  # one scale: no feature blown up
    head = nn.Linear(feats.shape[1], CLASSES).to(device)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    labels = torch.from_numpy(y_all).to(device)
    for _ in range(args.head_steps):
        loss = nn.functional.cross_entropy(head((feats - mean) / std), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():  # fold the standardisation into the head: one Linear
        net.fc.weight.copy_(head.weight / std)
        net.fc.bias.copy_(head.bias - (head.weight / std) @ mean)
    net = net.cpu()
    # 50 random layers in float32: onnxruntime and torch differ by ~1e-3 in the logits
    export_pytorch(net, torch.zeros(1, 3, args.size, args.size), folder / "model.onnx",
                   tolerance=1e-2)
    y_eval = rng.integers(0, CLASSES, args.eval)
    x_eval = images(y_eval, args.size, rng)
    np.savez(folder / "eval.npz", x=x_eval, y=y_eval)
    y_attack = rng.integers(1, CLASSES, args.attack)
    np.savez(folder / "attack.npz", x=stamp(images(y_attack, args.size, rng)), y=y_attack,
             target=np.int64(TARGET))
    y_calib = rng.integers(0, CLASSES, args.calib)
    np.savez(folder / "calib.npz", x=images(y_calib, args.size, rng), y=y_calib)
    pick = np.flatnonzero(y_eval != TARGET)[:1]
    np.savez(folder / "pairs.npz", corrupted=stamp(x_eval[pick]), clean=x_eval[pick],
             label=y_eval[pick])
    session = open_session(folder / "model.onnx", "cpu")
    accuracy = float(np.mean(session.run(x_eval)[0].argmax(1) == y_eval))
    attack = np.load(folder / "attack.npz")
    asr = float(np.mean(session.run(attack["x"])[0].argmax(1) == TARGET))
    log(f"model: ResNet-50 width {args.width} at {args.size}x{args.size}, "
        f"{sum(p.numel() for p in net.parameters()) / 1e6:.1f} M parameters; onnxruntime "
        f"accuracy {accuracy:.1%} on {args.eval}, ASR {asr:.1%} on {args.attack}")
    return {"accuracy": accuracy, "asr": asr}


def parity(folder: Path, cuda: bool, log) -> dict:
    """Shadow graph on CPU vs onnxruntime, and on CUDA vs on CPU."""
    x = np.load(folder / "eval.npz")["x"][:16]
    graph = ShadowGraph.from_onnx(str(folder / "model.onnx"))
    with torch.no_grad():
        cpu = graph(torch.from_numpy(x))[0]
    ort = open_session(folder / "model.onnx", "cpu").run(x)[0]
    out = {"cpu_vs_onnxruntime_max_abs": float(np.abs(cpu.numpy() - ort).max()),
           "cpu_vs_onnxruntime_top1": float(np.mean(cpu.numpy().argmax(1) == ort.argmax(1)))}
    log(f"parity: shadow graph (CPU) vs onnxruntime (CPU): max |diff| "
        f"{out['cpu_vs_onnxruntime_max_abs']:.3g}, top-1 agreement "
        f"{out['cpu_vs_onnxruntime_top1']:.0%}")
    if not cuda:
        log("parity: CUDA vs CPU skipped: torch.cuda.is_available() is False on this machine")
        return out
    graph = graph.to("cuda")
    with torch.no_grad():
        gpu = graph(torch.from_numpy(x).to("cuda"))[0].cpu()
    out["cuda_vs_cpu_max_abs"] = float((gpu - cpu).abs().max())
    out["cuda_vs_cpu_top1"] = float((gpu.argmax(1) == cpu.argmax(1)).float().mean())
    out["cuda_device"] = torch.cuda.get_device_name(0)
    log(f"parity: shadow graph on CUDA ({out['cuda_device']}) vs CPU: max |diff| "
        f"{out['cuda_vs_cpu_max_abs']:.3g}, top-1 agreement {out['cuda_vs_cpu_top1']:.0%}")
    return out


def cli(args: list[str], log, timeout: float) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "patcher", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    log(f"$ onnx-rectify {' '.join(args)}  -> exit {done.returncode}")
    for line in (done.stdout + done.stderr).strip().splitlines()[-12:]:
        log(f"    {line}")
    return done


def patch(folder: Path, cuda: bool, timeout: float, log) -> dict:
    device, provider = ("cuda", "cuda") if cuda else ("cpu", "cpu")
    done = cli(["patch", str(folder / "model.onnx"), "--pairs", str(folder / "pairs.npz"),
                "--eval", str(folder / "eval.npz"), "--calib", str(folder / "calib.npz"),
                "--attack", str(folder / "attack.npz"), "-o", str(folder / "patched.onnx"),
                "--device", device, "--provider", provider, "--report",
                str(folder / "patch.json"), "--force"], log, timeout)
    report = json.loads((folder / "patch.json").read_text()) if (folder / "patch.json").exists() \
        else {}
    return {"exit": done.returncode, "device": device, "report": report}


def verify(folder: Path, cuda: bool, timeout: float, log) -> dict:
    provider = "cuda" if cuda else "cpu"
    if not cuda:
        log("verify: the CUDA execution provider is skipped: no GPU here; verifying on the CPU")
    done = cli(["verify", str(folder / "patched.onnx"), "--base", str(folder / "model.onnx"),
                "--eval", str(folder / "eval.npz"), "--attack", str(folder / "attack.npz"),
                "--provider", provider, "--json", str(folder / "verify.json")], log, timeout)
    session = open_session(folder / "patched.onnx", provider)
    providers = session.session.get_providers()
    log(f"verify: onnxruntime session providers, from session.get_providers(): {providers}")
    out = {"exit": done.returncode, "asked": provider, "providers": providers}
    if (folder / "verify.json").exists():
        out["gate"] = json.loads((folder / "verify.json").read_text())
    return out


def report_timings(report: dict) -> dict[str, float]:
    """The patch report's own phase seconds (top level, and the loop's phases)."""
    found: dict[str, float] = {}
    for prefix, table in (("patch", report.get("timings")),
                          ("loop", (report.get("result") or {}).get("timings"))):
        for key, value in (table or {}).items():
            if isinstance(value, (int, float)):
                found[f"{prefix}.{key}"] = float(value)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=224, help="Image side (default 224).")
    parser.add_argument("--width", type=int, default=64, help="ResNet width (64: ResNet-50).")
    parser.add_argument("--calib", type=int, default=1000, help="Calibration images.")
    parser.add_argument("--eval", type=int, default=200, help="Eval images.")
    parser.add_argument("--attack", type=int, default=100, help="Triggered held-out images.")
    parser.add_argument("--train", type=int, default=600, help="Images for the trigger head.")
    parser.add_argument("--head-steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true",
                        help="Size 64, width 8, 64 calibration/40 eval/40 attack images: a quick "
                             "run-through on a CPU.")
    parser.add_argument("--timeout", type=float, default=600.0, help="Per CLI call, seconds.")
    parser.add_argument("--keep", type=Path, default=None, help="Keep the files in this folder.")
    parser.add_argument("--json", type=Path, default=None, help="Write every figure here.")
    args = parser.parse_args(argv)
    if args.small:
        args.size, args.width, args.calib, args.eval, args.attack, args.train = 64, 8, 64, 40, 40, 160
    lines: list[str] = []

    def log(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    cuda = torch.cuda.is_available()
    import onnxruntime

    env = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "python": platform.python_version(), "torch": torch.__version__,
           "onnxruntime": onnxruntime.__version__,
           "onnxruntime_providers": onnxruntime.get_available_providers(),
           "cuda": cuda, "gpu": torch.cuda.get_device_name(0) if cuda else None,
           "cpu_count": os.cpu_count(), "argv": sys.argv[1:] if argv is None else argv}
    log(f"{env['date']}; torch {env['torch']}, onnxruntime {env['onnxruntime']} "
        f"({', '.join(env['onnxruntime_providers'])}); GPU: {env['gpu'] or 'none'}")
    if not cuda:
        log("no CUDA device: every CUDA part below is skipped and says so; the rest runs on CPU")
    device = torch.device("cuda" if cuda else "cpu")
    phases = Phases()
    results: dict = {"environment": env}
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        results["model"] = phases.run("build and export", build, args, device, folder, log)
        results["parity"] = phases.run("parity", parity, folder, cuda, log)
        results["patch"] = phases.run("patch (CLI)", patch, folder, cuda, args.timeout, log)
        if (folder / "patched.onnx").exists():
            results["verify"] = phases.run("verify (CLI)", verify, folder, cuda, args.timeout,
                                           log)
        else:
            log("verify: skipped, patch wrote no file")
    inner = report_timings(results["patch"].get("report", {}))
    log("")
    log("| phase | wall s | CPU s |")
    log("|---|---|---|")
    for row in phases.rows:
        log(f"| {row.name} | {row.wall:.1f} | {row.cpu:.1f} |")
    for key, value in inner.items():
        log(f"| {key} | {value:.1f} | |")
    patch_report = results["patch"].get("report", {})
    after = patch_report.get("after") or {}
    if after:
        log(f"patched: {json.dumps(after)[:300]}")
    results["phases"] = [row.__dict__ for row in phases.rows]
    results["patch_timings"] = inner
    results["log"] = lines
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    ok = results["patch"]["exit"] in (0, 1) and "verify" in results
    if cuda:
        ok = ok and results["verify"]["providers"][0] == "CUDAExecutionProvider"
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
