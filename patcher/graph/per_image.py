"""Fixed-batch models in the shadow graph: a pass over n images runs each node on one batch
of the model's fixed size at a time.

A model exported with its batch fixed (at 1, as zoo and edge exports often are) may merge
the batch into other axes (a Reshape to [1, -1] before a Gemm), so it cannot run n images
at once. The shadow graph then holds every tensor that depends on the images as a
:class:`PerImage` list, one piece per batch of the fixed size, and runs each node once per
piece. Hooks and callers see the pieces joined along the first axis (for a batch-first
tensor, the usual [n, ...]); a tensor a hook returns is split again the same way.
"""
from __future__ import annotations

import torch


class PerImage(list):
    """One tensor of a fixed-batch pass, as a list of pieces (one per fixed-size batch)."""

    def joined(self) -> torch.Tensor:
        """The pieces concatenated along the first axis (stacked when they are scalars)."""
        if self[0].dim() == 0:
            return torch.stack(list(self))
        return torch.cat(list(self))


def split(t: torch.Tensor, pieces: int) -> PerImage:
    """``t`` (joined as :meth:`PerImage.joined` gives it) cut into ``pieces`` equal parts."""
    if t.dim() == 0 or t.shape[0] % pieces:
        raise ValueError(f"cannot cut a tensor of shape {list(t.shape)} into {pieces} pieces")
    return PerImage(t.split(t.shape[0] // pieces))


def joined(value):
    """``value`` as callers see it: a PerImage joined, anything else unchanged."""
    return value.joined() if isinstance(value, PerImage) else value


def fixed_batch(proto_graph, initializers) -> int | None:
    """The batch size the first graph input fixes (an integer first dimension of an input of
    rank 2 or more), or None when it is symbolic or absent."""
    first = next((i for i in proto_graph.input if i.name not in initializers), None)
    dims = first.type.tensor_type.shape.dim if first is not None else []
    if len(dims) >= 2 and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
        return int(dims[0].dim_value)
    return None
