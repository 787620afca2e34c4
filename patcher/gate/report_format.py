"""The report's shared pieces: its constants, optional libraries and value formatting."""
from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np

from patcher.errors import RectifyError

#: The longest side of a heatmap panel in pixels (small inputs are upscaled, nearest).
PANEL_SIZE = 168
#: The shortest side of a panel at least this many pixels (a 48x192 input is drawn at
#: 96x384), by a whole nearest-neighbour factor, aspect kept ...
MIN_PANEL_SIDE = 96
#: ... unless that makes the longest side exceed this.
MAX_PANEL_SIDE = 640
#: Panels at least this much wider than high are laid out two to a line.
WIDE_ASPECT = 2.0
#: At most this many layers in the score chart (the best ones, and any edited layer);
#: every layer is in the score table.
MAX_CHART_LAYERS = 10
#: Held-out attack examples shown: at least one per class present (up to this many),
#: at least ``max_pairs`` in all when there are that many.
MAX_ATTACK_EXAMPLES = 12

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
