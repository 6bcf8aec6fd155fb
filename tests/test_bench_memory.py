"""The benchmark's phase peaks (bench/memory.py) see memory a phase used and gave back.

Each case runs in a fresh interpreter: fixing glibc's mmap threshold lasts for the process, and a
test process's heap history would blur what is measured.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20

pytestmark = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux /proc only")


def _run(body: str) -> dict:
    script = textwrap.dedent(
        """
        import json, torch
        from bench.memory import PeakMemory, fixed_mmap_threshold
        """
    ) + textwrap.dedent(body)
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True, timeout=120
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_block_freed_inside_the_phase_still_counts():
    # A short-lived 48 MiB block, freed before the phase ends: a sampler could miss it, the
    # kernel's peak counter cannot.
    got = _run(
        """
        fixed_mmap_threshold()
        with PeakMemory(interval_s=10.0) as peak:
            block = torch.ones(48 * 2**20, dtype=torch.uint8)
            del block
        print(json.dumps({"delta": peak.delta, "exact": peak.peak_total is not None}))
        """
    )
    assert got["exact"]
    assert 0.95 * 48 * MIB <= got["delta"] < 56 * MIB


def test_memory_freed_inside_the_phase_is_not_counted_twice():
    # Blocks of growing size, each freed after a small allocation that pins the heap above it: a
    # heap cannot reuse the holes, so with glibc's adaptive threshold (raised by the warm-up block)
    # resident memory grows to the sum of the blocks (15 MiB measured) though at most one 8 MiB
    # block is ever live. With the fixed threshold each block is unmapped when freed.
    got = _run(
        """
        exact = fixed_mmap_threshold()
        warm = torch.ones(4 * 2**20, dtype=torch.uint8)
        del warm
        with PeakMemory() as peak:
            pins = []
            for size in range(1, 9):
                block = torch.ones(size * 2**20, dtype=torch.uint8)
                pins.append(torch.ones(1024, dtype=torch.uint8))
                del block
        print(json.dumps({"delta": peak.delta, "fixed": exact}))
        """
    )
    assert got["fixed"]
    assert 0.95 * 8 * MIB <= got["delta"] < 9 * MIB


def test_a_phase_that_allocates_nothing_reads_near_zero():
    got = _run(
        """
        fixed_mmap_threshold()
        keep = torch.ones(32 * 2**20, dtype=torch.uint8)
        with PeakMemory() as peak:
            total = int(keep[::4096].sum())
        print(json.dumps({"delta": peak.delta, "total": total}))
        """
    )
    assert got["total"] == 32 * MIB // 4096
    assert got["delta"] < 4 * MIB
