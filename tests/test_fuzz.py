"""Property-based fuzzing: mutated model and sample files fail only with a RectifyError
(one line, exit code 2; or 1 when the model still loads but a check fails), never a
traceback or an internal error, and the input files stay byte-identical."""
from __future__ import annotations

import io
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from patcher.cli import main
from patcher.errors import RectifyError
from patcher.samples import InputSpec, load_pairs
from patcher.model.modelio import load_model

TINY = Path(__file__).resolve().parents[1] / "samples" / "tiny" / "model.onnx"
MODEL_BYTES = TINY.read_bytes()
SPEC = InputSpec.of(load_model(TINY).proto)

mutations = st.lists(
    st.one_of(
        st.tuples(st.just("flip"), st.integers(0, len(MODEL_BYTES) - 1), st.integers(1, 255)),
        st.tuples(st.just("cut"), st.integers(0, len(MODEL_BYTES) - 1), st.just(0)),
        st.tuples(st.just("insert"), st.integers(0, len(MODEL_BYTES) - 1), st.integers(0, 255)),
    ), min_size=1, max_size=4)


def _mutate(data: bytes, ops) -> bytes:
    buf = bytearray(data)
    for kind, pos, value in ops:
        pos = min(pos, max(len(buf) - 1, 0))
        if kind == "flip" and buf:
            buf[pos] ^= value
        elif kind == "cut":
            del buf[pos:]
        else:
            buf.insert(pos, value)
    return bytes(buf)


# derandomize: CI runs the same examples every time (new ones are explored with a larger
# max_examples locally); a failure here is a real bug, never a flake.
@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=mutations)
def test_mutated_models_fail_cleanly(tmp_path_factory, ops):
    folder = tmp_path_factory.mktemp("fuzz")
    path = folder / "m.onnx"
    data = _mutate(MODEL_BYTES, ops)
    path.write_bytes(data)
    result = CliRunner().invoke(main, ["inspect", str(path), "--no-parity"])
    assert result.exit_code in (0, 1, 2), result.output
    if result.exit_code == 2:
        lines = result.output.strip().splitlines()
        assert lines[-1].startswith("onnx-rectify: error: ")
        assert "internal error" not in result.output
    assert "Traceback" not in result.output
    assert path.read_bytes() == data


arrays = st.fixed_dictionaries({
    "corrupted": st.sampled_from(["ok", "nan", "int", "rank3", "wide", "empty"]),
    "clean": st.sampled_from(["ok", "nan", "rank3"]),
    "label": st.sampled_from(["ok", "negative", "big", "float", "short"]),
    "drop": st.sampled_from([None, "corrupted", "clean", "label"]),
})


def _array(kind: str, n: int = 3) -> np.ndarray:
    rng = np.random.default_rng(0)
    base = rng.random((n, 1, 16, 16), dtype=np.float32)
    return {"ok": base, "nan": np.where(base > 0.5, np.nan, base).astype(np.float32),
            "int": (base * 255).astype(np.int32), "rank3": base[:, 0],
            "wide": rng.random((n, 1, 16, 17), dtype=np.float32),
            "empty": base[:0]}[kind]


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=arrays)
def test_mutated_pair_files_raise_only_rectify_errors(tmp_path_factory, spec):
    folder = tmp_path_factory.mktemp("pairs")
    labels = {"ok": np.array([0, 1, 2]), "negative": np.array([-1, 0, 1]),
              "big": np.array([0, 1, 9]), "float": np.array([0.0, 1.0, 2.0]),
              "short": np.array([0, 1])}[spec["label"]]
    content = {"corrupted": _array(spec["corrupted"]) + 0.01 if spec["corrupted"] == "ok"
               else _array(spec["corrupted"]), "clean": _array(spec["clean"]), "label": labels}
    if spec["drop"]:
        del content[spec["drop"]]
    buf = io.BytesIO()
    np.savez(buf, **content)
    path = folder / "pairs.npz"
    path.write_bytes(buf.getvalue())
    try:
        pairs = load_pairs(path, SPEC, 4)
    except RectifyError as exc:
        assert exc.exit_code == 2 and "\n" not in str(exc)
    else:  # only fully valid files load
        assert spec == {"corrupted": "ok", "clean": "ok", "label": "ok", "drop": None}
        assert len(pairs) == 3
    assert path.read_bytes() == buf.getvalue()


