"""The trade-off behind ``--objective attribution``: every silencing edit the loop could
try at its first round, with what it does to the loop's own share and to held-out data.

    python benchmarks/silence_sweep.py FOLDER [--n 1] [--images 150] [--betas 0.25,0.5,1,2,4,8]

FOLDER holds a leakage case in the layout of samples/leakage (model.onnx, eval.npz,
test.npz, leakage_test.npz with null_mask, pairs_n{n}.npz), e.g. samples/leakage or a
case kept by ``benchmarks/leakage_generalisation.py --keep DIR``. For each hidden layer
and beta it applies the silencing edit alone (patcher.edits.silence) and prints the loop's
share (on its share set), eval and test accuracy changes, the leakage on the first
``--images`` leakage-test images (16 IG steps), and the rate eval-accuracy lost per unit
of share removed (the loop keeps an edit when that rate is at most
patcher.rectify.config.ACCURACY_PER_SHARE). Shadow graph, one torch thread.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from patcher.gate.metrics import leakage
from patcher.rectify import RectifyConfig
from patcher.rectify.config import ACCURACY_PER_SHARE
from patcher.rectify.editkinds import SilencingEditKind
from patcher.rectify.objectives import ShareObjective
from patcher.rectify.workspace import Workspace
from patcher.samples import LabelledSet, Pairs
from patcher.graph.shadow import ShadowGraph
from patcher.edits.silence import silencing_edit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--n", type=int, default=1)
    ap.add_argument("--images", type=int, default=150)
    ap.add_argument("--betas", default="0.25,0.5,1,2,4,8")
    args = ap.parse_args()
    torch.set_num_threads(1)
    folder = args.folder
    graph = ShadowGraph.from_onnx(str(folder / "model.onnx"))
    p = np.load(folder / f"pairs_n{args.n}.npz")
    pairs = Pairs(p["corrupted"], p["clean"], p["label"])
    e = np.load(folder / "eval.npz")
    eval_set = LabelledSet(e["x"], e["y"])
    test, held = np.load(folder / "test.npz"), np.load(folder / "leakage_test.npz")
    k = args.images
    r = Workspace(graph, pairs, eval_set, None,
                  RectifyConfig(objective="attribution", show_progress=False))
    share = ShareObjective(r, pairs)
    kind = SilencingEditKind(share.key_examples, len(pairs))

    @torch.no_grad()
    def accuracy(x, y) -> float:
        return float((graph(torch.from_numpy(x))[0].argmax(1).numpy() == y).mean())

    def figures() -> tuple[float, float, float, float]:
        return (share.measure().value, accuracy(eval_set.x, eval_set.y), accuracy(test["x"], test["y"]),
                leakage(graph, held["x"][:k], held["y"][:k], held["null_mask"][:k], steps=16))

    base = figures()
    print(f"base: share {base[0]:.4f} (on {share.source}), eval OA {base[1]:.2%}, "
          f"test OA {base[2]:.2%}, leakage {base[3]:.4f}; keep rate <= {ACCURACY_PER_SHARE}")
    print(f"{'layer':<24} {'beta':>5} {'share':>8} {'eval OA':>8} {'test OA':>8} "
          f"{'leakage':>8} {'rate':>7}")
    for layer in r.hidden_layers():
        directions, sigma, signs = kind.parts(r, layer)
        for (source, direction), beta in ((d, float(b)) for d in directions
                                          for b in args.betas.split(",")):
            edit = silencing_edit(layer.name, layer.weight, direction, layer.value_dim,
                                  beta * sigma, signs)
            delta = r.stored(layer, edit.delta)
            r.add(layer.weight, delta)
            try:
                f = figures()
            finally:
                r.add(layer.weight, delta, sign=-1.0)
            removed = base[0] - f[0]
            rate = f"{(base[1] - f[1]) / removed:7.3f}" if removed > 0 else "      -"
            print(f"{layer.name + (' +eval' if 'eval' in source else ''):<24} {beta:>5g} "
                  f"{f[0] - base[0]:>+8.4f} "
                  f"{100 * (f[1] - base[1]):>+8.2f} {100 * (f[2] - base[2]):>+8.2f} "
                  f"{f[3] - base[3]:>+8.4f} {rate}", flush=True)


if __name__ == "__main__":
    main()
