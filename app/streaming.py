"""A reply's text, paced for the page: at most one piece per interval, and none left behind.

A backend that floods tokens (a GPU, vLLM) would otherwise send the browser hundreds of updates a
second, each re-rendered there, and the page — its Stop button included — falls seconds behind.
Coalescing alone is not enough: if the backend goes quiet right after a held-back token, that
token would wait for the next one. So the backend is read in a thread of its own, and text held
back is handed on as soon as its interval is up, whether or not more has come.

Only text crosses threads: the caller parses it and changes the session in its own thread, so
what a page update shows (the chat, the canvas, the panel) is always one consistent state.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator

from .backends.base import ReplyHandle

_END = object()
BOX_CLOSE = "<|/det|>"


def coalesced(handle: ReplyHandle, *, interval: float, box_interval: float) -> Iterator[str]:
    """The handle's deltas, joined into pieces at most one per ``interval`` (``box_interval`` when
    the held text closes a box, so boxes show sooner than words). The first piece goes at once.

    Closing this generator cancels the reply; the reading thread then closes the handle (a
    generator can only be closed by the thread that runs it)."""
    inbox: queue.Queue = queue.Queue()

    def read() -> None:
        try:
            for delta in handle:
                inbox.put(delta)
        except BaseException as exc:  # handed to the consumer, which raises it in its own thread
            inbox.put(exc)
        finally:
            handle.close()
            inbox.put(_END)

    reader = threading.Thread(target=read, name="vl2-reply", daemon=True)
    reader.start()
    held = ""
    last_sent = float("-inf")

    def wait_for(text: str) -> float:
        return box_interval if BOX_CLOSE in text else interval

    try:
        while True:
            due = last_sent + wait_for(held) if held else None
            try:
                item = inbox.get(timeout=None if due is None else max(due - time.monotonic(), 0.0))
            except queue.Empty:  # the backend went quiet with text held back: hand it on now
                piece, held, last_sent = held, "", time.monotonic()
                yield piece
                continue
            if item is _END or isinstance(item, BaseException):
                if held:
                    piece, held = held, ""
                    yield piece
                if item is _END:
                    return
                raise item
            held += item
            if time.monotonic() - last_sent >= wait_for(held):
                piece, held, last_sent = held, "", time.monotonic()
                yield piece
    finally:
        if reader.is_alive():
            handle.cancel()
