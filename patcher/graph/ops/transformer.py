"""Transformer ops that onnxruntime's transformer optimizer writes into ViT/BERT-like models
(``onnxruntime.transformers.optimizer.optimize_model``): com.microsoft Attention,
MultiHeadAttention, BiasGelu, FastGelu, Gelu, SkipLayerNormalization and
SkipSimplifiedLayerNormalization; and LayerNormalization / SimplifiedLayerNormalization as
onnxruntime registers them in the default domain below opset 17.

Attention with head size H and scale s (default 1/sqrt(H)) over q, k, v split into heads:
``softmax(s * q k^T + mask) v``, heads concatenated again. A masked-out key gets
``mask_filter_value`` (-10000 by default) added to its score, as onnxruntime does.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from patcher.errors import UnsupportedOpError
from patcher.graph.ops.norm import layer_norm
from patcher.graph.ops.registry import register

MS = "com.microsoft"


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, S, N*H] -> [B, N, S, H]."""
    b, s, width = x.shape
    return x.reshape(b, s, num_heads, width // num_heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, N, S, H] -> [B, S, N*H]."""
    b, n, s, h = x.shape
    return x.transpose(1, 2).reshape(b, s, n * h)


def _key_mask(mask: torch.Tensor, batch: int, q_len: int, kv_len: int,
              filter_value: float) -> torch.Tensor:
    """An additive mask broadcastable to the scores [B, N, S, L] from onnxruntime's mask forms:
    [B] (keys at or past mask[b] are padding), [B, L] or [B, S, L] (1 keeps, 0 masks)."""
    if mask.dim() == 1 and mask.shape[0] == batch:
        keep = torch.arange(kv_len, device=mask.device)[None, :] < mask[:, None].to(torch.int64)
        keep = keep[:, None, None, :]
    elif mask.dim() == 2:
        keep = (mask != 0)[:, None, None, :]
    elif mask.dim() == 3:
        keep = (mask != 0)[:, None, :, :]
    else:
        raise UnsupportedOpError(f"attention mask of shape {list(mask.shape)} (supported: "
                                 "[batch], [batch, kv_length], [batch, length, kv_length])")
    return torch.where(keep, 0.0, float(filter_value))


def _attend(q, k, v, num_heads: int, scale: float | None, additive=None,
            unidirectional: int = 0) -> torch.Tensor:
    """softmax(scale * q k^T + additive [+ causal]) v per head; q [B, S, N*H], k [B, L, N*H],
    v [B, L, N*Hv] -> [B, S, N*Hv]."""
    qh, kh, vh = _heads(q, num_heads), _heads(k, num_heads), _heads(v, num_heads)
    head = qh.shape[-1]
    s = scale if scale else 1.0 / math.sqrt(head)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * s
    if additive is not None:
        scores = scores + additive.to(scores.dtype)
    if unidirectional:
        q_len, kv_len = scores.shape[-2:]
        future = torch.ones(q_len, kv_len, dtype=torch.bool, device=scores.device).triu(
            1 + kv_len - q_len)
        scores = scores.masked_fill(future, torch.finfo(scores.dtype).min)
    return _merge_heads(torch.matmul(torch.softmax(scores, dim=-1), vh))


@register("Attention", domain=MS)
def attention(x, weights, bias=None, mask_index=None, past=None, attention_bias=None,
              past_sequence_length=None, *, num_heads, qkv_hidden_sizes=None, unidirectional=0,
              mask_filter_value=-10000.0, scale=0.0, num_outputs_=1):
    """Self-attention with a packed projection: [q | k | v] = x W + bias (W [D, Dq+Dk+Dv]),
    then multi-head attention; mask_index [B], [B, L] or [B, S, L]; attention_bias
    [B or 1, N, S, L] is added to the scores. No past state (decoder caches)."""
    if past is not None or past_sequence_length is not None or num_outputs_ > 1:
        raise UnsupportedOpError("Attention with past state (a decoder cache)")
    sizes = list(qkv_hidden_sizes) if qkv_hidden_sizes else [weights.shape[1] // 3] * 3
    qkv = torch.matmul(x, weights)
    if bias is not None:
        qkv = qkv + bias
    q, k, v = torch.split(qkv, sizes, dim=-1)
    additive = None
    if mask_index is not None:
        additive = _key_mask(mask_index, x.shape[0], x.shape[1], k.shape[1], mask_filter_value)
    if attention_bias is not None:
        additive = attention_bias if additive is None else additive + attention_bias
    return _attend(q, k, v, num_heads, scale, additive, unidirectional)


@register("MultiHeadAttention", domain=MS)
def multi_head_attention(query, key=None, value=None, bias=None, key_padding_mask=None,
                         attention_bias=None, past_key=None, past_value=None, *, num_heads,
                         mask_filter_value=-10000.0, scale=0.0, unidirectional=0,
                         num_outputs_=1):
    """Attention over separate q [B, S, D], k [B, L, D], v [B, L, Dv] (bias [D+D+Dv] added to
    each); key_padding_mask [B] or [B, L]; attention_bias [B or 1, N or 1, S, L]. Packed q/k/v
    and past state are refused (onnxruntime's CPU kernel has no packed forms either)."""
    if past_key is not None or past_value is not None or num_outputs_ > 1:
        raise UnsupportedOpError("MultiHeadAttention with past key/value (a decoder cache)")
    if (key is None or value is None or query.dim() != 3 or key.dim() != 3
            or value.dim() != 3):
        raise UnsupportedOpError("MultiHeadAttention with packed or 4-D query/key/value "
                                 "(supported: 3-D query, key and value)")
    q, k, v = query, key, value
    if bias is not None:
        dq, dk = q.shape[-1], k.shape[-1]
        q, k, v = q + bias[:dq], k + bias[dq:dq + dk], v + bias[dq + dk:]
    additive = None
    if key_padding_mask is not None:
        if key_padding_mask.dim() > 2:
            raise UnsupportedOpError("MultiHeadAttention key_padding_mask of rank > 2")
        additive = _key_mask(key_padding_mask, q.shape[0], q.shape[1], k.shape[1],
                             mask_filter_value)
    if attention_bias is not None:
        additive = attention_bias if additive is None else additive + attention_bias
    return _attend(q, k, v, num_heads, scale, additive, unidirectional)


@register("BiasGelu", domain=MS)
def bias_gelu(x, bias):
    """y = gelu(x + bias) with the exact (erf) gelu."""
    return F.gelu(x + bias)


@register("FastGelu", domain=MS)
def fast_gelu(x, bias=None):
    """y = gelu(x + bias) with the tanh approximation
    0.5 u (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3)))."""
    return F.gelu(x if bias is None else x + bias, approximate="tanh")


@register("Gelu", domain=MS)
def gelu_contrib(x):
    """y = 0.5 x (1 + erf(x / sqrt(2)))."""
    return F.gelu(x)


@register("SkipLayerNormalization", domain=MS)
def skip_layer_norm(x, skip, gamma, beta=None, bias=None, *, epsilon=1e-12, num_outputs_=1):
    """s = x + skip (+ bias); y = layer_norm(s over the last axis) * gamma (+ beta).
    Outputs y, mean, 1/std and s (the optional ones in that order)."""
    total = x + skip if bias is None else x + skip + bias
    y, mean, inv_std = layer_norm(total, gamma, beta, axis=-1, epsilon=epsilon, num_outputs_=3)
    return (y, mean, inv_std, total)[:num_outputs_]


def _rms_norm(x, scale, axis: int, epsilon: float, stash_type: int):
    """y = x / sqrt(mean(x^2 over axes axis..) + epsilon) * scale, and 1/rms, in float32."""
    axis = axis % x.dim()
    dims = tuple(range(axis, x.dim()))
    work = x.to(torch.float32) if stash_type == 1 and x.dtype != torch.float64 else x
    inv_rms = torch.rsqrt((work * work).mean(dim=dims, keepdim=True) + epsilon)
    return (work * inv_rms).to(x.dtype) * scale, inv_rms


@register("SkipSimplifiedLayerNormalization", domain=MS)
def skip_simplified_layer_norm(x, skip, gamma, bias=None, *, epsilon=1e-12, num_outputs_=1):
    """s = x + skip (+ bias); y = s / rms(s) * gamma. Outputs y, mean (unused: None),
    1/rms and s."""
    total = x + skip if bias is None else x + skip + bias
    y, inv_rms = _rms_norm(total, gamma, -1, epsilon, 1)
    return (y, torch.zeros_like(inv_rms), inv_rms, total)[:num_outputs_]


@register("LayerNormalization", since=1, until=16)
def layer_norm_contrib(x, scale, b=None, *, axis=-1, epsilon=1e-5, stash_type=1,
                       num_outputs_=1):
    """onnxruntime's LayerNormalization before it entered ONNX at opset 17 (same semantics)."""
    return layer_norm(x, scale, b, axis=axis, epsilon=epsilon, stash_type=stash_type,
                      num_outputs_=num_outputs_)


@register("SimplifiedLayerNormalization", since=1)
def simplified_layer_norm(x, scale, *, axis=-1, epsilon=1e-5, stash_type=1, num_outputs_=1):
    """RMS normalisation: y = x / sqrt(mean(x^2) + epsilon) * scale; also returns 1/rms."""
    y, inv_rms = _rms_norm(x, scale, axis, epsilon, stash_type)
    return (y, inv_rms)[:num_outputs_]
