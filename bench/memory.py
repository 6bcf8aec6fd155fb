"""Peak memory of a block of code: the kernel's peak resident-set counter, and CUDA's own counters.

``ru_maxrss`` only ever grows, so it cannot say what one phase cost. Linux keeps a per-process peak
(``VmHWM``) that ``/proc/self/clear_refs`` resets: reset at the start of a phase, read at its end,
it is the phase's exact peak, with no sampling to miss a short one. Two things would still blur it:

* glibc keeps freed blocks for reuse, so a phase could reuse memory an earlier one freed and read
  as free, or keep freed memory and read larger than it ever used. :func:`fixed_mmap_threshold`
  makes every block of 64 KiB or more a mapping of its own, returned when freed, so resident
  memory follows the live tensors (measured on full-size Tiny: a 1,433-token prefill read 139 MB
  this way, its cache included, against 454-627 MB with glibc's adaptive threshold). It slows a run down, so only the
  memory runs use it, not the timing ones;
* the checkpoint's weights are memory-mapped, and the first phase to touch a page reads it in:
  file-backed growth is counted apart and left out of the phase's peak.

Where ``clear_refs`` cannot be written (not Linux, a restricted sandbox) anonymous memory sampled
every few milliseconds stands in.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import re
import resource
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

_FIELDS = re.compile(r"^(RssAnon|RssFile|VmRSS|VmHWM):\s+(\d+) kB", re.MULTILINE)
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
# glibc's mallopt parameter number for the mmap threshold (malloc.h: M_MMAP_THRESHOLD).
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 64 * 1024


def rss_bytes() -> dict[str, int]:
    """This process's anonymous, file-backed and total resident memory, and the total's peak
    since start or the last :func:`_reset_peak` (Linux; zeros elsewhere)."""
    try:
        text = _STATUS.read_text()
    except OSError:
        return {"anon": 0, "file": 0, "total": 0, "peak": 0}
    values = {name: int(kb) * 1024 for name, kb in _FIELDS.findall(text)}
    return {
        "anon": values.get("RssAnon", 0),
        "file": values.get("RssFile", 0),
        "total": values.get("VmRSS", 0),
        "peak": values.get("VmHWM", 0),
    }


@functools.cache  # finding the library runs ldconfig (about 2 ms), and every phase needs it
def _libc() -> ctypes.CDLL | None:
    with contextlib.suppress(OSError, TypeError):
        return ctypes.CDLL(ctypes.util.find_library("c"))
    return None


def _release_free_heap() -> None:
    """``malloc_trim(0)``: give the heap's free pages back to the OS (glibc; elsewhere nothing)."""
    with contextlib.suppress(AttributeError):
        if (libc := _libc()) is not None:
            libc.malloc_trim(0)


def fixed_mmap_threshold() -> bool:
    """Make glibc map every block of :data:`MMAP_THRESHOLD_BYTES` or more on its own (and unmap it
    when freed) for the rest of the process. ``False`` where that is not possible."""
    with contextlib.suppress(AttributeError):
        if (libc := _libc()) is not None:
            return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    return False


def _reset_peak() -> bool:
    """Reset the kernel's peak resident-set counter to the current size (Linux 4.0+)."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class PeakMemory:
    """``with PeakMemory() as peak: ...`` then ``peak.delta`` (bytes above the level at entry)."""

    interval_s: float = 0.002
    device: torch.device | None = None
    start_anon: int = 0
    peak_anon: int = 0
    start_file: int = 0
    peak_file: int = 0
    start_total: int = 0
    peak_total: int | None = None  # the kernel's counter; None where it cannot be reset
    _kernel_peak: bool = False
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
        self._kernel_peak = _reset_peak()
        now = rss_bytes()
        self.start_anon = self.peak_anon = now["anon"]
        self.start_file = self.peak_file = now["file"]
        self.start_total = now["total"]
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
        self.peak_file = max(self.peak_file, now["file"])
        if self._kernel_peak:
            self.peak_total = now["peak"]

    @property
    def delta(self) -> int:
        """The phase's peak above the level at entry, less checkpoint pages read in on the way:
        exact where the kernel's counter could be reset, else sampled anonymous memory."""
        if self.peak_total is None:
            return self.peak_anon - self.start_anon
        return self.peak_total - self.start_total - max(0, self.peak_file - self.start_file)
