"""Sample scenarios (trojaned, spurious, leaky models on real data) and their data loaders.

Installed as the package ``onnx_rectify_samples``; each scenario folder holds a
build script, the built artifacts and a README with the measured figures.
"""
