"""Property-based fuzzing: mutated model and sample files fail only with a RectifyError
(one line, exit code 2; or 1 when the model still loads but a check fails), never a
traceback or an internal error, and the input files stay byte-identical."""
from __future__ import annotations

import io
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
