"""Metrics under onnxruntime on a model whose answers are known by construction."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import helper

from patcher.analysis.input_attribution import input_integrated_gradients
from patcher.gate import metrics
from patcher.graph.shadow import ShadowGraph
from tests.build import make_model, value_info

# y = x[:, :3] @ I: the predicted class is the argmax of the first three features.
MODEL = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")],
                   [value_info("x", ["batch", 4])], [value_info("y", ["batch", 3])],
                   {"w": np.vstack([np.eye(3), np.zeros((1, 3))]).astype(np.float32)})
BYTES = MODEL.SerializeToString()


def _onehot(classes):
    x = np.zeros((len(classes), 4), np.float32)
    x[np.arange(len(classes)), classes] = 1
    return x


def test_accuracy_and_attack_success_rate():
    x = _onehot([0, 1, 2, 2])
    assert metrics.accuracy(BYTES, x, np.array([0, 1, 2, 0]), provider="cpu") == 0.75
    # corrupted inputs: two of the three non-target ones land on target 2
    attack = _onehot([2, 2, 1, 2])
    y = np.array([0, 1, 1, 2])  # the last has the target label: not counted
    assert metrics.attack_success_rate(BYTES, attack, y, 2, provider="cpu") == pytest.approx(2 / 3)


def test_spurious_gap_sign():
    gap = metrics.spurious_gap(BYTES, _onehot([0, 1]), np.array([0, 0]), _onehot([0, 0]),
                               np.array([0, 0]), provider="cpu")
    assert (gap.clean_accuracy, gap.spurious_accuracy, gap.gap) == (0.5, 1.0, 0.5)


def test_input_integrated_gradients_are_complete_and_leakage_counts_the_mask():
    graph = ShadowGraph.from_onnx(MODEL)
    x = torch.tensor([[2.0, 0.5, 0.1, 3.0]])
    attr, error = input_integrated_gradients(graph, x, torch.tensor([0]), steps=64)
    assert float(error.max()) < 1e-3
    assert float(attr[0, 3]) == 0.0  # the fourth feature never reaches the output
    mask = np.array([[0, 1, 1, 1]], np.float32)  # everything but the true class's feature
    share = metrics.leakage(graph, x.numpy(), np.array([0]), mask, steps=64)
    expected = float(attr[0, 1:].abs().sum() / attr[0].abs().sum())
    assert share == pytest.approx(expected, rel=1e-4) and 0 < share < 1


def test_pair_gap_is_the_mean_probability_difference():
    clean, corrupted = _onehot([0, 1]) * 5, _onehot([2, 2]) * 5
    labels = np.array([0, 1])
    gap = metrics.pair_gap(BYTES, corrupted, clean, labels, provider="cpu")
    p_right = np.exp(5) / (np.exp(5) + 2)   # softmax of [5, 0, 0] at the hot class
    p_wrong = 1 / (np.exp(5) + 2)
    assert gap == pytest.approx(p_right - p_wrong, rel=1e-5)
