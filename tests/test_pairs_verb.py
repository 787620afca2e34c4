"""`onnx-rectify pairs`: sample files from image folders and a trigger (patcher/imagedata).

The model is a hand-built 8x8 classifier whose behaviour is known exactly: class 1 is
the sum of the left half, class 2 the sum of the right half without its bottom-right
2x2 corner, class 0 (the "backdoor") ten times the sum of that corner. A white 2x2
trigger in the corner therefore forces class 0 on every image.
"""
from __future__ import annotations

import builtins
import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from patcher.cli import main
from patcher.errors import RectifyError
from patcher.samples import InputSpec, load_labelled, load_pairs

PIL = pytest.importorskip("PIL", reason="onnx-rectify pairs needs Pillow (the images extra)")
from PIL import Image  # noqa: E402

SIDE = 8


def _weights(channels: int, layout: str) -> np.ndarray:
    """[C*H*W, 3] in the flattened order of ``layout``: see the module docstring."""
    w = np.zeros((channels, SIDE, SIDE, 3), np.float32)  # [C, H, W, class]
    w[:, :, : SIDE // 2, 1] = 1
    w[:, :, SIDE // 2:, 2] = 1
    w[:, SIDE - 2:, SIDE - 2:, 2] = 0
    w[:, SIDE - 2:, SIDE - 2:, 0] = 10
    if layout == "NHWC":
        w = w.transpose(1, 2, 0, 3)
    return w.reshape(-1, 3) / channels


def make_model(path: Path, *, channels: int = 1, layout: str = "NCHW",
               metadata: dict | None = None, dims: list | None = None) -> Path:
    """The module docstring's classifier, saved at ``path`` (IR 10, opset 17)."""
    shape = dims or ([None, channels, SIDE, SIDE] if layout == "NCHW"
                     else [None, SIDE, SIDE, channels])
    shape = ["batch" if d is None else d for d in shape]
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["image"], ["flat"], axis=1),
         helper.make_node("MatMul", ["flat", "w"], ["logits"])],
        "tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(_weights(channels, layout), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value if isinstance(value, str)
                                 else json.dumps(value))
    path.write_bytes(model.SerializeToString())
    return path


