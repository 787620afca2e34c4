"""The release gate's thresholds: one set of defaults for ``verify`` and ``patch``.

``verify`` gates a patched model with these; ``patch`` aims for them, so that a patch
that passes its own check with default options also passes the gate with default
options:

- accuracy: ``patch --budget`` defaults to the gate's ``--max-accuracy-drop``; both
  measure the drop on the eval set under onnxruntime.
- pair gap: ``patch --gap`` (:data:`PATCH_GAP`) is the loop's target, steered by on
  held-out transplanted pairs (calibration images that receive the pairs' corruption,
  never fitted) and then checked on the given pairs in the written file;
  ``verify --max-gap`` (:data:`MAX_GAP`) is measured on the pairs given to ``verify``.
  The patch target is the stricter of the two (it must stay at or below the gate's),
  so a patch that meets it on the same pairs passes the gate's pair gap.
- attack success rate: ``verify --max-asr`` only (``patch`` has no attack set to steer by).
"""
from __future__ import annotations

#: Largest accuracy drop on the eval set (0.01 = 1 point): ``verify --max-accuracy-drop``
#: and ``patch --budget``.
MAX_ACCURACY_DROP = 0.01
#: Largest attack success rate of the patched model on the attack set: ``verify --max-asr``.
MAX_ASR = 0.05
#: Largest mean pair gap p_y(clean) - p_y(corrupted) on the given pairs: ``verify --max-gap``.
MAX_GAP = 0.05
#: The gap ``patch`` aims for (``patch --gap``): at or below :data:`MAX_GAP`.
PATCH_GAP = 0.001
