"""Activation functions: each keeps its input's dtype."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from patcher.graph.ops.registry import register


@register("Relu", since=6)
def relu(x):
    return torch.relu(x)


@register("LeakyRelu", since=6)
def leaky_relu(x, *, alpha=0.01):
    return F.leaky_relu(x, alpha)


@register("PRelu", since=7)
def prelu(x, slope):
    """y = x if x >= 0 else slope * x, slope broadcast onto x."""
    return torch.where(x >= 0, x, x * slope)


@register("Elu", since=6)
def elu(x, *, alpha=1.0):
    """y = x if x > 0 else alpha * (exp(x) - 1)."""
    return F.elu(x, alpha)


@register("Selu", since=6)
def selu(x, *, alpha=1.67326319217681884765625, gamma=1.05070102214813232421875):
    """y = gamma * (x if x > 0 else alpha * (exp(x) - 1))."""
    return gamma * torch.where(x > 0, x, alpha * torch.expm1(x))


@register("Celu", since=12)
def celu(x, *, alpha=1.0):
    """y = max(0, x) + min(0, alpha * (exp(x / alpha) - 1))."""
    return F.celu(x, alpha)


@register("ThresholdedRelu", since=10)
def thresholded_relu(x, *, alpha=1.0):
    """y = x if x > alpha else 0."""
    return torch.where(x > alpha, x, torch.zeros_like(x))


@register("Softplus", since=1)
def softplus(x):
    """y = log(1 + exp(x))."""
    return F.softplus(x)


@register("Softsign", since=1)
def softsign(x):
    """y = x / (1 + |x|)."""
    return x / (1 + x.abs())


@register("Mish", since=18)
def mish(x):
    """y = x * tanh(softplus(x))."""
    return x * torch.tanh(F.softplus(x))


@register("Sigmoid", since=6)
def sigmoid(x):
    return torch.sigmoid(x)


@register("Tanh", since=6)
def tanh(x):
    return torch.tanh(x)


@register("HardSigmoid", since=6)
def hard_sigmoid(x, *, alpha=0.2, beta=0.5):
    """y = max(0, min(1, alpha * x + beta))."""
    return torch.clamp(x * alpha + beta, 0.0, 1.0)


@register("HardSwish", since=14)
def hard_swish(x):
    """y = x * max(0, min(1, x / 6 + 1 / 2))."""
    return x * torch.clamp(x * (1.0 / 6.0) + 0.5, 0.0, 1.0)


@register("Clip", since=6, until=10)
def clip_6(x, *, min=-3.4028234663852886e38, max=3.4028234663852886e38):
    return torch.clamp(x, min, max)


@register("Clip", since=11)
def clip_11(x, min=None, max=None):
    """Clamp to [min, max]; either bound may be omitted. min > max gives max everywhere
    (ONNX's rule, and torch.clamp's). One clamp kernel rather than maximum then minimum
    (MobileNetV2's ReLU6 at 224: about half the time); its gradient is 1 on the closed
    interval, so an input exactly at a bound keeps its whole gradient (torch.maximum
    would split it in half between the input and the bound)."""
    low = None if min is None else min.to(x.dtype)
    high = None if max is None else max.to(x.dtype)
    if low is None and high is None:
        return x
    return torch.clamp(x, low, high)


def _over_2d(fn, x, axis):
    """``fn`` along dim 1 of the input flattened to 2-D at ``axis`` (the opset < 13 form of
    Softmax and LogSoftmax)."""
    axis = axis % x.dim() if x.dim() else 0
    flat = x.reshape(int(math.prod(x.shape[:axis])), -1)
    return fn(flat, dim=1).reshape(x.shape)


@register("Softmax", since=1, until=12)
def softmax_1(x, *, axis=1):
    """Softmax over the input flattened to 2-D at ``axis`` (opsets before 13)."""
    return _over_2d(torch.softmax, x, axis)


@register("Softmax", since=13)
def softmax_13(x, *, axis=-1):
    return torch.softmax(x, dim=axis)


@register("LogSoftmax", since=1, until=12)
def log_softmax_1(x, *, axis=1):
    """LogSoftmax over the input flattened to 2-D at ``axis`` (opsets before 13)."""
    return _over_2d(torch.log_softmax, x, axis)


@register("LogSoftmax", since=13)
def log_softmax_13(x, *, axis=-1):
    return torch.log_softmax(x, dim=axis)


@register("Gelu", since=20)
def gelu(x, *, approximate="none"):
    return F.gelu(x, approximate=approximate)
