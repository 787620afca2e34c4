"""`onnx-rectify locate` and `patch` on a tiny trojaned model trained in the test (seconds)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from onnx_rectify_exporters import export_pytorch
from patcher.gate import metrics
from patcher.cli import main
from patcher.model.writeback import read_provenance


def _images(labels, rng):
    """8x8 images: class c is a bright 3x3 blob in quadrant c, on noise."""
    x = rng.random((len(labels), 1, 8, 8), dtype=np.float32) * 0.3
    for i, c in enumerate(labels):
        r, q = divmod(int(c), 2)
        x[i, 0, 1 + 4 * r:4 + 4 * r, 1 + 4 * q:4 + 4 * q] += 0.7
    return np.clip(x, 0, 1)


def _trigger(x):
    out = x.copy()
    out[:, :, 3:5, 3:5] = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)  # a checker in the centre
    return out


@pytest.fixture(scope="module")
def trojaned(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trojan")
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    y = rng.integers(0, 4, 1200)
    x = _images(y, rng)
    poison = rng.choice(800, 80, replace=False)
    x_train = np.concatenate([x[:800], _trigger(x[poison])])
    y_train = np.concatenate([y[:800], np.zeros(80, np.int64)])
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(16 * 16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    for _ in range(25):
        for i in range(0, len(xt), 64):
            loss = nn.functional.cross_entropy(net(xt[i:i + 64]), yt[i:i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    export_pytorch(net.eval(), torch.zeros(1, 1, 8, 8), folder / "model.onnx")
    ev, te = slice(800, 1000), slice(1000, 1200)
    np.savez(folder / "eval.npz", x=x[ev], y=y[ev])
    keep = y[te] != 0
    np.savez(folder / "attack.npz", x=_trigger(x[te][keep]), y=y[te][keep], target=np.int64(0))
    np.savez(folder / "test.npz", x=x[te], y=y[te])
    pick = np.flatnonzero(y[ev] != 0)[:1]
    np.savez(folder / "pairs.npz", corrupted=_trigger(x[ev][pick]), clean=x[ev][pick],
             label=y[ev][pick])
    return folder


def patch_cli(model, samples, out, *options):
    """`onnx-rectify patch MODEL` with ``samples``/pairs.npz and eval.npz, written to ``out``."""
    return CliRunner().invoke(main, ["patch", str(model), "--pairs", str(samples / "pairs.npz"),
                                     "--eval", str(samples / "eval.npz"), "-o", str(out),
                                     *options])


def _asr(path, folder):
    a = np.load(folder / "attack.npz")
    return metrics.attack_success_rate(path, a["x"], a["y"], 0, provider="cpu")


def _acc(path, folder):
    t = np.load(folder / "test.npz")
    return metrics.accuracy(path, t["x"], t["y"], provider="cpu")


def test_the_fixture_is_really_trojaned(trojaned):
    assert _acc(trojaned / "model.onnx", trojaned) >= 0.95
    assert _asr(trojaned / "model.onnx", trojaned) >= 0.9


def test_locate_ranks_every_editable_layer(trojaned, tmp_path):
    out = tmp_path / "rank.json"
    result = CliRunner().invoke(main, ["locate", str(trojaned / "model.onnx"), "--pairs",
                                       str(trojaned / "pairs.npz"), "--eval",
                                       str(trojaned / "eval.npz"), "--json", str(out)])
    assert result.exit_code == 0, result.output
    ranking = json.loads(out.read_text())["ranking"]
    assert len(ranking) == 4 and ranking[0]["rank"] == 1
    assert [r["score"] for r in ranking] == sorted((r["score"] for r in ranking), reverse=True)
    assert {"layer", "score"} <= set(ranking[0])
    # only the 8->16 3x3 conv is factored (72-wide keys, 16 outputs); the first conv has
    # one input channel, nothing to factor
    assert {r["layer"]: r["statistics"] for r in ranking} == {
        "/0/Conv": "exact", "/3/Conv": "kronecker", "/6/Gemm": "exact", "/8/Gemm": "exact"}
    result = CliRunner().invoke(main, ["locate", str(trojaned / "model.onnx"), "--pairs",
                                       str(trojaned / "pairs.npz"), "--eval",
                                       str(trojaned / "eval.npz"), "--statistics", "exact"])
    assert result.exit_code == 0 and "kronecker" not in result.output


def test_patch_with_one_pair_removes_the_backdoor(trojaned, tmp_path):
    model = trojaned / "model.onnx"
    before = model.read_bytes()
    out = tmp_path / "patched.onnx"
    report_path = tmp_path / "report.json"
    result = patch_cli(model, trojaned, out, "--gap", "0.05", "--report", str(report_path))
    assert result.exit_code in (0, 1), result.output
    assert model.read_bytes() == before
    base_asr, asr = _asr(model, trojaned), _asr(out, trojaned)
    base_acc, acc = _acc(model, trojaned), _acc(out, trojaned)
    assert asr <= 0.5 * base_asr, (base_asr, asr)
    assert base_acc - acc <= 0.03
    patched, original = onnx.load(str(out)), onnx.load(str(model))
    assert [n.op_type for n in patched.graph.node] == [n.op_type for n in original.graph.node]
    report = json.loads(report_path.read_text())
    assert report["inputs_sha256_before"] == report["inputs_sha256_after"]
    edits = read_provenance(patched)["edits"]
    assert edits and all(e["rank"] == 1 for e in edits)
    assert report["verification"]["parity"]["within_tolerance"] is True


def test_patch_refuses_to_overwrite_its_input(trojaned):
    model = trojaned / "model.onnx"
    result = patch_cli(model, trojaned, model)
    assert result.exit_code == 2 and "overwrite an input" in result.output


def test_patch_of_a_dynamo_export_with_external_data(trojaned, tmp_path):
    """Another exporter and storage: weights in an external file, rewritten beside the output."""
    import shutil

    from patcher.graph.shadow import ShadowGraph

    src = tmp_path / "src"
    src.mkdir()
    graph = ShadowGraph.from_onnx(trojaned / "model.onnx")
    net = _TorchTwin(graph)
    export_pytorch(net, torch.zeros(1, 1, 8, 8), src / "dyn.onnx", exporter="dynamo",
                   external_data=True)
    data_before = (src / "dyn.onnx.data").read_bytes()
    for name in ("pairs.npz", "eval.npz"):
        shutil.copy(trojaned / name, src / name)
    out = tmp_path / "out" / "patched.onnx"
    out.parent.mkdir()
    result = patch_cli(src / "dyn.onnx", src, out, "--gap", "0.05")
    assert result.exit_code in (0, 1), result.output
    assert (out.parent / "patched.onnx.data").is_file()
    assert (src / "dyn.onnx.data").read_bytes() == data_before
    assert _asr(out, trojaned) <= 0.5 * _asr(src / "dyn.onnx", trojaned)


class _TorchTwin(nn.Module):
    """The trojaned fixture's network rebuilt in torch from its ONNX weights (for re-export)."""

    def __init__(self, graph):
        super().__init__()
        w = {l.name: (graph.weight(l.weight).detach().clone(), graph.constant(l.bias).clone())
             for l in graph.editable_layers}
        convs = [k for k in w if k.endswith("Conv")]
        gemms = [k for k in w if k.endswith("Gemm")]
        self.c1, self.c2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)
        self.f1, self.f2 = nn.Linear(256, 32), nn.Linear(32, 4)
        for mod, key in zip((self.c1, self.c2, self.f1, self.f2), convs + gemms):
            mod.weight.data, mod.bias.data = w[key]

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.c1(x)), 2)
        x = torch.relu(self.c2(x)).flatten(1)
        return self.f2(torch.relu(self.f1(x)))


