"""The HTML patch report (patcher.gate.report) from a real patch of samples/backdoor_cnn."""
from __future__ import annotations

import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from patcher.errors import RectifyError

pytest.importorskip("matplotlib", reason="the HTML report needs the 'report' extra "
                    "(pip install 'onnx-rectify[report]'): matplotlib is not installed")
pytest.importorskip("PIL", reason="the HTML report needs the 'report' extra "
                    "(pip install 'onnx-rectify[report]'): Pillow is not installed")

from PIL import Image  # noqa: E402

from patcher.patch import patch  # noqa: E402
from patcher.rectify import RectifyConfig  # noqa: E402
from patcher.gate.report import write_report  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "backdoor_cnn"


class _Page(HTMLParser):
    """Tables as lists of rows of cell text, image sources, and every external reference."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.images: list[str] = []
        self.external: list[str] = []
        self.scripts = 0
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr" and self.tables:
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(attrs.get("src", ""))
        elif tag == "script":
            self.scripts += 1
        for key in ("src", "href"):
            if attrs.get(key) and ("//" in attrs[key] or attrs[key].startswith(("data:", "/"))):
                self.external.append(attrs[key])

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


@pytest.fixture(scope="module")
def patched(tmp_path_factory):
    folder = tmp_path_factory.mktemp("patched")
    report = patch(SAMPLE / "model.onnx", SAMPLE / "pairs_n1.npz", SAMPLE / "eval.npz", None,
                   folder / "patched.onnx", RectifyConfig(), device="cpu", provider="cpu")
    return report.as_dict()


def test_report_of_the_bundled_sample(patched, tmp_path):
    index = write_report(patched, tmp_path / "report", attack_path=SAMPLE / "attack.npz",
                         provider="cpu")
    assert index == tmp_path / "report" / "index.html" and index.is_file()
    page = _Page()
    page.feed(index.read_text(encoding="utf-8"))
    page.close()
    assert page.scripts == 0 and page.external == []

    rounds = next(t for t in page.tables if t and t[0][:2] == ["round", "layer"])
    assert len(rounds) == 1 + len(patched["result"]["rounds"])
    for row, rd in zip(rounds[1:], patched["result"]["rounds"]):
        assert row[0] == str(rd["index"]) and row[1] == rd["layer"]
        assert row[-1] == rd["reason"]
    checks = next(t for t in page.tables if t and t[0][:2] == ["check", "verdict"])
    names = [row[0] for row in checks[1:]]
    assert {"accuracy", "attack_success_rate", "pair_gap"} <= set(names)

    # the score chart, 4 panels for the one pair, 3 for each of the held-out attack inputs
    assert "scores.png" in page.images
    assert sum(src.startswith("pair1-") for src in page.images) == 4
    assert sum(src.startswith("attack") for src in page.images) >= 3
    for src in page.images:
        path = index.parent / src
        assert path.parent == index.parent and path.is_file(), src
        with Image.open(path) as im:
            im.verify()
            assert im.format == "PNG"


def test_text_is_escaped_and_missing_files_are_noted(tmp_path):
    nasty = "<script>alert(1)</script>"
    report = {"model": str(tmp_path / "gone.onnx"), "output": nasty, "pairs": "gone.npz",
              "eval": "None", "written": [nasty], "passed": False, "device": "cpu",
              "timings": {"total": 1.0},
              "result": {"strategy": "dynamic", "base_accuracy": 0.9, "base_gap": 0.5,
                         "final_accuracy": 0.9, "final_gap": 0.4, "met_target": False,
                         "rounds": [{"index": 1, "layer": nasty, "score": 2.0, "kept": False,
                                     "reason": "gap & accuracy", "gap_before": 0.5,
                                     "gap_after": 0.4, "accuracy": 0.9, "accuracy_drop": 0.0,
                                     "delta_norm": 1.0, "fit_residual_ratio": None}],
                         "scores": [{"layer": nasty, "score": 2.0, "completeness_error": 0.1}],
                         "edits": [], "timings": {}},
              "verification": {}}
    index = write_report(report, tmp_path / "out")
    text = index.read_text(encoding="utf-8")
    assert nasty not in text and "&lt;script&gt;" in text
    assert "no heatmaps: cannot find" in text and "was not run" in text
    page = _Page()
    page.feed(text)
    assert page.scripts == 0 and page.images == ["scores.png"]


def test_missing_libraries_say_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(RectifyError, match=r"pip install 'onnx-rectify\[report\]'"):
        write_report({"result": {}}, tmp_path)


def test_not_a_patch_report(tmp_path):
    with pytest.raises(RectifyError, match="not a patch report"):
        write_report({"checks": []}, tmp_path)


def test_patch_report_dir_and_report_verb(tmp_path):
    pytest.importorskip("matplotlib", reason="the HTML report needs onnx-rectify[report]")
    from click.testing import CliRunner

    from patcher.cli import main
    from patcher.demo import sample_folder

    sample = sample_folder()
    runner = CliRunner()
    out = runner.invoke(main, ["patch", str(sample / "model.onnx"), "--pairs",
                               str(sample / "pairs_n1.npz"), "--eval", str(sample / "eval.npz"),
                               "-o", str(tmp_path / "p.onnx"), "--report", str(tmp_path / "r.json"),
                               "--report-dir", str(tmp_path / "html"), "--device", "cpu",
                               "--provider", "cpu"])
    assert out.exit_code == 0, out.output
    assert (tmp_path / "html" / "index.html").is_file()
    again = runner.invoke(main, ["report", str(tmp_path / "r.json"), "-o", str(tmp_path / "html2"),
                                 "--attack", str(sample / "attack.npz"), "--device", "cpu"])
    assert again.exit_code == 0, again.output
    assert "attack" in (tmp_path / "html2" / "index.html").read_text().lower()


def test_an_attribution_objective_report_names_the_share(tmp_path):
    pytest.importorskip("matplotlib", reason="the HTML report needs onnx-rectify[report]")
    report = {"model": str(tmp_path / "gone.onnx"), "output": "out.onnx", "pairs": "gone.npz",
              "eval": "None", "written": [], "passed": True, "device": "cpu",
              "timings": {"total": 1.0},
              "result": {"strategy": "dynamic", "objective": "attribution",
                         "base_accuracy": 0.97, "base_gap": 0.44, "final_accuracy": 0.97,
                         "final_gap": 0.29, "met_target": True,
                         "gap_measured_on": "the 1 pairs and 100 eval images",
                         "rounds": [{"index": 1, "layer": "conv", "score": None, "kept": True,
                                     "reason": "silenced (beta 1)", "gap_before": 0.44,
                                     "gap_after": 0.29, "accuracy": 0.97,
                                     "accuracy_drop": 0.0, "delta_norm": 1.0,
                                     "fit_residual_ratio": None, "scale": 1.0}],
                         "scores": [], "edits": [], "timings": {}},
              "verification": {}}
    text = write_report(report, tmp_path / "out").read_text(encoding="utf-8")
    assert "attribution share before" in text and "attribution share after" in text
    assert "Integrated-Gradients mass on the corrupted region" in text
    assert "gap before" not in text


# ------------------------------------------------------------------ a two-class wide model
def two_class_wide_model(path: Path) -> Path:
    """x [N, 1, 48, 192] -> Flatten -> Gemm -> 2 scores: class 1 when the mean pixel is
    above 0.3 (a bright patch, the trigger, pushes dark images over it)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    d = 48 * 192
    w = np.stack([-np.full(d, 10.0 / d), np.full(d, 10.0 / d)]).astype(np.float32)
    b = np.array([1.5, -1.5], np.float32)  # equal scores at mean 0.15 * 2 = 0.3
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"], name="flatten"),
         helper.make_node("Gemm", ["f", "w", "b"], ["y"], name="head", transB=1)],
        "two_class", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 1, 48, 192])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


