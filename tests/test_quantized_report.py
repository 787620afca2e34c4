"""The HTML patch report of an int8 patch (samples/backdoor_cnn/model_int8_qdq.onnx): it is
written, its heatmaps run through the int8 model, and it shows the int8 changes (the tensors
written in the stored precision, values changed and steps) as the written file holds them."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

pytest.importorskip("matplotlib", reason="the HTML report needs the 'report' extra "
                    "(pip install 'onnx-rectify[report]'): matplotlib is not installed")
pytest.importorskip("PIL", reason="the HTML report needs the 'report' extra "
                    "(pip install 'onnx-rectify[report]'): Pillow is not installed")

from patcher.gate.report import stored_precision, write_report  # noqa: E402
from patcher.model.writeback import read_provenance  # noqa: E402
from patcher.patch import patch  # noqa: E402
from patcher.rectify import RectifyConfig  # noqa: E402
from tests.test_report import _Page  # noqa: E402

CNN = Path(__file__).resolve().parents[1] / "samples" / "backdoor_cnn"
QDQ = CNN / "model_int8_qdq.onnx"


@pytest.fixture(scope="module")
def qdq_patched(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qdq")
    report = patch(QDQ, CNN / "pairs_n1.npz", CNN / "eval.npz", None, folder / "patched.onnx",
                   RectifyConfig(), device="cpu", provider="cpu")
    return report.as_dict()


def _changed_values(a: Path, b: Path) -> dict[str, int]:
    ta = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(a)).graph.initializer}
    tb = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(b)).graph.initializer}
    return {k: int(np.count_nonzero(ta[k] != tb[k])) for k in ta if not np.array_equal(ta[k], tb[k])}


def test_the_report_of_an_int8_patch_shows_the_int8_changes(qdq_patched, tmp_path):
    out = Path(qdq_patched["output"])
    index = write_report(qdq_patched, tmp_path / "report", attack_path=CNN / "attack.npz",
                         max_pairs=1, steps=8, provider="cpu")
    page = _Page()
    page.feed(index.read_text(encoding="utf-8"))
    page.close()
    assert page.scripts == 0 and page.external == []

    # the stored-precision table: one row per tensor the write-back changed, as the file says
    table = next(t for t in page.tables if t and t[0][:3] == ["tensor", "role", "form"])
    records = [e for e in read_provenance(onnx.load(str(out)))["edits"]
               if e["kind"] == "quantized-writeback"]
    assert records == stored_precision(out) and records
    assert [row[0] for row in table[1:]] == [r["weight"] for r in records]
    changed = _changed_values(QDQ, out)
    assert set(changed) == {r["weight"] for r in records}  # nothing else changed
    for row, record in zip(table[1:], records):
        assert row[2] == "QDQ"
        if record["role"] == "weight":  # int8 weight: values changed and steps, from the file
            weight = numpy_helper.to_array(next(t for t in onnx.load(str(out)).graph.initializer
                                                if t.name == record["weight"]))
            assert weight.dtype == np.int8
            assert row[3] == str(changed[record["weight"]]) and int(row[3]) > 0
            assert int(row[4]) == record["max_steps"] > 0 and row[6] == "steps"

    # the release gate ran on the int8 files and passed; ASR shown before and after
    checks = next(t for t in page.tables if t and t[0][:2] == ["check", "verdict"])
    verdicts = {row[0]: row[1] for row in checks[1:]}
    assert verdicts["structure"] == verdicts["provenance"] == "PASSED"
    assert verdicts["attack_success_rate"] == "PASSED"
    # heatmaps through the int8 model: the pair's 4 panels and the held-out triggered inputs
    assert sum(src.startswith("pair1-") for src in page.images) == 4
    assert sum(src.startswith("attack") for src in page.images) >= 3
    for src in page.images:
        assert (index.parent / src).is_file(), src


def test_a_float_patch_report_has_no_stored_precision_table(tmp_path):
    """Without int8 write-back records (a float model, or no written file) the section is
    left out rather than shown empty."""
    assert stored_precision(None) == []
    assert stored_precision(CNN / "model.onnx") == []  # a float model: no provenance at all
    report = {"model": "gone.onnx", "output": str(tmp_path / "gone.onnx"), "pairs": "gone.npz",
              "eval": "None", "written": [], "passed": True, "device": "cpu",
              "timings": {"total": 1.0},
              "result": {"strategy": "dynamic", "rounds": [], "scores": [], "edits": [],
                         "timings": {}}, "verification": {}}
    text = write_report(report, tmp_path / "out", run_verify=False).read_text(encoding="utf-8")
    assert "Written in the stored precision" not in text
