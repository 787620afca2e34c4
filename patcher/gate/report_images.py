"""The report's pictures: input panels, attribution heatmaps (input-level IG) and the
layer score chart, as PNG bytes."""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


from patcher.gate.report_format import (_EDITED, _OTHER, _TRIED, MAX_ATTACK_EXAMPLES,
                                         MAX_CHART_LAYERS, MAX_PANEL_SIDE, MIN_PANEL_SIDE,
                                         PANEL_SIZE)


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _channels_first(x: np.ndarray) -> np.ndarray | None:
    """[n, C, H, W] from NCHW or NHWC image batches; None when the input is not images."""
    if x.ndim != 4:
        return None
    if x.shape[1] in (1, 3, 4) or x.shape[-1] not in (1, 3, 4):
        return x
    return np.transpose(x, (0, 3, 1, 2))


def _display(img: np.ndarray) -> np.ndarray:
    """[C, H, W] -> [H, W] or [H, W, 3] in [0, 1] for display."""
    img = img.astype(np.float64)
    if img.min() < 0 or img.max() > 1:  # normalised inputs: rescale for display only
        lo, hi = img.min(), img.max()
        img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    if img.shape[0] == 3:
        return np.transpose(img, (1, 2, 0))
    if img.shape[0] == 1:
        return img[0]
    return img.mean(0)


