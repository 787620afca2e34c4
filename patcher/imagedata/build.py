"""pairs.npz, eval.npz and attack.npz from an image folder and a trigger.

The images are shuffled once (``numpy.random.default_rng(seed)``) and taken in that
order, each into one split:

1. **pairs** (``corrupted`` = clean + trigger, ``clean``, ``label``), while it wants more:
   an image whose label is not the attack target; with ``pairs_from="fooled"`` (the
   default) only one the base model gets right clean and wrong with the trigger, the
   behaviour the patch removes;
2. otherwise **attack** (``x`` = with the trigger, ``y``, ``target``; only with a target;
   labels other than the target) or **eval** (``x``, ``y``: clean; any label), whichever
   is the less full share of its count.

So the three sets never share an image, and the same folder, trigger, options and seed
give the same files (byte for byte: the npz members carry a fixed date). Pairs are
required in full; when the folder holds fewer images than eval and attack ask for, both
counts shrink in proportion (so a small folder still gives an eval set of every class).
The
attack target is one class (an all-to-one backdoor), the format ``verify`` and
``patch --attack`` read; a per-image target is not supported there.
"""
from __future__ import annotations

import io
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from patcher.errors import BadSamplesError, RectifyError
from patcher.imagedata.images import ImageFolder, read_pixels
from patcher.imagedata.preprocess import Preprocessing
from patcher.imagedata.trigger import Trigger
from patcher.model.modelio import LoadedModel
from patcher.model.paths import Outputs
from patcher.model.runtime import open_session
from patcher.progress import progress
from patcher.samples import MAX_SAMPLE_BYTES, InputSpec

PAIRS_FROM = ("fooled", "any")
#: Images decoded and run through the model at a time.
CHUNK = 64
FILE_NAMES = {"pairs": "pairs.npz", "eval": "eval.npz", "attack": "attack.npz",
              "manifest": "manifest.json"}


@dataclass(frozen=True)
class Counts:
    """How many images each split takes: pairs exactly, eval and attack at most."""

    pairs: int = 1
    eval: int = 500
    attack: int = 500


@dataclass
class ImageSets:
    """The three sets as arrays in the npz contract, the files they came from (relative
    to the folder, with their labels) and what the base model does on them."""

    pairs: dict[str, np.ndarray]
    eval: dict[str, np.ndarray]
    attack: dict[str, np.ndarray] | None
    files: dict[str, list[tuple[str, int]]]
    figures: dict[str, float | int] = field(default_factory=dict)


