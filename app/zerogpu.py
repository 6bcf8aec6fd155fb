"""``spaces.GPU`` on Hugging Face ZeroGPU, a no-op everywhere else.

ZeroGPU attaches a GPU only while a decorated function runs, so the decorator goes on the outer
generating handler (parsing and drawing happen inside it, but they are cheap next to decoding).

What ZeroGPU requires of the rest of the app:

* ``spaces`` is imported before anything initialises CUDA (:func:`prepare`, first thing at start-up).
* Each decorated call runs in a **forked process**: its arguments and results are pickled, threads
  of the parent do not exist there. So model work is not handed to the long-lived compute thread
  (``model.compute_thread.use_caller_threads``), the model is loaded in the main thread at
  start-up (``app/launch.py``), and session state travels as plain, picklable data.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

from model.environment import read_int

F = TypeVar("F", bound=Callable)
GPU_SECONDS = read_int("VL2_GPU_SECONDS", 120)


def on_zerogpu() -> bool:
    return os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "true")


def prepare() -> None:
    """Call before anything touches CUDA; nothing happens outside ZeroGPU."""
    if not on_zerogpu():
        return
    import spaces  # noqa: F401  (preinstalled on Spaces; it patches torch's CUDA start-up)

    from model import compute_thread

    compute_thread.use_caller_threads()


def gpu(fn: F) -> F:
    if not on_zerogpu():
        return fn
    import spaces

    return spaces.GPU(duration=GPU_SECONDS)(fn)
