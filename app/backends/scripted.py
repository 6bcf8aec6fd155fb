"""A deterministic backend that replays scripted model text, for tests and UI development.

It behaves like the real one where the UI can tell: text arrives in token-sized pieces from a
background "generation" thread, ``cancel`` ends that thread within one step, and an exception
can be raised mid-stream (e.g. a simulated out-of-memory error).
"""

from __future__ import annotations

import queue
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from model.generation import GenerationSettings
from model.processing import Message

from .base import BackendInfo, ConcurrentCompletions, ReplyHandle

Script = str | Callable[[Sequence[Message]], str]
_PIECE = re.compile(r"<\|[^|]*\|>|<｜[^｜]*｜>|\s*[^\s<]+|\s+|<")


def split_into_pieces(text: str) -> list[str]:
    """Token-like chunks: whole special tags, words with their leading space."""
    return _PIECE.findall(text)


@dataclass
class GenerationRecord:
    """What one scripted generation did, for assertions."""

    pieces_total: int
    cancel_event: threading.Event
    pieces_sent: int = 0
    cancelled_at: int | None = None
    finished: threading.Event = field(default_factory=threading.Event)


class ScriptedBackend(ConcurrentCompletions):
    def __init__(
        self,
        script: Script = "Hello.",
        *,
        info: BackendInfo | None = None,
        fail_after: int | None = None,
        failure: BaseException | None = None,
        gate: threading.Semaphore | Callable[[Sequence[Message]], threading.Semaphore | None] | None = None,
        tokens_per_image: int = 421,
    ) -> None:
        self.script = script
        self.info = info or BackendInfo(model_id="scripted", precision="n/a", device="cpu")
        self.fail_after = fail_after
        self.failure = failure
        # When set (or returned for a conversation), each piece waits for one release: tests pace streams.
        self.gate = gate
        self.tokens_per_image = tokens_per_image
        self.records: list[GenerationRecord] = []
        self.conversations: list[list[Message]] = []

    def count_tokens(self, conversation: Sequence[Message], *, system_prompt: str = "") -> int:
        words = sum(len(m.text.split()) + 4 for m in conversation) + len(system_prompt.split())
        return words + self.tokens_per_image * sum(len(m.images) for m in conversation)

    in_flight = 4  # replies are instant: a few at once is enough to exercise the concurrency

    def stream(
        self,
        conversation: Sequence[Message],
        settings: GenerationSettings,
        *,
        system_prompt: str = "",
        cancel_event: threading.Event | None = None,
    ) -> ReplyHandle:
        self.conversations.append(list(conversation))
        text = self.script(conversation) if callable(self.script) else self.script
        pieces = split_into_pieces(text)[: settings.max_new_tokens]
        gate = self.gate(conversation) if callable(self.gate) else self.gate
        event = cancel_event or threading.Event()
        record = GenerationRecord(pieces_total=len(pieces), cancel_event=event)
        self.records.append(record)
        out: queue.Queue[str | BaseException | None] = queue.Queue()

        def generate() -> None:
            try:
                for index, piece in enumerate(pieces):
                    if gate is not None:
                        gate.acquire()
                    if event.is_set():
                        record.cancelled_at = index
                        return
                    if self.fail_after is not None and index >= self.fail_after:
                        raise self.failure or RuntimeError("scripted failure")
                    out.put(piece)
                    record.pieces_sent += 1
            except BaseException as exc:
                out.put(exc)
            finally:
                out.put(None)
                record.finished.set()

        worker = threading.Thread(target=generate, name="scripted-generate", daemon=True)
        worker.start()

        def deltas() -> Iterator[str]:
            try:
                while (item := out.get()) is not None:
                    if isinstance(item, BaseException):
                        raise item
                    yield item
            finally:
                if worker.is_alive():  # the consumer left early: cancel, like the real backend
                    event.set()
                    if gate is not None:
                        gate.release()  # let a paced worker observe the cancel
                worker.join()

        return ReplyHandle(deltas(), event)


def demo_script(conversation: Sequence[Message]) -> str:
    """Plausible canned replies for UI work without a model: boxes for Find, prose otherwise."""
    prompt = conversation[-1].text if conversation else ""
    match = re.search(r"<\|ref\|>(.*?)<\|/ref\|>", prompt, re.DOTALL)
    if match:
        phrase = match.group(1).strip()
        seed = sum(map(ord, phrase))
        x1, y1 = 100 + seed % 300, 120 + (seed * 7) % 300
        return f"<|ref|>{phrase}<|/ref|><|det|>[[{x1}, {y1}, {x1 + 350}, {y1 + 400}]]<|/det|>"
    if prompt.startswith("<|grounding|>"):
        return (
            "The <|ref|>main subject<|/ref|><|det|>[[210, 150, 700, 930]]<|/det|> stands in front of "
            "<|ref|>the background<|/ref|><|det|>[[0, 0, 999, 520]]<|/det|>."
        )
    return "This is the scripted demo backend: start the app without --backend scripted to run the real model."
