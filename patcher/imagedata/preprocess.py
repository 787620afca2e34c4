"""How an image becomes the model's input, from the model's metadata or from options.

An image is decoded to pixels p in 0..255 (float), laid out [height, width, channels] in
the model's channel order, at the model's size. The model sees

    x = (p * scale - mean) / std          (per channel)

laid out as its input: [N, C, H, W] (NCHW), [N, H, W, C] (NHWC), [N, H, W] (one channel,
rank 3) or [N, C*H*W] flattened in the layout's order (rank 2).

Where each setting comes from, first match wins: an option given to the verb; the
model's ``metadata_props``; the model's input dims; a default. The metadata keys
(:data:`PREPROCESSING_KEY` holds a JSON object; :func:`exporters.export_pytorch` writes it
from its ``preprocessing`` argument):

| key | value | default |
|---|---|---|
| ``size`` | ``[height, width]`` or one integer (square) | the input's fixed dims |
| ``layout`` | ``"NCHW"`` or ``"NHWC"`` (also :data:`LAYOUT_KEY`, the exporter's) | from the dims |
| ``channels`` | ``"RGB"``, ``"BGR"`` or ``"L"`` (grayscale) | from the channel count |
| ``scale`` | a number, or ``"pixels / N"`` (what the samples' exporter writes) | 1/255 (1 for integer inputs) |
| ``mean``, ``std`` | a number, or one per channel, in the scaled units | 0, 1 |
| ``interpolation`` | ``nearest``, ``bilinear``, ``bicubic``, ``lanczos``, ``box``, ``hamming`` | ``bilinear`` |
| ``resize`` | ``stretch`` (to height x width) or ``center-crop`` (shorter side to size / crop_fraction, then the centre) | ``stretch`` |
| ``crop_fraction`` | in (0, 1], with ``center-crop`` | 1 |

Other keys (``description``) are ignored. A value of the wrong kind is refused with the
key named (:class:`BadModelError`); settings that contradict the input's fixed dims are
refused too.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

import numpy as np
import onnx

from patcher.errors import BadModelError, RectifyError
from patcher.samples import InputSpec

PREPROCESSING_KEY = "onnx_rectify.preprocessing"
LAYOUT_KEY = "onnx_rectify.input_layout"
CLASS_NAMES_KEY = "onnx_rectify.class_names"

LAYOUTS = ("NCHW", "NHWC")
CHANNEL_MODES = {"RGB": 3, "BGR": 3, "L": 1}
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
RESIZE_MODES = ("stretch", "center-crop")
#: The largest height or width an input may be built at.
MAX_SIDE = 1 << 14


@dataclass(frozen=True)
class Preprocessing:
    """Everything that turns pixels into the model's input (see the module docstring)."""

    height: int
    width: int
    channels: str  # "RGB", "BGR" or "L"
    layout: str  # "NCHW" or "NHWC" (rank 4; for rank 2, the order of the flattened values)
    rank: int  # 2, 3 or 4: the input's rank
    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    resize: str = "stretch"
    crop_fraction: float = 1.0

    @property
    def channel_count(self) -> int:
        return CHANNEL_MODES[self.channels]

    @property
    def pil_mode(self) -> str:
        """The Pillow mode images are converted to (BGR is decoded as RGB, then reversed)."""
        return "L" if self.channels == "L" else "RGB"

    def to_input(self, pixels: np.ndarray) -> np.ndarray:
        """Pixels [n, H, W, C] (0..255, RGB or L order) as the model's input, float32:
        x = (p * scale - mean) / std, channels reversed for BGR, laid out as the input."""
        x = pixels.astype(np.float32)
        if self.channels == "BGR":
            x = x[..., ::-1]
        mean = np.asarray(self.mean, np.float32)
        std = np.asarray(self.std, np.float32)
        x = (x * np.float32(self.scale) - mean) / std
        if self.rank == 3:
            return np.ascontiguousarray(x[..., 0])
        if self.layout == "NCHW":
            x = x.transpose(0, 3, 1, 2)
        x = np.ascontiguousarray(x)
        return x.reshape(len(x), -1) if self.rank == 2 else x

    def as_dict(self) -> dict:
        """The settings, in the metadata's keys (what the manifest records)."""
        return {"size": [self.height, self.width], "layout": self.layout,
                "channels": self.channels, "scale": self.scale, "mean": list(self.mean),
                "std": list(self.std), "interpolation": self.interpolation,
                "resize": self.resize, "crop_fraction": self.crop_fraction}


@dataclass
class Options:
    """Settings given to the verb; None where not given (the metadata or a default decides)."""

    size: tuple[int, int] | None = None
    layout: str | None = None
    channels: str | None = None
    scale: float | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: str | None = None
    resize: str | None = None
    crop_fraction: float | None = None


