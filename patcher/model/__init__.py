"""The model file: safe loading, dtypes, write-back into the stored tensors, onnxruntime sessions."""
