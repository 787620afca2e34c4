"""What the verbs print while they work (issue 23, "output a person can live with"):
a heartbeat off a terminal, --quiet, one line per round, warnings once with one prefix
and only with options the verb has, bars cleared on a terminal."""
from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import click
import pytest

import patcher.patch
from patcher import progress
from patcher.cli import main
from patcher.cli.common import verb_flags, warning_text
from tests.hostile_cases import FAST, run, samples, save, tiny_model

REPO = Path(__file__).resolve().parents[1]
HEARTBEAT = re.compile(r"^onnx-rectify: (\d+m )?\d+s elapsed: (.+)$")


class FakeClock:
    """A clock that moves ``step`` seconds at every reading: heartbeats fall due by the
    number of readings, not by how fast this machine is."""

    def __init__(self, step: float = 1.0) -> None:
        self.now, self.step = 1000.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


@pytest.fixture
def tiny(tmp_path):
    model = save(tiny_model(), tmp_path / "m.onnx")
    files = samples(tmp_path / "samples")
    return model, files


def patch_args(model: Path, files: dict, out: Path, *extra: str) -> list[str]:
    return ["patch", str(model), "--pairs", str(files["pairs"]), "--eval", str(files["eval"]),
            "-o", str(out), "--max-rounds", "2", "--provider", "cpu", *FAST, *extra]


# ------------------------------------------------------------------ heartbeat
def test_a_patch_off_a_terminal_prints_heartbeat_lines_naming_the_phase(tiny, tmp_path,
                                                                        monkeypatch):
    """CliRunner's stderr is not a terminal: with a 3 s interval on a clock that moves 1 s
    per reading, the run says where it is in heartbeat lines."""
    model, files = tiny
    monkeypatch.setenv("ONNX_RECTIFY_HEARTBEAT", "3")
    monkeypatch.setattr(progress, "clock", FakeClock())
    result = run(patch_args(model, files, tmp_path / "p.onnx"))
    assert result.exit_code in (0, 1), result.stderr
    beats = [HEARTBEAT.match(line) for line in result.stderr.splitlines()]
    beats = [m for m in beats if m]
    assert beats, result.stderr
    phases = {m.group(2) for m in beats}
    assert any(re.match(r"(evaluating|attribution|key statistics.*|verifying) \d+/\d+$", p)
               for p in phases), phases
    assert "\r" not in result.stderr  # no bar is drawn into a log


def test_the_heartbeat_comes_at_least_every_interval(monkeypatch):
    """A 100-step phase on a clock moved by hand, 1 s per step, interval 10 s: a line every
    10 s of the clock, each with how far the phase got."""
    now = [0.0]
    monkeypatch.setattr(progress, "clock", lambda: now[0])
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    with progress.session(interval=10):
        with progress.progress(100, "phase") as bar:
            for _ in range(100):
                now[0] += 1
                bar.update(1)
        now[0] += 25  # work with no bar: the timer thread's tick still beats
        progress.tick()
    lines = stream.getvalue().splitlines()
    beats = [HEARTBEAT.match(line) for line in lines]
    assert all(beats), lines
    seconds = [int(re.search(r"(\d+)s elapsed", line).group(1)) +
               60 * int((re.search(r"(\d+)m ", line) or [0, 0])[1]) for line in lines]
    assert seconds[:10] == list(range(10, 101, 10)), lines
    assert [m.group(2) for m in beats[:10]] == [f"phase {k}/100" for k in range(10, 101, 10)]
    assert beats[-1].group(2) == "after phase" and seconds[-1] == 125


