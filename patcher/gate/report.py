"""The HTML patch report: one self-contained page (inline CSS, no scripts, no external
URLs) with PNG images beside it.

The page shows a summary (model, output, strategy, accuracy and gap before and after,
the verify verdict), the per-round table, a bar chart of the editability scores per layer
(edited layers highlighted), the input attribution heatmaps of the pairs before and after
the patch, the verify results and the timings.

Heatmaps: input-level Integrated Gradients (``patcher.analysis.input_attribution``, zero
baseline) of the class each model predicts, on the corrupted input, run in the shadow
graphs of the base and the patched files; |IG| summed over channels, each map scaled to
its own 99th percentile. "On trigger" is the share of |IG| on the pixels where the pair's
corrupted input differs from its clean one.

matplotlib and Pillow are an optional extra (``pip install 'onnx-rectify[report]'``),
imported only here and only when a report is written.
"""
from __future__ import annotations

import html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from patcher.errors import OutputError, RectifyError

#: The longest side of a heatmap panel in pixels (small inputs are upscaled, nearest).
PANEL_SIZE = 168
#: At most this many layers in the score chart (the best ones).
MAX_CHART_LAYERS = 30

_EDITED, _TRIED, _OTHER = "#d9480f", "#f0a36b", "#8aa4c8"


def _require_libraries():
    try:
        import matplotlib  # noqa: F401
        import PIL  # noqa: F401
    except ImportError as exc:
        raise RectifyError(f"the HTML report needs matplotlib and Pillow ({exc.name} is not "
                           "installed): pip install 'onnx-rectify[report]'") from None


def _esc(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * float(v):.2f}%"


def _num(v, fmt: str = ".4f") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if not math.isfinite(v):
            return str(v)
        return format(v, fmt) if 1e-3 <= abs(v) < 1e5 or v == 0 else f"{v:.3g}"
    return str(v)


def _resolve(value, base_dir: Path | None) -> Path | None:
    """A path from the report, as written (relative to the current folder) or relative to
    ``base_dir`` (the report file's folder); None when it is absent or does not exist."""
    if not value or str(value) == "None":
        return None
    p = Path(str(value))
    if p.exists():
        return p
    if base_dir is not None and not p.is_absolute() and (Path(base_dir) / p).exists():
        return Path(base_dir) / p
    return None


