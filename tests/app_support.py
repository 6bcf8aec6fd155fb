"""Helpers for the app tests: images with known geometry, scripted replies, an in-process server."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from app.backends.scripted import ScriptedBackend
from app.ui import build_demo, launch_options

BACKGROUND = (128, 128, 128)


def solid_image(path: Path, size: tuple[int, int], *, exif_orientation: int | None = None) -> Path:
    """A grey image (stored pixels of ``size``), optionally tagged with an EXIF orientation."""
    image = Image.new("RGB", size, BACKGROUND)
    if exif_orientation is None:
        image.save(path)
    else:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        image.save(path, exif=exif, quality=95)
    return path


def find_reply(label: str, box: tuple[int, int, int, int]) -> str:
    return f"<|ref|>{label}<|/ref|><|det|>[[{box[0]}, {box[1]}, {box[2]}, {box[3]}]]<|/det|>"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_app(backend: ScriptedBackend, tmp_path: Path, *, mcp: bool = False, **queue_kwargs) -> Iterator[str]:
    demo = build_demo(backend, image_dir=tmp_path / "images")
    demo.queue(**({"max_size": 16} | queue_kwargs))
    _, url, _ = demo.launch(
        prevent_thread_lock=True,
        server_name="127.0.0.1",
        server_port=free_port(),
        quiet=True,
        mcp_server=mcp,
        **launch_options(),
    )
    try:
        yield url
    finally:
        demo.close()
