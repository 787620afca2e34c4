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
from inspect import signature as _signature
from typing import TYPE_CHECKING

# OpenMP threads (torch's intra-op pool, GNU libgomp) that wait at a barrier spin for
# 10,000 iterations, then sleep, instead of libgomp's 300,000, unless the environment
# sets a wait policy; read once, when torch loads its OpenMP runtime, so it must be set
# before torch is imported. A long spin burns the CPU a descheduled peer needs: on 2
# shared cores at load 3-5, a ViT-Ti/16 forward over 40 images took 9.1 CPU s with the
# default spin, 2.1-2.7 with this one or with OMP_WAIT_POLICY=PASSIVE (ResNet-18: 2.7 and
# 1.5); with both cores free, 1.7-2.2 CPU s and 0.9-1.1 s wall with either spin, while
# PASSIVE took 2.1-2.4 CPU s and 1.25-1.7 s wall (wake-ups of many small ops).
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

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
