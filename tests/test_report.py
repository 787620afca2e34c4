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