# ---------------------------------------------------------------- every command, through the CLI
from tests.hostile_cases import (VERBS, command, samples as _samples, save as _save,  # noqa: E402
                                 snapshot, tiny_model)

HOSTILE_BYTES = tiny_model().SerializeToString()
_hostile_mutations = st.lists(
    st.one_of(
        st.tuples(st.just("flip"), st.integers(0, len(HOSTILE_BYTES) - 1), st.integers(1, 255)),
        st.tuples(st.just("cut"), st.integers(0, len(HOSTILE_BYTES) - 1), st.just(0)),
        st.tuples(st.just("insert"), st.integers(0, len(HOSTILE_BYTES) - 1),
                  st.integers(0, 255)),
    ), min_size=1, max_size=3)


def _check_clean_failure(result, inputs_before, folder_before, folder, allowed_new=()):
    text = result.stdout + result.stderr
    assert "Traceback" not in text
    assert result.exit_code in (0, 1, 2), text
    if result.exit_code == 2:
        errors = [l for l in result.stderr.splitlines() if l.startswith("onnx-rectify: error: ")]
        assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0], text
        assert "internal error" not in errors[0]
        assert snapshot(folder) == folder_before  # nothing written
    else:
        new = set(snapshot(folder)) - set(folder_before)
        assert {Path(p).name for p in new} <= set(allowed_new), new
    for path, digest in inputs_before.items():
        assert snapshot(Path(path).parent).get(path) == digest  # inputs byte-identical


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_hostile_mutations, verb=st.sampled_from(VERBS))
def test_mutated_models_fail_cleanly_in_every_command(tmp_path_factory, ops, verb):
    """A byte-mutated model through inspect, locate, patch, verify or diff: a RectifyError's
    one line and exit 2 (or 0/1 when the mutation left a usable model), inputs untouched,
    nothing written but patch's own output."""
    from tests.hostile_cases import run

    folder = tmp_path_factory.mktemp("fuzzcli")
    files = _samples(folder / "samples")
    good = _save(tiny_model(), folder / "good.onnx")
    path = folder / "m.onnx"
    path.write_bytes(_mutate(HOSTILE_BYTES, ops))
    (folder / "out").mkdir()
    before = snapshot(folder)
    inputs = {k: v for k, v in before.items() if not k.startswith(str(folder / "out"))}
    result = run(command(verb, path, good, files, folder / "out"))
    _check_clean_failure(result, inputs, before, folder, allowed_new=("out.onnx",))


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=mutations.map(lambda o: o), which=st.sampled_from(["pairs", "eval"]),
       verb=st.sampled_from(["locate", "verify"]))
def test_mutated_sample_files_fail_cleanly_in_every_command(tmp_path_factory, ops, which, verb):
    """Byte-mutated npz files (zip CRCs, headers, data) through locate and verify."""
    from tests.hostile_cases import run

    folder = tmp_path_factory.mktemp("fuzznpz")
    files = _samples(folder / "samples")
    target = files[which]
    target.write_bytes(_mutate(target.read_bytes(), [(k, p % max(target.stat().st_size, 1), v)
                                                     for k, p, v in ops]))
    model = _save(tiny_model(), folder / "m.onnx")
    before = snapshot(folder)
    args = (["locate", str(model), "--pairs", str(files["pairs"]), "--eval", str(files["eval"]),
             "--steps", "2", "--transplant", "none", "--device", "cpu"] if verb == "locate" else
            ["verify", str(model), "--base", str(model), "--eval", str(files["eval"]),
             "--pairs", str(files["pairs"]), "--provider", "cpu"])
    _check_clean_failure(run(args), before, before, folder)


