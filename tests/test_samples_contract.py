"""The npz sample contract: what is accepted, and one clear error for each kind of bad file."""
from __future__ import annotations

import numpy as np
import pytest

from patcher.errors import BadSamplesError
from patcher.samples import InputSpec, load_labelled, load_pairs, num_classes_of
from tests.build import make_model, value_info
from onnx import helper

MODEL = make_model([helper.make_node("Flatten", ["x"], ["f"], name="flat"),
                    helper.make_node("MatMul", ["f", "w"], ["y"], name="fc")],
                   [value_info("x", ["batch", 1, 4, 4])], [value_info("y", ["batch", 3])],
                   {"w": np.ones((16, 3), np.float32)})
SPEC = InputSpec.of(MODEL)
RNG = np.random.default_rng(0)


def _images(n=4):
    return RNG.random((n, 1, 4, 4), dtype=np.float32)


def test_spec_and_classes_come_from_the_model():
    assert SPEC.name == "x" and SPEC.dims == (None, 1, 4, 4)
    assert num_classes_of(MODEL) == 3


def test_valid_files_load(tmp_path):
    clean = _images()
    np.savez(tmp_path / "p.npz", corrupted=clean + 0.1, clean=clean, label=np.array([0, 1, 2, 0]))
    pairs = load_pairs(tmp_path / "p.npz", SPEC, 3)
    assert len(pairs) == 4 and pairs.label.dtype == np.int64
    np.savez(tmp_path / "a.npz", x=_images(), y=np.array([1, 2, 1, 2]), target=np.int64(0))
    attack = load_labelled(tmp_path / "a.npz", SPEC, 3, with_target=True)
    assert attack.target == 0 and attack.x.dtype == np.float32


@pytest.mark.parametrize("arrays,match", [
    ({"clean": _images(), "label": np.zeros(4, np.int64)}, "missing key\\(s\\) corrupted"),
    ({"corrupted": _images(), "clean": _images(), "label": np.array([0, 1, 2, 3])},
     "labels must lie in 0..2"),
    ({"corrupted": _images()[:, :, :3], "clean": _images()[:, :, :3], "label": np.zeros(4, int)},
     "does not fit the model input 'x'"),
    ({"corrupted": np.full((4, 1, 4, 4), np.nan, np.float32), "clean": _images(),
      "label": np.zeros(4, int)}, "NaN or Inf"),
    ({"corrupted": _images().astype(np.int32), "clean": _images(), "label": np.zeros(4, int)},
     "expected float32 images"),
    ({"corrupted": np.zeros((0, 1, 4, 4), np.float32), "clean": np.zeros((0, 1, 4, 4), np.float32),
      "label": np.zeros(0, int)}, "holds no samples"),
])
def test_bad_pairs_are_named(tmp_path, arrays, match):
    np.savez(tmp_path / "p.npz", **arrays)
    with pytest.raises(BadSamplesError, match=match):
        load_pairs(tmp_path / "p.npz", SPEC, 3)


def test_identical_pairs_pickles_and_garbage_are_refused(tmp_path):
    same = _images()
    np.savez(tmp_path / "same.npz", corrupted=same, clean=same, label=np.zeros(4, int))
    with pytest.raises(BadSamplesError, match="nothing to fix"):
        load_pairs(tmp_path / "same.npz", SPEC, 3)
    np.savez(tmp_path / "obj.npz", x=np.array([object()], dtype=object), y=np.zeros(1, int))
    with pytest.raises(BadSamplesError, match="without pickles"):
        load_labelled(tmp_path / "obj.npz", SPEC, 3)
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(BadSamplesError, match="not a readable npz"):
        load_labelled(tmp_path / "junk.npz", SPEC, 3)
