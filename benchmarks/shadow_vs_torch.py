"""Benchmark: the shadow graph (ONNX run as a torch module) versus the same network
written directly in torch, forward+backward and forward-only, on CPU.

Acceptance criterion: shadow forward+backward costs no more than 1.5x the torch
network (``shadow_vs_torch_ratio`` = ResNet-18 fwd+bwd, shadow of the BN-folded
ONNX export versus the BN-folded torch module).

    python benchmarks/shadow_vs_torch.py [--quick] [--json FILE]

or ``from shadow_vs_torch import run; run(quick=True)`` (returns the JSON dict).

Method: each network is exported with the TorchScript exporter (``dynamo=False``,
opset 17, eval mode). Two ONNX variants:

* ``folded``: ``TrainingMode.EVAL`` + constant folding - the exporter folds every
  BatchNorm into its Conv (the shipped-model case). Torch reference: the module
  with BN folded by ``fuse_conv_bn_eval`` (the network the file represents);
  also reported against the unfused eval-mode module.
* ``bn_kept``: ``TrainingMode.PRESERVE`` on the eval-mode module keeps inference
  ``BatchNormalization`` nodes. Torch reference: the unfused eval-mode module.

Outputs of every shadow are checked against torch (atol 1e-4) before timing, and
input gradients too (all but <= 0.1% of elements within 1e-4: max-pool tie flips). Timing interleaves all implementations in rounds (order rotated
each round), so drift on a shared machine hits all of them alike; the reported
time is the median over rounds, and the ratio is median(shadow) / median(torch).
The paired ratio (median over rounds of the per-round ratio) is in the JSON too.

Note on "same work": in torch every parameter requires grad (conv/linear
weights and biases, BN affine); in the shadow only editable weights (Conv, Gemm
B) are Parameters, biases and BN tensors are buffers. So torch does slightly
*more* backward work (bias gradients), which only favours torch.
"""
from __future__ import annotations

import argparse
import gc
import io
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
for p in (str(HERE), str(HERE.parent)):
    if p not in sys.path:
        sys.path.insert(0, p)

import onnx  # noqa: E402
import torch  # noqa: E402

from models import NETWORKS, fold_bn, randomize_bn  # noqa: E402
from patcher.graph.shadow import ShadowGraph  # noqa: E402
from patcher.graph.support import op_histogram  # noqa: E402

ATOL = 1e-4
#: tolerated fraction of input-gradient elements beyond ATOL (max-pool tie flips)
GRAD_MISMATCH_FRACTION = 1e-3

#: name -> (network key, batch, quick batch)
CASES = [
    ("resnet18", "resnet18", 32, 32),
    ("plain_cnn", "plain_cnn", 128, 128),
]


# ---------------------------------------------------------------- environment
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict:
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cores_available": affinity,
        "platform": platform.platform(),
    }


# ---------------------------------------------------------------- building
def export_onnx(model: torch.nn.Module, x: torch.Tensor, keep_bn: bool) -> onnx.ModelProto:
    """TorchScript export, opset 17; BN folded (EVAL) or kept (PRESERVE on an eval module)."""
    mode = torch.onnx.TrainingMode.PRESERVE if keep_bn else torch.onnx.TrainingMode.EVAL
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17,
                          do_constant_folding=True, training=mode,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return onnx.load_from_string(buf.getvalue())


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _check(name: str, shadow, ref, x: torch.Tensor) -> dict:
    """Outputs (no_grad) and input gradients of shadow vs ref must agree within ATOL."""
    with torch.no_grad():
        d_out = (_first(shadow(x)) - ref(x)).abs().max().item()
    grads = []
    for m in (shadow, ref):
        xi = x.clone().requires_grad_(True)
        _first(m(xi)).sum().backward()
        m.zero_grad(set_to_none=True)
        grads.append(xi.grad)
    diff = (grads[0] - grads[1]).abs()
    d_grad = diff.max().item()
    # Max-pool after ReLU has exact ties (all-zero windows); a 1e-8 difference in the
    # folded weights can move the argmax and route one gradient to a neighbour pixel.
    # So require almost all (not all) input-gradient elements to agree.
    bad = (diff > ATOL * max(1.0, grads[1].abs().max().item())).float().mean().item()
    if not (d_out <= ATOL and bad <= GRAD_MISMATCH_FRACTION):
        raise AssertionError(f"{name}: shadow differs from torch (max |dy| {d_out:.2e}, "
                             f"input-grad elements off by > atol: {bad:.2e}, atol {ATOL})")
    return {"max_abs_out_diff": d_out, "max_abs_input_grad_diff": d_grad,
            "input_grad_mismatch_fraction": bad}


# ---------------------------------------------------------------- timing
def _fwd_bwd(m, x):
    _first(m(x)).sum().backward()
    m.zero_grad(set_to_none=True)


def _fwd(m, x):
    with torch.no_grad():
        m(x)


def interleaved(impls: dict, x: torch.Tensor, step, warmup: int, rounds: int) -> dict:
    """Time step(impl, x) for every impl once per round, order rotated each round.

    Returns name -> list of per-round seconds (measured rounds only)."""
    names = list(impls)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        k = r % len(names)
        order = names[k:] + names[:k]
        gc.collect()
        for n in order:
            t0 = time.perf_counter()
            step(impls[n], x)
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[n].append(dt)
    return times