# ---------------------------------------------------------------- option values and npz containers
def _assert_clean_exit(result, folder_before, folder) -> None:
    """No exit 3, no traceback; a refusal (exit 2) is one 'onnx-rectify: error:' line (click's
    usage errors included); nothing written."""
    text = result.stdout + result.stderr
    assert "Traceback" not in text and "internal error" not in text, text
    assert result.exit_code in (0, 1, 2), text
    if result.exit_code == 2:
        lines = result.stderr.strip().splitlines()
        ours = [l for l in lines if l.startswith("onnx-rectify: error: ")]
        assert ours == lines and len(ours) == 1, text
    assert snapshot(folder) == folder_before


_INTS = st.one_of(st.integers(-3, 3), st.integers(-(2 ** 70), 2 ** 70),
                  st.sampled_from([2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 63, -(2 ** 63)]))
_TEXT = st.one_of(_INTS.map(str), st.sampled_from(["", " ", "nan", "inf", "-inf", "1e309", "0x10",
                                                   "1_0", "٣", "2.5", "1e3"]))
_SHAPES = st.one_of(
    st.lists(st.integers(-2, 1 << 20).map(str), min_size=0, max_size=6).map(",".join),
    st.text(alphabet="0123456789,=x -", max_size=12)).map(lambda dims: f"x={dims}")


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=_TEXT, batch=_TEXT, shape=st.one_of(st.none(), _SHAPES))
def test_inspect_option_values_fail_cleanly(tmp_path_factory, seed, batch, shape):
    """Any --seed, --batch and --input-shape text: a clean run or a one-line refusal."""
    from tests.hostile_cases import run

    folder = tmp_path_factory.mktemp("fuzzopt")
    model = _save(tiny_model(), folder / "m.onnx")
    before = snapshot(folder)
    args = ["inspect", str(model), "--provider", "cpu", "--seed", seed, "--batch", batch]
    if shape is not None:
        args += ["--input-shape", shape]
    _assert_clean_exit(run(args), before, folder)


@settings(max_examples=20, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(option=st.sampled_from(["--steps", "--seed", "--transplant-count", "--heldout-count",
                               "--stat-rows", "--top-fraction"]), value=_TEXT)
def test_locate_option_values_fail_cleanly(tmp_path_factory, option, value):
    from tests.hostile_cases import run

    folder = tmp_path_factory.mktemp("fuzzloc")
    files = _samples(folder / "samples")
    model = _save(tiny_model(), folder / "m.onnx")
    before = snapshot(folder)
    args = ["locate", str(model), "--pairs", str(files["pairs"]), "--device", "cpu",
            "--transplant", "none", *(["--steps", "2"] if option != "--steps" else []),
            option, value]
    _assert_clean_exit(run(args), before, folder)


_DTYPES = st.sampled_from(["<f4", "<f8", "<f2", "|i1", "<i8", "|u1", "<u8", "|b1", "<c8",
                           "<U3", "|S2", "|O", "|V4", "<M8[s]", "[('a', '<f4')]", ">f4", "zz"])
_DIMS = st.lists(st.one_of(st.integers(0, 5), st.integers(-3, -1), st.integers(1 << 31, 1 << 62)),
                 min_size=0, max_size=5)


def _member(kind: str, dtype: str, dims: list[int], payload: bytes, data: np.ndarray) -> bytes:
    """One .npy member: a real array, a header with arbitrary dtype/shape and payload bytes,
    or raw random bytes."""
    if kind == "array":
        buf = io.BytesIO()
        np.save(buf, data)
        return buf.getvalue()
    if kind == "header":
        header = ("{'descr': %s, 'fortran_order': False, 'shape': (%s), }"
                  % (dtype if dtype.startswith("[") else repr(dtype),
                     "".join(f"{d}," for d in dims)))
        header = header + " " * (-(len(header) + 11) % 64) + "\n"
        return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + payload
    return payload


_MEMBERS = st.tuples(st.sampled_from(["array", "header", "bytes"]), _DTYPES, _DIMS,
                     st.binary(max_size=256))


def _zip_edit(data: bytes, edit: str | None, at: int) -> bytes:
    """Mark the members encrypted, give them an unknown compression method, or flip a byte
    of the (deflated) payload of the first member."""
    out = bytearray(data)
    if edit is None:
        return data
    local = [i for i in range(len(out)) if out.startswith(b"PK\x03\x04", i)]
    central = [i for i in range(len(out)) if out.startswith(b"PK\x01\x02", i)]
    if edit == "flip":
        name_len, extra_len = struct.unpack("<HH", out[26:30])
        start = 30 + name_len + extra_len
        size = struct.unpack("<I", out[18:22])[0]
        if size:
            out[start + at % size] ^= 0x55
        return bytes(out)
    for lo, ce in zip(local, central):
        if edit == "encrypt":
            out[lo + 6] |= 1
            out[ce + 8] |= 1
        else:
            out[lo + 8:lo + 10] = struct.pack("<H", 99)
            out[ce + 10:ce + 12] = struct.pack("<H", 99)
    return bytes(out)


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(members=st.fixed_dictionaries({k: _MEMBERS for k in ("corrupted", "clean", "label")}),
       compress=st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]),
       edit=st.sampled_from([None, None, "encrypt", "method", "flip"]),
       at=st.integers(0, 1 << 16),
       shape=st.sampled_from([(3, 1, 16, 16), (3, 1, 16, 15), (0, 1, 16, 16), (3, 16, 16)]),
       dtype=st.sampled_from([np.float32, np.float64, np.float16, np.int32, np.uint8]),
       scale=st.sampled_from([1.0, 1e300, np.nan, -np.inf]))
