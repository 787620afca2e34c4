"""The library API (patcher.api, exported as patcher.patch/locate/verify/inspect): paths,
arrays and in-memory models give the same results; options are keyword-only with the
CLI's defaults, ranges and choices; bad arrays and options are refused as files are."""
from __future__ import annotations

import inspect as pyinspect
import shutil
from pathlib import Path

import click
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import patcher
from patcher import api
from patcher.cli import main
from patcher.errors import BadModelError, BadSamplesError, RectifyError

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "backdoor_cnn"
#: A patch that costs seconds: one rank-one edit at the last layer.
QUICK = {"strategy": "static", "show_progress": False}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The backdoor sample's model and one pair, 64 eval and 64 attack images, as files in
    a folder of their own and as arrays."""
    folder = tmp_path_factory.mktemp("api")
    shutil.copy2(SAMPLE / "model.onnx", folder / "model.onnx")
    shutil.copy2(SAMPLE / "pairs_n1.npz", folder / "pairs.npz")
    with np.load(SAMPLE / "eval.npz") as e:
        np.savez(folder / "eval.npz", x=e["x"][:64], y=e["y"][:64])
    with np.load(SAMPLE / "attack.npz") as a:
        np.savez(folder / "attack.npz", x=a["x"][:64], y=a["y"][:64], target=a["target"])
    arrays = {name: dict(np.load(folder / f"{name}.npz")) for name in ("pairs", "eval", "attack")}
    return folder, arrays


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_paths_arrays_and_a_model_proto_patch_alike(files, tmp_path):
    folder, arrays = files
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    by_path = api.patch(folder / "model.onnx", folder / "pairs.npz", folder / "eval.npz",
                        attack=folder / "attack.npz", out=tmp_path / "fixed.onnx", **QUICK)
    p, a = arrays["pairs"], arrays["attack"]
    in_memory = patcher.patch(onnx.load(str(folder / "model.onnx")),
                              (p["corrupted"], p["clean"], p["label"]), arrays["eval"],
                              attack=(a["x"], a["y"], int(a["target"])), **QUICK)
    assert by_path.output == tmp_path / "fixed.onnx" and by_path.model is None
    assert in_memory.output is None and isinstance(in_memory.model, onnx.ModelProto)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fixed.onnx"]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # nothing written there
    written = weights(onnx.load(str(tmp_path / "fixed.onnx")))
    kept = weights(in_memory.model)
    assert written.keys() == kept.keys()
    assert all(np.array_equal(written[k], kept[k]) for k in written)
    changed = [k for k, w in weights(onnx.load(str(folder / "model.onnx"))).items()
               if not np.array_equal(w, written[k])]
    assert len(changed) == 1  # one rank-one edit
    for figure in ("passed", "accuracy_before", "accuracy_after", "pair_gap_before",
                   "pair_gap_after", "asr_before", "asr_after", "layers"):
        assert getattr(by_path, figure) == getattr(in_memory, figure), figure
    assert by_path.layers == ["/classifier.2/Gemm"] and len(by_path.edits) == 1
    assert by_path.pair_gap_after < by_path.pair_gap_before
    assert 0 <= by_path.asr_after < by_path.asr_before
    assert by_path.accuracy_drop == by_path.accuracy_before - by_path.accuracy_after
    assert {"load", "rectify", "verify", "total"} <= set(by_path.timings)
    assert by_path.report.verification.parity["within_tolerance"]


def test_verify_and_locate_take_paths_or_arrays_alike(files, tmp_path):
    folder, arrays = files
    fixed = api.patch(folder / "model.onnx", folder / "pairs.npz", folder / "eval.npz",
                      out=tmp_path / "fixed.onnx", **QUICK)
    from_files = api.verify(fixed.output, base=folder / "model.onnx", eval=folder / "eval.npz",
                            attack=folder / "attack.npz", pairs=folder / "pairs.npz")
    from_arrays = api.verify(onnx.load(str(fixed.output)),
                             base=onnx.load(str(folder / "model.onnx")), eval=arrays["eval"],
                             attack=arrays["attack"], pairs=arrays["pairs"])
    assert [c.name for c in from_files.checks] == [c.name for c in from_arrays.checks]
    for c, d in zip(from_files.checks, from_arrays.checks):
        if c.name not in ("latency", "load"):  # wall time; file hashes (none in memory)
            assert (c.passed, c.figures) == (d.passed, d.figures), c.name
    assert from_files.skipped == from_arrays.skipped == {}
    options = {"steps": 2, "transplant_count": 4, "heldout_count": 4, "show_progress": False}
    ranked = api.locate(folder / "model.onnx", folder / "pairs.npz", eval=folder / "eval.npz",
                        **options)
    again = api.locate(onnx.load(str(folder / "model.onnx")), arrays["pairs"],
                       eval=arrays["eval"], **options)
    assert ranked.method == "attribution" and ranked.layers == again.layers
    assert [s.score for s in ranked.ranking] == pytest.approx([s.score for s in again.ranking])
    assert set(ranked.layers) == {"/classifier.0/Gemm", "/classifier.2/Gemm",
                                  "/features.0.0/Conv", "/features.2.0/Conv",
                                  "/features.3.0/Conv"}
    fewer = api.locate(folder / "model.onnx", folder / "pairs.npz", eval=folder / "eval.npz",
                       exclude_layers="/classifier.2/Gemm", max_memory="64G", **options)
    assert fewer.layers == [n for n in ranked.layers if n != "/classifier.2/Gemm"]


def test_inspect_describes_a_path_or_a_model_proto(files):
    folder, _ = files
    by_path = patcher.inspect(folder / "model.onnx", seed=3)
    in_memory = patcher.inspect(onnx.load(str(folder / "model.onnx")), seed=3)
    assert by_path.path == str(folder / "model.onnx") and in_memory.path is None
    assert by_path.editable_layers == in_memory.editable_layers
    assert len(by_path.editable_layers) == 5 and by_path.parity.passed
    assert by_path.parity.max_abs_diff == in_memory.parity.max_abs_diff
    assert patcher.inspect(folder / "model.onnx", parity=False).parity is None


# --- keyword-only options with the CLI's defaults ----------------------------------------

#: API keyword -> the CLI option's parameter name, where the two differ.
CLI_NAME = {"calib": "calib_path", "eval": "eval_path", "attack": "attack_path",
            "pairs": "pairs_path", "out": "output", "gap": "gap_target",
            "attribution_form": "attribution", "base": "base_path"}
#: Keywords only the API has (the CLI decides these by its own means: a terminal, stderr).
API_ONLY = {"show_progress", "log"}
#: The CLI's options that write files or set its output, which the API returns instead.
CLI_ONLY = {"json_path", "junit_path", "report_path", "report_dir", "quiet", "verbose"}
VERBS = {"patch": api.patch, "locate": api.locate, "verify": api.verify,
         "inspect": api.inspect}


def cli_default(command: click.Command, option: click.Option):
    """The value the verb gets when the option is not given (click's own resolution)."""
    return option.get_default(click.Context(command), call=True)


def keywords(fn) -> dict[str, pyinspect.Parameter]:
    return {n: p for n, p in pyinspect.signature(fn).parameters.items()
            if p.kind is p.KEYWORD_ONLY}


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_options_are_keyword_only_with_the_cli_defaults(verb):
    fn, command = VERBS[verb], main.commands[verb]
    params = pyinspect.signature(fn).parameters
    positional = [n for n, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert all(params[n].default is pyinspect.Parameter.empty for n in positional)
    assert len(positional) <= 3  # the model and the data sets, nothing else
    cli = {p.name: p for p in command.params if isinstance(p, click.Option)}
    compared = 0
    for name, param in keywords(fn).items():
        if name in API_ONLY:
            continue
        if verb == "inspect" and name == "parity":  # the CLI's flag says the opposite
            assert param.default is True and cli_default(command, cli["no_parity"]) is False
            continue
        option = cli[CLI_NAME.get(name, name)]
        if option.required:
            assert param.default is pyinspect.Parameter.empty, name
        else:
            default = cli_default(command, option)
            if option.multiple:  # a repeatable option: none given is an empty list
                given = default if isinstance(default, (list, tuple)) else ()  # click: UNSET
                assert tuple(param.default or ()) == tuple(given), name
            else:
                assert param.default == default, (name, param.default, default)
        compared += 1
    assert compared >= 3
    api_names = {CLI_NAME.get(n, n) for n in params} | {"no_parity"}
    assert set(cli) - api_names <= CLI_ONLY, set(cli) - api_names  # every option is there


def test_patch_aims_for_what_verify_gates_by_default():
    patch_kw, verify_kw = keywords(api.patch), keywords(api.verify)
    assert patch_kw["budget"].default == verify_kw["max_accuracy_drop"].default == 0.01
    assert patch_kw["gap"].default <= verify_kw["max_gap"].default


def test_options_cannot_be_given_by_position(files):
    folder, _ = files
    with pytest.raises(TypeError):
        api.patch(folder / "model.onnx", folder / "pairs.npz", folder / "eval.npz",
                  folder / "out.onnx")
    with pytest.raises(TypeError):
        api.verify(folder / "model.onnx", folder / "model.onnx", folder / "eval.npz")
    with pytest.raises(TypeError):
        api.inspect(folder / "model.onnx", False)


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_ranges_and_choices_are_the_clis(verb):
    command = main.commands[verb]
    names = {CLI_NAME.get(n, n): n for n in keywords(VERBS[verb])}
    for option in command.params:
        name = names.get(option.name)
        if name is None:
            continue
        kind = option.type
        if isinstance(kind, click.Choice):
            assert tuple(kind.choices) == tuple(api.CHOICES[name]), name
        elif isinstance(kind, (click.IntRange, click.FloatRange)):
            ranges = {**api.RANGES, **api.VERB_RANGES.get(verb, {})}
            assert ranges[name] == (kind.min, kind.max, bool(kind.min_open)), name
            assert not kind.max_open


@pytest.mark.parametrize("options, message", [
    ({"budget": -1}, "budget=-1: expected a value in [0.0, 1.0]"),
    ({"budget": float("nan")}, "budget=nan: expected a number"),
    ({"gap": "0.1"}, "gap='0.1': expected a number"),
    ({"steps": 0}, "steps=0: expected a value in [1, 1024]"),
    ({"steps": 2.5}, "steps=2.5: expected an integer"),
    ({"seed": True}, "seed=True: expected an integer"),
    ({"strategy": "fast"}, "strategy='fast': expected one of 'dynamic', "),
    ({"device": "tpu"}, "device='tpu': expected one of 'auto', 'cpu', 'cuda'"),
    ({"max_memory": "lots"}, "max_memory='lots': not a size (e.g. 4G"),
    ({"max_memory": 0}, "max_memory=0: expected bytes"),
    ({"exclude_layers": [3]}, "exclude_layers=[3]: expected layer (node) names"),
])
def test_bad_options_are_refused_in_one_line(files, options, message):
    folder, _ = files
    with pytest.raises(RectifyError) as info:  # before anything is read: no such model
        api.patch(folder / "missing.onnx", folder / "pairs.npz", folder / "eval.npz",
                  **options)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    assert info.value.exit_code == 2


# --- arrays get the checks files get -----------------------------------------------------

def _bad_sets(arrays):
    p, e = arrays["pairs"], arrays["eval"]
    nan = e["x"].copy()
    nan[0, 0, 0, 0] = np.nan
    huge = e["x"].astype(np.float64)
    huge[1, 0, 3, 3] = 1e300
    return [
        ("eval", {"x": nan, "y": e["y"]}, "eval: 'x': contains NaN or Inf"),
        ("eval", (huge, e["y"]), "eval: 'x': values beyond the range of float32"),
        ("eval", (e["x"], e["y"] + 10), "eval: 'y': labels must lie in 0..9"),
        ("eval", (e["x"], e["y"].astype(np.float32)), "eval: 'y': dtype float32, expected "
         "integer labels"),
        ("eval", (e["x"][:, 0], e["y"]), "eval: 'x': shape [64, 28, 28] has rank 3"),
        ("eval", (e["x"], e["y"][:5]), "eval: 'y': 5 labels for 64 samples"),
        ("eval", (e["x"].astype(np.int64), e["y"]), "eval: 'x': dtype int64, expected "
         "float32 images"),
        ("eval", (e["x"],), "eval: expected (x, y), got a sequence of 1"),
        ("eval", {"x": e["x"]}, "eval: missing key(s) y (has: x)"),
        ("eval", 42, "eval: expected an npz path, (x, y) arrays or a mapping"),
        ("pairs", ([[0.0], [0.0, 1.0]], p["clean"], p["label"]), "pairs: 'corrupted' is "
         "not an array"),
        ("pairs", (p["clean"], p["clean"], p["label"]), "pairs: every corrupted sample "
         "equals its clean one"),
        ("pairs", (p["corrupted"][:, :, :14], p["clean"], p["label"]), "pairs: 'corrupted': "
         "shape [1, 1, 14, 28] does not fit"),
        ("attack", (e["x"], e["y"], np.array([0, 1])), "attack: 'target' must be one integer"),
        ("calib", (e["x"], e["y"] - 1), "calib: 'y': labels must lie in 0..9"),
    ]


def test_bad_arrays_are_refused_like_bad_files(files, tmp_path):
    folder, arrays = files
    given = {"pairs": arrays["pairs"], "eval": arrays["eval"]}
    for where, bad, message in _bad_sets(arrays):
        snapshot = {k: v.copy() for k, v in arrays["eval"].items()}
        sets = {**given, where: bad}
        with pytest.raises(BadSamplesError) as info:
            api.patch(folder / "model.onnx", sets.pop("pairs"), sets.pop("eval"),
                      out=tmp_path / "never.onnx", **sets, **QUICK)
        assert str(info.value).startswith(message), (str(info.value), message)
        assert "\n" not in str(info.value) and info.value.exit_code == 2
        assert all(np.array_equal(snapshot[k], arrays["eval"][k]) for k in snapshot)
    assert list(tmp_path.iterdir()) == []


def test_verify_and_locate_refuse_bad_arrays_by_their_keyword(files):
    folder, arrays = files
    e = arrays["eval"]
    with pytest.raises(BadSamplesError, match=r"^eval: 'y': labels must lie in 0\.\.9"):
        api.verify(folder / "model.onnx", base=folder / "model.onnx", eval=(e["x"], e["y"] * 0 + 99))
    with pytest.raises(BadSamplesError, match=r"^pairs: 'label': labels must lie"):
        api.verify(folder / "model.onnx", base=folder / "model.onnx", eval=e,
                   pairs={**arrays["pairs"], "label": np.array([12])})
    with pytest.raises(BadSamplesError, match=r"^pairs: 'clean': contains NaN"):
        p = arrays["pairs"]
        api.locate(folder / "model.onnx", (p["corrupted"], p["clean"] * np.nan, p["label"]))


def test_a_model_that_is_neither_a_path_nor_a_proto_is_refused(files):
    folder, arrays = files
    for call in (lambda: api.patch(b"bytes", arrays["pairs"], arrays["eval"]),
                 lambda: api.inspect(3),
                 lambda: api.verify(folder / "model.onnx", base=None, eval=arrays["eval"])):
        with pytest.raises(BadModelError, match="expected a path or an onnx.ModelProto"):
            call()
    with pytest.raises(BadModelError, match="no such file"):
        api.inspect(folder / "missing.onnx")


def test_inspect_lists_unsupported_nodes_instead_of_refusing():
    from onnx import TensorProto, helper

    weight = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Hardmax", ["h"], ["y"], axis=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["n", 4])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, ["n", 3])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              ir_version=8)
    summary = api.inspect(model)
    assert summary.unsupported == ["Hardmax (domain ai.onnx, opset 17) at node 'Hardmax_1'"]
    assert summary.parity is None and summary.op_histogram == {"MatMul": 1, "Hardmax": 1}


def test_patcher_patch_is_the_api_and_still_the_pipeline_module():
    import patcher.patch as pipeline

    assert patcher.patch is pipeline and callable(pipeline)
    assert pipeline.load_inputs and pipeline.COMPLETENESS_LIMIT  # the module's own names
    assert pyinspect.signature(patcher.patch) == pyinspect.signature(api.patch)
    assert {"patch", "locate", "verify", "inspect", "PatchResult",
            "LocateResult"} <= set(patcher.__all__)


def test_every_keyword_a_library_warning_names_is_a_keyword_of_the_api():
    """Warnings name their remedies by keyword (progress.Remedy); each is one a caller of
    patch or locate can pass."""
    import re

    package = Path(patcher.__file__).parent
    named = {m for p in package.rglob("*.py") if p.parent.name != "cli"
             for m in re.findall(r"Remedy\(\s*\"(\w+)\"", p.read_text())}
    assert named, "no Remedy found: the warnings' wording moved"
    accepted = set(pyinspect.signature(api.patch).parameters) | set(
        pyinspect.signature(api.locate).parameters)
    assert named <= accepted, named - accepted


def test_the_api_and_the_cli_with_their_defaults_write_the_same_model(files, tmp_path):
    """Behaviour, not only signatures: the verb and the function, each with only the model,
    the data and the strategy given, write the same weights and pass or fail alike."""
    from click.testing import CliRunner

    folder, _ = files
    by_api = api.patch(folder / "model.onnx", folder / "pairs.npz", folder / "eval.npz",
                       out=tmp_path / "api.onnx", **QUICK)
    outcome = CliRunner().invoke(main, [
        "patch", str(folder / "model.onnx"), "--pairs", str(folder / "pairs.npz"), "--eval",
        str(folder / "eval.npz"), "--strategy", "static", "-o", str(tmp_path / "cli.onnx"),
        "--quiet"])
    assert outcome.exit_code == (0 if by_api.passed else 1), outcome.output
    a, b = (weights(onnx.load(str(tmp_path / name))) for name in ("api.onnx", "cli.onnx"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_an_output_that_is_an_input_is_refused_naming_the_keywords(files):
    folder, _ = files
    before = (folder / "eval.npz").read_bytes()
    with pytest.raises(RectifyError, match=r"^out \(.*eval\.npz\) and eval \(.*\) are the same "
                       r"file: the output would overwrite an input file; choose another out$"):
        api.patch(folder / "model.onnx", folder / "pairs.npz", folder / "eval.npz",
                  out=folder / "eval.npz", force=True, **QUICK)
    assert (folder / "eval.npz").read_bytes() == before


def test_refusals_name_keyword_arguments_not_cli_flags(files, tmp_path):
    """The checks are shared with the CLI, which names its flags; through the API the same
    refusals name the keyword arguments (``layer``, ``force=True``)."""
    from patcher.api import _keyword_text

    assert _keyword_text("pass --force to overwrite it") == "pass force=True to overwrite it"
    assert _keyword_text("--exclude-layer 'x' is not an editable layer; --attribution "
                         "path") == "exclude_layers 'x' is not an editable layer; " \
                                    "attribution_form path"
    folder, _ = files
    out = tmp_path / "taken.onnx"
    out.write_bytes(b"an earlier result")
    with pytest.raises(RectifyError) as refused:
        patcher.patch(folder / "model.onnx", folder / "pairs.npz", folder / "eval.npz", out=out,
                      **QUICK)
    assert "force=True" in str(refused.value) and "--" not in str(refused.value)
    assert out.read_bytes() == b"an earlier result"
    with pytest.raises(RectifyError) as unknown:
        patcher.patch(folder / "model.onnx", folder / "pairs.npz", folder / "eval.npz",
                      layer="no_such_layer", **QUICK)
    assert str(unknown.value).startswith("layer 'no_such_layer'"), str(unknown.value)
