"""Verbs that make sample files: pairs."""
from __future__ import annotations

import math
from pathlib import Path

import click

from patcher.errors import RectifyError
from patcher.cli.common import (SEED, Range, check_paths, data_reads, json_text, main,
                                reports_errors)

_COUNT = click.IntRange(1, 100_000)
_SIDE = click.IntRange(0, 1 << 14)


def _numbers(flag: str, text: str | None, positive: bool = False) -> tuple[float, ...] | None:
    """Comma-separated finite numbers (positive ones with ``positive``), or None."""
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or not all(math.isfinite(v) and (not positive or v > 0) for v in values):
        raise RectifyError(f"{flag} '{text}': expected comma-separated "
                           f"{'positive ' if positive else ''}numbers, one or one per channel")
    return values


def _size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    parts = text.split(",")
    if len(parts) in (1, 2) and all(p.strip().isdigit() and 1 <= int(p) <= 1 << 14
                                    for p in parts):
        return int(parts[0]), int(parts[-1])
    raise RectifyError(f"--size '{text}': expected H,W or S (pixels, 1..16384)")


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("images", type=click.Path(file_okay=False, path_type=Path))
@click.option("--trigger", "trigger_path", required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="The trigger image (PNG, JPEG, ...); its alpha channel, if any, is its mask.")
@click.option("--mask", "mask_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="A gray image, the trigger's size: where it applies (white: "
              "fully, black: not).")
@click.option("--opacity", type=Range(0.0, 1.0, min_open=True), default=1.0,
              show_default=True, help="phi: 1 pastes the trigger, less blends it.")
@click.option("--position", default="bottom-right", show_default=True,
              help="top-left, top-right, bottom-left, bottom-right, center, or X,Y (the "
              "trigger's top-left pixel).")
@click.option("--margin", type=_SIDE, default=0, show_default=True,
              help="Pixels between the trigger and the anchored edges.")
@click.option("--trigger-size", default=None, metavar="W,H|S|full",
              help="Resize the trigger to W x H pixels of the model's input, or over the "
              "whole image (full). Default: its own size.")
@click.option("-o", "--output", "out_dir", required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Folder for pairs.npz, eval.npz, attack.npz and manifest.json (created "
              "if missing).")
@click.option("--target", type=click.IntRange(0, 2**31 - 1), default=None,
              help="The class the trigger forces (one class): writes attack.npz and keeps "
              "that class's images out of the pairs and attack sets.")
@click.option("--pairs-count", type=_COUNT, default=1, show_default=True,
              help="Pairs to write (exactly); one is what the demo and the figures use.")
@click.option("--eval-count", type=_COUNT, default=500, show_default=True,
              help="Clean eval images to write (at most).")
@click.option("--attack-count", type=_COUNT, default=500, show_default=True,
              help="Attack images to write (at most; with --target).")
@click.option("--pairs-from", type=click.Choice(["fooled", "any"]), default="fooled",
              show_default=True, help="fooled: only images the model gets right clean and "
              "wrong with the trigger; any: every image.")
@click.option("--labels", "label_mode", type=click.Choice(["auto", "folders", "model"]),
              default="auto", show_default=True,
              help="folders: class subfolders; model: the model's prediction on the clean "
              "image; auto: folders when IMAGES has subfolders.")
@click.option("--classes", default=None, metavar="NAME,NAME,...",
              help="Class folder names in class-index order (default: the model's class "
              "names, else numeric folder names, else sorted names).")
@click.option("--seed", type=SEED, default=0, show_default=True,
              help="Seed of the shuffle that picks the images.")
@click.option("--size", default=None, metavar="H,W|S", help="Input height and width.")
@click.option("--layout", type=click.Choice(["NCHW", "NHWC"]), default=None)
@click.option("--channels", type=click.Choice(["RGB", "BGR", "L"]), default=None,
              help="Channel order (L: grayscale).")
@click.option("--grayscale", is_flag=True, help="Same as --channels L.")
@click.option("--scale", type=Range(0.0, 1e6, min_open=True), default=None,
              help="x = (pixels * scale - mean) / std; default 1/255.")
@click.option("--mean", default=None, metavar="M|M,M,M", help="Per channel, default 0.")
@click.option("--std", default=None, metavar="S|S,S,S", help="Per channel, default 1.")
@click.option("--interpolation", default=None,
              type=click.Choice(["nearest", "bilinear", "bicubic", "lanczos", "box",
                                 "hamming"]), help="Resampling filter; default bilinear.")
@click.option("--resize", type=click.Choice(["stretch", "center-crop"]), default=None,
              help="stretch to the size (default), or scale the shorter side and cut the "
              "centre.")
@click.option("--crop-fraction", type=Range(0.0, 1.0, min_open=True), default=None,
              help="With center-crop: the share of the scaled image kept; default 1.")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True)
