"""onnx-rectify: attribution-guided rank-one rectification of ONNX classifiers.

Data flow: ``modelio`` (safe load) -> ``shadow`` (torch graph over ``ops``) ->
statistics, attributions, edits -> written back into the ONNX tensors ->
verified under onnxruntime (``runtime``, ``parity``).
"""
from patcher.errors import RectifyError
from patcher.graph.shadow import EditableLayer, ShadowGraph
from patcher.version import __version__

__all__ = ["EditableLayer", "RectifyError", "ShadowGraph", "__version__"]