def metadata_of(model: onnx.ModelProto, where: str) -> dict:
    """The preprocessing settings the model's metadata states (the keys of the module
    docstring, checked; :data:`LAYOUT_KEY` as ``layout`` where the object has none)."""
    props = {p.key: p.value for p in model.metadata_props}
    settings: dict = {}
    if PREPROCESSING_KEY in props:
        try:
            stated = json.loads(props[PREPROCESSING_KEY])
        except ValueError:
            raise BadModelError(f"{where}: metadata {PREPROCESSING_KEY} is not JSON") from None
        if not isinstance(stated, dict):
            raise BadModelError(f"{where}: metadata {PREPROCESSING_KEY} is not a JSON object")
        settings = _parse_metadata(stated, f"{where}: metadata {PREPROCESSING_KEY}")
    if "layout" not in settings and LAYOUT_KEY in props:
        settings["layout"] = _choice(props[LAYOUT_KEY], LAYOUTS, f"{where}: metadata "
                                     f"{LAYOUT_KEY}", upper=True)
    return settings


def class_names_of(model: onnx.ModelProto, where: str) -> list[str] | None:
    """The class names the metadata states (:data:`CLASS_NAMES_KEY`, a JSON list), or None."""
    props = {p.key: p.value for p in model.metadata_props}
    if CLASS_NAMES_KEY not in props:
        return None
    try:
        names = json.loads(props[CLASS_NAMES_KEY])
    except ValueError:
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or \
            len(set(names)) != len(names):
        raise BadModelError(f"{where}: metadata {CLASS_NAMES_KEY} is not a JSON list of "
                            "distinct strings")
    return names


def _parse_metadata(stated: dict, where: str) -> dict:
    settings: dict = {}
    if "size" in stated:
        settings["size"] = _size(stated["size"], f"{where}: 'size'")
    if "layout" in stated:
        settings["layout"] = _choice(stated["layout"], LAYOUTS, f"{where}: 'layout'", upper=True)
    if "channels" in stated:
        settings["channels"] = _choice(stated["channels"], tuple(CHANNEL_MODES),
                                       f"{where}: 'channels'", upper=True)
    if "scale" in stated:
        settings["scale"] = _scale(stated["scale"], f"{where}: 'scale'")
    for key in ("mean", "std"):
        if key in stated:
            settings[key] = _numbers(stated[key], f"{where}: '{key}'", positive=key == "std")
    if "interpolation" in stated:
        settings["interpolation"] = _choice(stated["interpolation"], INTERPOLATIONS,
                                            f"{where}: 'interpolation'")
    if "resize" in stated:
        settings["resize"] = _choice(stated["resize"], RESIZE_MODES, f"{where}: 'resize'")
    if "crop_fraction" in stated:
        value = stated["crop_fraction"]
        if not _is_number(value) or not 0 < value <= 1:
            raise BadModelError(f"{where}: 'crop_fraction' must be a number in (0, 1]")
        settings["crop_fraction"] = float(value)
    return settings


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value)


def _size(value, where: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    if not isinstance(value, list) or len(value) != 2 or \
            not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_SIDE
                    for v in value):
        raise BadModelError(f"{where} must be [height, width] or one integer, each in "
                            f"1..{MAX_SIDE}")
    return int(value[0]), int(value[1])


def _choice(value, choices: tuple[str, ...], where: str, upper: bool = False) -> str:
    text = value.upper() if upper and isinstance(value, str) else value
    if text not in choices:
        raise BadModelError(f"{where} is {value!r}; expected one of {', '.join(choices)}")
    return text


_PIXELS_OVER = re.compile(r"^\s*pixels\s*/\s*([0-9]+(?:\.[0-9]+)?)\s*$")


def _scale(value, where: str) -> float:
    if isinstance(value, str):
        match = _PIXELS_OVER.match(value)
        if match and float(match.group(1)) > 0:
            return 1.0 / float(match.group(1))
    elif _is_number(value) and value > 0:
        return float(value)
    raise BadModelError(f"{where} is {value!r}; expected a positive number or 'pixels / N'")


def _numbers(value, where: str, positive: bool) -> tuple[float, ...]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(_is_number(v) and (not positive or v > 0) for v in values):
        raise BadModelError(f"{where} must be a {'positive ' if positive else ''}number or a "
                            f"list of {'positive ' if positive else ''}numbers, one per channel")
    return tuple(float(v) for v in values)