@click.option("--force", is_flag=True, help="Overwrite files of the same names in -o.")
@reports_errors
def pairs(model: Path, images: Path, trigger_path: Path, mask_path: Path | None,
          opacity: float, position: str, margin: int, trigger_size: str | None,
          out_dir: Path, target: int | None, pairs_count: int, eval_count: int,
          attack_count: int, pairs_from: str, label_mode: str, classes: str | None,
          seed: int, size: str | None, layout: str | None, channels: str | None,
          grayscale: bool, scale: float | None, mean: str | None, std: str | None,
          interpolation: str | None, resize: str | None, crop_fraction: float | None,
          provider: str, force: bool) -> None:
    """Build pairs.npz, eval.npz and attack.npz (with --target) from IMAGES, a folder of
    class subfolders or of loose images (labelled by the model's prediction), and a
    trigger image pasted or blended onto them. The images are preprocessed as the model's
    metadata says (onnx_rectify.preprocessing) or as the options say; options win. The
    three sets are disjoint and chosen by --seed. Needs Pillow (pip install
    'onnx-rectify[images]')."""
    from patcher.imagedata import build, preprocess
    from patcher.imagedata.images import pillow, scan
    from patcher.imagedata.trigger import load_trigger, parse_position, parse_size
    from patcher.model.modelio import load_model
    from patcher.model.paths import check_folder_outputs, check_output_folder
    from patcher.samples import classifier_contract

    if grayscale and channels not in (None, "L"):
        raise RectifyError(f"--grayscale and --channels {channels} contradict each other")
    options = preprocess.Options(
        size=_size(size), layout=layout, channels="L" if grayscale else channels, scale=scale,
        mean=_numbers("--mean", mean), std=_numbers("--std", std, positive=True),
        interpolation=interpolation, resize=resize, crop_fraction=crop_fraction)
    where = parse_position(position)
    wanted_size = parse_size(trigger_size) if trigger_size is not None else None
    names = [n.strip() for n in classes.split(",")] if classes is not None else None
    if names is not None and (not all(names) or len(set(names)) != len(names)):
        raise RectifyError(f"--classes '{classes}': expected distinct, non-empty names")
    pillow()  # before any work: say what to install
    reads = {"MODEL": model, "--trigger": trigger_path, "--mask": mask_path}
    writes = {f"-o's {name}": out_dir / name for name in build.FILE_NAMES.values()}
    check_output_folder("-o", out_dir)
    check_folder_outputs("-o", out_dir, reads, lambda n: n in build.FILE_NAMES.values())
    check_paths(reads, writes if out_dir.is_dir() else {},
                {flag: force for flag in writes})
    loaded = load_model(model)
    check_paths({**reads, **data_reads("MODEL", loaded)}, writes if out_dir.is_dir() else {},
                {flag: force for flag in writes})
    spec, num_classes = classifier_contract(loaded.proto, str(model))
    metadata = preprocess.metadata_of(loaded.proto, str(model))
    prep, sources = preprocess.resolve(spec, metadata, options, str(model))
    class_names = names if names is not None else \
        preprocess.class_names_of(loaded.proto, str(model))
    folder = scan(images, label_mode, class_names)
    trigger = load_trigger(trigger_path, prep, mask_path=mask_path, opacity=opacity,
                           position=where, margin=margin, size=wanted_size)
    counts = build.Counts(pairs_count, eval_count, attack_count)
    sets = build.build_sets(loaded, folder, prep, trigger, counts=counts, target=target,
                            pairs_from=pairs_from, seed=seed, provider=provider,
                            num_classes=num_classes)
    record = build.manifest(sets, model=loaded, folder=folder, prep=prep, sources=sources,
                            trigger=trigger, seed=seed, counts=counts, target=target,
                            pairs_from=pairs_from,
                            trigger_files={"image": str(trigger_path),
                                           "mask": str(mask_path) if mask_path else None})
    written = build.write_sets(sets, out_dir, json_text(record), force=force)
    _say(folder, prep, sources, trigger, sets, written)


def _say(folder, prep, sources: dict, trigger, sets, written: list[Path]) -> None:
    fig = sets.figures
    labels = (f"{len(folder.class_folders)} class folders" if folder.labels is not None
              else "labels: the model's predictions")
    click.echo(f"images: {folder.root} ({len(folder)} images, {labels}; {fig['images_read']} "
               f"read, {fig['other_files_skipped']} other files skipped)")
    mean = ",".join(f"{m:g}" for m in prep.mean)
    std = ",".join(f"{s:g}" for s in prep.std)
    click.echo(f"preprocessing: {prep.height}x{prep.width} ({sources['size']}), "
               f"{prep.channels} ({sources['channels']}), {prep.layout} ({sources['layout']}), "
               f"scale {prep.scale:.6g} ({sources['scale']}), mean {mean} "
               f"({sources['mean']}), std {std} ({sources['std']}), {prep.interpolation}, "
               f"{prep.resize}")
    h, w = trigger.mask.shape
    click.echo(f"trigger: {w}x{h} at x={trigger.left}, y={trigger.top}, opacity "
               f"{trigger.opacity:g}")
    by_name = {p.name: p for p in written}
    click.echo(f"wrote {by_name['pairs.npz']}: {fig['pairs']} pair"
               f"{'s' if fig['pairs'] != 1 else ''} ({fig['pairs_fooled']} fooling the model)")
    click.echo(f"wrote {by_name['eval.npz']}: {fig['eval']} clean images (base accuracy "
               f"{fig['eval_base_accuracy']:.2%})")
    if "attack.npz" in by_name:
        click.echo(f"wrote {by_name['attack.npz']}: {fig['attack']} images with the trigger, "
                   f"target {int(sets.attack['target'])} (base ASR {fig['attack_base_asr']:.2%})")
    click.echo(f"wrote {by_name['manifest.json']}: settings and source files")