def _scale(shape) -> int:
    """The whole nearest-neighbour factor for an input of ``shape`` (H, W): its longest
    side up to PANEL_SIZE, or its shortest up to MIN_PANEL_SIDE, whichever is larger, with
    the longest side at most MAX_PANEL_SIDE (aspect kept; 1: not enlarged)."""
    long, short = max(shape), min(shape)
    k = max(PANEL_SIZE // long, -(-MIN_PANEL_SIDE // short))
    return max(1, min(k, MAX_PANEL_SIDE // long))


def _to_panel(pixels: np.ndarray, box: tuple[int, int, int, int] | None):
    """uint8 [H, W] or [H, W, 3] -> an upscaled PIL image with the trigger box drawn on it."""
    from PIL import Image, ImageDraw

    img = Image.fromarray(pixels)
    h, w = pixels.shape[:2]
    k = _scale((h, w))
    if k > 1:
        img = img.resize((w * k, h * k), Image.Resampling.NEAREST)
    elif max(h, w) > MAX_PANEL_SIDE:
        f = MAX_PANEL_SIDE / max(h, w)
        img = img.resize((round(w * f), round(h * f)), Image.Resampling.LANCZOS)
    if box is not None:
        img = img.convert("RGB")
        sx, sy = img.width / w, img.height / h
        r0, c0, r1, c1 = box
        ImageDraw.Draw(img).rectangle(
            [c0 * sx - 1, r0 * sy - 1, (c1 + 1) * sx, (r1 + 1) * sy], outline=(0, 200, 255), width=2)
    return img


def _image_panel(img: np.ndarray, box):
    return _to_panel(np.round(_display(img) * 255).astype(np.uint8), box)


def _heat_panel(attr: np.ndarray, box):
    import matplotlib

    h = np.abs(attr).sum(0)
    top = float(np.percentile(h, 99))  # a few extreme pixels would leave the rest black
    top = top if top > 0 else float(h.max())
    h = np.clip(h / top, 0, 1) if top > 0 else h
    rgb = matplotlib.colormaps["inferno"](h)[..., :3]
    return _to_panel(np.round(rgb * 255).astype(np.uint8), box)


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    rows, cols = np.nonzero(mask)
    if len(rows) == 0:
        return None
    return int(rows.min()), int(cols.min()), int(rows.max()), int(cols.max())


@dataclass
class _Row:
    title: str
    label: int | None
    panels: list[tuple[str, str, str]] = field(default_factory=list)  # (file, heading, caption)
    #: the panels' size in pixels (width, height), as drawn
    size: tuple[int, int] = (0, 0)


def choose_attack_examples(y: np.ndarray, target: int, base_pred: np.ndarray,
                           limit: int) -> list[int]:
    """Indices of attack inputs to show: inputs not of the target class, where the base
    model is fooled (predicts ``target``) first. One per class present (a class none of
    whose inputs fools the base model shows its first input), then more fooled inputs in
    file order up to ``limit`` in all; at most MAX_ATTACK_EXAMPLES. Ordered by class."""
    y, base_pred = np.asarray(y), np.asarray(base_pred)
    candidates = [i for i in range(len(y)) if y[i] != target]
    fooled = [i for i in candidates if base_pred[i] == target]
    chosen: list[int] = []
    for c in sorted({int(y[i]) for i in candidates}):
        of_class = [i for i in fooled if y[i] == c] or [i for i in candidates if y[i] == c]
        chosen.append(of_class[0])
    chosen = chosen[:MAX_ATTACK_EXAMPLES]
    wanted = min(max(limit, len(chosen)), MAX_ATTACK_EXAMPLES)
    for i in fooled:
        if len(chosen) >= wanted:
            break
        if i not in chosen:
            chosen.append(i)
    return sorted(chosen, key=lambda i: (int(y[i]), i))


def _predictions(graph, x: np.ndarray, device: str, batch: int = 256) -> np.ndarray:
    """The class each input gets from ``graph`` (a shadow graph), batched."""
    import torch

    preds = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out = graph(torch.from_numpy(np.ascontiguousarray(x[i:i + batch])).to(device))
            out = out[0] if isinstance(out, (tuple, list)) else out
            preds.append(out.argmax(1).cpu().numpy())
    return np.concatenate(preds) if preds else np.zeros(0, np.int64)


def _attributions(graph, x: np.ndarray, steps: int, device: str):
    import torch

    from patcher.analysis.input_attribution import input_integrated_gradients

    xt = torch.from_numpy(np.ascontiguousarray(x)).to(device)
    with torch.no_grad():
        out = graph(xt)
        probs = torch.softmax((out[0] if isinstance(out, (tuple, list)) else out).float(), dim=1)
    pred = probs.argmax(1)
    attr, _ = input_integrated_gradients(graph, xt, pred, steps=steps)
    return attr.float().cpu().numpy(), pred.cpu().numpy(), probs.cpu().numpy()


def _share(attr: np.ndarray, mask: np.ndarray | None) -> float | None:
    if mask is None or not mask.any():
        return None
    m = np.abs(attr).sum(0)
    total = m.sum()
    return float((m * mask).sum() / total) if total > 0 else None


def _heatmaps(files: dict[str, Path], out_dir: Path, max_pairs: int, attack_path: Path | None,
              steps: int, device: str, write) -> tuple[list[_Row], list[_Row], list[str]]:
    """Render the pair rows (and held-out attack rows); returns (pair rows, attack rows, notes).
    Its passes (the attack set's predictions, each model's attributions) move one bar."""
    from patcher.progress import progress

    with progress(5 if attack_path is not None else 2, "report heatmaps") as bar:
        return _heatmaps_of(files, max_pairs, attack_path, steps, device, write, bar)


def _heatmaps_of(files: dict[str, Path], max_pairs: int, attack_path: Path | None,
                 steps: int, device: str, write, bar) -> tuple[list[_Row], list[_Row], list[str]]:
    from patcher.graph.support import load_supported_model as load_model
    from patcher.samples import InputSpec, load_labelled, load_pairs, num_classes_of
    from patcher.graph.shadow import ShadowGraph

    notes: list[str] = []
    base = load_model(files["model"])
    spec, classes = InputSpec.of(base.proto), num_classes_of(base.proto)
    pairs = load_pairs(files["pairs"], spec, classes)
    n = min(max_pairs, len(pairs))
    corrupted, clean, label = pairs.corrupted[:n], pairs.clean[:n], pairs.label[:n]
    if _channels_first(corrupted) is None:
        return [], [], [f"no heatmaps: the model input has rank {corrupted.ndim}, not an image batch"]
    graphs = {}
    for key in ("model", "output"):
        graphs[key] = ShadowGraph.from_onnx(files[key]).to(device).eval()
    attack = None
    if attack_path is not None:
        att = load_labelled(attack_path, spec, classes, with_target=True)
        base_pred = _predictions(graphs["model"], att.x, device)
        bar.update(1)
        chosen = choose_attack_examples(att.y, att.target, base_pred, max_pairs)
        if chosen:
            attack = (att.x[chosen], att.y[chosen], att.target, base_pred[chosen] == att.target)
            others = att.y != att.target
            fooled = int((base_pred[others] == att.target).sum())
            notes.append(f"attack examples: {len(chosen)} of {int(others.sum())} triggered "
                         f"inputs not of class {att.target}, one per class present first, "
                         f"where the base model is fooled (it is on {fooled} of them)")
    results = {}
    for k, g in graphs.items():
        results[k] = _attributions(g, corrupted, steps, device)
        bar.update(1)
    cf = lambda a: _channels_first(a)  # noqa: E731
    c_corr, c_clean = cf(corrupted), cf(clean)
    masks = np.abs(c_corr - c_clean).max(1) > 1e-6  # [n, H, W]
    union = masks.any(0)
    pair_rows = []
    for i in range(n):
        box = _bbox(masks[i])
        row = _Row(f"pair {i + 1}", int(label[i]))
        name = f"pair{i + 1}-clean.png"
        panel = _image_panel(c_clean[i], None)
        row.size = panel.size
        write(name, _png(panel))
        row.panels.append((name, "clean input", f"label {int(label[i])}"))
        name = f"pair{i + 1}-corrupted.png"
        write(name, _png(_image_panel(c_corr[i], box)))
        row.panels.append((name, "corrupted input", "changed pixels boxed" if box else "no change"))
        for key, heading in (("model", "base model |IG|"), ("output", "patched model |IG|")):
            attr, pred, probs = results[key]
            a = cf(attr)[i]
            name = f"pair{i + 1}-{'base' if key == 'model' else 'patched'}-ig.png"
            write(name, _png(_heat_panel(a, box)))
            share = _share(a, masks[i])
            cap = f"predicts {int(pred[i])} (p {probs[i, pred[i]]:.2f})"
            if share is not None:
                cap += f"; {100 * share:.0f}% on trigger"
            row.panels.append((name, heading, cap))
        pair_rows.append(row)
    attack_rows = []
    if attack is not None:
        ax, ay, target, fooled = attack
        res = {}
        for k, g in graphs.items():
            res[k] = _attributions(g, ax, steps, device)
            bar.update(1)
        c_ax = cf(ax)
        box = _bbox(union)
        for i in range(len(ax)):
            row = _Row(f"attack {i + 1}", int(ay[i]))
            name = f"attack{i + 1}-input.png"
            panel = _image_panel(c_ax[i], box)
            row.size = panel.size
            write(name, _png(panel))
            row.panels.append((name, "triggered input", f"label {int(ay[i])}, target {target}; "
                               + ("base model fooled" if fooled[i] else
                                  "base model not fooled (no input of this class fools it)")))
            for key, heading in (("model", "base model |IG|"), ("output", "patched model |IG|")):
                attr, pred, probs = res[key]
                a = cf(attr)[i]
                name = f"attack{i + 1}-{'base' if key == 'model' else 'patched'}-ig.png"
                write(name, _png(_heat_panel(a, box)))
                share = _share(a, union)
                cap = f"predicts {int(pred[i])} (p {probs[i, pred[i]]:.2f})"
                if share is not None:
                    cap += f"; {100 * share:.0f}% in trigger box"
                row.panels.append((name, heading, cap))
            attack_rows.append(row)
    if len(pairs) > n:
        notes.append(f"showing {n} of {len(pairs)} pairs")
    return pair_rows, attack_rows, notes


# ---------------------------------------------------------------------------- chart
def chart_rows(scores: list[dict], edited: set[str]) -> list[dict]:
    """The layers the chart shows: the MAX_CHART_LAYERS best by score, then any edited
    layer beyond them, best first (the score table lists every layer)."""
    ranked = sorted(scores, key=lambda s: -float(s.get("score") or 0))
    return ranked[:MAX_CHART_LAYERS] + [s for s in ranked[MAX_CHART_LAYERS:]
                                        if s.get("layer") in edited]


def _score_chart(scores: list[dict], edited: set[str], tried: set[str]) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    rows = chart_rows(scores, edited)
    names = [str(s.get("layer")) for s in rows]
    values = [float(s.get("score") or 0) for s in rows]
    colors = [_EDITED if n in edited else _TRIED if n in tried else _OTHER for n in names]
    fig = Figure(figsize=(8.6, 0.9 + 0.38 * len(rows)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    y = np.arange(len(rows))
    ax.barh(y, values, color=colors, height=0.65)
    ax.set_yticks(y, [n if len(n) <= 42 else "…" + n[-41:] for n in names], fontsize=9)
    ax.invert_yaxis()
    positive = [v for v in values if v > 0]
    if positive and min(values) > 0 and max(positive) / min(positive) > 1e3:
        ax.set_xscale("log")
    for yi, v in zip(y, values):
        ax.annotate(f"{v:.3g}", (v, yi), xytext=(4, 0), textcoords="offset points",
                    va="center", fontsize=8, color="#333")
    ax.margins(x=0.12)
    ax.set_xlabel("editability score (higher: the pairs' error is more fixable here)", fontsize=9)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.tick_params(axis="x", labelsize=8)
    handles = [Patch(color=_EDITED, label="edited (kept)")]
    if tried - edited:
        handles.append(Patch(color=_TRIED, label="tried, not kept"))
    handles.append(Patch(color=_OTHER, label="not edited"))
    ax.legend(handles=handles, loc="lower right", fontsize=8, frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, pil_kwargs={"optimize": True})
    return buf.getvalue()


# ---------------------------------------------------------------------------- html
