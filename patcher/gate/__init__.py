"""Measuring and gating under onnxruntime: metrics, verify, diff, reports, inspect summary."""
