"""The ``onnx-rectify`` command line. Each verb is a small function whose docstring is its help.

Exit codes: 0 success, 1 a check or gate failed, 2 bad input or usage, 3 an
internal error (a bug). A ``RectifyError`` becomes one line on stderr and its
exit code, never a traceback.

``common`` holds what every verb shares (errors, signals, path checks, option types, JSON
output) and the ``main`` group; each other module registers its verbs on it.
"""
from patcher.cli.common import main
from patcher.cli import data_verbs, gate_verbs, model_verbs, rectify_verbs  # noqa: F401  (register verbs)

__all__ = ["main"]
