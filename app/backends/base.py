"""The seam between the UI and whatever produces model text.

The UI only ever calls :meth:`Backend.stream` (a reply for a conversation with images, as text
deltas) and :meth:`ReplyHandle.cancel`. The in-process transformers runtime is one backend; a
remote OpenAI-compatible engine (vLLM, SGLang) is another; a scripted one replays text for tests.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
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

    def complete_many(
        self,
        conversations: Sequence[Sequence[Message]],
        settings: GenerationSettings,
        *,
        cancel_event: threading.Event | None = None,
    ) -> list[str]:
        """Each conversation's whole reply, computed together (a labelling job's batch)."""
        ...

    def batch_size(self, conversation: Sequence[Message], settings: GenerationSettings) -> int:
        """How many conversations like this one ``complete_many`` should get at once."""
        ...


def complete_concurrently(
    backend: Backend,
    conversations: Sequence[Sequence[Message]],
    settings: GenerationSettings,
    *,
    cancel_event: threading.Event | None = None,
) -> list[str]:
    """Every reply streamed at the same time, one thread per request.

    A serving engine (vLLM, SGLang) batches requests that are in flight together, so this is how
    a labelling job scales past one machine. The first failure cancels the others and is raised.
    """
    event = cancel_event or threading.Event()

    def reply(conversation: Sequence[Message]) -> str:
        if event.is_set():
            return ""
        return "".join(backend.stream(conversation, settings, cancel_event=event))

    with ThreadPoolExecutor(max_workers=max(1, len(conversations)), thread_name_prefix="vl2-request") as pool:
        futures = [pool.submit(reply, conversation) for conversation in conversations]
        try:
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        except BaseException:  # Ctrl-C while waiting: leaving the pool must not wait for whole replies
            event.set()
            raise
        if any(future.exception() is not None for future in done):
            event.set()  # the others stop at their next delta instead of running to the end
        return [future.result() for future in futures]


class ConcurrentCompletions:
    """``complete_many`` for a backend whose requests can run side by side (a serving engine)."""

    # Requests a labelling job keeps in flight at once: the engine batches them (and queues past
    # its own limit), so more than a handful only lengthens each request's wait.
    in_flight: int = 8

    def batch_size(self, conversation: Sequence[Message], settings: GenerationSettings) -> int:
        return self.in_flight

    def complete_many(
        self,
        conversations: Sequence[Sequence[Message]],
        settings: GenerationSettings,
        *,
        cancel_event: threading.Event | None = None,
    ) -> list[str]:
        """Every request in flight at once, so the engine batches them."""
        return complete_concurrently(self, conversations, settings, cancel_event=cancel_event)
