"""Where the app writes files: one private folder per process, a sub-folder per session.

The folder is made fresh with ``mkdtemp`` (mode 0700, a new random name), never an existing one
adopted: a fixed name under the shared temp dir lets other local users read every upload, or
plant the folder (or a symlink) first and have the app write into it. A session's folder goes
when the session ends (the controller then never asks for it again); the whole folder when the
process exits.
API calls write nothing here.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from pathlib import Path


def _remove_tree(root: Path, owner_pid: int) -> None:
    if os.getpid() == owner_pid:  # not from a forked child (ZeroGPU's) that happens to exit normally
        shutil.rmtree(root, ignore_errors=True)


class PrivateStorage:
    def __init__(self, parent: str | os.PathLike[str] | None = None) -> None:
        if parent is not None:
            Path(parent).mkdir(parents=True, exist_ok=True)
        self.root = Path(tempfile.mkdtemp(prefix="vl2-studio-", dir=parent))
        self._remove = weakref.finalize(self, _remove_tree, self.root, os.getpid())

    def _child(self, *parts: str) -> Path:
        path = self.root.joinpath(*parts)
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        return path

    def session_dir(self, session_id: str) -> Path:
        return self._child("sessions", session_id)

    def discard_session(self, session_id: str) -> None:
        shutil.rmtree(self.root / "sessions" / session_id, ignore_errors=True)

    def bytes_used(self) -> int:
        return sum(f.stat().st_size for f in self.root.rglob("*") if f.is_file())

    def close(self) -> None:
        self._remove()
