"""One exception root for everything onnx-rectify refuses or fails at.

Every error carries the exit code the CLI returns for it: 2 for input the tool
cannot use (bad model, bad samples, unsupported ops, unsafe files, output
problems), 1 for a check or gate that ran and failed. Messages are one line and
say what to change, in the manner of Polygraphy's.
"""
from __future__ import annotations


class RectifyError(Exception):
    """Root of all onnx-rectify errors; ``exit_code`` is what the CLI returns."""

    exit_code: int = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class BadModelError(RectifyError):
    """The model file is missing, unreadable, malformed or inconsistent."""


class UnsafeModelError(RectifyError):
    """The model file points outside its folder or at something that is not a plain file."""


class UnsupportedOpError(RectifyError):
    """The graph contains ops (or op versions, or attributes) the shadow graph cannot run."""


class BadSamplesError(RectifyError):
    """A sample file (npz) does not match the contract or the model's input."""


class NumericalError(RectifyError):
    """A computation produced non-finite or unusable numbers."""


class OutputError(RectifyError):
    """The output cannot be written where it was asked to be written."""


class CheckFailedError(RectifyError):
    """A check or gate ran to completion and did not pass."""

    exit_code = 1
