"""The job's journal: one JSON line per finished image, appended and flushed as each batch completes.

It is the job's only state. A rerun reads it back and skips every key it holds, so an interrupted
job (Ctrl-C, a crash, a killed process, a full disk) resumes with no image done twice and none
lost. A process killed in the middle of a write leaves at most one partial last line; reading
drops it and the next append starts on a fresh line, so that image is simply done again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .records import ImageRecord

JOURNAL_NAME = "journal.jsonl"
JOB_NAME = "job.json"


class JobMismatch(ValueError):
    """The output folder holds a different job: resuming it with these settings would mix datasets."""


class Journal:
    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / JOURNAL_NAME
        self.job_path = out_dir / JOB_NAME

    def claim(self, job: dict[str, Any]) -> None:
        """Record what this folder's job is, or check that a resumed one asks the same."""
        if self.job_path.exists():
            earlier = json.loads(self.job_path.read_text(encoding="utf-8"))
            differing = sorted(k for k in job if k in earlier and earlier[k] != job[k])
            if differing:
                changes = "; ".join(f"{k}: {earlier[k]!r} there, {job[k]!r} now" for k in differing)
                raise JobMismatch(
                    f"{self.job_path.parent} holds another job ({changes}). Run the same command to resume "
                    "it, or choose another --out folder."
                )
            return
        self.job_path.parent.mkdir(parents=True, exist_ok=True)
        staging = self.job_path.with_suffix(".tmp")
        staging.write_text(json.dumps(job, indent=2, ensure_ascii=False), encoding="utf-8")
        staging.replace(self.job_path)

    def records(self) -> list[ImageRecord]:
        """Every complete record, in the order written (a key written twice counts once, the last)."""
        if not self.path.exists():
            return []
        by_key: dict[str, ImageRecord] = {}
        with self.path.open("rb") as journal:
            for line in journal:
                if not line.endswith(b"\n"):
                    break  # the partial last line of a killed write
                try:
                    record = ImageRecord.from_dict(json.loads(line))
                except (ValueError, KeyError, TypeError):
                    continue  # a damaged line: that image is done again
                by_key.pop(record.key, None)
                by_key[record.key] = record
        return list(by_key.values())

    def append(self, records: Iterable[ImageRecord]) -> None:
        lines = b"".join(json.dumps(r.to_dict(), ensure_ascii=False).encode("utf-8") + b"\n" for r in records)
        if not lines:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab") as journal:
            if journal.tell() and not self._ends_with_newline():
                journal.write(b"\n")  # end a partial line left by a killed write, so it stays one bad line
            journal.write(lines)
            journal.flush()
            os.fsync(journal.fileno())

    def _ends_with_newline(self) -> bool:
        with self.path.open("rb") as journal:
            journal.seek(-1, os.SEEK_END)
            return journal.read(1) == b"\n"
