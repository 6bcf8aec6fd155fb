"""The pictures the page shows, as files Gradio serves itself (``/gradio_api/file=…``).

The canvas draws boxes in the browser, so an image is encoded once — its browser-sized copy, when
it is first shown — and never again per update. Copies go into a folder of the session's own
under Gradio's upload cache (the folder Gradio's file route serves), with a random part in each
name; the folder is deleted when the session ends, and Gradio ages out anything older. A copy that
has gone is written again on the next update.
"""

from __future__ import annotations

import io
import os
import secrets
import shutil
from pathlib import Path
from urllib.parse import quote

from gradio.utils import get_upload_folder

from .session import SessionImage

# Above this many pixels a photo goes to the browser as JPEG (a PNG of it is several MB); below it
# PNG keeps charts and screenshots crisp.
JPEG_ABOVE_PIXELS = 1_000_000


def file_url(path: str | os.PathLike[str]) -> str:
    """The URL Gradio serves ``path`` at, relative to the page (so it works under a mounted prefix)."""
    return "gradio_api/file=" + quote(os.fspath(path))


def views_folder(session_id: str) -> Path:
    """Where one session's served copies go (under Gradio's cache, which its file route serves)."""
    return Path(get_upload_folder()) / "vl2-views" / session_id


def view_file(entry: SessionImage, folder: Path) -> str:
    """The browser-sized copy of ``entry`` (written on first use into ``folder``)."""
    if entry.served_path and os.path.exists(entry.served_path):
        return entry.served_path
    shown = entry.display
    buffer = io.BytesIO()
    if shown.width * shown.height > JPEG_ABOVE_PIXELS:
        shown.save(buffer, format="JPEG", quality=90)
        suffix = "jpg"
    else:
        shown.save(buffer, format="PNG", compress_level=1)
        suffix = "png"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{entry.key}-{secrets.token_hex(8)}.{suffix}"  # not guessable from the session's id
    path.write_bytes(buffer.getvalue())
    entry.served_path = str(path)
    return entry.served_path


def discard_views(session_id: str) -> None:
    shutil.rmtree(views_folder(session_id), ignore_errors=True)