def test_a_status_line_counts_as_a_sign_of_life(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(progress, "clock", lambda: now[0])
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    with progress.session(interval=10):
        now[0] = 8
        progress.status("round 1: kept")
        now[0] = 15
        progress.tick()  # 7 s after the status line: not due
        now[0] = 18
        progress.tick()
    assert stream.getvalue().splitlines() == ["round 1: kept",
                                             "onnx-rectify: 18s elapsed: working"]


def test_no_heartbeat_outside_a_verb_run(monkeypatch):
    """The library alone (no session) prints no heartbeat."""
    monkeypatch.setattr(progress, "clock", FakeClock(100.0))
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    progress.configure()
    with progress.progress(10, "phase") as bar:
        for _ in range(10):
            bar.update(1)
    assert stream.getvalue() == ""


# ------------------------------------------------------------------ terminal
def test_on_a_terminal_a_finished_bar_is_cleared_and_lines_print_above_it(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(progress, "clock", lambda: now[0])
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    progress.configure(terminal=True)
    with progress.progress(4, "attribution") as bar:
        for k in range(4):
            now[0] += 1
            bar.update(1)  # every update moves the bar (redraws at most every 0.1 s)
            if k == 1:
                progress.status("round 1: kept")
    text = stream.getvalue()
    frames = text.split("\r\033[K")
    assert any(f.startswith("attribution [") and "1/4" in f for f in frames)
    assert any(f.startswith("attribution [") and "4/4" in f for f in frames)
    assert "round 1: kept\n" in frames  # the bar was erased before the line
    assert text.endswith("\r\033[K")  # and the finished bar is gone


# ------------------------------------------------------------------ --quiet
def test_quiet_prints_only_the_result(tiny, tmp_path, monkeypatch):
    model, files = tiny
    monkeypatch.setenv("ONNX_RECTIFY_HEARTBEAT", "1")
    monkeypatch.setattr(progress, "clock", FakeClock())
    monkeypatch.setattr(patcher.patch, "COMPLETENESS_LIMIT", -1.0)  # a warning is due
    loud = run(patch_args(model, files, tmp_path / "loud.onnx", "--attribution", "path"))
    quiet = run(patch_args(model, files, tmp_path / "quiet.onnx", "--attribution", "path",
                           "--quiet"))
    assert loud.exit_code == quiet.exit_code and quiet.exit_code in (0, 1)
    assert "onnx-rectify: warning:" in loud.stderr and "elapsed" in loud.stderr
    if quiet.exit_code == 0:
        assert quiet.stderr == ""
    else:  # exit 1 says why, as the result
        assert quiet.stderr.startswith("onnx-rectify: warning: the pairs' gap did not meet")
        assert len(quiet.stderr.splitlines()) == 1
    assert quiet.stdout.splitlines()[0].split()[:2] == ["round", "layer"]
    assert "wrote " in quiet.stdout and "reloaded from disk" in quiet.stdout


@pytest.mark.parametrize("verb", sorted(main.commands))
def test_every_verb_has_quiet_and_verbose(verb):
    opts = {o for p in main.commands[verb].params for o in getattr(p, "opts", [])}
    assert {"-q", "--quiet", "-v", "--verbose"} <= opts


def test_quiet_inspect_prints_the_description_and_nothing_else(tiny):
    model, _ = tiny
    result = run(["inspect", str(model), "--quiet"])
    assert result.exit_code == 0 and result.stderr == "" and result.stdout.strip()


# ------------------------------------------------------------------ rounds
def test_each_round_is_printed_once_on_a_repo_sample(tmp_path):
    """samples/backdoor_cnn, one pair: the round table on stdout, no round line on stderr."""
    folder = REPO / "samples" / "backdoor_cnn"
    result = run(["patch", str(folder / "model.onnx"), "--pairs", str(folder / "pairs_n1.npz"),
                  "--eval", str(folder / "eval.npz"), "-o", str(tmp_path / "p.onnx"),
                  "--provider", "cpu", "--device", "cpu"])
    assert result.exit_code == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if re.match(r"^\s+\d+\s+/", line)]
    assert rows and [int(r.split()[0]) for r in rows] == list(range(1, len(rows) + 1))
    assert not re.search(r"(?m)^round \d+:", result.stderr), result.stderr
    assert result.stdout.count("round  layer") == 1
    # the default run warns of nothing a user cannot act on: no note without --verbose,
    # each warning names an option of patch
    for line in result.stderr.splitlines():
        if line.startswith("onnx-rectify: ") and not HEARTBEAT.match(line):
            assert line.startswith("onnx-rectify: warning: "), line
            assert re.search(r"; use --\w+", line), line


# ------------------------------------------------------------------ warnings
def test_a_warning_is_said_once_with_the_prefix_in_locate_and_patch(tiny, tmp_path,
                                                                    monkeypatch):
    model, files = tiny
    monkeypatch.setattr(patcher.patch, "COMPLETENESS_LIMIT", -1.0)
    texts = []
    for args in (["locate", str(model), "--pairs", str(files["pairs"]), *FAST,
                  "--attribution", "path"],
                 patch_args(model, files, tmp_path / "p.onnx", "--attribution", "path")):
        result = run(args)
        assert result.exit_code in (0, 1), result.stderr
        lines = [l for l in result.stderr.splitlines() if "completeness" in l]
        assert len(lines) == 1 and lines[0].startswith("onnx-rectify: warning: ")
        texts.append(re.sub(r"error [\d.e+-]+ at \S+", "", lines[0]))
    assert texts[0] == texts[1]  # the same wording in both verbs


def _record(remedies) -> logging.LogRecord:
    record = logging.LogRecord("onnx_rectify", logging.WARNING, __file__, 0,
                               "library text; set attribution_form='path'", None, None)
    record.advice, record.remedies = "scores less faithful", remedies
    return record


def _in_verb(verb: str, fn):
    with click.Context(main.commands[verb], info_name=verb):
        return fn()


def test_a_warning_names_the_verbs_flag_or_becomes_a_verbose_note():
    remedies = (progress.Remedy("attribution_form", "path"),)
    assert _in_verb("locate", lambda: warning_text(_record(remedies))) == \
        ("warning", "scores less faithful; use --attribution path")
    progress.configure()
    assert _in_verb("demo", lambda: warning_text(_record(remedies))) is None
    progress.configure(verbose=True)
    try:
        assert _in_verb("demo", lambda: warning_text(_record(remedies))) == \
            ("note", "scores less faithful")
    finally:
        progress.configure()


@pytest.mark.parametrize("verb", sorted(main.commands))
def test_no_warning_suggests_an_option_the_verb_does_not_have(verb):
    """Every remedy the library gives (grep 'Remedy(' in patcher/) rendered for every verb
    names only options that verb has."""
    keywords = set()
    for path in (REPO / "patcher").rglob("*.py"):
        keywords |= set(re.findall(r'Remedy\("(\w+)"', path.read_text()))
    assert keywords  # the grep sees the remedies
    flags = _in_verb(verb, lambda: verb_flags(keywords))
    opts = {o for p in main.commands[verb].params for o in getattr(p, "opts", [])}
    assert set(flags.values()) <= opts


def test_the_library_names_config_fields_not_flags(monkeypatch):
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    progress.LOG.addHandler(handler)
    try:
        from patcher.rectify.results import LayerScore

        monkeypatch.setattr(patcher.patch, "COMPLETENESS_LIMIT", -1.0)
        patcher.patch.warn_completeness([LayerScore("L", 1.0, completeness_error=0.5)], "path")
    finally:
        progress.LOG.removeHandler(handler)
    assert len(records) == 1
    assert records[0].getMessage().endswith("; raise steps")
    assert "--" not in records[0].getMessage()


def test_on_a_terminal_a_pause_between_phases_prints_whole_heartbeat_lines(monkeypatch):
    """Between bars nothing transient is left on the terminal (a result printed on stdout
    next would land on it): the heartbeat prints whole lines, as in a log."""
    now = [0.0]
    monkeypatch.setattr(progress, "clock", lambda: now[0])
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    monkeypatch.setattr(progress, "_on_terminal", lambda: True)
    with progress.session(interval=10):
        with progress.progress(2, "attribution") as bar:
            bar.update(2)
        assert stream.getvalue().endswith("\r\033[K")  # the finished bar is gone
        now[0] = 9.0
        progress.tick()
        assert "after attribution" not in stream.getvalue()
        now[0] = 65.0
        progress.tick()
        assert stream.getvalue().endswith("onnx-rectify: 1m 05s elapsed: after attribution\n")
