"""The report's HTML page: tables, badges and the page itself."""
from __future__ import annotations

from pathlib import Path



from patcher.gate.report_format import MAX_CHART_LAYERS, WIDE_ASPECT, _esc, _num, _pct
from patcher.gate.report_images import _Row


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
.hm{display:grid;grid-template-columns:80px repeat(4,minmax(0,1fr));gap:8px 10px;align-items:start;
 margin:8px 0}
.hm.wide{grid-template-columns:80px repeat(2,minmax(0,1fr))}.hm.wide .rl{grid-row:span 2}
.hm .rl{font-weight:600;padding-top:24px}.hm figure{margin:0;text-align:center}
.hm img{max-width:100%;height:auto;image-rendering:pixelated;border:1px solid #d0d7de}
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
    """A grid of panels, one row per example, each image at its drawn size (scaled down
    only to fit). Wide panels (WIDE_ASPECT) go two to a line, each with its heading."""
    wide = any(r.size[1] and r.size[0] >= WIDE_ASPECT * r.size[1] for r in rows)
    columns = 2 if wide else 4
    out = [f'<div class="hm{" wide" if wide else ""}">']
    if not wide:
        out.append('<div></div>' + "".join(
            f'<div class="h" style="text-align:center">{_esc(h)}</div>' for h in headings))
        out.append("<div></div>" * (4 - len(headings)))
    for row in rows:
        out.append(f'<div class="rl">{_esc(row.title)}</div>')
        size = (f' width="{row.size[0]}" height="{row.size[1]}"' if row.size[0] else "")
        for file, heading, caption in row.panels:
            head = f'<div class="h">{_esc(heading)}</div>' if wide else ""
            out.append(f'<figure>{head}<img src="{_esc(file)}"{size} '
                       f'alt="{_esc(row.title + ": " + heading)}">'
                       f"<figcaption>{_esc(caption)}</figcaption></figure>")
        filled = -len(row.panels) % columns
        out.extend("<div></div>" for _ in range(filled))
    out.append("</div>")
    return "".join(out)


def _stored_rows(records: list[dict]) -> str:
    """The int8 write-back table: each tensor the edit changed in its stored precision."""
    body = [[f'<code class="id">{_esc(r.get("weight"))}</code>', _esc(r.get("role")),
             _esc(r.get("form")), _esc(r.get("steps_changed", "-")),
             _esc(r.get("max_steps", "-")), _esc(_num(r.get("delta_norm"), ".4g")),
             _esc(r.get("units")), _esc(_num(r.get("relative_error"), ".3g")),
             _esc(r.get("option", "-"))] for r in records]
    return _table(["tensor", "role", "form", "values changed", "max steps", "‖Δ‖", "units",
                   "relative error of Δ", "scales"], body, {3, 4, 5, 7})


def _page(rep: dict, verify_report: dict | None, chart_file: str | None, pair_rows, attack_rows,
          heat_notes: list[str], verify_note: str = "",
          stored: list[dict] | None = None) -> str:
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

    if stored:
        h.append("<h2>Written in the stored precision</h2>")
        h.append('<p class="note">The model stores these weights quantized: the edit was '
                 'written back as integers (steps of each value\'s scale), with new scales only '
                 'where it would saturate; relative error ‖Δ written − Δ‖ / ‖Δ‖.</p>')
        h.append(_stored_rows(stored))

    h.append("<h2>Editability scores per layer</h2>")
    if chart_file:
        scores = res.get("scores") or []
        if len(scores) > MAX_CHART_LAYERS:
            h.append(f'<p class="note">The {MAX_CHART_LAYERS} best of {len(scores)} layers '
                     '(and any edited layer below them); every layer is in the score '
                     'table.</p>')
        h.append(f'<img class="chart" src="{_esc(chart_file)}" alt="editability score per layer">')
        cond = res.get("conditioning") or {}
        body = [[f'<code class="id">{_esc(s.get("layer"))}</code>', _esc(_num(s.get("score"), ".4g")),
                 _esc(_num(s.get("completeness_error"), ".3g")),
                 _esc(_num((cond.get(s.get("layer")) or {}).get("condition_number"), ".3g")),
                 _esc(_num((cond.get(s.get("layer")) or {}).get("ridge"), ".3g")),
                 _esc((cond.get(s.get("layer")) or {}).get("kind", "exact"))]
                for s in scores]
        h.append(f"<details{' open' if len(scores) > MAX_CHART_LAYERS else ''}><summary>"
                 f"score table ({len(scores)} layers)</summary>" + _table(
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