def _trigger(x):
    out = x.copy()
    out[:, :, 14:34, 40:120] = 1.0  # 1600 of 9216 pixels
    return out


def test_report_of_a_two_class_wide_model(tmp_path):
    """The issue's case: a two-class 48x192 model whose base ASR is high, where the first
    triggered inputs in the file do not fool it. Shown: only inputs that fool the base
    model, each at 384x96 (2x nearest, aspect kept), two to a line; the chart holds the
    10 best of 54 layers (and the edited one below them), the table all 54."""
    import numpy as np

    model = two_class_wide_model(tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    # darkest first: mean 0.02 + 0.17 * 0.98 < 0.3 is not fooled; 0.25 is
    means = np.linspace(0.02, 0.25, 12).astype(np.float32)
    x = (means[:, None, None, None] * np.ones((12, 1, 48, 192), np.float32)
         + rng.uniform(-0.01, 0.01, (12, 1, 48, 192)).astype(np.float32))
    attack_x = np.concatenate([_trigger(x), np.full((2, 1, 48, 192), 0.8, np.float32)])
    attack_y = np.array([0] * 12 + [1, 1])
    np.savez(tmp_path / "attack.npz", x=attack_x, y=attack_y, target=np.int64(1))
    np.savez(tmp_path / "pairs.npz", corrupted=_trigger(x[-1:]), clean=x[-1:],
             label=np.array([0]))
    base_pred = (attack_x.reshape(14, -1).mean(1) > 0.3).astype(int)
    assert base_pred[0] == 0 and base_pred[:12].sum() >= 5  # the file starts unfooled
    scores = [{"layer": f"L{i:02d}", "score": float(100 - i), "completeness_error": 0.0}
              for i in range(54)]
    report = {"model": str(model), "output": str(model), "pairs": str(tmp_path / "pairs.npz"),
              "eval": "None", "written": [str(model)], "passed": True, "device": "cpu",
              "timings": {}, "verification": {},
              "result": {"strategy": "dynamic", "base_accuracy": 1.0, "base_gap": 0.5,
                         "final_accuracy": 1.0, "final_gap": 0.0, "met_target": True,
                         "rounds": [], "scores": scores, "timings": {},
                         "edits": [{"layer": "L40"}]}}
    index = write_report(report, tmp_path / "out", attack_path=tmp_path / "attack.npz",
                         run_verify=False, steps=4)
    text = index.read_text(encoding="utf-8")
    page = _Page()
    page.feed(text)
    inputs = sorted(src for src in page.images if src.endswith("-input.png"))
    assert len(inputs) == 5  # max_pairs fooled examples of the one class present
    assert text.count("base model fooled") == 5 and "not fooled" not in text
    assert "(it is on " in text
    for src in inputs:
        with Image.open(index.parent / src) as im:
            assert im.size == (384, 96)
    assert '<div class="hm wide">' in text and 'width="384" height="96"' in text
    with Image.open(index.parent / "pair1-clean.png") as im:
        assert im.size == (384, 96)
    assert "The 10 best of 54 layers" in text
    table = next(t for t in page.tables if t and t[0][:2] == ["layer", "score"])
    assert len(table) == 1 + 54
    with Image.open(index.parent / "scores.png") as im:
        assert im.size[1] < 0.9 * 100 + 0.38 * 100 * 12  # 11 bars, not 54


def test_attack_examples_fool_the_base_model_one_per_class_first():
    import numpy as np

    from patcher.gate.report_images import choose_attack_examples

    y = np.array([0, 0, 0, 2, 2, 3, 3, 1])
    pred = np.array([0, 1, 1, 2, 1, 3, 3, 1])  # target 1: fooled at 1, 2, 4; class 3 never
    assert choose_attack_examples(y, 1, pred, 5) == [1, 2, 4, 5]
    assert choose_attack_examples(y, 1, pred, 1) == [1, 4, 5]  # one per class beats limit
    assert choose_attack_examples(y, 1, pred, 0) == [1, 4, 5]
    assert choose_attack_examples(np.array([1, 1]), 1, np.array([1, 1]), 5) == []


@pytest.mark.parametrize("shape, size", [((28, 28), (168, 168)), ((48, 192), (384, 96)),
                                         ((8, 640), (640, 8)), ((224, 224), (224, 224)),
                                         ((32, 100), (300, 96)), ((1000, 500), (320, 640))])
def test_panels_are_enlarged_by_whole_factors_keeping_the_aspect(shape, size):
    import numpy as np

    from patcher.gate.report_images import _to_panel

    panel = _to_panel(np.zeros(shape, np.uint8), None)
    assert panel.size == size


def test_the_chart_shows_the_best_layers_and_the_edited_ones():
    from patcher.gate.report_images import chart_rows

    scores = [{"layer": f"L{i}", "score": float(i)} for i in range(30)]
    rows = chart_rows(scores, {"L3", "L29"})
    assert [r["layer"] for r in rows] == [f"L{i}" for i in range(29, 19, -1)] + ["L3"]
