"""onnx-rectify: attribution-guided rank-one rectification of ONNX classifiers.

Data flow: ``model`` (safe load) -> ``graph`` (the torch shadow graph over ``graph.ops``)
-> ``analysis`` (statistics, attributions) -> ``rectify`` (locators, edit kinds,
objectives, the loop) -> ``model.writeback`` (deltas into the ONNX tensors) -> ``gate``
(verified under onnxruntime). See docs/ARCHITECTURE.md.
"""
from patcher.errors import RectifyError
from patcher.graph.shadow import EditableLayer, ShadowGraph
from patcher.rectify import RectifyConfig, RectifyResult, rectify
from patcher.version import __version__

__all__ = ["EditableLayer", "RectifyConfig", "RectifyError", "RectifyResult", "ShadowGraph",
           "__version__", "rectify"]