# ---------------------------------------------------------------------------- images
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
    return max(1, PANEL_SIZE // max(shape))


def _to_panel(pixels: np.ndarray, box: tuple[int, int, int, int] | None):
    """uint8 [H, W] or [H, W, 3] -> an upscaled PIL image with the trigger box drawn on it."""
    from PIL import Image, ImageDraw

    img = Image.fromarray(pixels)
    h, w = pixels.shape[:2]
    k = _scale((h, w))
    if k > 1:
        img = img.resize((w * k, h * k), Image.Resampling.NEAREST)
    elif max(h, w) > PANEL_SIZE * 2:
        f = PANEL_SIZE * 2 / max(h, w)
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
    """Render the pair rows (and held-out attack rows); returns (pair rows, attack rows, notes)."""
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
    attack = None
    if attack_path is not None:
        att = load_labelled(attack_path, spec, classes, with_target=True)
        keep = [i for i in range(len(att)) if att.y[i] != att.target]
        chosen, seen = [], set()
        for i in keep:  # one per class first, in file order
            if int(att.y[i]) not in seen:
                chosen.append(i)
                seen.add(int(att.y[i]))
            if len(chosen) == max_pairs:
                break
        if chosen:
            attack = (att.x[chosen], att.y[chosen], att.target)
    graphs = {}
    for key in ("model", "output"):
        graphs[key] = ShadowGraph.from_onnx(files[key]).to(device).eval()
    results = {k: _attributions(g, corrupted, steps, device) for k, g in graphs.items()}
    cf = lambda a: _channels_first(a)  # noqa: E731
    c_corr, c_clean = cf(corrupted), cf(clean)
    masks = np.abs(c_corr - c_clean).max(1) > 1e-6  # [n, H, W]
    union = masks.any(0)
    pair_rows = []
    for i in range(n):
        box = _bbox(masks[i])
        row = _Row(f"pair {i + 1}", int(label[i]))
        name = f"pair{i + 1}-clean.png"
        write(name, _png(_image_panel(c_clean[i], None)))
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
        ax, ay, target = attack
        res = {k: _attributions(g, ax, steps, device) for k, g in graphs.items()}
        c_ax = cf(ax)
        box = _bbox(union)
        for i in range(len(ax)):
            row = _Row(f"attack {i + 1}", int(ay[i]))
            name = f"attack{i + 1}-input.png"
            write(name, _png(_image_panel(c_ax[i], box)))
            row.panels.append((name, "triggered input", f"label {int(ay[i])}, target {target}"))
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
def _score_chart(scores: list[dict], edited: set[str], tried: set[str]) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    rows = sorted(scores, key=lambda s: -float(s.get("score") or 0))[:MAX_CHART_LAYERS]
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
_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
 color:#1f2328;background:#f6f7f9;margin:0}
main{max-width:1080px;margin:0 auto;padding:24px 28px 40px;background:#fff;min-height:100vh}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:30px 0 8px;border-bottom:1px solid #e3e6ea;
 padding-bottom:4px}
p.sub{color:#57606a;margin:0 0 14px;overflow-wrap:anywhere}
.badge{display:inline-block;padding:1px 9px;border-radius:10px;font-weight:600;font-size:12px;
 vertical-align:2px;color:#fff}
.pass{background:#1a7f37}.fail{background:#cf222e}.none{background:#8c959f}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(190px,1fr));gap:10px}
.card{border:1px solid #e3e6ea;border-radius:6px;padding:8px 12px}
.card .k{color:#57606a;font-size:12px}.card .v{font-size:16px;font-weight:600;overflow-wrap:anywhere}
table{border-collapse:collapse;width:100%;font-size:13px;margin:6px 0}
th,td{border-bottom:1px solid #eaecef;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f3f4f6;font-weight:600}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
tr.kept td{background:#fff4ec}
code{font:12px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;overflow-wrap:anywhere}
.note{color:#57606a;font-size:13px}
.hm{display:grid;grid-template-columns:80px repeat(4,1fr);gap:8px 10px;align-items:start;margin:8px 0}
.hm .rl{font-weight:600;padding-top:24px}.hm figure{margin:0;text-align:center}
.hm img{width:100%;max-width:168px;image-rendering:pixelated;border:1px solid #d0d7de}
.hm figcaption{font-size:12px;color:#57606a}.hm .h{font-size:12px;font-weight:600;color:#1f2328}
img.chart{max-width:100%;border:0}.scroll{overflow-x:auto}
code.id{overflow-wrap:normal;white-space:nowrap}
table.narrow{width:auto;min-width:420px}
details{margin:6px 0}summary{cursor:pointer;color:#0969da}
"""


def _table(headers: list[str], rows: list[list], numeric: set[int] = frozenset(),
           row_class=None, cls: str = "") -> str:
    head = "".join(f'<th class="n">{_esc(h)}</th>' if i in numeric else f"<th>{_esc(h)}</th>"
                   for i, h in enumerate(headers))
    body = []
    for r_i, row in enumerate(rows):
        tr_cls = row_class(r_i) if row_class else ""
        cells = "".join(f'<td class="n">{c}</td>' if i in numeric else f"<td>{c}</td>"
                        for i, c in enumerate(row))
        body.append(f'<tr class="{tr_cls}">{cells}</tr>' if tr_cls else f"<tr>{cells}</tr>")
    table = f'<table class="{cls}">' if cls else "<table>"
    return (f'<div class="scroll">{table}<thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


def _badge(passed) -> str:
    if passed is None:
        return '<span class="badge none">not run</span>'
    return '<span class="badge pass">PASSED</span>' if passed else '<span class="badge fail">FAILED</span>'


def _short(v):
    """sha256 digests shortened to 12 hex digits; everything else as is."""
    if isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v):
        return v[:12] + "…"
    return v


def _figures_text(figures: dict) -> str:
    parts = []
    for k, v in (figures or {}).items():
        v = _short(v)
        if isinstance(v, dict):
            inner = ", ".join(f"{kk} {_num(vv, '.4g')}" for kk, vv in v.items()
                              if not isinstance(vv, (dict, list)))
            parts.append(f"{k}: {{{inner}}}")
        elif isinstance(v, list):
            parts.append(f"{k}: [{', '.join(map(str, v[:8]))}{', …' if len(v) > 8 else ''}]")
        else:
            parts.append(f"{k} {_num(v, '.4g')}")
    return "; ".join(parts)


def _check(verify_report: dict | None, name: str) -> dict | None:
    for c in (verify_report or {}).get("checks", []):
        if c.get("name") == name:
            return c
    return None


def _heat_rows(rows: list[_Row], headings: list[str]) -> str:
    head = '<div></div>' + "".join(f'<div class="h" style="text-align:center">{_esc(h)}</div>'
                                   for h in headings)
    if len(headings) < 4:
        head += "<div></div>" * (4 - len(headings))
    out = [f'<div class="hm">{head}']
    for row in rows:
        out.append(f'<div class="rl">{_esc(row.title)}</div>')
        for file, heading, caption in row.panels:
            out.append(f'<figure><img src="{_esc(file)}" alt="{_esc(row.title + ": " + heading)}">'
                       f"<figcaption>{_esc(caption)}</figcaption></figure>")
        out.extend("<div></div>" for _ in range(4 - len(row.panels)))
    out.append("</div>")
    return "".join(out)


def _page(rep: dict, verify_report: dict | None, chart_file: str | None, pair_rows, attack_rows,
          heat_notes: list[str], verify_note: str = "") -> str:
    from patcher.version import __version__

    res = rep.get("result") or {}
    ver = rep.get("verification") or {}
    rounds = res.get("rounds") or []
    edited = sorted({e.get("layer") for e in res.get("edits") or [] if e.get("layer")})
    verdict = verify_report.get("passed") if verify_report else None
    asr = _check(verify_report, "attack_success_rate")
    h = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
         '<meta name="viewport" content="width=device-width,initial-scale=1">',
         f"<title>onnx-rectify patch report: {_esc(Path(str(rep.get('model', ''))).name)}</title>",
         f"<style>{_CSS}</style></head><body><main>"]
    h.append(f"<h1>onnx-rectify patch report {_badge(rep.get('passed'))}</h1>")
    h.append(f'<p class="sub"><code>{_esc(rep.get("model"))}</code> → '
             f'<code>{_esc(rep.get("output"))}</code></p>')
    share = res.get("objective") == "attribution"  # the loop's "gap" is an attribution share
    measure = "attribution share" if share else "gap"
    cards = [
        ("strategy", _esc(res.get("strategy", "-")
                          + (" (attribution objective)" if share else ""))),
        (f"patch gate ({'share lowered' if share else 'gap target'} within budget)",
         _badge(rep.get("passed"))),
        ("verify", _badge(verdict)),
        ("eval accuracy (onnxruntime)",
         f"{_pct(ver.get('base_accuracy'))} → {_pct(ver.get('patched_accuracy'))}"),
        ("pair gap (onnxruntime)",
         f"{_num(ver.get('base_pair_gap'))} → {_num(ver.get('patched_pair_gap'))}"),
        (f"rectifier {measure} ({res.get('gap_measured_on', 'pairs')})",
         f"{_num(res.get('base_gap'))} → {_num(res.get('final_gap'))}"),
    ]
    if asr:
        f = asr.get("figures", {})
        cards.append(("attack success rate", f"{_pct(f.get('base_asr'))} → {_pct(f.get('patched_asr'))}"))
    cards.append(("edited layers", _esc(", ".join(edited) or "none")))
    h.append('<div class="cards">' + "".join(
        f'<div class="card"><div class="k">{_esc(k)}</div><div class="v">{v}</div></div>'
        for k, v in cards) + "</div>")

    h.append("<h2>Rounds</h2>")
    if rounds:
        body = [[_esc(r.get("index")), f'<code class="id">{_esc(r.get("layer"))}</code>',
                 _esc(_num(r.get("score"), ".4g")), _esc(_num(r.get("gap_before"))),
                 _esc(_num(r.get("gap_after"))), _esc(_num(r.get("target_gap_after"))),
                 _esc(("≤ " if r.get("evaluated") else "") + _pct(r.get("accuracy"))),
                 _esc(("≥ " if r.get("evaluated") else "") + _pct(r.get("accuracy_drop"))), _esc(_num(r.get("delta_norm"), ".4g")),
                 _esc(_num(r.get("fit_residual_ratio"), ".3g")), _esc(r.get("reason"))]
                for r in rounds]
        h.append(_table(["round", "layer", "score", f"{measure} before", f"{measure} after",
                         "τ after", "accuracy", "accuracy drop", "‖Δ‖", "fit residual",
                         "decision"], body,
                        {0, 2, 3, 4, 5, 6, 7, 8, 9},
                        lambda i: "kept" if rounds[i].get("kept") else ""))
        what = ('Attribution share: mean over inputs of the input Integrated-Gradients mass on '
                'the corrupted region over the total; measured on ' if share else
                'Gap: mean p(label | clean) − p(label | corrupted); target-class gap τ, when '
                'the corruption has a target class t: mean p(t | corrupted) − p(t | clean); '
                'both measured on ')
        h.append(f'<p class="note">{what}'
                 f'{_esc(res.get("gap_measured_on", "the pairs"))}; accuracy on the eval set, '
                 f'in the shadow graph. Base: accuracy {_esc(_pct(res.get("base_accuracy")))}, '
                 f'{measure} {_esc(_num(res.get("base_gap")))}.</p>')
    else:
        h.append('<p class="note">No rounds were run.</p>')

    h.append("<h2>Editability scores per layer</h2>")
    if chart_file:
        h.append(f'<img class="chart" src="{_esc(chart_file)}" alt="editability score per layer">')
        scores = res.get("scores") or []
        cond = res.get("conditioning") or {}
        body = [[f'<code class="id">{_esc(s.get("layer"))}</code>', _esc(_num(s.get("score"), ".4g")),
                 _esc(_num(s.get("completeness_error"), ".3g")),
                 _esc(_num((cond.get(s.get("layer")) or {}).get("condition_number"), ".3g")),
                 _esc(_num((cond.get(s.get("layer")) or {}).get("ridge"), ".3g")),
                 _esc((cond.get(s.get("layer")) or {}).get("kind", "exact"))]
                for s in scores]
        h.append("<details><summary>score table</summary>" + _table(
            ["layer", "score", "completeness error", "condition number", "ridge",
             "key statistics"], body, {1, 2, 3, 4}) + "</details>")
    else:
        h.append('<p class="note">No layer scores in this report (a forced --layer or the '
                 'fine-tune strategy skips scoring).</p>')

    h.append("<h2>Attributions before and after the patch</h2>")
    if pair_rows:
        h.append('<p class="note">Input Integrated Gradients (zero baseline) of the class each '
                 'model predicts, on the corrupted input; |IG| summed over channels, each map '
                 'scaled to its own 99th percentile (bright: more attribution). The blue box marks the '
                 'pixels the corruption changed; "on trigger" is the share of |IG| inside them.</p>')
        h.append(_heat_rows(pair_rows, ["clean", "corrupted", "base model", "patched model"]))
    if attack_rows:
        h.append('<p class="note">Held-out triggered inputs from the attack set (not used for '
                 'the patch); the box is the region the pairs\' corruption changed.</p>')
        h.append(_heat_rows(attack_rows, ["triggered input", "base model", "patched model"]))
    for note in heat_notes:
        h.append(f'<p class="note">{_esc(note)}</p>')

    h.append("<h2>Verification</h2>")
    parity = ver.get("parity") or {}
    rows = [["onnxruntime provider", _esc(ver.get("provider"))],
            ["eval accuracy", f"{_esc(_pct(ver.get('base_accuracy')))} → "
                              f"{_esc(_pct(ver.get('patched_accuracy')))} (drop "
                              f"{_esc(_pct(ver.get('accuracy_drop')))})"],
            ["pair gap", f"{_esc(_num(ver.get('base_pair_gap')))} → "
                         f"{_esc(_num(ver.get('patched_pair_gap')))}"],
            ["shadow vs onnxruntime parity",
             f"{'within tolerance' if parity.get('within_tolerance') else 'OUT OF TOLERANCE'}; "
             f"max |diff| {_esc(_num(parity.get('max_abs_diff'), '.3g'))}, top-1 agreement "
             f"{_esc(_pct(parity.get('top1_agreement')))}"],
            ["weight rounding error", _esc(", ".join(
                f"{k} {_num(v, '.3g')}" for k, v in (ver.get("rounding_errors") or {}).items())
                or "-")],
            ["input files unchanged",
             _esc("yes" if rep.get("inputs_sha256_before") == rep.get("inputs_sha256_after")
                  else "NO")]]
    h.append('<p class="note">The written file, reloaded from disk by the patch run:</p>')
    h.append(_table(["check", "result"], rows))
    if verify_report:
        h.append(f"<p class=\"note\">Release gate (<code>onnx-rectify verify</code>, provider "
                 f"{_esc(verify_report.get('provider') or '-')}): {_badge(verify_report.get('passed'))}</p>")
        checks = verify_report.get("checks", [])
        messages = any(c.get("message") for c in checks)
        body = [[_esc(c.get("name")), _badge(c.get("passed")),
                 f"<code>{_esc(_figures_text(c.get('figures')))}</code>"]
                + ([_esc(c.get("message"))] if messages else []) for c in checks]
        h.append(_table(["check", "verdict", "figures"] + (["message"] if messages else []), body))
    else:
        h.append('<p class="note">The release gate (onnx-rectify verify) was not run for this '
                 f'report{_esc(verify_note)}.</p>')

    h.append("<h2>Timings</h2>")
    t_rows = [[_esc(f"patch: {k}"), _esc(f"{float(v):.2f} s")]
              for k, v in (rep.get("timings") or {}).items()]
    t_rows += [[_esc(f"rectifier: {k}"), _esc(f"{float(v):.2f} s")]
               for k, v in (res.get("timings") or {}).items()]
    h.append(_table(["step", "wall time"], t_rows, {1}, cls="narrow") if t_rows else
             '<p class="note">No timings recorded.</p>')
    h.append(f'<p class="note">Device {_esc(rep.get("device", "-"))}; pairs '
             f'<code>{_esc(rep.get("pairs"))}</code>, eval <code>{_esc(rep.get("eval"))}</code>; '
             f'written: {", ".join(f"<code>{_esc(w)}</code>" for w in rep.get("written") or [])}.'
             f' Generated by onnx-rectify {_esc(__version__)}.</p>')
    h.append("</main></body></html>")
    return "\n".join(h) + "\n"


# ---------------------------------------------------------------------------- entry point
def writes_name(name: str) -> bool:
    """Whether the HTML report may write a file of this name into its folder."""
    return name == "index.html" or name.endswith(".png")


def require_libraries() -> None:
    """Refuse (exit 2) now, before any work, when the HTML report's libraries are missing."""
    _require_libraries()


def referenced_files(patch_report: dict, base_dir: Path | None = None) -> dict[str, Path]:
    """The files a patch report names that the HTML report reads (model, output, pairs,
    eval), as found on disk (see :func:`write_report`)."""
    if not isinstance(patch_report, dict):
        return {}
    found = {k: _resolve(patch_report.get(k), base_dir) for k in ("model", "output", "pairs",
                                                                   "eval")}
    return {f"the report's {k}": p for k, p in found.items() if p is not None}


def write_report(patch_report: dict, out_dir: Path, verify_report: dict | None = None,
                 attack_path: Path | None = None, max_pairs: int = 5, *,
                 base_dir: Path | None = None, run_verify: bool = True, device: str = "cpu",
                 provider: str = "auto", steps: int = 32,
                 read_from: dict[str, Path] | None = None) -> Path:
    """Write ``index.html`` and its PNG images into ``out_dir`` (created if needed) from a
    patch report (``PatchReport.as_dict()`` or the JSON of ``patch --report``); returns the
    path of ``index.html``.

    ``verify_report`` is a ``VerifyReport.as_dict()`` (or ``verify --json``); when it is None
    and ``run_verify`` is set, ``patcher.gate.verify.verify`` is run on the base and written
    models (with ``attack_path`` and the pairs). ``attack_path`` also adds heatmaps of up to
    ``max_pairs`` held-out triggered inputs. Paths in the report are taken as written, else
    relative to ``base_dir`` (e.g. the report file's folder). Heatmaps and the verify run
    are skipped, with a note on the page, when the files they need are gone. ``read_from``
    overrides where those files (keys model, output, pairs, eval) are read from."""
    _require_libraries()
    if not isinstance(patch_report, dict) or not isinstance(patch_report.get("result"), dict):
        raise RectifyError("not a patch report: expected the JSON written by "
                           "'onnx-rectify patch --report' (no 'result' object found)")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out_dir}: cannot create the folder ({exc.strerror})") from None
    from patcher.model.modelio import write_bytes_atomic, write_text_atomic

    def write(name: str, data: bytes) -> None:
        write_bytes_atomic(out_dir / name, data)

    res = patch_report["result"]
    files = {k: _resolve(patch_report.get(k), base_dir) for k in ("model", "output", "pairs", "eval")}
    files.update(read_from or {})  # e.g. the written model, still in its staging folder
    if attack_path is not None and not Path(attack_path).is_file():
        raise RectifyError(f"{attack_path}: no such file")
    notes: list[str] = []

    chart = None
    if res.get("scores"):
        edited = {e.get("layer") for e in res.get("edits") or []}
        tried = {r.get("layer") for r in res.get("rounds") or []}
        chart = "scores.png"
        write(chart, _score_chart(res["scores"], edited, tried))

    pair_rows, attack_rows = [], []
    missing = [f"{k} ({patch_report.get(k)})" for k in ("model", "output", "pairs") if files[k] is None]
    if missing:
        notes.append(f"no heatmaps: cannot find {', '.join(missing)}")
    elif max_pairs > 0:
        pair_rows, attack_rows, more = _heatmaps(files, out_dir, max_pairs, attack_path, steps,
                                                 device, write)
        notes += more

    verify_note = ""
    if verify_report is None and run_verify:
        if files["model"] and files["output"] and files["eval"]:
            from patcher.graph.support import load_supported_model as load_model
            from patcher.gate.verify import verify

            verify_report = verify(load_model(files["model"]), load_model(files["output"]),
                                   files["eval"], attack_path, files["pairs"],
                                   provider=provider).as_dict()
        else:
            verify_note = ": the base model, the written model or the eval set is gone"

    write_text_atomic(out_dir / "index.html",
                      _page(patch_report, verify_report, chart, pair_rows, attack_rows, notes,
                            verify_note))
    return out_dir / "index.html"