def test_npz_containers_raise_only_rectify_errors(tmp_path_factory, members, compress, edit,
                                                  at, shape, dtype, scale):
    """Random members (arrays of random shapes and dtypes, .npy headers declaring any dtype
    and shape over random bytes, random bytes) in a stored or deflated zip, whose members
    may be flagged encrypted, use an unknown compression method or have a flipped byte:
    load_pairs loads it (finite float32 images) or raises one RectifyError line with exit
    code 2, and no numpy warning."""
    import warnings

    folder = tmp_path_factory.mktemp("fuzzzip")
    rng = np.random.default_rng(0)
    base = rng.random(shape)
    arrays = {"corrupted": (base + 0.5) * scale, "clean": base, "label": np.array([0, 1, 2])}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compress) as zf:
        for key, (kind, descr, dims, payload) in members.items():
            with np.errstate(all="ignore"):
                data = np.asarray(arrays[key]).astype(dtype)
            zf.writestr(f"{key}.npy", _member(kind, descr, dims, payload, data))
    content = _zip_edit(buf.getvalue(), edit, at)
    path = folder / "pairs.npz"
    path.write_bytes(content)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        try:
            pairs = load_pairs(path, SPEC, 4)
        except RectifyError as exc:
            assert exc.exit_code == 2 and "\n" not in str(exc)
        else:
            assert np.isfinite(pairs.clean).all() and np.isfinite(pairs.corrupted).all()
            assert pairs.clean.dtype == np.float32
    assert path.read_bytes() == content


@settings(max_examples=20, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(members=st.fixed_dictionaries({k: _MEMBERS for k in ("x", "y")}),
       compress=st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))
def test_npz_containers_fail_cleanly_in_verify(tmp_path_factory, members, compress):
    """The same random containers as the eval set of verify, through the CLI."""
    from tests.hostile_cases import run

    folder = tmp_path_factory.mktemp("fuzzeval")
    files = _samples(folder / "samples")
    model = _save(tiny_model(), folder / "m.onnx")
    good = {"x": np.random.default_rng(0).random((6, 1, 4, 4), dtype=np.float32),
            "y": np.array([0, 1, 2, 0, 1, 2])}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compress) as zf:
        for key, (kind, descr, dims, payload) in members.items():
            zf.writestr(f"{key}.npy", _member(kind, descr, dims, payload, good[key]))
    files["eval"].write_bytes(buf.getvalue())
    before = snapshot(folder)
    _assert_clean_exit(run(["verify", str(model), "--base", str(model), "--eval",
                            str(files["eval"]), "--provider", "cpu"]), before, folder)
