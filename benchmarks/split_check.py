"""Is an edit's accuracy cost on the eval set representative of the test set?

    python benchmarks/split_check.py MODEL PATCHED EVAL.npz TEST.npz [--permutations 100000]

Runs both models under onnxruntime on the eval and test images and counts, per set, the
images the patch loses (right before, wrong after) and gains. With the per-image changes
fixed, it then asks how often a random split of the pooled images into sets of the same
sizes shows a test-minus-eval accuracy drop at least as large as the observed one: a
small p says the two sets differ in how fragile their images are to this edit, more
than random splits usually do (the eval set then under- or overstates the cost).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from patcher.model.runtime import open_session  # noqa: E402


def predictions(model: Path, x: np.ndarray, batch: int = 500) -> np.ndarray:
    session = open_session(str(model), "cpu")
    out = [session.run(x[i:i + batch])[0] for i in range(0, len(x), batch)]
    return np.concatenate(out).reshape(len(x), -1).argmax(1)


def split_check(model: Path, patched: Path, eval_path: Path, test_path: Path,
                permutations: int = 100_000, seed: int = 0) -> dict:
    with np.load(eval_path) as e, np.load(test_path) as t:
        x = np.concatenate([e["x"], t["x"]])
        y = np.concatenate([e["y"], t["y"]])
        n_eval = len(e["y"])
    change = (predictions(model, x) == y).astype(np.int8) - \
        (predictions(patched, x) == y).astype(np.int8)  # 1: lost, -1: gained
    observed = change[n_eval:].mean() - change[:n_eval].mean()
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(permutations):
        c = change[rng.permutation(len(change))]
        hits += c[n_eval:].mean() - c[:n_eval].mean() >= observed - 1e-12
    sets = {"eval": change[:n_eval], "test": change[n_eval:]}
    return {name: {"images": int(len(c)), "lost": int((c == 1).sum()),
                   "gained": int((c == -1).sum()), "drop": float(c.mean())}
            for name, c in sets.items()} | {"test_minus_eval": float(observed),
                                            "p": hits / permutations,
                                            "permutations": permutations}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("patched", type=Path)
    ap.add_argument("eval", type=Path)
    ap.add_argument("test", type=Path)
    ap.add_argument("--permutations", type=int, default=100_000)
    args = ap.parse_args(argv)
    r = split_check(args.model, args.patched, args.eval, args.test, args.permutations)
    for name in ("eval", "test"):
        s = r[name]
        print(f"{name}: {s['images']} images, lost {s['lost']}, gained {s['gained']}, "
              f"accuracy drop {s['drop']:+.2%}")
    print(f"test minus eval drop {r['test_minus_eval']:+.2%}; share of random splits at "
          f"least as far apart: p = {r['p']:.4f} ({r['permutations']} permutations)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
