"""Packaging: the wheel builds without warnings and ships the type marker, the samples and
the exporters under our own name (no top-level ``exporters``)."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _setuptools_version() -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in re.findall(r"\d+", metadata.version("setuptools"))[:2])
    except metadata.PackageNotFoundError:
        return (0,)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel built from a copy of the source tree (no build folders in the checkout),
    with the installed setuptools (no network), and the build's output."""
    if _setuptools_version() < (77,):
        pytest.skip("the build needs setuptools >= 77 (pyproject.toml's build-system); "
                    f"installed: {'.'.join(map(str, _setuptools_version()))}")
    if shutil.which("pip") is None and subprocess.run(
            [sys.executable, "-m", "pip", "--version"], capture_output=True).returncode != 0:
        pytest.skip("pip is not available")
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
    for name in ("patcher", "exporters", "samples"):
        shutil.copytree(ROOT / name, src / name, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "-w",
                           str(work / "dist"), "--no-deps", "--no-build-isolation"],  # as a user runs it (no -v)
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = (work / "dist").glob("onnx_rectify-*.whl")
    return path, proc.stdout + proc.stderr


def test_the_wheel_builds_without_warnings(wheel):
    _, output = wheel
    warnings = [line for line in output.splitlines() if re.search(r"warning", line, re.I)]
    assert warnings == []


def test_the_wheel_ships_py_typed_the_samples_and_an_spdx_license(wheel):
    path, _ = wheel
    with zipfile.ZipFile(path) as z:
        names = set(z.namelist())
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "patcher/py.typed" in names
    for sample in ("backdoor_cnn", "backdoor_resnet", "leakage", "spurious", "tiny"):
        assert f"onnx_rectify_samples/{sample}/model.onnx" in names
    assert {"onnx_rectify_samples/backdoor_cnn/attack.npz",
            "onnx_rectify_samples/backdoor_cnn/report/index.html",
            "onnx_rectify_samples/spurious/README.md"} <= names
    assert "License-Expression: MIT" in meta.splitlines()


def test_the_wheel_installs_no_top_level_exporters(wheel):
    """The repository's exporters/ folder ships as onnx_rectify_exporters: a top-level
    ``exporters`` would clash with the PyPI package of that name."""
    path, _ = wheel
    with zipfile.ZipFile(path) as z:
        names = set(z.namelist())
        top_level = z.read(next(n for n in names if n.endswith(".dist-info/top_level.txt"))
                           ) if any(n.endswith("top_level.txt") for n in names) else b""
    tops = {n.split("/")[0] for n in names if "/" in n and ".dist-info/" not in n}
    assert tops == {"patcher", "onnx_rectify_exporters", "onnx_rectify_samples"}
    assert {"onnx_rectify_exporters/__init__.py", "onnx_rectify_exporters/pytorch.py",
            "patcher/api.py"} <= names
    assert b"exporters\n" not in top_level.replace(b"onnx_rectify_exporters", b"")


def test_pyproject_maps_exporters_under_our_name_and_nothing_imports_the_old_one():
    """Without a build: the package list and mapping, and no module of the package, its
    samples, tests or benchmarks imports the top-level name ``exporters``."""
    import tomllib

    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "exporters" not in setup["packages"]
    assert setup["package-dir"]["onnx_rectify_exporters"] == "exporters"
    old = re.compile(r"^\s*(from exporters[ .]|import exporters\b)", re.M)
    offenders = [str(p.relative_to(ROOT)) for folder in ("patcher", "samples", "tests",
                                                         "benchmarks", "exporters")
                 for p in (ROOT / folder).rglob("*.py") if old.search(p.read_text())]
    assert offenders == []
