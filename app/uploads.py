"""Which files a request may make the server read: uploads to this server, and the app's examples.

A client can put any string where a file goes. Gradio vets only values marked as its ``FileData``;
a bare path or a ``{"path": ...}`` dict reaches the function as it was sent, and reading it would
hand any image on the host back through ``/annotate`` (and say whether other paths exist). So a
file is taken only when it is marked as an upload *and*, with symlinks resolved, lies inside the
upload folder or the examples folder. Every refusal reads the same, whether or not the path exists.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from gradio.data_classes import FileData

from .errors import UserError

NOT_AN_UPLOAD = (
    "Images must be uploaded to this server: POST the file to /gradio_api/upload and pass "
    '{"path": <the returned path>, "meta": {"_type": "gradio.FileData"}} (gradio_client\'s handle_file '
    "does this). Paths on the server are not accepted."
)
FILE_DATA_TYPE = "gradio.FileData"


class UploadGuard:
    def __init__(self, roots: Iterable[str | os.PathLike[str]]) -> None:
        self.roots = tuple(Path(os.path.realpath(root)) for root in roots)

    def allows(self, path: str | os.PathLike[str]) -> bool:
        resolved = Path(os.path.realpath(path))
        return any(resolved.is_relative_to(root) for root in self.roots)

    def local_path(self, path: str | os.PathLike[str]) -> str:
        """``path`` (from the page's own components) if it lies in an allowed folder; else refused."""
        if not isinstance(path, str | os.PathLike) or not self.allows(path):
            raise UserError(NOT_AN_UPLOAD)
        return os.path.realpath(path)

    def api_file(self, value: Any) -> str:
        """The path of a file sent to the API: a Gradio ``FileData`` (object or marked dict) only."""
        if isinstance(value, dict):
            marked = isinstance(value.get("meta"), dict) and value["meta"].get("_type") == FILE_DATA_TYPE
            path = value.get("path") if marked else None
        else:
            path = value.path if isinstance(value, FileData) else None
        if not isinstance(path, str) or not path:
            raise UserError(NOT_AN_UPLOAD)
        return self.local_path(path)