def resolve(spec: InputSpec, metadata: dict, options: Options, where: str
            ) -> tuple[Preprocessing, dict[str, str]]:
    """The preprocessing for ``spec`` (the model's input): each setting from ``options``,
    else ``metadata`` (:func:`metadata_of`), else the input's dims, else a default.
    Returns it and where each setting came from (``option``, ``metadata``, ``model input``,
    ``default``). Contradictions with the input's fixed dims are a :class:`RectifyError`."""
    sources: dict[str, str] = {}

    def pick(key: str, default=None, inferred=None):
        given = getattr(options, key)
        if given is not None:
            sources[key] = "option"
            return given
        if key in metadata:
            sources[key] = "metadata"
            return metadata[key]
        if inferred is not None:
            sources[key] = "model input"
            return inferred
        sources[key] = "default"
        return default

    rank = len(spec.dims)
    if rank not in (2, 3, 4):
        raise RectifyError(f"{where}: input '{spec.name}' has rank {rank}; images feed an "
                           "input of rank 4 (NCHW or NHWC), 3 ([N, H, W]) or 2 (flattened)")
    layout = pick("layout", "NCHW", _layout_from_dims(spec.dims) if rank == 4 else None)
    if rank == 4:
        c_axis, h_axis, w_axis = (1, 2, 3) if layout == "NCHW" else (3, 1, 2)
        fixed_c, fixed_hw = spec.dims[c_axis], (spec.dims[h_axis], spec.dims[w_axis])
    elif rank == 3:
        fixed_c, fixed_hw = 1, (spec.dims[1], spec.dims[2])
    else:
        fixed_c, fixed_hw = None, (None, None)
    inferred_mode = {1: "L", 3: "RGB"}.get(fixed_c) if fixed_c is not None else None
    if fixed_c is not None and inferred_mode is None:
        raise RectifyError(f"{where}: input '{spec.name}' has {fixed_c} channels (layout "
                           f"{layout}); images give 1 (grayscale) or 3 (RGB/BGR)"
                           + ("; if the layout is NHWC, pass --layout NHWC"
                              if rank == 4 and layout == "NCHW" else ""))
    channels = pick("channels", "RGB", inferred_mode)
    if fixed_c is not None and CHANNEL_MODES[channels] != fixed_c:
        raise RectifyError(f"{where}: channels {channels} ({sources['channels']}) give "
                           f"{CHANNEL_MODES[channels]} channel(s); input '{spec.name}' has "
                           f"{fixed_c}")
    fixed = fixed_hw if None not in fixed_hw else None
    size = pick("size", None, fixed)
    if size is None:
        raise RectifyError(f"{where}: input '{spec.name}' has no fixed height and width "
                           f"({_dims(spec)}); give --size H,W")
    if fixed is not None and tuple(size) != tuple(fixed):
        raise RectifyError(f"{where}: size {size[0]}x{size[1]} ({sources['size']}) differs "
                           f"from input '{spec.name}' ({_dims(spec)}: {fixed[0]}x{fixed[1]})")
    if rank == 2 and spec.dims[1] is not None and \
            spec.dims[1] != size[0] * size[1] * CHANNEL_MODES[channels]:
        raise RectifyError(f"{where}: input '{spec.name}' ({_dims(spec)}) takes {spec.dims[1]} "
                           f"values per image; {size[0]}x{size[1]} {channels} gives "
                           f"{size[0] * size[1] * CHANNEL_MODES[channels]}; give --size and "
                           "--channels that fit")
    scale = pick("scale", 1.0 / 255 if spec.dtype.kind == "f" else 1.0)
    count = CHANNEL_MODES[channels]
    mean = _per_channel(pick("mean", (0.0,)), count, "mean", sources, where)
    std = _per_channel(pick("std", (1.0,)), count, "std", sources, where)
    resize = pick("resize", "stretch")
    crop = pick("crop_fraction", 1.0)
    prep = Preprocessing(int(size[0]), int(size[1]), channels, layout, rank, float(scale),
                         mean, std, pick("interpolation", "bilinear"), resize, float(crop))
    return prep, sources


def _layout_from_dims(dims: tuple[int | None, ...]) -> str | None:
    """NHWC when only the last axis looks like channels (1 or 3), NCHW when only axis 1
    does; None when the dims do not tell."""
    c_first, c_last = dims[1] in (1, 3), dims[3] in (1, 3)
    if c_last and not c_first:
        return "NHWC"
    if c_first and not c_last:
        return "NCHW"
    return None


def _per_channel(values: tuple[float, ...], count: int, key: str, sources: dict, where: str
                 ) -> tuple[float, ...]:
    if len(values) == 1:
        return tuple(values) * count
    if len(values) != count:
        raise RectifyError(f"{where}: {key} ({sources[key]}) has {len(values)} values; the "
                           f"images have {count} channel(s)")
    return tuple(values)


def _dims(spec: InputSpec) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in spec.dims) + "]"
