"""The README's Python example (the library API, patcher.patch) runs as written (from the
repository root) and prints what its comment says."""
from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_the_readme_python_example_runs_and_prints_what_it_says():
    blocks = python_blocks()
    assert blocks, "the README has no Python example"
    assert any("patcher.patch(" in block for block in blocks), \
        "the README's Python example does not show the library API (patcher.patch)"
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        for block in blocks:
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
            promised = re.findall(r"print\(.*\)\s+# (.+)", block)
            printed = out.getvalue().strip().splitlines()
            assert printed[-len(promised):] == promised, (printed, promised)
    finally:
        os.chdir(cwd)
