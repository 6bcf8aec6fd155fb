"""Peak memory of a block of code: anonymous RSS sampled by a thread, and CUDA's own counters.

``ru_maxrss`` only ever grows and counts the checkpoint's memory-mapped pages (which the kernel can
drop at any time), so it cannot say what one phase cost. Anonymous RSS, sampled every few
milliseconds, can: the peak over a phase minus the level before it is that phase's activation peak,
provided the phase has to take its memory from the OS. glibc keeps freed blocks for reuse once it
has freed a large one (its mmap threshold rises to that block's size: a 13 MB cache buffer of the
decode warm-up is enough), and a phase that reuses them would read as free. So the heap's free
memory is handed back (``malloc_trim``) before each measured block.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import re
import resource
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

_FIELDS = re.compile(r"^(RssAnon|RssFile):\s+(\d+) kB", re.MULTILINE)


def rss_bytes() -> dict[str, int]:
    """Current anonymous and file-backed resident memory of this process (Linux)."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return {"anon": 0, "file": 0}
    values = {name: int(kb) * 1024 for name, kb in _FIELDS.findall(text)}
    return {"anon": values.get("RssAnon", 0), "file": values.get("RssFile", 0)}


def _release_free_heap() -> None:
    """``malloc_trim(0)``: give the heap's free pages back to the OS (glibc; elsewhere nothing)."""
    with contextlib.suppress(OSError, AttributeError, TypeError):
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class PeakMemory:
    """``with PeakMemory() as peak: ...`` then ``peak.anon_delta`` (bytes above the level at entry)."""

    interval_s: float = 0.002
    device: torch.device | None = None
    start_anon: int = 0
    peak_anon: int = 0
    peak_file: int = 0
    cuda_allocated: int = 0
    cuda_reserved: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            now = rss_bytes()
            self.peak_anon = max(self.peak_anon, now["anon"])
            self.peak_file = max(self.peak_file, now["file"])
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakMemory:
        _release_free_heap()
        now = rss_bytes()
        self.start_anon = self.peak_anon = now["anon"]
        self.peak_file = now["file"]
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.cuda_allocated = torch.cuda.max_memory_allocated(self.device)
            self.cuda_reserved = torch.cuda.max_memory_reserved(self.device)
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        now = rss_bytes()
        self.peak_anon = max(self.peak_anon, now["anon"])

    @property
    def anon_delta(self) -> int:
        return self.peak_anon - self.start_anon