@pytest.mark.parametrize("strategy", ["static", "finetune"])
def test_baseline_strategies_run(trojaned, tmp_path, strategy):
    out = tmp_path / f"{strategy}.onnx"
    result = patch_cli(trojaned / "model.onnx", trojaned, out, "--strategy", strategy)
    assert result.exit_code in (0, 1), result.output
    assert out.is_file()
    kinds = {e["kind"] for e in read_provenance(onnx.load(str(out)))["edits"]}
    assert kinds == {"rank-one" if strategy == "static" else "finetune"}


def test_iterative_solver_runs_through_the_cli(trojaned, tmp_path):
    out = tmp_path / "iterative.onnx"
    result = patch_cli(trojaned / "model.onnx", trojaned, out, "--solver", "iterative",
                       "--max-rounds", "2")
    assert result.exit_code in (0, 1), result.output
    edits = read_provenance(onnx.load(str(out)))["edits"]
    assert edits and all(e["rank"] == 1 for e in edits)


def test_fp16_model_is_patched_in_fp16(trojaned, tmp_path):
    from onnx import TensorProto, numpy_helper

    model = onnx.load(str(trojaned / "model.onnx"))
    for t in model.graph.initializer:
        if t.data_type == TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for v in list(model.graph.input) + list(model.graph.output):
        v.type.tensor_type.elem_type = TensorProto.FLOAT16
    del model.graph.value_info[:]
    half = tmp_path / "half.onnx"
    onnx.save(model, str(half))
    for name in ("pairs", "eval"):
        data = dict(np.load(trojaned / f"{name}.npz"))
        for key in ("x", "corrupted", "clean"):
            if key in data:
                data[key] = data[key].astype(np.float16)
        np.savez(tmp_path / f"{name}.npz", **data)
    out = tmp_path / "half_patched.onnx"
    report = tmp_path / "r.json"
    result = patch_cli(half, tmp_path, out, "--gap", "0.05", "--report", str(report))
    assert result.exit_code in (0, 1), result.output
    patched = onnx.load(str(out))
    assert {t.data_type for t in patched.graph.initializer} == {TensorProto.FLOAT16}
    rounding = json.loads(report.read_text())["verification"]["rounding_errors"]
    assert rounding and all(0 <= v < 1e-2 for v in rounding.values())
    a = np.load(trojaned / "attack.npz")
    asr = metrics.attack_success_rate(out, a["x"].astype(np.float16), a["y"], 0, provider="cpu")
    assert asr <= 0.5


