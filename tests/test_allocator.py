"""patcher.allocator: inside a phase, freed large blocks are reused (no fresh page faults);
outside, they are mapped afresh as glibc does by default; values never change."""
from __future__ import annotations

import resource

import pytest
import torch

from patcher import allocator

pytestmark = pytest.mark.skipif(not allocator.reuse_freed_memory(),
                                reason="the C library has no mallopt (not glibc)")

SIZE = 16 << 20  # floats: a 64 MiB tensor, above glibc's largest automatic mmap threshold


def _faults_of_repeated_tensors(times: int = 4) -> int:
    """Minor page faults while a 64 MiB tensor is filled and freed ``times`` times after a
    first one."""
    torch.ones(SIZE)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for i in range(times):
        t = torch.full((SIZE,), float(i))
        assert float(t[-1]) == float(i)
        del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_a_phase_reuses_freed_blocks_and_outside_one_they_are_mapped_afresh():
    pages = SIZE * 4 // resource.getpagesize()
    with allocator.phase():
        inside = _faults_of_repeated_tensors()
    outside = _faults_of_repeated_tensors()
    assert outside >= 4 * pages * 0.9  # every tensor faulted in again
    assert inside < 2 * pages  # at most the first is faulted in: the others reuse its block


def test_phases_nest_and_values_are_unchanged():
    x = torch.arange(SIZE, dtype=torch.float32)
    with allocator.phase():
        with allocator.phase():
            y = x * 2
        z = x * 2  # still inside the outer phase
    assert torch.equal(y, z) and torch.equal(y, torch.arange(SIZE, dtype=torch.float32) * 2)
