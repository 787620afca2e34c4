"""The shadow graph: torch execution of the ONNX graph (ops), keys of editable layers, parity."""