def _predict(session, x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The class the model predicts for each row of ``x`` (its first output's argmax)."""
    if dtype.kind == "f":
        feed = x.astype(dtype)
    elif dtype.kind == "b":
        feed = x > 0.5
    else:  # integer inputs take the values rounded and clipped to their range
        feed = np.clip(np.rint(x), np.iinfo(dtype).min, np.iinfo(dtype).max).astype(dtype)
    scores = session.run(feed)[0]
    if scores.ndim != 2 or len(scores) != len(x):
        raise RectifyError(f"the model's first output has shape {list(scores.shape)} for "
                           f"{len(x)} images; a classifier outputs [batch, classes]")
    return scores.argmax(1)


def check_memory(prep: Preprocessing, counts: Counts) -> None:
    """Refuse, before decoding, counts whose files would exceed what a sample file may
    hold (:data:`patcher.samples.MAX_SAMPLE_BYTES`, as the loaders count it)."""
    per_image = prep.height * prep.width * prep.channel_count * 4
    for name, images in (("pairs", 2 * counts.pairs), ("eval", counts.eval),
                         ("attack", counts.attack)):
        if images * per_image > MAX_SAMPLE_BYTES:
            raise RectifyError(f"{name}: {images:,} images of {prep.height}x{prep.width}x"
                               f"{prep.channel_count} take {images * per_image / 2**30:.1f} "
                               f"GiB, more than the {MAX_SAMPLE_BYTES / 2**30:g} GiB a sample "
                               "file may take; ask for fewer")


def build_sets(model: LoadedModel, folder: ImageFolder, prep: Preprocessing,
               trigger: Trigger, *, counts: Counts = Counts(), target: int | None = None,
               pairs_from: str = "fooled", seed: int = 0, provider: str = "auto",
               num_classes: int | None = None) -> ImageSets:
    """The pairs, eval and attack sets (module docstring): labels from the class folders,
    or the base model's predictions on the clean images where the folder has none."""
    if pairs_from not in PAIRS_FROM:
        raise RectifyError(f"unknown --pairs-from '{pairs_from}' (choose from "
                           f"{', '.join(PAIRS_FROM)})")
    if counts.pairs < 1 or counts.eval < 1 or counts.attack < 0:
        raise RectifyError("at least one pair and one eval image are needed")
    if target is not None and (target < 0 or (num_classes is not None and
                                              target >= num_classes)):
        raise RectifyError(f"--target {target} is not a class of the model"
                           + (f" (0..{num_classes - 1})" if num_classes else ""))
    if folder.labels is not None and num_classes is not None and len(folder.labels) and \
            int(folder.labels.max()) >= num_classes:
        name = next(k for k, v in folder.class_folders.items() if v == int(folder.labels.max()))
        raise BadSamplesError(f"{folder.root / name}: class {int(folder.labels.max())}, but the "
                              f"model has {num_classes} classes (0..{num_classes - 1})")
    check_memory(prep, counts)
    spec = InputSpec.of(model.proto)
    session = open_session(model.path or model.proto.SerializeToString(), provider)
    wanted = _wanted(counts, len(folder), target is not None)
    # per split: (position, clean, corrupted, label, clean prediction, corrupted prediction)
    taken: dict[str, list] = {k: [] for k in wanted}
    counters = {"seen": 0, "fooled": 0}
    order = np.random.default_rng(seed).permutation(len(folder))
    with progress(len(order), "reading images") as bar:
        for start in range(0, len(order), CHUNK):
            if all(len(taken[k]) >= wanted[k] for k in wanted):
                break
            chunk = order[start:start + CHUNK]
            _take(chunk, folder, prep, trigger, session, spec, taken, wanted, target,
                  pairs_from, counters)
            bar.update(len(chunk))
    _check_taken(taken, wanted, folder, counters["seen"], counters["fooled"], pairs_from,
                 target)
    return _as_sets(taken, folder, target, counters["seen"])


def _take(chunk: np.ndarray, folder: ImageFolder, prep: Preprocessing, trigger: Trigger,
          session, spec: InputSpec, taken: dict, wanted: dict, target: int | None,
          pairs_from: str, counters: dict) -> None:
    """Decode ``chunk`` (positions in the folder), run the model on each image clean and
    with the trigger, and put each image in the split that wants it (module docstring)."""
    pixels = np.stack([read_pixels(folder.files[i], prep) for i in chunk])
    clean = prep.to_input(pixels)
    corrupted = prep.to_input(trigger.apply(pixels))
    said_clean = _predict(session, clean, spec.dtype)
    said_corrupted = _predict(session, corrupted, spec.dtype)
    labels = folder.labels[chunk] if folder.labels is not None else said_clean
    for row, position in enumerate(chunk):
        label = int(labels[row])
        counters["seen"] += 1
        fooled = bool(said_clean[row] == label and said_corrupted[row] != label)
        counters["fooled"] += fooled and label != target
        item = (int(position), clean[row], corrupted[row], label,
                int(said_clean[row]), int(said_corrupted[row]))
        if label != target and len(taken["pairs"]) < wanted["pairs"] and \
                (pairs_from == "any" or fooled):
            taken["pairs"].append(item)
            continue
        open_splits = [name for name in ("attack", "eval")
                       if len(taken[name]) < wanted[name] and
                       (name == "eval" or label != target)]
        if open_splits:  # the split least filled, as a share of what it wants
            taken[min(open_splits, key=lambda n: len(taken[n]) / wanted[n])].append(item)


def _wanted(counts: Counts, images: int, with_attack: bool) -> dict[str, int]:
    """How many images each split takes: the counts, eval and attack shrunk in proportion
    where the folder has fewer images than the pairs, eval and attack ask for."""
    attack = counts.attack if with_attack else 0
    left = max(images - counts.pairs, 0)
    evals = counts.eval
    if evals + attack > left:
        evals = max(1, left * counts.eval // (counts.eval + attack)) if left else 1
        attack = max(left - evals, 1) if attack else 0
    return {"pairs": counts.pairs, "attack": attack, "eval": evals}


def _check_taken(taken: dict, wanted: dict, folder: ImageFolder, seen: int, fooled: int,
                 pairs_from: str, target: int | None) -> None:
    if len(taken["pairs"]) < wanted["pairs"]:
        if pairs_from == "fooled":
            raise BadSamplesError(f"{folder.root}: {fooled} of its {seen} images (label not "
                                  "the target) fool the model (right when clean, wrong with "
                                  f"the trigger); {wanted['pairs']} pair(s) were asked for: "
                                  "ask for fewer (--pairs-count), use every image "
                                  "(--pairs-from any) or check the trigger")
        raise BadSamplesError(f"{folder.root}: {len(taken['pairs'])} image(s) can be pairs "
                              + (f"(label not the target {target}) " if target is not None
                                 else "") + f"; {wanted['pairs']} were asked for")
    if not taken["eval"]:
        raise BadSamplesError(f"{folder.root}: no image is left for eval.npz after "
                              f"{len(taken['pairs'])} pair(s) and {len(taken['attack'])} "
                              "attack image(s); add images or ask for fewer")
    if wanted["attack"] and not taken["attack"]:
        raise BadSamplesError(f"{folder.root}: no image whose label is not the target "
                              f"{target} is left for attack.npz; add images")
    if all(np.array_equal(item[1], item[2]) for item in taken["pairs"]):
        raise BadSamplesError("the trigger changes none of the pair images (every corrupted "
                              "image equals its clean one): nothing to fix")


def _as_sets(taken: dict, folder: ImageFolder, target: int | None, seen: int) -> ImageSets:
    def stack(items, which):
        return np.stack([item[which] for item in items]).astype(np.float32)

    def labels(items):
        return np.asarray([item[3] for item in items], np.int64)

    pairs = {"corrupted": stack(taken["pairs"], 2), "clean": stack(taken["pairs"], 1),
             "label": labels(taken["pairs"])}
    evals = {"x": stack(taken["eval"], 1), "y": labels(taken["eval"])}
    attack = None
    if taken["attack"]:
        attack = {"x": stack(taken["attack"], 2), "y": labels(taken["attack"]),
                  "target": np.asarray(target, np.int64)}
    files = {name: [(folder.files[item[0]].relative_to(folder.root).as_posix(), item[3])
                    for item in items] for name, items in taken.items() if items}
    figures: dict[str, float | int] = {
        "images": len(folder), "images_read": seen, "other_files_skipped": folder.skipped,
        "pairs": len(pairs["label"]),
        "pairs_fooled": sum(item[4] == item[3] and item[5] != item[3]
                            for item in taken["pairs"]),
        "eval": len(evals["y"]),
        "eval_base_accuracy": float(np.mean([item[4] == item[3] for item in taken["eval"]])),
    }
    if attack is not None:
        figures["attack"] = len(attack["y"])
        figures["attack_base_asr"] = float(np.mean([item[5] == target
                                                    for item in taken["attack"]]))
    return ImageSets(pairs, evals, attack, files, figures)


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An npz file (numpy.savez_compressed's layout, no pickles) whose bytes depend only on
    the arrays: every member carries the same fixed date."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for key, array in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)
    return buffer.getvalue()


def write_sets(sets: ImageSets, out_dir: str | os.PathLike, manifest_text: str | None = None,
               force: bool = False) -> list[Path]:
    """Write pairs.npz, eval.npz, attack.npz (when there is an attack set) and
    manifest.json (when given) into ``out_dir`` (created if missing), all renamed into
    place in one step; without ``force`` an existing file there is refused, also one
    that appears while the files are written. Returns the files written."""
    out_dir = Path(out_dir)
    contents = {FILE_NAMES["pairs"]: npz_bytes(sets.pairs),
                FILE_NAMES["eval"]: npz_bytes(sets.eval)}
    if sets.attack is not None:
        contents[FILE_NAMES["attack"]] = npz_bytes(sets.attack)
    if manifest_text is not None:
        contents[FILE_NAMES["manifest"]] = manifest_text.encode("utf-8")
    with Outputs() as outputs:
        if out_dir.is_dir():
            for name, data in contents.items():
                outputs.add_bytes(out_dir / name, data, exclusive=not force)
        else:
            stage = outputs.tree(out_dir)
            for name, data in contents.items():
                (stage / name).write_bytes(data)
        return outputs.commit()


def manifest(sets: ImageSets, *, model: LoadedModel, folder: ImageFolder,
             prep: Preprocessing, sources: dict[str, str], trigger: Trigger,
             trigger_files: dict[str, str | None], seed: int, counts: Counts,
             target: int | None, pairs_from: str) -> dict:
    """What manifest.json records: the inputs (paths, the model's sha256), every setting
    and where it came from, the figures, and each set's source files with their labels."""
    return {
        "model": str(model.path) if model.path else None, "model_sha256": model.sha256,
        "images": str(folder.root),
        "labels": "folders" if folder.labels is not None else "model",
        "classes": folder.class_folders or None,
        "preprocessing": prep.as_dict(), "preprocessing_sources": sources,
        "trigger": {**trigger_files, **trigger.as_dict()},
        "seed": seed, "counts": {"pairs": counts.pairs, "eval": counts.eval,
                                 "attack": counts.attack},
        "target": target, "pairs_from": pairs_from, "figures": sets.figures,
        "files": {name: [{"file": f, "label": y} for f, y in items]
                  for name, items in sets.files.items()},
    }
