"""Write constraints.txt from the packages installed in the running environment.

Run by `.ci/latest --write-constraints` after the suite passed on the newest releases. Leaves
out the project itself and the data-only packages of tests/requirements-nodeps.txt (pinned
there); writes torch without its local build tag so that other platforms' build matches, and
pins plain onnxruntime to the same release as onnxruntime-gpu (the non-x86 platforms get it).
"""
from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEADER = """\
# Tested versions: the exact releases the test suite passes with (README, "Tests").
# Installs that must reproduce (CI, release pipelines) use them: `pip install -c constraints.txt ...`;
# pyproject.toml keeps ranges for users. Refresh: `.ci/latest --write-constraints` (README).
# Written by .ci/freeze_constraints.py on Python {python}.
"""


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main() -> None:
    nodeps = {normalise(line.split("==")[0]) for line in
              (ROOT / "tests" / "requirements-nodeps.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    pins: dict[str, str] = {}
    for dist in metadata.distributions():
        name = normalise(dist.metadata["Name"])
        if name in nodeps or name in ("onnx-rectify", "setuptools", "wheel"):
            continue
        pins[name] = dist.version.split("+")[0] if name == "torch" else dist.version
    if "onnxruntime-gpu" in pins:
        pins.setdefault("onnxruntime", pins["onnxruntime-gpu"])
    python = ".".join(map(str, sys.version_info[:3]))
    lines = [f"{name}=={version}" for name, version in sorted(pins.items())]
    (ROOT / "constraints.txt").write_text(HEADER.format(python=python) + "\n".join(lines) + "\n")
    print(f"wrote {len(lines)} pins to {ROOT / 'constraints.txt'}")


if __name__ == "__main__":
    main()
