"""Integrated Gradients at every editable layer in one batched pass (paper Eq. 3, Lemma 3).

With the corrupted input x~ as reference and f = p_y (softmax probability of the
correct label), the attribution of layer l's output f_l is

    M^l = (f_l(x) - f_l(x~)) * mean_k  df/df_l  at  x~ + a_k (x - x~),  a_k = (k + 1/2) / m

(midpoint rule, m steps). All editable layers are read in the same forward and
backward pass over a chunk of interpolation steps, unlike captum's
LayerIntegratedGradients which runs once per layer. Completeness for layer l:
|sum M^l - (f(x) - f(x~))|; the *path* form

    M^l_path = sum_k  (df/df_l at x_k + df/df_l at x_{k+1}) / 2  *  (f_l(x_{k+1}) - f_l(x_k))

follows the layer's own path and makes completeness hold up to the quadrature error.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from patcher.graph.keys import LayerTap, image_rows_of
from patcher.progress import progress
from patcher.graph.shadow import EditableLayer, ShadowGraph


@dataclass
class LayerAttribution:
    """Attribution of one layer's output for each pair: [n, *output shape]."""

    layer: str
    attribution: torch.Tensor
    completeness_error: torch.Tensor  # [n]


@dataclass
class AttributionResult:
    layers: dict[str, LayerAttribution]
    f_clean: torch.Tensor      # p_y(x), [n]
    f_corrupted: torch.Tensor  # p_y(x~), [n]
    steps: int
    form: str
    corrupted_outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    clean_outputs: dict[str, torch.Tensor] = field(default_factory=dict)


def _prob(graph: ShadowGraph, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = graph(x)[0]
    return torch.softmax(logits.reshape(len(x), -1), dim=1)[torch.arange(len(x)), labels]


#: Interpolated inputs per forward+backward block when nothing smaller is asked (the
#: workspace asks for fewer where memory bounds a block: rectify.workspace.ig_chunk).
IG_CHUNK = 64


def layer_integrated_gradients(graph: ShadowGraph, layers: list[EditableLayer],
                               corrupted: torch.Tensor, clean: torch.Tensor,
                               labels: torch.Tensor, steps: int = 16, chunk: int = IG_CHUNK,
                               form: str = "ig", show_progress: bool | None = None
                               ) -> AttributionResult:
    """IG (``form="ig"``) or path-derivative IG (``form="path"``) for all ``layers`` at once."""
    if form not in ("ig", "path"):
        raise ValueError(f"unknown attribution form '{form}'")
    n = len(clean)
    device = corrupted.device
    names = [l.name for l in layers]
    with torch.no_grad(), LayerTap(graph, layers) as tap:
        ends = _prob(graph, torch.cat([clean, corrupted]), torch.cat([labels, labels]))
    f_clean, f_corr = ends[:n], ends[n:]
    out_clean = {k: v[:n] for k, v in tap.outputs.items()}
    out_corr = {k: v[n:] for k, v in tap.outputs.items()}

    if form == "ig":
        alphas = (torch.arange(steps, dtype=clean.dtype, device=device) + 0.5) / steps
    else:  # segment end points 0..1 and their midpoints
        alphas = torch.arange(steps + 1, dtype=clean.dtype, device=device) / steps
    grad_sum = {k: torch.zeros_like(out_clean[k]) for k in names}
    path_sum = {k: torch.zeros_like(out_clean[k]) for k in names}
    prev_out: dict[str, torch.Tensor] = {}
    prev_grad: dict[str, torch.Tensor] = {}
    # rows: step-major blocks of the n pairs
    points = [corrupted + a * (clean - corrupted) for a in alphas]
    per_chunk = max(1, chunk // max(n, 1))
    step_index = 0
    with progress(len(points), "attribution", show_progress) as bar:
        for start in range(0, len(points), per_chunk):
            block = torch.cat(points[start:start + per_chunk]).detach().requires_grad_(False)
            k_steps = len(points[start:start + per_chunk])
            captured: dict[str, torch.Tensor] = {}

            def keep(node, ins, outs):
                out = outs[0]
                if not out.requires_grad:
                    out = out.detach().requires_grad_(True)
                out.retain_grad()
                captured[node.name] = out
                return (out,) + tuple(outs[1:])

            handle = graph.register_hook(keep, nodes=names)
            try:
                with torch.enable_grad():
                    prob = _prob(graph, block, labels.repeat(k_steps))
                    prob.sum().backward()
            finally:
                handle.remove()
            for layer in layers:  # token rows regrouped per image, as LayerTap gives them
                name, out = layer.name, captured[layer.name]
                grad = image_rows_of(graph, layer, out.grad, k_steps * n)
                value = image_rows_of(graph, layer, out.detach(), k_steps * n)
                grads = grad.reshape(k_steps, n, *grad.shape[1:])
                values = value.reshape(k_steps, n, *value.shape[1:])
                if form == "ig":
                    grad_sum[name] += grads.sum(0)
                else:
                    for j in range(k_steps):
                        idx = step_index + j
                        if idx > 0:  # trapezoid: mean gradient of the segment's end points
                            mid = (grads[j] + prev_grad[name]) / 2
                            path_sum[name] += mid * (values[j] - prev_out[name])
                        prev_out[name] = values[j]
                        prev_grad[name] = grads[j]
            step_index += k_steps
            bar.update(k_steps)
            for p in graph.parameters():
                p.grad = None
    result: dict[str, LayerAttribution] = {}
    target = f_clean - f_corr
    for name in names:
        if form == "ig":
            m = (out_clean[name] - out_corr[name]) * grad_sum[name] / steps
        else:
            m = path_sum[name]
        error = (m.reshape(n, -1).sum(1) - target).abs()
        result[name] = LayerAttribution(name, m.detach(), error.detach())
    return AttributionResult(result, f_clean.detach(), f_corr.detach(), steps, form,
                             out_corr, out_clean)