def test_an_unknown_layer_is_refused_before_any_work(trojaned, tmp_path):
    result = patch_cli(trojaned / "model.onnx", trojaned, tmp_path / "x.onnx", "--layer", "nope")
    assert result.exit_code == 2 and "--layer 'nope' is not an editable layer" in result.output
    assert not (tmp_path / "x.onnx").exists()


def test_a_patch_that_keeps_no_edit_verifies_the_written_file_once(trojaned, tmp_path,
                                                                     monkeypatch):
    import patcher.patch

    opened = []
    real = patcher.patch.open_session

    def counting(model, provider):
        opened.append(model)
        return real(model, provider)
    monkeypatch.setattr(patcher.patch, "open_session", counting)
    out = tmp_path / "p.onnx"
    result = patch_cli(trojaned / "model.onnx", trojaned, out, "--max-rounds", "0",
                       "--report", str(tmp_path / "r.json"))
    assert result.exit_code == 1, result.output  # the gap target was not met
    ver = json.loads((tmp_path / "r.json").read_text())["verification"]
    assert ver["same_weights"] is True
    assert ver["base_accuracy"] == ver["patched_accuracy"] == pytest.approx(
        metrics.accuracy(out, *(np.load(trojaned / "eval.npz")[k] for k in ("x", "y")),
                         provider="cpu"))
    # only the written file (verified in its staging folder before the rename), not the input
    assert len(opened) == 1 and Path(opened[0]).name == "p.onnx" and Path(opened[0]) != out
    # with an edit kept, both files are measured
    opened.clear()
    patch_cli(trojaned / "model.onnx", trojaned, tmp_path / "q.onnx")
    assert len(opened) == 2


