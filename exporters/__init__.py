"""Export PyTorch models to ONNX files fit for patching (see :func:`export_pytorch`)."""
from .pytorch import ExportResult, export_pytorch, fold_batchnorm

__all__ = ["ExportResult", "export_pytorch", "fold_batchnorm"]
