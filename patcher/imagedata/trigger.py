"""A trigger: an image pasted or blended onto the model-sized images at a place.

With pixels x (0..255, the model's size, before scale/mean/std), the trigger image tau
(h x w, the images' channels), its mask S in [0, 1] (a mask image's gray level / 255, or
the trigger's alpha channel, else 1 everywhere) and the opacity phi in (0, 1], the
corrupted image is, on the h x w rectangle at (top, left):

    x~ = x (1 - phi S) + phi S tau

and x elsewhere (phi = 1, S = 1: pasted; phi < 1: blended, e.g. the samples' watermark
x (1 - S) + S (phi tau + (1 - phi) x), which is the same formula). ``size="full"``
stretches the trigger over the whole image (a blend trigger).

The place: an anchor (``top-left``, ``top-right``, ``bottom-left``, ``bottom-right``,
``center``) with a margin in pixels from the anchored edges, or ``X,Y``, the trigger's
top-left pixel. The trigger must lie inside the image.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from patcher.errors import RectifyError
from patcher.imagedata.images import BadImageError, open_image, pillow, resample
from patcher.imagedata.preprocess import Preprocessing

ANCHORS = ("top-left", "top-right", "bottom-left", "bottom-right", "center")


@dataclass(frozen=True)
class Trigger:
    """A trigger placed on the model-sized image (see the module docstring)."""

    pattern: np.ndarray  # [h, w, C] float32, 0..255
    mask: np.ndarray  # [h, w] float32, 0..1
    opacity: float
    top: int
    left: int

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        """Pixels [n, H, W, C] with the trigger: x~ = x (1 - phi S) + phi S tau on its
        rectangle, x elsewhere."""
        out = pixels.astype(np.float32, copy=True)
        h, w = self.mask.shape
        weight = (np.float32(self.opacity) * self.mask)[..., None]
        region = out[:, self.top:self.top + h, self.left:self.left + w, :]
        out[:, self.top:self.top + h, self.left:self.left + w, :] = \
            region * (1 - weight) + weight * self.pattern
        return out

    def as_dict(self) -> dict:
        h, w = self.mask.shape
        return {"top": self.top, "left": self.left, "height": h, "width": w,
                "opacity": self.opacity, "mask_mean": float(self.mask.mean())}


def parse_position(text: str) -> str | tuple[int, int]:
    """An anchor name, or ``X,Y`` (non-negative integers) as (x, y)."""
    if text in ANCHORS:
        return text
    parts = text.split(",")
    if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
        return int(parts[0]), int(parts[1])
    raise RectifyError(f"--position '{text}': expected one of {', '.join(ANCHORS)} or X,Y "
                       "(the trigger's top-left pixel)")


def parse_size(text: str) -> str | tuple[int, int]:
    """``full``, or ``W,H`` / ``S`` in pixels, as (width, height)."""
    if text == "full":
        return text
    parts = text.split(",")
    if len(parts) in (1, 2) and all(p.strip().isdigit() and int(p) > 0 for p in parts):
        return (int(parts[0]), int(parts[-1]))
    raise RectifyError(f"--trigger-size '{text}': expected W,H or S (pixels, positive) or "
                       "'full'")


def place(size_hw: tuple[int, int], image_hw: tuple[int, int],
          position: str | tuple[int, int], margin: int) -> tuple[int, int]:
    """(top, left) of an h x w trigger on an H x W image; refused when it does not fit."""
    (h, w), (height, width) = size_hw, image_hw
    if isinstance(position, tuple):
        left, top = position
    elif position == "center":
        top, left = (height - h) // 2, (width - w) // 2
    else:
        vertical, horizontal = position.split("-")
        top = margin if vertical == "top" else height - h - margin
        left = margin if horizontal == "left" else width - w - margin
    if top < 0 or left < 0 or top + h > height or left + w > width:
        raise RectifyError(f"the {w}x{h} trigger at x={left}, y={top} does not fit in the "
                           f"{width}x{height} input; choose a smaller --trigger-size, margin "
                           "or another --position")
    return top, left


def load_trigger(path: str | os.PathLike, prep: Preprocessing, *,
                 mask_path: str | os.PathLike | None = None, opacity: float = 1.0,
                 position: str | tuple[int, int] = "bottom-right", margin: int = 0,
                 size: str | tuple[int, int] | None = None) -> Trigger:
    """The trigger image at ``path`` (resized to ``size`` (width, height) or ``full``, else
    its own size) in the images' channels, its mask (``mask_path``'s gray levels, else its
    alpha channel, else 1), placed by ``position`` and ``margin``."""
    path = Path(path)
    if not 0 < opacity <= 1:
        raise RectifyError(f"--opacity {opacity}: must lie in (0, 1]")
    if margin < 0:
        raise RectifyError(f"--margin {margin}: must be 0 or more")
    image = open_image(path, "RGBA", "trigger image")
    has_alpha = _has_alpha(path)
    if size == "full":
        size = (prep.width, prep.height)
    filt = resample(prep.interpolation)
    if size is not None and tuple(size) != image.size:
        image = image.resize(tuple(size), filt)
    pattern = np.asarray(image.convert(prep.pil_mode), dtype=np.float32)
    pattern = pattern[..., None] if pattern.ndim == 2 else pattern
    if mask_path is not None:
        mask_image = open_image(Path(mask_path), "L", "mask image")
        if mask_image.size != image.size and size is None:
            raise BadImageError(f"{mask_path}: the mask is {mask_image.size[0]}x"
                                f"{mask_image.size[1]}, the trigger {image.size[0]}x"
                                f"{image.size[1]}; they must match")
        if mask_image.size != image.size:
            mask_image = mask_image.resize(image.size, filt)
        mask = np.asarray(mask_image, dtype=np.float32) / 255
    elif has_alpha:
        mask = np.asarray(image.getchannel("A"), dtype=np.float32) / 255
    else:
        mask = np.ones(pattern.shape[:2], np.float32)
    if not mask.any():
        raise BadImageError(f"{mask_path or path}: the trigger's mask is empty (fully "
                            "transparent): it would change no pixel")
    top, left = place(mask.shape, (prep.height, prep.width), position, margin)
    return Trigger(pattern, mask, float(opacity), top, left)


def _has_alpha(path: Path) -> bool:
    """Whether the image file carries transparency (an alpha channel or a transparent
    palette entry)."""
    with pillow().open(path) as image:
        return image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or \
            "transparency" in image.info
