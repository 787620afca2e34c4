"""The op registry: ONNX op type and opset range -> a small pure torch function.

An implementation is registered with ``@register("Softmax", since=13)``; the
newest implementation of an op leaves ``until`` open. A function receives the
node's inputs positionally (``None`` for an omitted optional input) and its
attributes as keyword arguments, already converted to Python values (tensor
attributes become torch tensors). It returns a tensor or a tuple of tensors in
node-output order. A function may declare the keyword ``num_outputs_`` to learn
how many outputs the node has (``Split`` needs it), and ``input_types_`` to learn
the declared ONNX element type of each input (0 when unknown): a type carried in a
wider torch dtype (INT4 in int8) cannot be told from the tensor (``QuantizeLinear``
needs its zero point's).
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Callable

OpFunction = Callable[..., object]

#: Opset domains treated as the default ONNX domain.
DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class OpImpl:
    """One registered implementation of ``op_type`` for opsets ``since..until`` (inclusive)."""

    op_type: str
    domain: str
    since: int
    until: int | None
    fn: OpFunction

    def covers(self, opset: int) -> bool:
        return self.since <= opset and (self.until is None or opset <= self.until)

    @property
    def attribute_names(self) -> frozenset[str]:
        return _keyword_names(self.fn)

    @property
    def wants_output_count(self) -> bool:
        return "num_outputs_" in _parameter_names(self.fn)

    @property
    def wants_input_types(self) -> bool:
        return "input_types_" in _parameter_names(self.fn)


@functools.lru_cache(maxsize=None)
def _parameter_names(fn: OpFunction) -> frozenset[str]:
    """The parameter names of ``fn`` (cached: inspect.signature costs ~50 us, and every node
    of a graph asks, which made long chains of trivial nodes slow)."""
    return frozenset(inspect.signature(fn).parameters)


@functools.lru_cache(maxsize=None)
def _keyword_names(fn: OpFunction) -> frozenset[str]:
    params = inspect.signature(fn).parameters.values()
    return frozenset(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


_REGISTRY: dict[tuple[str, str], list[OpImpl]] = {}


def register(op_type: str, since: int = 1, until: int | None = None,
             domain: str = "") -> Callable[[OpFunction], OpFunction]:
    """Decorator: register ``fn`` as ``op_type`` for opsets ``since..until``."""

    def decorate(fn: OpFunction) -> OpFunction:
        impls = _REGISTRY.setdefault((domain, op_type), [])
        for other in impls:
            lo, hi = max(other.since, since), min(other.until or 10**9, until or 10**9)
            if lo <= hi:
                raise ValueError(f"{op_type} opsets {since}..{until} overlap an earlier registration")
        impls.append(OpImpl(op_type, domain, since, until, fn))
        return fn

    return decorate


def lookup(op_type: str, domain: str, opset: int) -> OpImpl | None:
    """The implementation of ``op_type`` in ``domain`` at ``opset``, or None."""
    domain = "" if domain in DEFAULT_DOMAINS else domain
    for impl in _REGISTRY.get((domain, op_type), ()):
        if impl.covers(opset):
            return impl
    return None


def supported_ops() -> dict[str, list[tuple[int, int | None]]]:
    """Op type -> list of (since, until) opset ranges, for docs and ``inspect``."""
    out: dict[str, list[tuple[int, int | None]]] = {}
    for (domain, op_type), impls in sorted(_REGISTRY.items()):
        key = op_type if not domain else f"{domain}.{op_type}"
        out[key] = sorted((i.since, i.until) for i in impls)
    return out
