"""Fine-tuning one weight tensor: the paper's baseline edit."""
from __future__ import annotations

import torch

from patcher.graph.shadow import ShadowGraph


def finetune_in_place(graph: ShadowGraph, weight_name: str, x: torch.Tensor, y: torch.Tensor,
                      steps: int, lr: float) -> torch.Tensor:
    """Adam on the cross-entropy of ``graph(x)`` against ``y``, ``steps`` steps, on the weight
    ``weight_name`` only (the graph keeps the trained weight). Returns W_trained - W."""
    weight = graph.weight(weight_name)
    original = weight.detach().clone()
    others = [p for p in graph.parameters() if p is not weight]
    states, was = [p.requires_grad for p in others], weight.requires_grad
    for p in others:
        p.requires_grad_(False)
    weight.requires_grad_(True)
    opt = torch.optim.Adam([weight], lr=lr)
    try:
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(graph(x)[0].reshape(len(x), -1), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        for p, state in zip(others, states):
            p.requires_grad_(state)
        weight.requires_grad_(was)
    return weight.detach() - original
