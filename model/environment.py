"""Every ``VL2_*`` environment switch: its default and meaning, in one table, read in one place.

Code asks :func:`read` (or :func:`read_int`, :func:`read_float`, :func:`read_choice`) for a
switch by name; a name that is not in :data:`SWITCHES` is a programming error, so a new switch
cannot be added without being documented here. ``python -m model.environment`` prints the table
(docs/configuration.md is that table; a test keeps them equal). Values are read when asked, not
at import, so a test or a process manager can change them before the thing they steer starts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Switch:
    name: str
    default: str  # "" means unset
    meaning: str
    area: str  # who reads it: runtime, app, limits, bench/tests


SWITCHES: tuple[Switch, ...] = (
    # -- the runtime (model/) --
    Switch(
        "VL2_VISION_CACHE_MB",
        "256 (CPU) / 64 (GPU)",
        "memory for the vision features of recent images; 0: off",
        "runtime",
    ),
    Switch(
        "VL2_PREFIX_CACHE_MB",
        "384 (CPU) / 128 (GPU)",
        "memory for recent conversations' key/value caches; 0: off",
        "runtime",
    ),
    Switch(
        "VL2_CPU_GEMM", "auto", "CPU: the dtype of many-row products: auto (measured at load), bf16 or fp32", "runtime"
    ),
    Switch(
        "VL2_CPU_KERNELS",
        "auto",
        "CPU: one-row decode kernels: auto, compiled (fail if they cannot be) or eager",
        "runtime",
    ),
    Switch(
        "VL2_DECODE_STEP",
        "auto",
        "CPU, Tiny: whole-step decoder: auto (native where it builds, else compiled), native or compiled",
        "runtime",
    ),
    Switch(
        "VL2_NATIVE_CACHE",
        "",
        "CPU: where the native decode step's compiled library is kept (default ~/.cache/vl2-grounding-studio/native)",
        "runtime",
    ),
    Switch("VL2_MAX_PIXELS", "64000000", "largest image accepted, in pixels", "runtime"),
    # -- the app (app/) --
    Switch("VL2_MODEL", "deepseek-ai/deepseek-vl2-tiny", "--model's default", "app"),
    Switch("VL2_GPU_MEMORY", "auto", "--gpu-memory's default (a GPU budget like 8GiB)", "app"),
    Switch("VL2_SERVER_URL", "http://127.0.0.1:8000/v1", "--server-url's default (--backend openai)", "app"),
    Switch("VL2_LABEL_FONT", "", "a .ttf/.otf font file tried first for box labels", "app"),
    Switch("VL2_GPU_SECONDS", "120", "ZeroGPU: seconds of GPU one request may hold", "app"),
    Switch("VL2_ALLOWED_HOSTS", "", "more Host names to serve (comma-separated; *.lan patterns)", "app"),
    Switch("VL2_ALLOWED_ORIGINS", "", "more browser origins allowed to call the server (comma-separated)", "app"),
    # -- limits that protect the host (app/limits.py) --
    Switch("VL2_MAX_UPLOAD_MB", "50", "largest upload, in MB", "limits"),
    Switch("VL2_MAX_SIDE", "16384", "longest image side, in pixels", "limits"),
    Switch("VL2_MAX_ASPECT", "200", "most elongated image (1:N)", "limits"),
    Switch("VL2_MAX_IMAGES_PER_TURN", "8", "images in one message", "limits"),
    Switch("VL2_MAX_IMAGES_PER_REQUEST", "16", "images in one request with its history", "limits"),
    Switch("VL2_MAX_REQUEST_PIXELS", "100000000", "pixels in one request with its history", "limits"),
    Switch("VL2_MAX_SERVER_PIXELS", "1000000000", "pixels held for all conversations together", "limits"),
    Switch("VL2_MAX_HISTORY_ITEMS", "64", "history entries in an API call", "limits"),
    Switch("VL2_MAX_PROMPT_CHARS", "8000", "characters in a message", "limits"),
    Switch("VL2_MAX_NEW_TOKENS", "2048", "a reply's length cap", "limits"),
    Switch("VL2_MAX_TURNS", "200", "turns in one conversation", "limits"),
    Switch("VL2_MAX_BOXES", "1000", "boxes in one API call", "limits"),
    Switch("VL2_MAX_LABEL_CHARS", "200", "characters in a label or phrase", "limits"),
    Switch("VL2_MAX_LABEL_IMAGES", "200", "images or video frames per labelling run in the page", "limits"),
    Switch("VL2_MAX_LABEL_PHRASES", "8", "phrases per labelling run in the page or /label", "limits"),
    Switch("VL2_SESSION_TTL", "7200", "seconds an idle conversation is kept", "limits"),
    Switch("VL2_QUEUE_SIZE", "32", "requests waiting for the model before new ones are refused", "limits"),
    # -- benchmarks and tests --
    Switch(
        "VL2_BENCH_CACHE",
        "",
        "where the benchmarks keep their generated checkpoints (default: the temp dir)",
        "bench/tests",
    ),
    Switch("VL2_TEST_REQUEST_SECONDS", "120", "tests: the longest one HTTP request may take", "bench/tests"),
)
_BY_NAME = {switch.name: switch for switch in SWITCHES}


def read(name: str, default: str | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """The switch's value as set (in ``environ``, else the process's), else ``default`` (None: unset).

    Unknown names are refused: every switch is documented in :data:`SWITCHES`.
    """
    if name not in _BY_NAME:
        raise KeyError(f"{name} is not a documented switch: add it to model/environment.py's SWITCHES")
    value = (os.environ if environ is None else environ).get(name)
    return value if value not in (None, "") else default


def read_int(name: str, default: int) -> int:
    """A whole number; anything else (unset, empty, a typo) is the default."""
    value = (read(name) or "").strip()
    return int(value) if value.isdigit() else default


def read_float(name: str, default: float) -> float:
    value = read(name)
    try:
        return float(value) if value is not None else default
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a number") from None


def read_choice(name: str, choices: tuple[str, ...]) -> str:
    """One of ``choices`` (the first is the default); anything else is refused with the choices."""
    value = (read(name) or choices[0]).lower()
    if value not in choices:
        raise ValueError(f"{name}={value!r}: use {', '.join(choices[:-1])} or {choices[-1]}")
    return value


def table() -> str:
    """The switches as a Markdown table."""
    rows = ["| variable | default | what it does | read by |", "|---|---|---|---|"]
    rows += [f"| `{s.name}` | {(s.default and f'`{s.default}`') or '—'} | {s.meaning} | {s.area} |" for s in SWITCHES]
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