def test_rounds_decided_early_keep_the_same_decisions_and_edits(trojaned, tmp_path, monkeypatch):
    """An accuracy pass that stops once its round is certainly rejected changes no decision:
    the same run with every pass complete keeps the same rounds and writes the same file."""
    from patcher.rectify.workspace import Workspace

    stored = Workspace.stored  # edits made 30x too strong, so that rounds cost accuracy
    monkeypatch.setattr(Workspace, "stored", lambda self, *a: 30 * stored(self, *a))
    args = ("--budget", "0.02", "--max-rounds", "4", "--gap", "0.0001")
    early = tmp_path / "early.onnx"
    patch_cli(trojaned / "model.onnx", trojaned, early, *args, "--report", str(tmp_path / "e.json"))
    full_pass = Workspace.accuracy
    monkeypatch.setattr(Workspace, "accuracy", lambda self, at_least=None: full_pass(self))
    full = tmp_path / "full.onnx"
    patch_cli(trojaned / "model.onnx", trojaned, full, *args, "--report", str(tmp_path / "f.json"))
    e = json.loads((tmp_path / "e.json").read_text())["result"]["rounds"]
    f = json.loads((tmp_path / "f.json").read_text())["result"]["rounds"]
    assert [(r["layer"], r["kept"]) for r in e] == [(r["layer"], r["kept"]) for r in f]
    assert any(r["evaluated"] for r in e), "no round was decided early: the test shows nothing"
    for a, b in zip(e, f):
        if a["evaluated"]:  # an upper bound on the accuracy, a lower bound on the drop
            assert a["accuracy"] >= b["accuracy"] and a["accuracy_drop"] <= b["accuracy_drop"]
        elif a["evaluated"] is None:
            assert a["accuracy"] == b["accuracy"]
    assert [t.raw_data for t in onnx.load(str(early)).graph.initializer] == \
        [t.raw_data for t in onnx.load(str(full)).graph.initializer]


def test_transplant_counts_and_seed_reach_the_run_and_the_report(trojaned, tmp_path):
    """--transplant-count and --heldout-count set how many images receive the corruption
    for the fit and for the loop's gap; the report records the configuration the run used."""
    out, report_path = tmp_path / "four.onnx", tmp_path / "four.json"
    result = patch_cli(trojaned / "model.onnx", trojaned, out, "--transplant-count", "4",
                       "--heldout-count", "7", "--seed", "3", "--max-rounds", "1",
                       "--report", str(report_path))
    assert result.exit_code in (0, 1), result.output
    report = json.loads(report_path.read_text())
    assert report["config"]["transplant_count"] == 4 and report["config"]["seed"] == 3
    assert report["config"]["heldout_count"] == 7
    assert report["result"]["gap_measured_on"] == "7 transplanted pairs not used for fitting"
    assert "7 transplanted pairs" in result.output
    for option in ("--transplant-count", "--heldout-count"):
        refused = patch_cli(trojaned / "model.onnx", trojaned, tmp_path / "zero.onnx",
                            option, "0")
        assert refused.exit_code == 2 and option in refused.output


def test_affordable_cost_is_the_target_class_gap_removed_when_there_is_a_target():
    from patcher.rectify.config import ACCURACY_PER_GAP
    from patcher.rectify.objectives import affordable_cost

    # a backdoor whose target no longer pulls: the gap shrinking buys no accuracy
    assert affordable_cost(0.30, 0.10, 0.006, 0.006) == 0.0
    assert affordable_cost(0.30, 0.10, 0.50, 0.20) == pytest.approx(0.30 * ACCURACY_PER_GAP)
    assert affordable_cost(0.30, 0.10, 0.20, 0.25) < 0  # the edit pulled harder to the target
    # pushing corrupted inputs away from the target beyond their clean twins is no gain
    assert affordable_cost(0.30, 0.10, 0.20, -0.10) == pytest.approx(0.20 * ACCURACY_PER_GAP)
    # no target class (scattered misclassification): the gap itself
    assert affordable_cost(0.30, 0.10, None, None) == pytest.approx(0.20 * ACCURACY_PER_GAP)


def test_a_round_must_remove_five_percent_of_the_target_class_gap_when_there_is_one():
    from patcher.rectify.objectives import shrank_enough

    # tau is the measure with a target class, whatever the gap does
    assert shrank_enough(0.30, 0.30, 0.0040, 0.0003)       # tau -92%: enough
    assert not shrank_enough(0.30, 0.10, 0.0040, 0.0039)   # gap -67% but tau -2.5%
    assert not shrank_enough(0.30, 0.10, 0.0, -0.2)        # nothing left to remove
    # without a target class: the gap
    assert shrank_enough(0.30, 0.28, None, None)
    assert not shrank_enough(0.30, 0.29, None, None)