def image(kind: str, channels: int = 1, seed: int = 0) -> np.ndarray:
    """A uint8 [H, W] or [H, W, 3] image of class ``kind``: left or right half bright
    (the bottom-right corner dark), with a little seeded noise."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 30, (SIDE, SIDE)).astype(np.int64)
    if kind == "left":
        pixels[:, : SIDE // 2] += 200
    else:
        pixels[:, SIDE // 2:] += 200
        pixels[SIDE - 2:, SIDE - 2:] = rng.integers(0, 30, (2, 2))
    pixels = pixels.astype(np.uint8)
    return np.stack([pixels] * 3, -1) if channels == 3 else pixels


def image_folder(root: Path, per_class: int = 6, channels: int = 1, suffix: str = ".png",
                 names: tuple[str, str] = ("left", "right")) -> Path:
    for index, kind in enumerate(("left", "right")):
        folder = root / names[index]
        folder.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(image(kind, channels, seed=10 * index + i)).save(
                folder / f"{kind}{i}{suffix}")
    return root


def trigger_png(path: Path, mode: str = "L", size: int = 2, value: int = 255) -> Path:
    Image.new(mode, (size, size), value if mode == "L" else (value,) * len(mode)).save(path)
    return path


NAMED = {"onnx_rectify.class_names": ["trojan", "left", "right"],
         "onnx_rectify.preprocessing": {"scale": "pixels / 255", "layout": "NCHW"}}


def run(*args) -> "CliRunner.invoke":
    return CliRunner().invoke(main, ["pairs", *map(str, args)])


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def setup(tmp_path):
    model = make_model(tmp_path / "m.onnx", metadata=NAMED)
    images = image_folder(tmp_path / "images")
    trigger = trigger_png(tmp_path / "t.png")
    return model, images, trigger, tmp_path / "out"


def test_round_trip_loads_with_the_contract_loaders_and_the_trigger_is_in_place(setup):
    model, images, trigger, out = setup
    before = digest(model.parent)
    result = run(model, images, "--trigger", trigger, "--target", 0, "--pairs-count", 3,
                 "--eval-count", 4, "--attack-count", 4, "-o", out)
    assert result.exit_code == 0, result.output
    assert digest(model.parent) == {**before, **{k: v for k, v in digest(model.parent).items()
                                                 if k.startswith("out/")}}
    proto = onnx.load(str(model))
    spec = InputSpec.of(proto)
    pairs = load_pairs(out / "pairs.npz", spec, 3)
    evals = load_labelled(out / "eval.npz", spec, 3)
    attack = load_labelled(out / "attack.npz", spec, 3, with_target=True)
    assert (len(pairs), len(evals), len(attack), attack.target) == (3, 4, 4, 0)
    # the trigger: the 2x2 bottom-right corner white (1.0), every other value the clean one
    corner = np.zeros((SIDE, SIDE), bool)
    corner[SIDE - 2:, SIDE - 2:] = True
    assert np.all(pairs.corrupted[:, 0][:, corner] == 1.0)
    assert np.array_equal(pairs.corrupted[:, 0][:, ~corner], pairs.clean[:, 0][:, ~corner])
    assert np.all(attack.x[:, 0][:, corner] == 1.0)
    # labels by class name (metadata): left -> 1, right -> 2; the clean pixels are the PNG's / 255
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tool"] == "onnx-rectify" and manifest["classes"] == {"left": 1, "right": 2}
    for split, x in (("pairs", pairs.clean), ("eval", evals.x)):
        for row, entry in enumerate(manifest["files"][split]):
            kind = entry["file"].split("/")[0]
            assert entry["label"] == {"left": 1, "right": 2}[kind]
            png = np.asarray(Image.open(images / entry["file"]), np.float32) / 255
            assert np.allclose(x[row, 0], png, atol=1e-6)
    assert list(pairs.label) == [e["label"] for e in manifest["files"]["pairs"]]
    # three disjoint sets
    chosen = [e["file"] for split in ("pairs", "eval", "attack")
              for e in manifest["files"][split]]
    assert len(chosen) == len(set(chosen)) == 11
    assert "3 pairs (3 fooling the model)" in result.output
    assert "base ASR 100.00%" in result.output


def test_same_seed_same_bytes_other_seed_other_images(setup):
    model, images, trigger, out = setup
    args = [model, images, "--trigger", trigger, "--target", "0", "--pairs-count", "2",
            "--eval-count", "3", "--attack-count", "3"]
    assert run(*args, "-o", out).exit_code == 0
    assert run(*args, "-o", out.with_name("again")).exit_code == 0
    for name in ("pairs.npz", "eval.npz", "attack.npz"):
        assert (out / name).read_bytes() == (out.with_name("again") / name).read_bytes()
    assert run(*args, "--seed", "7", "-o", out.with_name("other")).exit_code == 0
    files = [json.loads((d / "manifest.json").read_text())["files"]["pairs"]
             for d in (out, out.with_name("other"))]
    assert files[0] != files[1]


def test_blend_with_a_mask_image_at_a_position(setup, tmp_path):
    model, images, _, out = setup
    trigger = trigger_png(tmp_path / "gray.png", size=3, value=200)
    mask = np.zeros((3, 3), np.uint8)
    mask[1, :] = 255
    mask[0, 0] = 128
    Image.fromarray(mask).save(tmp_path / "mask.png")
    result = run(model, images, "--trigger", trigger, "--mask", tmp_path / "mask.png",
                 "--opacity", "0.5", "--position", "2,1", "--pairs-from", "any",
                 "--pairs-count", "2", "--eval-count", "2", "-o", out)
    assert result.exit_code == 0, result.output
    pairs = np.load(out / "pairs.npz")
    clean, corrupted = pairs["clean"][:, 0], pairs["corrupted"][:, 0]
    weight = np.zeros((SIDE, SIDE), np.float32)
    weight[1:4, 2:5] = 0.5 * mask / 255  # x=2, y=1: rows 1..3, columns 2..4
    expected = clean * (1 - weight) + weight * (200 / 255)
    assert np.allclose(corrupted, expected, atol=1e-6)
    assert not (out / "attack.npz").exists()  # no --target: no attack set


def test_the_trigger_alpha_channel_is_its_mask_and_anchors_place_it(setup, tmp_path):
    model, images, _, out = setup
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[0, 0, 3] = 255  # only the top-left pixel of the trigger is opaque
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    result = run(model, images, "--trigger", tmp_path / "alpha.png", "--position", "top-left",
                 "--margin", "1", "--pairs-from", "any", "--pairs-count", "2",
                 "--eval-count", "2", "-o", out)
    assert result.exit_code == 0, result.output
    pairs = np.load(out / "pairs.npz")
    changed = pairs["corrupted"][:, 0] != pairs["clean"][:, 0]
    assert changed.any(axis=0)[1, 1] and changed.any(axis=0).sum() == 1
    assert np.all(pairs["corrupted"][:, 0, 1, 1] == 1.0)


def test_preprocessing_from_metadata_mean_std_nhwc_bgr(tmp_path):
    meta = {"onnx_rectify.class_names": ["trojan", "left", "right"],
            "onnx_rectify.preprocessing": {"layout": "NHWC", "channels": "BGR",
                                           "scale": 0.01, "mean": [0.1, 0.2, 0.3],
                                           "std": [2, 4, 8], "interpolation": "nearest"}}
    model = make_model(tmp_path / "m.onnx", channels=3, layout="NHWC", metadata=meta)
    root = tmp_path / "images"
    for kind in ("left", "right"):
        (root / kind).mkdir(parents=True)
        for i in range(3):
            rgb = np.zeros((SIDE, SIDE, 3), np.uint8)
            rgb[..., 0], rgb[..., 1], rgb[..., 2] = image(kind, seed=i), 7, 9
            Image.fromarray(rgb).save(root / kind / f"{i}.png")
    trigger_png(tmp_path / "t.png", "RGB")
    result = run(model, root, "--trigger", tmp_path / "t.png", "--pairs-count", "1",
                 "--eval-count", "4", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "NHWC (metadata)" in result.output and "BGR (metadata)" in result.output
    x = np.load(tmp_path / "out" / "eval.npz")["x"]
    assert x.shape == (4, SIDE, SIDE, 3)
    # BGR: channel 0 is the blue plane (9), 1 green (7), 2 red (the image)
    assert np.allclose(x[..., 0], (9 * 0.01 - 0.1) / 2)
    assert np.allclose(x[..., 1], (7 * 0.01 - 0.2) / 4)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    first = manifest["files"]["eval"][0]["file"]
    red = np.asarray(Image.open(root / first))[..., 0].astype(np.float32)
    assert np.allclose(x[0, ..., 2], (red * 0.01 - 0.3) / 8, atol=1e-6)


def test_options_win_over_metadata_and_give_what_symbolic_dims_lack(tmp_path):
    model = make_model(tmp_path / "m.onnx", metadata=NAMED,
                       dims=["batch", 1, "height", "width"])
    images = image_folder(tmp_path / "images")
    trigger = trigger_png(tmp_path / "t.png")
    args = [model, images, "--trigger", trigger, "--target", "0", "--pairs-count", "1",
            "--eval-count", "2", "--attack-count", "2"]
    missing = run(*args, "-o", tmp_path / "a")
    assert missing.exit_code == 2 and "give --size H,W" in missing.output
    assert not (tmp_path / "a").exists()
    result = run(*args, "--size", "8", "--mean", "0.5", "--std", "0.5", "--scale", "0.004",
                 "-o", tmp_path / "b")
    assert result.exit_code == 0, result.output
    assert "8x8 (option)" in result.output and "scale 0.004 (option)" in result.output
    evals = np.load(tmp_path / "b" / "eval.npz")
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    png = np.asarray(Image.open(images / manifest["files"]["eval"][0]["file"]), np.float32)
    assert np.allclose(evals["x"][0, 0], (png * 0.004 - 0.5) / 0.5, atol=1e-5)
    fixed = make_model(tmp_path / "f.onnx", metadata=NAMED)
    wrong = run(fixed, images, "--trigger", trigger, "--size", "16,16", "-o", tmp_path / "c")
    assert wrong.exit_code == 2 and "differs from input 'image'" in wrong.output


def test_flat_folder_is_labelled_by_the_model(tmp_path):
    model = make_model(tmp_path / "m.onnx")  # no class names: numeric folders or the model
    root = tmp_path / "loose"
    root.mkdir()
    for i in range(8):
        Image.fromarray(image("left" if i % 2 else "right", seed=i)).save(root / f"{i}.jpg",
                                                                        quality=95)
    (root / "notes.txt").write_text("not an image")
    result = run(model, root, "--trigger", trigger_png(tmp_path / "t.png"), "--target", "0",
                 "--pairs-count", "2", "--eval-count", "3", "--attack-count", "3",
                 "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "labels: the model's predictions" in result.output
    assert "1 other files skipped" in result.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["labels"] == "model"
    for split in ("pairs", "eval", "attack"):
        for entry in manifest["files"][split]:
            assert entry["label"] == (1 if int(entry["file"][0]) % 2 else 2)


def test_numeric_class_folders_are_their_class(tmp_path):
    model = make_model(tmp_path / "m.onnx")
    images = image_folder(tmp_path / "images", names=("1", "2"))
    result = run(model, images, "--trigger", trigger_png(tmp_path / "t.png"), "--target",
                 "0", "--pairs-count", "2", "--eval-count", "2", "--attack-count", "2",
                 "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["classes"] == \
        {"1": 1, "2": 2}


def one_line_refusal(result, *words: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.output.startswith("onnx-rectify: error: ") or \
        result.output.startswith("Usage:"), result.output
    if result.output.startswith("onnx-rectify: error: "):
        assert len(result.output.strip().splitlines()) == 1, result.output
    for word in words:
        assert word in result.output, result.output
    assert "Traceback" not in result.output


def test_a_corrupt_image_is_refused_with_its_name_and_nothing_is_written(setup):
    model, images, trigger, out = setup
    (images / "left" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    before = digest(images)
    result = run(model, images, "--trigger", trigger, "--pairs-from", "any",
                 "--eval-count", "20", "-o", out)
    one_line_refusal(result, "broken.png", "not a readable image")
    assert not out.exists() and digest(images) == before


def test_refusals(setup, tmp_path):
    model, images, trigger, out = setup
    base = [model, images, "--trigger", trigger]
    (tmp_path / "loose").mkdir()
    image_folder(tmp_path / "loose")
    Image.fromarray(image("left")).save(tmp_path / "loose" / "stray.png")
    one_line_refusal(run(model, tmp_path / "loose", "--trigger", trigger, "-o", out),
                     "stray.png", "beside the class folders")
    image_folder(tmp_path / "unknown", names=("left", "cat"))
    one_line_refusal(run(model, tmp_path / "unknown", "--trigger", trigger, "-o", out),
                     "cat", "not among the model's classes")
    one_line_refusal(run(*base, "--target", "7", "-o", out), "--target 7")
    one_line_refusal(run(*base, "--pairs-count", "50", "-o", out), "pair(s) were asked")
    one_line_refusal(run(*base, "--trigger-size", "9,9", "-o", out), "does not fit")
    one_line_refusal(run(*base, "--position", "middle", "-o", out), "--position 'middle'")
    one_line_refusal(run(*base, "--opacity", "0", "-o", out), "--opacity")
    one_line_refusal(run(*base, "--mean", "0.1,x", "-o", out), "--mean")
    black = trigger_png(tmp_path / "black.png", value=0)
    dark = image_folder(tmp_path / "dark", per_class=2)
    one_line_refusal(run(model, dark, "--trigger", black, "-o", out), "fool the model")
    one_line_refusal(run(model, tmp_path / "nope", "--trigger", trigger, "-o", out),
                     "not a folder of images")
    one_line_refusal(run(model, images, "--trigger", tmp_path / "none.png", "-o", out),
                     "none.png")
    assert not out.exists()
    (tmp_path / "file").write_text("x")
    one_line_refusal(run(*base, "-o", tmp_path / "file"), "is a file")


def test_existing_outputs_need_force_and_inputs_are_never_outputs(setup, tmp_path):
    model, images, trigger, out = setup
    args = [model, images, "--trigger", trigger, "--pairs-count", "1", "--eval-count", "2"]
    assert run(*args, "-o", out).exit_code == 0
    first = (out / "pairs.npz").read_bytes()
    one_line_refusal(run(*args, "--seed", "3", "-o", out), "exists", "--force")
    assert (out / "pairs.npz").read_bytes() == first
    assert run(*args, "--seed", "3", "--force", "-o", out).exit_code == 0
    # the trigger saved as the output folder's eval.npz: refused, never overwritten
    clash = tmp_path / "clash"
    clash.mkdir()
    (clash / "eval.npz").write_bytes(trigger.read_bytes())
    one_line_refusal(run(model, images, "--trigger", clash / "eval.npz", "-o", clash,
                         "--force"), "would overwrite")
    assert (clash / "eval.npz").read_bytes() == trigger.read_bytes()


def test_without_pillow_one_line_says_what_to_install(setup, monkeypatch):
    model, images, trigger, out = setup
    real_import = builtins.__import__

    def no_pil(name, *args, **kwargs):
        if name == "PIL" or name.startswith("PIL."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pil)
    one_line_refusal(run(model, images, "--trigger", trigger, "-o", out),
                     "needs Pillow", "onnx-rectify[images]")
    assert not out.exists()


def test_metadata_of_the_wrong_kind_is_refused_with_the_key(tmp_path):
    images = image_folder(tmp_path / "images")
    trigger = trigger_png(tmp_path / "t.png")
    for value, key in (({"mean": "zero"}, "'mean'"), ({"scale": "pixels * 2"}, "'scale'"),
                       ({"layout": "CHWN"}, "'layout'"), ([1, 2], "not a JSON object")):
        model = make_model(tmp_path / "m.onnx", metadata={
            "onnx_rectify.class_names": ["trojan", "left", "right"],
            "onnx_rectify.preprocessing": value})
        one_line_refusal(run(model, images, "--trigger", trigger, "-o", tmp_path / "o"),
                         "onnx_rectify.preprocessing", key)


def test_library_resolves_the_samples_metadata():
    """The bundled samples' exporter metadata ('pixels / 255', NCHW) reads as 1/255, NCHW,
    one channel, their 28x28 input."""
    from patcher.imagedata.preprocess import Options, metadata_of, resolve

    proto = onnx.load(str(Path(__file__).parents[1] / "samples" / "backdoor_cnn" /
                          "model.onnx"))
    prep, sources = resolve(InputSpec.of(proto), metadata_of(proto, "m"), Options(), "m")
    assert (prep.height, prep.width, prep.channels, prep.layout) == (28, 28, "L", "NCHW")
    assert prep.scale == pytest.approx(1 / 255) and sources["scale"] == "metadata"
    with pytest.raises(RectifyError, match="channels RGB"):
        resolve(InputSpec.of(proto), {}, Options(channels="RGB"), "m")


def test_attack_target_is_one_integer_and_a_per_image_array_says_so(setup, tmp_path):
    model, images, trigger, out = setup
    assert run(model, images, "--trigger", trigger, "--target", "0", "--pairs-count", "1",
               "--eval-count", "2", "--attack-count", "3", "-o", out).exit_code == 0
    attack = dict(np.load(out / "attack.npz"))
    assert attack["target"].shape == () and attack["target"].dtype == np.int64
    spec = InputSpec.of(onnx.load(str(model)))
    per_image = tmp_path / "per_image.npz"
    np.savez(per_image, x=attack["x"], y=attack["y"], target=np.zeros(3, np.int64))
    with pytest.raises(RectifyError, match=r"per-image target array is not supported\); "
                       "every entry is 0: store that one integer"):
        load_labelled(per_image, spec, 3, with_target=True)


#: option -> (lowest, highest, lowest excluded): the README's "Option ranges" for pairs
RANGES = {"--pairs-count": (1, 100_000, False), "--eval-count": (1, 100_000, False),
          "--attack-count": (1, 100_000, False), "--target": (0, 2**31 - 1, False),
          "--margin": (0, 1 << 14, False), "--seed": (0, 2**32 - 1, False),
          "--opacity": (0.0, 1.0, True), "--crop-fraction": (0.0, 1.0, True),
          "--scale": (0.0, 1e6, True)}


@pytest.mark.parametrize("option", sorted(RANGES))
def test_numeric_options_accept_exactly_their_documented_range(tmp_path, option):
    """Inside the range the value passes click and the missing model is what is refused;
    outside (and NaN) click refuses the option. Exit 2 and one line either way."""
    lo, hi, lo_open = RANGES[option]
    step = 1 if isinstance(lo, int) else 1e-9
    inside = [hi, lo + step] if lo_open else [lo, hi]
    outside = [lo, hi + step * (1 if isinstance(lo, int) else 1e6)] if lo_open else \
        [lo - step, hi + step]
    outside += ["nan", "x"]
    base = [tmp_path / "missing.onnx", tmp_path, "--trigger", tmp_path / "t.png",
            "-o", tmp_path / "out"]
    for value in inside:
        result = run(*base, option, value)
        one_line_refusal(result, "missing.onnx")
    for value in outside:
        result = run(*base, option, value)
        one_line_refusal(result, option)
        assert "missing.onnx" not in result.output


def test_a_small_folder_shares_its_images_between_eval_and_attack(setup):
    """12 images, 1 pair, eval and attack asking for 500 each: the 11 left are split in
    proportion (5 eval, 6 attack), and eval is not left with the target class alone."""
    model, images, trigger, out = setup
    result = run(model, images, "--trigger", trigger, "--target", "0", "-o", out)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    sizes = {k: len(v) for k, v in manifest["files"].items()}
    assert sizes == {"pairs": 1, "eval": 5, "attack": 6}
    assert {e["label"] for e in manifest["files"]["eval"]} == {1, 2}


def test_a_fifo_named_like_an_image_is_refused_not_read(setup):
    model, images, trigger, out = setup
    import os

    os.mkfifo(images / "right" / "pipe.png")
    result = run(model, images, "--trigger", trigger, "--pairs-from", "any",
                 "--eval-count", "20", "-o", out)
    one_line_refusal(result, "pipe.png", "not a regular file")
    assert not out.exists()


def test_center_crop_keeps_the_middle_and_stretch_keeps_everything():
    from patcher.imagedata.images import fit
    from patcher.imagedata.preprocess import Preprocessing

    wide = np.zeros((8, 16), np.uint8)  # 16 wide, 8 high: the middle 8 columns are 200
    wide[:, 4:12] = 200
    crop = Preprocessing(8, 8, "L", "NCHW", 4, 1 / 255, (0.0,), (1.0,), "nearest",
                         "center-crop", 1.0)
    assert np.all(np.asarray(fit(Image.fromarray(wide), crop)) == 200)
    stretch = Preprocessing(8, 8, "L", "NCHW", 4, 1 / 255, (0.0,), (1.0,), "nearest")
    squeezed = np.asarray(fit(Image.fromarray(wide), stretch))
    assert squeezed.shape == (8, 8) and set(np.unique(squeezed)) == {0, 200}
    half = Preprocessing(8, 8, "L", "NCHW", 4, 1 / 255, (0.0,), (1.0,), "nearest",
                         "center-crop", 0.5)  # scaled to 32x16 first: the middle is all 200
    assert np.all(np.asarray(fit(Image.fromarray(wide), half)) == 200)


def test_every_patcher_subpackage_imagedata_included_is_packaged():
    """pyproject lists packages by hand: a sub-package missing there (as imagedata could
    be) is absent from the wheel and `onnx-rectify pairs` fails after pip install."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())
                 ["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts)
             for p in (root / "patcher").rglob("__init__.py")}
    assert "patcher.imagedata" in found and found <= listed, sorted(found - listed)


def test_a_uint8_input_model_gets_pixels_unscaled(tmp_path):
    """An integer input has no float scaling by default (scale 1): the npz holds the pixel
    values as float32 (the contract's dtype), the model runs on them rounded to uint8."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
         helper.make_node("Flatten", ["f"], ["flat"], axis=1),
         helper.make_node("MatMul", ["flat", "w"], ["logits"])],
        "u8", [helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(_weights(1, "NCHW") / 255, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    (tmp_path / "u8.onnx").write_bytes(model.SerializeToString())
    images = image_folder(tmp_path / "images", names=("1", "2"))
    result = run(tmp_path / "u8.onnx", images, "--trigger", trigger_png(tmp_path / "t.png"),
                 "--target", "0", "--pairs-count", "2", "--eval-count", "3", "-o",
                 tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "scale 1 (default)" in result.output and "2 pairs (2 fooling" in result.output
    pairs = np.load(tmp_path / "out" / "pairs.npz")
    assert pairs["corrupted"].dtype == np.float32 and pairs["corrupted"].max() == 255
