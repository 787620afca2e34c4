"""onnx-rectify: attribution-guided rank-one rectification of ONNX classifiers.

Data flow: ``modelio`` (safe load) -> ``shadow`` (torch graph over ``ops``) ->
statistics, attributions, edits -> written back into the ONNX tensors ->
verified under onnxruntime (``runtime``, ``parity``).
"""
from .errors import RectifyError
from .shadow import EditableLayer, ShadowGraph

__version__ = "0.1.0"
__all__ = ["EditableLayer", "RectifyError", "ShadowGraph", "__version__"]
