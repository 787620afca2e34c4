"""onnx-rectify: attribution-guided rank-one rectification of ONNX classifiers.

The library API (:mod:`patcher.api`): ``patcher.patch``, ``patcher.locate``,
``patcher.verify`` and ``patcher.inspect`` take a model as a path or an
``onnx.ModelProto`` and sample sets as npz paths or arrays, with the CLI's options and
defaults as keyword arguments, and return the figures (:class:`PatchResult`,
:class:`LocateResult`, :class:`~patcher.gate.verify.VerifyReport`,
:class:`~patcher.gate.summary.ModelSummary`).

Data flow: ``model`` (safe load) -> ``graph`` (the torch shadow graph over ``graph.ops``)
-> ``analysis`` (statistics, attributions) -> ``rectify`` (locators, edit kinds,
objectives, the loop) -> ``model.writeback`` (deltas into the ONNX tensors) -> ``gate``
(verified under onnxruntime). See docs/ARCHITECTURE.md.
"""
import os
import sys
import types

# torch's CPU kernels run on GNU OpenMP, whose idle threads spin between parallel regions by
# default. Where the cores are shared (another process, or a library's own pool) the spinning
# threads take the cores from the working ones: a MobileNetV2 ``locate`` on 2 cores beside
# one other busy process cost 20-28 CPU s with spinning and 8.8 CPU s with passive waits
# (8.5 on one thread). Read when torch loads, so set before anything imports it; a value the
# user set stays.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from inspect import signature as _signature
from typing import TYPE_CHECKING

from patcher import api
from patcher.api import LocateResult, PatchResult, inspect, locate, verify
from patcher.errors import RectifyError
from patcher.graph.shadow import EditableLayer, ShadowGraph
from patcher.rectify import RectifyConfig, RectifyResult, rectify
from patcher.version import __version__

if TYPE_CHECKING:
    from patcher.api import patch as patch
else:
    class _PatchModule(types.ModuleType):
        """``patcher.patch`` is the pipeline module (:mod:`patcher.patch`, which tests and
        tools import) and, called, the library API's :func:`patcher.api.patch`."""

        def __call__(self, *args, **kwargs) -> PatchResult:
            return api.patch(*args, **kwargs)

    sys.modules["patcher.patch"].__class__ = _PatchModule
    sys.modules["patcher.patch"].__signature__ = _signature(api.patch)  # help() and IDEs
    patch = sys.modules["patcher.patch"]

__all__ = ["EditableLayer", "LocateResult", "PatchResult", "RectifyConfig", "RectifyError",
           "RectifyResult", "ShadowGraph", "__version__", "inspect", "locate", "patch",
           "rectify", "verify"]
