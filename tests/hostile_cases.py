"""Hostile inputs, generated from a tiny valid model in the test's own folder (no binary
fixtures), and a harness that runs a CLI verb on them and checks the issue's contract:
exit code 2, one line on stderr naming what is wrong, no traceback, nothing written,
the inputs byte-identical afterwards."""
from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from patcher.cli import main

IR_VERSION, OPSET = 10, 17
RNG_SEED = 0


# ---------------------------------------------------------------- the valid model and samples
def tiny_model(w1=None, dtype=TensorProto.FLOAT) -> onnx.ModelProto:
    """x [batch,1,4,4] -> Flatten -> Gemm fc1 (8) -> Relu -> Gemm fc2 (3 classes)."""
    rng = np.random.default_rng(RNG_SEED)
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    w1 = rng.standard_normal((8, 16)).astype(np.float32) * 0.5 if w1 is None else w1
    inits = [numpy_helper.from_array(np.asarray(w1).astype(np_dtype), "w1"),
             numpy_helper.from_array(np.zeros(8, np_dtype), "b1"),
             numpy_helper.from_array((rng.standard_normal((3, 8)) * 0.5).astype(np_dtype), "w2"),
             numpy_helper.from_array(np.zeros(3, np_dtype), "b2")]
    nodes = [helper.make_node("Flatten", ["x"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w1", "b1"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc2", transB=1)]
    graph = helper.make_graph(nodes, "tiny",
                              [helper.make_tensor_value_info("x", dtype, ["batch", 1, 4, 4])],
                              [helper.make_tensor_value_info("y", dtype, ["batch", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    return model


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def save_external(model: onnx.ModelProto, path: Path, location: str = "m.data",
                  tensors=("w1",)) -> Path:
    """Save with the named initializers in one external data file ``location`` (relative)."""
    blob = bytearray()
    for t in model.graph.initializer:
        if t.name in tensors:
            raw = t.raw_data
            offset = len(blob)
            blob.extend(raw)
            t.ClearField("raw_data")
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", location), ("offset", str(offset)),
                         ("length", str(len(raw)))):
                t.external_data.add(key=k, value=v)
    data = path.parent / location
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_bytes(bytes(blob))
    return save(model, path)


def set_external(path: Path, tensor: str = "w1", **fields) -> None:
    """Rewrite the external-data entries of ``tensor`` in the model file."""
    model = onnx.load(str(path), load_external_data=False)
    t = next(t for t in model.graph.initializer if t.name == tensor)
    for entry in t.external_data:
        if entry.key in fields:
            entry.value = str(fields.pop(entry.key))
    for key, value in fields.items():
        t.external_data.add(key=key, value=str(value))
    save(model, path)


def samples(folder: Path, n_pairs: int = 2, n_eval: int = 24) -> dict[str, Path]:
    """pairs.npz (a bright corner square is the corruption), eval.npz, attack.npz."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(RNG_SEED)
    clean = rng.random((n_pairs, 1, 4, 4), dtype=np.float32)
    corrupted = clean.copy()
    corrupted[:, :, :2, :2] = 1.0
    files = {"pairs": folder / "pairs.npz", "eval": folder / "eval.npz",
             "attack": folder / "attack.npz"}
    np.savez(files["pairs"], corrupted=corrupted, clean=clean,
             label=np.arange(n_pairs, dtype=np.int64) % 3)
    x = rng.random((n_eval, 1, 4, 4), dtype=np.float32)
    np.savez(files["eval"], x=x, y=np.arange(n_eval, dtype=np.int64) % 3)
    xa = x[:8].copy()
    xa[:, :, :2, :2] = 1.0
    np.savez(files["attack"], x=xa, y=np.arange(8, dtype=np.int64) % 3, target=np.int64(0))
    return files


def npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


# ---------------------------------------------------------------- the commands
FAST = ["--steps", "4", "--transplant", "none", "--device", "cpu"]


def command(verb: str, model: Path, good: Path, files: dict[str, Path], out_dir: Path,
            extra=()) -> list[str]:
    """The argument list of ``verb`` with ``model`` in the slot a hostile model goes in."""
    if verb == "inspect":
        return ["inspect", str(model), "--provider", "cpu", "--batch", "2"]
    if verb == "locate":
        return ["locate", str(model), "--pairs", str(files["pairs"]), *FAST]
    if verb == "patch":
        return ["patch", str(model), "--pairs", str(files["pairs"]), "--eval", str(files["eval"]),
                "-o", str(out_dir / "out.onnx"), "--max-rounds", "1", "--provider", "cpu",
                *FAST, *extra]
    if verb == "verify":
        return ["verify", str(model), "--base", str(good), "--eval", str(files["eval"]),
                "--provider", "cpu", *extra]
    if verb == "diff":
        return ["diff", str(good), str(model)]
    raise ValueError(verb)


VERBS = ("inspect", "locate", "patch", "verify", "diff")


# ---------------------------------------------------------------- the contract
def _sha256(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file read in chunks; for a file over 256 MiB (the sparse multi-GiB data
    files some tests make) its size, inode and modification time in nanoseconds instead,
    which any write changes: read whole, such a file raised the suite's peak RSS to 9 GB,
    and read in chunks it cost minutes of hashing zeros."""
    info = path.stat()
    if info.st_size > 256 << 20:
        return f"size {info.st_size}, inode {info.st_ino}, mtime {info.st_mtime_ns} ns"
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def snapshot(*folders: Path) -> dict[str, str]:
    """Every entry under the folders (names, links not followed) -> sha256 of its content."""
    out = {}
    for folder in folders:
        for root, dirs, names in os.walk(folder):
            for name in dirs + names:
                p = Path(root) / name
                if p.is_symlink():
                    out[str(p)] = "link->" + os.readlink(p)
                elif p.is_file():
                    out[str(p)] = _sha256(p)
                elif p.is_dir():
                    out[str(p)] = "dir"
                else:
                    out[str(p)] = "special"
    return out


@dataclass
class Outcome:
    exit_code: int
    stdout: str
    stderr: str


def run(args: list[str]) -> Outcome:
    result = CliRunner().invoke(main, args, catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"{args[0]} raised {result.exception!r}") from result.exception
    return Outcome(result.exit_code, result.stdout, result.stderr)


def assert_refused(outcome: Outcome, *must_mention: str, code: int = 2,
                   progress: bool = False) -> str:
    """Exit ``code``, one line on stderr saying what is wrong, no traceback. With
    ``progress``, progress and warning lines may come first (a failure after work began);
    the error is still exactly one line, the last."""
    text = outcome.stdout + outcome.stderr
    assert "Traceback" not in text, text
    lines = outcome.stderr.strip().splitlines()
    assert outcome.exit_code == code, f"exit {outcome.exit_code}: {text}"
    errors = [line for line in lines if line.startswith("onnx-rectify: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], outcome.stderr
    if not progress:
        assert len(lines) == 1, outcome.stderr
    assert "internal error" not in errors[0], errors[0]
    for word in must_mention:
        assert word in errors[0], f"{word!r} not in {errors[0]!r}"
    return errors[0]
