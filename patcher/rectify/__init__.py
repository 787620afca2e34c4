"""Rectification: objectives, locators, edit kinds, transplant sets and the one loop.

Data flow inside: :mod:`workspace` (graph, data, statistics) -> :mod:`locators` (which
layers) -> :mod:`editkinds` (candidate deltas) -> :mod:`objectives` (measure) -> :mod:`loop`
(keep or roll back, the result).
"""
from patcher.rectify.config import RectifyConfig
from patcher.rectify.loop import rectify
from patcher.rectify.results import LayerScore, RectifyResult, Round

__all__ = ["LayerScore", "RectifyConfig", "RectifyResult", "Round", "rectify"]
