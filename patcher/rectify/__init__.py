"""Rectification: objectives, locators, transplant sets and the one loop."""
from patcher.rectify.loop import (LayerScore, RectifyConfig, RectifyResult, Round,
                                  rectify)

__all__ = ["LayerScore", "RectifyConfig", "RectifyResult", "Round", "rectify"]
