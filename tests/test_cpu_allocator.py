"""Freed activation memory stays with the process for the next layer (glibc thresholds)."""

from __future__ import annotations

import platform

import pytest
import torch

from model import cpu_allocator
from model.cpu_allocator import ENV, reuse_freed_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _heap_ranges() -> list[tuple[int, int]]:
    """Address ranges of the main thread's heap, as the kernel lists them."""
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            if line.rstrip().endswith("[heap]"):
                start, end = (int(part, 16) for part in line.split()[0].split("-"))
                ranges.append((start, end))
    return ranges


@pytest.mark.skipif(not GLIBC, reason="the thresholds are glibc's")
def test_a_large_activation_comes_from_the_heap_once_reuse_is_on(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert reuse_freed_memory() == "freed memory reused (glibc thresholds raised)"
    block = torch.empty(64 * 2**20, dtype=torch.uint8)  # larger than glibc's default mmap ceiling (32 MiB)
    address = block.data_ptr()
    assert any(start <= address < end for start, end in _heap_ranges()), "64 MiB block was given its own mapping"


def test_system_choice_leaves_the_allocator_alone(monkeypatch):
    monkeypatch.setenv(ENV, "system")
    monkeypatch.setattr(cpu_allocator.ctypes, "CDLL", lambda *args: pytest.fail("mallopt called"))
    assert reuse_freed_memory() == f"system allocator defaults ({ENV}=system)"


def test_an_unknown_choice_is_refused_with_the_accepted_values(monkeypatch):
    monkeypatch.setenv(ENV, "jemalloc")
    with pytest.raises(ValueError, match="use reuse or system"):
        reuse_freed_memory()
