"""The seam between the UI and whatever produces model text.

The UI only ever calls :meth:`Backend.stream` (a reply for a conversation with images, as text
deltas) and :meth:`ReplyHandle.cancel`. The in-process transformers runtime is one backend; a
remote OpenAI-compatible engine (vLLM, SGLang) is another; a scripted one replays text for tests.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from model.generation import GenerationSettings
from model.processing import Message


@dataclass(frozen=True)
class BackendInfo:
    """What the header shows: which model, in which precision, on which device."""

    model_id: str
    precision: str
    device: str
    context_length: int = 4096
    details: str = ""

    def headline(self) -> str:
        return f"{self.model_id} · {self.precision} · {self.device}"


@dataclass
class ReplyHandle:
    """One running reply: iterate for text deltas; ``cancel()`` stops the generation itself."""

    deltas: Iterator[str]
    cancel_event: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancel_event.set()

    def close(self) -> None:
        """Stop consuming; a generation that is still running is cancelled and joined."""
        close = getattr(self.deltas, "close", None)
        if close is not None:
            close()

    def __iter__(self) -> Iterator[str]:
        return self.deltas


class BackendError(RuntimeError):
    """A failure the user should read (out of memory, engine unreachable…); the app keeps serving."""


class Backend(Protocol):
    info: BackendInfo

    def stream(
        self,
        conversation: Sequence[Message],
        settings: GenerationSettings,
        *,
        system_prompt: str = "",
        cancel_event: threading.Event | None = None,
    ) -> ReplyHandle:
        """Start a reply for ``conversation`` (last message from the user)."""
        ...

    def count_tokens(self, conversation: Sequence[Message], *, system_prompt: str = "") -> int:
        """Prompt length in tokens (image tokens included), for trimming history to the context."""
        ...
