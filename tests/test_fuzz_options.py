"""Property-based fuzzing of option values (issue 19, class 8), beside the model-byte fuzzing
of tests/test_fuzz.py: every numeric option accepts exactly its documented range (below,
written out here, not read from the code) and refuses everything else with exit 2 and
click's one ``Error:`` line naming the option; ``--input-shape`` text never gets past its
parser unless it is a list of dimensions in range. Never a traceback or an internal error.

The model path does not exist, so an accepted value is seen as the command's own refusal
of the missing file (one ``onnx-rectify: error:`` line) and no work is ever done."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from patcher.cli import main

#: verb -> option -> (type, lowest, highest, lowest excluded): the README's ranges
RANGES = {
    "inspect": {"--seed": (int, 0, 2**32 - 1, False), "--batch": (int, 1, 1024, False)},
    "locate": {"--steps": (int, 1, 1024, False), "--transplant-count": (int, 1, 10000, False),
               "--heldout-count": (int, 1, 10000, False), "--seed": (int, 0, 2**32 - 1, False),
               "--stat-rows": (int, 1, 2**24, False), "--top-fraction": (float, 0, 1, True)},
    "patch": {"--steps": (int, 1, 1024, False), "--transplant-count": (int, 1, 10000, False),
              "--heldout-count": (int, 1, 10000, False), "--seed": (int, 0, 2**32 - 1, False),
              "--stat-rows": (int, 1, 2**24, False), "--budget": (float, 0, 1, False),
              "--gap": (float, 0, 1, False), "--max-rounds": (int, 0, 100, False),
              "--care-neurons": (int, 1, 2**20, False),
              "--care-min-multiplier": (float, -1000, 1000, False),
              "--care-max-multiplier": (float, -1000, 1000, False),
              "--care-triggered": (int, 0, 100000, False),
              "--care-eval": (int, 1, 100000, False), "--care-alpha": (float, 0, 1, False),
              "--care-particles": (int, 1, 1000, False),
              "--care-iterations": (int, 0, 10000, False),
              "--care-patience": (int, 1, 10000, False)},
    "verify": {"--max-accuracy-drop": (float, 0, 1, False), "--max-asr": (float, 0, 1, False),
               "--max-gap": (float, 0, 1, False)},
    "export": {"--opset": (int, 7, 23, False)},
}
OPTIONS = [(verb, option) for verb, options in RANGES.items() for option in options]


def _command(verb: str, folder: Path) -> list[str]:
    missing = str(folder / "missing.onnx")
    return {
        "inspect": ["inspect", missing],
        "locate": ["locate", missing, "--pairs", str(folder / "p.npz")],
        "patch": ["patch", missing, "--pairs", str(folder / "p.npz"), "--eval",
                  str(folder / "e.npz")],
        "verify": ["verify", missing, "--base", missing, "--eval", str(folder / "e.npz")],
        "export": ["export", "no_such_module_h19:make", "--input-shape", "1,1,4,4", "-o",
                   str(folder / "x.onnx")],
    }[verb]


def _accepted(kind, lo, hi, lo_open, text: str) -> bool:
    try:
        value = kind(text)
    except ValueError:
        return False
    if isinstance(value, float) and math.isnan(value):
        return False
    return (lo < value if lo_open else lo <= value) and value <= hi


def _number_text(kind, lo, hi):
    near = st.integers(lo - 3, hi + 3).map(str)
    wide = st.integers(-2**70, 2**70).map(str)
    odd = st.sampled_from(["", " ", "1.5", "0x10", "1_0", "\u0661", " 3", "-0", "+2", "nan",
                           "inf", "-inf", "1e309", "1e-300", "0.0", "1.0", "0.5", "abc"])
    floats = st.floats(allow_nan=True, allow_infinity=True).map(repr)
    return st.one_of(near, wide, odd, floats) if kind is float else st.one_of(near, wide, odd)


def _check(verb: str, option: str, text: str, folder: Path) -> None:
    kind, lo, hi, lo_open = RANGES[verb][option]
    result = CliRunner().invoke(main, [*_command(verb, folder), option, text])
    output = result.stdout + result.stderr
    assert result.exit_code == 2, output
    assert "Traceback" not in output and "internal error" not in output, output
    errors = result.stderr.splitlines()
    assert len(errors) == 1 and errors[0].startswith("onnx-rectify: error: "), result.stderr
    usage_error = errors[0].startswith(f"onnx-rectify: error: Invalid value for '{option}'")
    # a value inside the documented range passes click and is refused by the verb itself
    assert usage_error != _accepted(kind, lo, hi, lo_open, text), (option, text, errors[0])
    assert sorted(p.name for p in folder.iterdir()) == []


@pytest.mark.parametrize("verb,option", OPTIONS)
def test_numeric_options_at_the_edges_of_their_range(tmp_path, verb, option):
    kind, lo, hi, lo_open = RANGES[verb][option]
    step = 1 if kind is int else 1e-6
    for value in (lo - step, lo, lo + step, hi - step, hi, hi + step):
        _check(verb, option, str(value), tmp_path)


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_numeric_options_accept_exactly_their_range(tmp_path, data):
    verb, option = data.draw(st.sampled_from(OPTIONS))
    kind, lo, hi, lo_open = RANGES[verb][option]
    text = data.draw(_number_text(kind, lo, hi))
    _check(verb, option, text, tmp_path)


shape_text = st.one_of(
    st.text(alphabet="x=,0123456789-_ .\u0661e+", max_size=30),
    st.lists(st.integers(-5, 2**40), min_size=0, max_size=7).map(
        lambda dims: "x=" + ",".join(map(str, dims))))


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=shape_text, verb=st.sampled_from(["inspect", "export"]))
def test_input_shape_text_is_refused_in_one_line_or_parsed_in_range(tmp_path, text, verb):
    args = _command(verb, tmp_path)
    if verb == "export":  # export's --input-shape has no NAME=
        args[args.index("--input-shape") + 1] = text.removeprefix("x=")
    else:
        args += ["--input-shape", text]
    result = CliRunner().invoke(main, args)
    output = result.stdout + result.stderr
    assert result.exit_code == 2, output
    assert "Traceback" not in output and "internal error" not in output, output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnx-rectify: error:"), result.stderr
    if verb == "export":
        name, dims = "-", text.removeprefix("x=")
    else:
        name, _, dims = text.rpartition("=")
    try:
        shape = [int(d) for d in dims.split(",")]
    except ValueError:
        shape = []
    in_range = (bool(shape) and bool(name) and min(shape) >= 1 and max(shape) <= 1 << 16
                and math.prod(shape) <= 1 << 27)
    if not in_range:
        assert "--input-shape" in lines[0], (text, lines[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == []
