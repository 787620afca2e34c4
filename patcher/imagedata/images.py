"""An image folder and its images, decoded with Pillow at the model's size.

Two layouts (torchvision's ImageFolder and a plain folder):

- **class folders**: ``ROOT/<class>/**/<image>``; a class folder is named after its class.
  The class index is the folder name's position in the model's class names
  (``metadata_props`` ``onnx_rectify.class_names``) or in the names given; without either,
  folders named 0, 1, 2, ... are those classes, and other names are sorted (ImageFolder's
  order). Images loose in ROOT beside class folders are refused (which class?).
- **loose images** (``ROOT/**/<image>``, labels from the model): each image's label is the
  model's prediction on it (clean), so "accuracy" on such a set is agreement with the
  unpatched model.

Images are the files whose extension is one of :data:`IMAGE_EXTENSIONS` (any case); other
files and hidden entries (a name starting with '.') are skipped and counted; symlinked
subfolders are not followed. An image that is not a regular file, cannot be decoded, or
has more than :data:`MAX_PIXELS` pixels is refused with its path (nothing is written):
a damaged file in a data set is something to know, not to skip silently.
"""
from __future__ import annotations

import os
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from patcher.errors import BadSamplesError, RectifyError
from patcher.imagedata.preprocess import Preprocessing

#: What torchvision's ImageFolder reads.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
#: Images with more pixels than this are refused before they are decoded.
MAX_PIXELS = 1 << 26
LABEL_MODES = ("auto", "folders", "model")


class BadImageError(BadSamplesError):
    """An image file that cannot be used (named in the message)."""


def pillow():
    """The ``PIL.Image`` module, or a one-line error saying what to install."""
    try:
        from PIL import Image
    except ImportError:
        raise RectifyError("reading images needs Pillow: pip install 'onnx-rectify[images]' "
                           "(or pip install Pillow)") from None
    return Image


@dataclass
class ImageFolder:
    """The images of a folder, sorted by relative path; ``labels`` None where the model
    labels them (loose images)."""

    root: Path
    files: list[Path]
    labels: np.ndarray | None
    class_folders: dict[str, int] = field(default_factory=dict)
    skipped: int = 0  # files that are not images, hidden entries

    def __len__(self) -> int:
        return len(self.files)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _walk(folder: Path) -> tuple[list[Path], int]:
    """Image files under ``folder`` (recursively, symlinked folders not followed, hidden
    entries skipped), sorted; and the count of other files skipped."""
    found, skipped = [], 0

    def refuse(exc: OSError) -> None:
        raise BadImageError(f"{exc.filename}: cannot list the folder ({exc.strerror})")

    for top, dirs, names in os.walk(folder, onerror=refuse):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            if name.startswith(".") or not _is_image(name):
                skipped += 1
            else:
                found.append(Path(top) / name)
    return sorted(found), skipped


def scan(root: str | os.PathLike, mode: str = "auto", class_names: list[str] | None = None
         ) -> ImageFolder:
    """The images under ``root`` and, with class folders, their labels.

    ``mode``: ``folders`` (class subfolders), ``model`` (every image, labelled later by
    the model), ``auto`` (``folders`` when ``root`` has subfolders, else ``model``).
    ``class_names``: the model's classes in index order (folder names are looked up
    there); None: numeric folder names are their class, other names are sorted."""
    root = Path(root)
    if mode not in LABEL_MODES:
        raise RectifyError(f"unknown label mode '{mode}' (choose from {', '.join(LABEL_MODES)})")
    if not root.is_dir():
        raise BadImageError(f"{root}: not a folder of images")
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as exc:
        raise BadImageError(f"{root}: cannot list the folder ({exc.strerror})") from None
    folders = [e for e in entries if not e.name.startswith(".") and e.is_dir()]
    if mode == "auto":
        mode = "folders" if folders else "model"
    if mode == "model":
        files, skipped = _walk(root)
        if not files:
            raise BadImageError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)})")
        return ImageFolder(root, files, None, {}, skipped)
    loose = [e.name for e in entries if e.is_file() and _is_image(e.name)
             and not e.name.startswith(".")]
    if not folders:
        raise BadImageError(f"{root}: no class folders; put each class's images in a folder "
                            "named after it, or label loose images with the model "
                            "(--labels model)")
    if loose:
        raise BadImageError(f"{root}: {len(loose)} image(s) beside the class folders "
                            f"({', '.join(loose[:3])}{', ...' if len(loose) > 3 else ''}): "
                            "which class? move them into a class folder, or label every "
                            "image with the model (--labels model)")
    index = class_index([e.name for e in folders], class_names, root)
    files, labels, skipped = [], [], sum(1 for e in entries if e.is_file()) - len(loose)
    for entry in folders:
        found, other = _walk(root / entry.name)
        files.extend(found)
        labels.extend([index[entry.name]] * len(found))
        skipped += other
    if not files:
        raise BadImageError(f"{root}: the class folders hold no images "
                            f"({', '.join(IMAGE_EXTENSIONS)})")
    return ImageFolder(root, files, np.asarray(labels, np.int64), index, skipped)


def class_index(folders: list[str], class_names: list[str] | None, root: Path
                ) -> dict[str, int]:
    """Each class folder's class index (see :func:`scan`)."""
    if class_names is not None:
        unknown = [f for f in folders if f not in class_names]
        if unknown:
            raise BadImageError(f"{root}: class folder(s) {', '.join(unknown[:5])}"
                                f"{', ...' if len(unknown) > 5 else ''} are not among the "
                                f"model's classes ({', '.join(class_names[:10])}"
                                f"{', ...' if len(class_names) > 10 else ''}); rename them or "
                                "give the class order with --classes")
        return {f: class_names.index(f) for f in folders}
    if all(f.isdigit() and f.isascii() and (f == "0" or not f.startswith("0")) for f in folders):
        return {f: int(f) for f in folders}
    return {f: i for i, f in enumerate(sorted(folders))}


_RESAMPLE = {"nearest": "NEAREST", "bilinear": "BILINEAR", "bicubic": "BICUBIC",
             "lanczos": "LANCZOS", "box": "BOX", "hamming": "HAMMING"}


def resample(name: str):
    """Pillow's resampling filter for an interpolation name."""
    return getattr(pillow().Resampling, _RESAMPLE[name])


def open_image(path: Path, mode: str, what: str = "image"):
    """The image at ``path`` decoded (first frame) and converted to Pillow ``mode``; a
    file that is not a regular file, cannot be decoded or is too large is refused."""
    image_module = pillow()
    try:
        info = os.stat(path)
    except OSError as exc:
        raise BadImageError(f"{path}: cannot read the {what} ({exc.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise BadImageError(f"{path}: the {what} is not a regular file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning: our own cap below
            with image_module.open(path) as image:
                width, height = image.size
                if width * height > MAX_PIXELS:
                    raise BadImageError(f"{path}: the {what} has {width}x{height} pixels, more "
                                        f"than the {MAX_PIXELS:,} read")
                image.load()
                converted = image.convert(mode) if image.mode != mode else image.copy()
    except BadImageError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, TypeError, KeyError, IndexError,
            image_module.DecompressionBombError, MemoryError) as exc:
        text = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise BadImageError(f"{path}: not a readable {what} ({text})") from None
    return converted


def fit(image, prep: Preprocessing):
    """The image resized to the model's size: stretched, or its shorter side scaled to
    size / crop_fraction and the centre cut out (``center-crop``)."""
    height, width = prep.height, prep.width
    filt = resample(prep.interpolation)
    if prep.resize == "stretch":
        return image.resize((width, height), filt) if image.size != (width, height) else image
    scale = max(height / image.height, width / image.width) / prep.crop_fraction
    new_w = max(width, round(image.width * scale))
    new_h = max(height, round(image.height * scale))
    resized = image.resize((new_w, new_h), filt) if (new_w, new_h) != image.size else image
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return resized.crop((left, top, left + width, top + height))


def read_pixels(path: Path, prep: Preprocessing) -> np.ndarray:
    """The image as pixels [H, W, C] float32 in 0..255 at the model's size (RGB or L)."""
    image = fit(open_image(path, prep.pil_mode), prep)
    pixels = np.asarray(image, dtype=np.float32)
    return pixels[..., None] if pixels.ndim == 2 else pixels
