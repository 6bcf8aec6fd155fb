"""Where the app writes files: one private folder per process, a sub-folder per session.

The folder is made fresh with ``mkdtemp`` (mode 0700, a new random name), never an existing one
adopted: a fixed name under the shared temp dir lets other local users read every upload, or
plant the folder (or a symlink) first and have the app write into it. A session's folder goes
when the session ends; a call's folder when the call ends; the whole folder when the process exits.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
import weakref
from collections.abc import Iterator
from pathlib import Path


class PrivateStorage:
    def __init__(self, parent: str | os.PathLike[str] | None = None) -> None:
        if parent is not None:
            Path(parent).mkdir(parents=True, exist_ok=True)
        self.root = Path(tempfile.mkdtemp(prefix="vl2-studio-", dir=parent))
        self._remove = weakref.finalize(self, shutil.rmtree, self.root, ignore_errors=True)

    def _child(self, *parts: str) -> Path:
        path = self.root.joinpath(*parts)
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        return path

    def session_dir(self, session_id: str) -> Path:
        return self._child("sessions", session_id)

    def discard_session(self, session_id: str) -> None:
        shutil.rmtree(self.root / "sessions" / session_id, ignore_errors=True)

    @contextlib.contextmanager
    def call_dir(self) -> Iterator[Path]:
        """A folder for one API call's files, removed when the call ends."""
        path = self._child("calls", uuid.uuid4().hex)
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def bytes_used(self) -> int:
        return sum(f.stat().st_size for f in self.root.rglob("*") if f.is_file())

    def close(self) -> None:
        self._remove()
