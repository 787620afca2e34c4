"""onnxruntime sessions, on the provider that really runs.

onnxruntime-gpu silently falls back to the CPU when CUDA cannot load, so the
provider in use is read back from ``session.get_providers()`` and reported.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from patcher.errors import BadModelError, BadSamplesError, RectifyError

PROVIDER_CHOICES = ("auto", "cpu", "cuda")


def _ort():
    import onnxruntime

    return onnxruntime


@dataclass
class RuntimeSession:
    """An onnxruntime session and the execution provider that actually runs it."""

    session: object
    provider: str

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.session.get_inputs()]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    @property
    def fixed_batch(self) -> int | None:
        """The batch size the model's first input fixes (an integer first dimension of an
        input of rank 2 or more), or None when it is symbolic."""
        inputs = self.session.get_inputs()
        shape = inputs[0].shape if inputs else None
        if shape and len(shape) >= 2 and isinstance(shape[0], int) and shape[0] > 0:
            return shape[0]
        return None

    def run(self, *arrays: np.ndarray) -> list[np.ndarray]:
        """Outputs for ``arrays``; a model whose batch is fixed at b runs b images at a time
        (outputs joined along their first axis), and refuses a count that b does not divide."""
        fixed = self.fixed_batch
        count = arrays[0].shape[0] if arrays and getattr(arrays[0], "ndim", 0) else None
        if fixed is None or count is None or count == fixed:
            return self._run(arrays)
        if count % fixed:
            raise BadSamplesError(f"the model fixes its batch at {fixed} image(s); {count} "
                                  f"image(s) cannot be run {fixed} at a time")
        parts = [self._run([a[i:i + fixed] for a in arrays]) for i in range(0, count, fixed)]
        return [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]

    def _run(self, arrays) -> list[np.ndarray]:
        feeds = dict(zip(self.input_names, arrays))
        try:
            return self.session.run(None, feeds)
        except Exception as exc:  # onnxruntime's own exception types
            raise BadSamplesError(f"onnxruntime refused the input: {exc}") from None


def _gpu_present() -> bool:
    """Whether an NVIDIA GPU is visible at all (so 'auto' does not try CUDA in vain)."""
    try:
        import torch

        if torch.cuda.is_available():
            return True
    except ImportError:
        pass
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/dxg")


def open_session(model: "str | os.PathLike | bytes", provider: str = "auto",
                 threads: int | None = None) -> RuntimeSession:
    """Open an inference session. ``provider``: auto (CUDA when it really loads), cpu, cuda.

    Asking for cuda where CUDA does not load is an error, not a silent fallback.
    """
    if provider not in PROVIDER_CHOICES:
        raise RectifyError(f"unknown provider '{provider}' (choose from {', '.join(PROVIDER_CHOICES)})")
    ort = _ort()
    wanted = ["CPUExecutionProvider"]
    if provider == "cuda" or (provider == "auto" and _gpu_present()):
        if "CUDAExecutionProvider" in ort.get_available_providers():
            wanted.insert(0, "CUDAExecutionProvider")
            # A CUDA provider that fails to load logs errors before falling back; we
            # report the fallback ourselves from get_providers().
            ort.set_default_logger_severity(4)
    options = ort.SessionOptions()
    options.log_severity_level = 4  # failures are reported by us, in one line
    if threads:
        options.intra_op_num_threads = threads
    source = os.fspath(model) if not isinstance(model, (bytes, bytearray)) else bytes(model)
    try:
        session = ort.InferenceSession(source, sess_options=options, providers=wanted)
    except Exception as exc:  # onnxruntime raises its own exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadModelError(f"onnxruntime cannot load the model: {first}") from None
    used = session.get_providers()[0]
    if provider == "cuda" and used != "CUDAExecutionProvider":
        raise RectifyError("the CUDA execution provider is not available here "
                           "(onnxruntime fell back to the CPU); use --provider cpu or auto")
    return RuntimeSession(session, used)