def _summary(times: dict, pairs: dict) -> dict:
    med = {n: statistics.median(v) * 1e3 for n, v in times.items()}
    out = {"median_ms": med,
           "min_ms": {n: min(v) * 1e3 for n, v in times.items()},
           "ratios": {}, "paired_ratios": {}}
    for label, (shadow, ref) in pairs.items():
        out["ratios"][label] = med[shadow] / med[ref]
        out["paired_ratios"][label] = statistics.median(
            s / t for s, t in zip(times[shadow], times[ref]))
    return out


# ---------------------------------------------------------------- main
PAIRS = {
    # label: (shadow impl, torch impl)
    "folded_vs_torch_folded": ("shadow_folded", "torch_folded"),
    "folded_vs_torch_unfused": ("shadow_folded", "torch_unfused"),
    "bn_kept_vs_torch_unfused": ("shadow_bn_kept", "torch_unfused"),
}


def bench_network(label: str, key: str, batch: int, warmup: int, rounds: int,
                  fwd_rounds: int, seed: int = 0) -> dict:
    cls, shape = NETWORKS[key]
    torch.manual_seed(seed)
    model = randomize_bn(cls(), seed).eval()
    folded = fold_bn(model)
    for m in (model, folded):
        for p in m.parameters():
            p.requires_grad_(True)
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed + 1))

    t0 = time.perf_counter()
    proto_folded = export_onnx(model, x, keep_bn=False)
    proto_bn = export_onnx(model, x, keep_bn=True)
    shadow_folded = ShadowGraph.from_onnx(proto_folded)
    shadow_bn = ShadowGraph.from_onnx(proto_bn)
    build_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    checks = {
        "shadow_folded_vs_torch_folded": _check(f"{label} folded", shadow_folded, folded, x),
        "shadow_folded_vs_torch_unfused": _check(f"{label} folded/unfused", shadow_folded,
                                                 model, x),
        "shadow_bn_kept_vs_torch_unfused": _check(f"{label} bn_kept", shadow_bn, model, x),
    }
    impls = {"torch_folded": folded, "torch_unfused": model,
             "shadow_folded": shadow_folded, "shadow_bn_kept": shadow_bn}
    check_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    fb = interleaved(impls, x, _fwd_bwd, warmup, rounds)
    fw = interleaved(impls, x, _fwd, warmup, fwd_rounds)
    timing_s = time.perf_counter() - t0
    return {
        "network": label,
        "batch": batch,
        "input_shape": [batch, *shape],
        "onnx_ops_folded": op_histogram(proto_folded),
        "onnx_ops_bn_kept": op_histogram(proto_bn),
        "shadow_parameters": sum(p.numel() for p in shadow_folded.parameters()),
        "torch_parameters": sum(p.numel() for p in folded.parameters()),
        "export_and_build_s": build_s,
        "check_s": check_s,
        "timing_s": timing_s,
        "checks": checks,
        "rounds": {"warmup": warmup, "fwd_bwd": rounds, "fwd": fwd_rounds},
        "fwd_bwd": _summary(fb, PAIRS),
        "fwd": _summary(fw, PAIRS),
    }


def run(quick: bool = False) -> dict:
    """Run the benchmark; returns the JSON-ready result dict."""
    t_start = time.perf_counter()
    warmup, rounds, fwd_rounds = (2, 7, 7) if quick else (5, 20, 20)
    results = {}
    for label, key, batch, quick_batch in CASES:
        results[label] = bench_network(label, key, quick_batch if quick else batch,
                                       warmup, rounds, fwd_rounds)
    headline = results["resnet18"]["fwd_bwd"]["ratios"]["folded_vs_torch_folded"]
    return {
        "benchmark": "shadow_vs_torch",
        "quick": quick,
        "criterion": "shadow fwd+bwd <= 1.5x torch (ResNet-18, BN-folded ONNX vs folded torch)",
        "shadow_vs_torch_ratio": headline,
        "passes_1_5x": headline <= 1.5,
        "networks": results,
        "environment": environment(),
        "wall_time_s": time.perf_counter() - t_start,
    }


def format_table(result: dict) -> str:
    rows = [("network", "batch", "variant", "torch ms", "shadow ms", "ratio fwd+bwd",
             "torch fwd ms", "shadow fwd ms", "ratio fwd")]
    for net in result["networks"].values():
        fb, fw = net["fwd_bwd"], net["fwd"]
        for label, (s, t) in PAIRS.items():
            rows.append((net["network"], str(net["batch"]), label,
                         f"{fb['median_ms'][t]:.1f}", f"{fb['median_ms'][s]:.1f}",
                         f"{fb['ratios'][label]:.3f}",
                         f"{fw['median_ms'][t]:.1f}", f"{fw['median_ms'][s]:.1f}",
                         f"{fw['ratios'][label]:.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    env = result["environment"]
    lines.append("")
    lines.append(f"shadow_vs_torch_ratio (ResNet-18 fwd+bwd, folded): "
                 f"{result['shadow_vs_torch_ratio']:.3f} "
                 f"({'PASS' if result['passes_1_5x'] else 'FAIL'} vs 1.5x)")
    lines.append(f"torch {env['torch']}, {env['torch_num_threads']} threads, "
                 f"{env['cores_available']} cores, {env['cpu_model']}; "
                 f"wall {result['wall_time_s']:.1f} s")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds (< 60 s)")
    ap.add_argument("--json", metavar="FILE", help="write the results as JSON")
    args = ap.parse_args(argv)
    result = run(quick=args.quick)
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
