"""``spaces.GPU`` on Hugging Face ZeroGPU, a no-op everywhere else.

ZeroGPU attaches a GPU only while a decorated function runs, so the decorator goes on the outer
generating handler (parsing and drawing happen inside it, but they are cheap next to decoding).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)
GPU_SECONDS = int(os.environ.get("VL2_GPU_SECONDS", "120"))


def on_zerogpu() -> bool:
    return os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "true")


def gpu(fn: F) -> F:
    if not on_zerogpu():
        return fn
    import spaces  # preinstalled on Spaces

    return spaces.GPU(duration=GPU_SECONDS)(fn)
