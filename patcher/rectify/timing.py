"""Seconds per named phase of a run (statistics, attribution, localization, edit, ...)."""
from __future__ import annotations

import time


class Timings(dict):
    """A dict phase -> seconds that phases add to."""

    def add(self, phase: str, start: float) -> None:
        """Add the seconds since ``start`` (time.perf_counter) to ``self[phase]``."""
        self[phase] = self.get(phase, 0.0) + time.perf_counter() - start
