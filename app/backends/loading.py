"""A backend that loads in the background, so the page is up (and says what is happening) at once."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from model.generation import GenerationSettings
from model.processing import Message

from .base import Backend, BackendError, BackendInfo, ReplyHandle

log = logging.getLogger("vl2-studio")


class BackgroundLoadedBackend:
    """Wraps a loader; calls wait for it, and a failed load becomes a readable error on every call."""

    def __init__(self, loader: Callable[[Callable[[str], None]], Backend], placeholder: BackendInfo) -> None:
        self._placeholder = placeholder
        self.phase = "starting"
        self._backend: Backend | None = None
        self._error: BaseException | None = None
        self._ready = threading.Event()
        self.started_at = time.monotonic()
        self._thread = threading.Thread(target=self._load, args=(loader,), name="vl2-load", daemon=True)
        self._thread.start()

    def _report(self, phase: str) -> None:
        self.phase = phase

    def _load(self, loader: Callable[[Callable[[str], None]], Backend]) -> None:
        try:
            self._backend = loader(self._report)
        except BaseException as exc:  # reported to the UI and terminal; the server keeps running
            self._error = exc
            log.error("model failed to load: %s", exc)
        finally:
            self._ready.set()

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self._backend is not None

    @property
    def status(self) -> str:
        if self._error is not None:
            return f"Model failed to load: {self._error}"
        if not self._ready.is_set():
            elapsed = time.monotonic() - self.started_at
            return f"Loading the model — {self.phase} ({elapsed:.0f} s)"
        return "ready"

    @property
    def info(self) -> BackendInfo:
        return self._backend.info if self._backend is not None else self._placeholder

    def reuse_summary(self) -> str:
        summary = getattr(self._backend, "reuse_summary", None)
        return summary() if summary is not None else ""

    def _wait(self) -> Backend:
        self._ready.wait()
        if self._backend is None:
            raise BackendError(f"The model is not available: {self._error}")
        return self._backend

    def count_tokens(self, conversation: Sequence[Message], *, system_prompt: str = "") -> int:
        return self._wait().count_tokens(conversation, system_prompt=system_prompt)

    def stream(
        self,
        conversation: Sequence[Message],
        settings: GenerationSettings,
        *,
        system_prompt: str = "",
        cancel_event: threading.Event | None = None,
    ) -> ReplyHandle:
        return self._wait().stream(conversation, settings, system_prompt=system_prompt, cancel_event=cancel_event)

    def batch_size(self, conversation: Sequence[Message], settings: GenerationSettings) -> int:
        return self._wait().batch_size(conversation, settings)

    def complete_many(
        self,
        conversations: Sequence[Sequence[Message]],
        settings: GenerationSettings,
        *,
        cancel_event: threading.Event | None = None,
    ) -> list[str]:
        return self._wait().complete_many(conversations, settings, cancel_event=cancel_event)

    def wait(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)