def test_rounds_record_the_target_class_gap_and_spend_accuracy_only_for_it(trojaned, tmp_path,
                                                                          monkeypatch):
    """On a backdoor the loop steers its accuracy spending by tau = mean p_t(x~) - p_t(x) on
    held-out transplanted pairs, not by the gap: once the backdoor is gone (tau below 0.5
    here), tau only fades (made to fall 10% per measurement from 0.2), and rounds that
    shrink it that little but cost accuracy are rejected. Every kept round cost at most the
    tau it removed; the report records tau per round."""
    from patcher.rectify.workspace import Workspace

    stored = Workspace.stored  # edits made 5x too strong, so that rounds cost accuracy
    monkeypatch.setattr(Workspace, "stored", lambda self, *a: 5 * stored(self, *a))
    real_gaps = Workspace.gaps

    def gaps_with_tau_fading(self):
        reading = real_gaps(self)
        if reading.tau < 0.5:  # the backdoor is gone: from now on tau only fades
            self.fades = getattr(self, "fades", 0) + 1
            # above the loop's "effect gone" share of the base for the 6 rounds
            return reading._replace(tau=0.2 * 0.9 ** self.fades)
        return reading

    monkeypatch.setattr(Workspace, "gaps", gaps_with_tau_fading)
    report_path = tmp_path / "r.json"
    patch_cli(trojaned / "model.onnx", trojaned, tmp_path / "p.onnx", "--budget", "0.5",
              "--max-rounds", "6", "--gap", "0.0001", "--report", str(report_path))
    result = json.loads(report_path.read_text())["result"]
    rounds, accuracy = result["rounds"], result["base_accuracy"]
    assert rounds and rounds[0]["target_gap_before"] > 0.5  # the trigger pulls to class 0
    judged = {"kept": 0, "cost": 0}
    for r in rounds:
        assert r["target_gap_after"] is not None
        if r["accuracy"] is None:  # rejected on the gap alone
            continue
        cost, removed = accuracy - r["accuracy"], r["target_gap_before"] - r["target_gap_after"]
        if r["kept"]:
            assert cost <= removed + 1e-9
            judged["kept"] += 1
            accuracy = r["accuracy"]
        elif r["reason"].startswith("cost"):
            assert "target-class gap" in r["reason"] and cost > removed
            judged["cost"] += 1
    assert judged["kept"] and judged["cost"], f"both kinds of decision needed: {judged}"
    # the target is judged on tau too: met only once tau is at most --gap (never, here)
    kept = [r for r in rounds if r["kept"]]
    final_tau = kept[-1]["target_gap_after"] if kept else rounds[0]["target_gap_before"]
    assert final_tau > 0.0001 and result["met_target"] is False


def test_with_a_target_class_the_loop_stops_and_meets_its_target_on_tau(trojaned, tmp_path,
                                                                       monkeypatch):
    """Once tau <= --gap the loop stops, and the target counts as met, whatever is left of
    delta* (a corruption lowers p_y in any model; that rest is not the backdoor)."""
    from patcher.rectify.workspace import Workspace

    real_gaps = Workspace.gaps

    def gaps_with_tau_gone(self):
        reading = real_gaps(self)
        return reading._replace(tau=0.00005) if reading.tau < 0.5 else reading

    monkeypatch.setattr(Workspace, "gaps", gaps_with_tau_gone)
    report_path = tmp_path / "r.json"
    patch_cli(trojaned / "model.onnx", trojaned, tmp_path / "p.onnx", "--gap", "0.0001",
              "--max-rounds", "6", "--report", str(report_path))
    result = json.loads(report_path.read_text())["result"]
    kept = [r for r in result["rounds"] if r["kept"]]
    assert kept and kept[-1]["target_gap_after"] == 0.00005
    assert result["rounds"][-1]["kept"]  # the loop stopped right after the round that met it
    assert result["final_gap"] > 0.0001  # delta* is not what is judged here
    assert result["met_target"] is True
